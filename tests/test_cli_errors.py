"""`sample` and `evaluate` against bad arguments and a damaged workdir (issue 19, points 4, 5, 8
and 9), and the bounded program cache of the sample generators.

Each bad input ends with one line on stderr naming the value and the fix, exit status 2, before
anything is restored or compiled; non-finite samples and a full disk end with one line and
status 3, and nothing is written. Most cases run in this process through ``cli.main`` with a
tiny analytic model standing in for a restored checkpoint (the generator, the chunking, the
checks and the writer are the real ones).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import cli
from diffjax import run as run_lib
from diffjax.data import images
from diffjax.samplers import generate as generate_lib
from diffjax.train import config as config_lib
from diffjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy2d_icfm.py")
DIGITS = str(ROOT / "configs" / "digits_fm.py")


def one_line(capsys, code: int, expected: int = 2) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == expected, (code, err)
  assert len(lines) == 1 and lines[0].startswith("diffjax: error: "), err
  assert "Traceback" not in err
  return lines[0]


@pytest.fixture()
def workdir(tmp_path) -> pathlib.Path:
  """A workdir holding only the config.json `diffjax train` writes for the toy config."""
  config = config_lib.load_config_file(TOY)
  path = tmp_path / "w"
  path.mkdir()
  (path / "config.json").write_text(config_lib.config_to_json(config))
  return path


@pytest.fixture()
def no_restore(monkeypatch):
  """Restoring a checkpoint (the first step that compiles) fails the test."""

  def restore(*args, **kwargs):
    raise AssertionError("a bad input reached the checkpoint restore")

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)
  monkeypatch.setattr(loop, "train", restore)


def _velocity(params, x, t, cond):
  del cond
  return jnp.tanh(x @ params) * (1.0 - t)[:, None]


def _nan_velocity(params, x, t, cond):
  return _velocity(params, x, t, cond) * jnp.nan


PARAMS = jnp.asarray([[0.5, -0.2], [0.1, 0.3]])


@pytest.fixture()
def fake_restore(monkeypatch, workdir):
  """``restore_for_inference`` returning an analytic velocity model; ``use(apply)`` swaps it."""
  holder = {"apply": _velocity}

  def restore(path):
    config = config_lib.config_from_json((pathlib.Path(path) / "config.json").read_text())
    generate = generate_lib.flow_generator(
      apply=lambda *a: holder["apply"](*a),
      source=lambda key, n: jax.random.normal(key, (n, 2)),
      data_shape=(2,),
    )
    experiment = types.SimpleNamespace(generate=generate, target_sampler=None, log_likelihood=None)
    return config, experiment, PARAMS, 7

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)
  return holder


def _sample(workdir, out, *extra) -> int:
  return cli.main(["sample", "--workdir", str(workdir), "--out", str(out), *extra])


# ---- 19.4: numeric arguments ------------------------------------------------------------------

NUMERIC_CASES = [
  (["--guidance", "nan"], "--guidance nan"),
  (["--guidance", "inf"], "--guidance inf"),
  (["--guidance=-inf"], "--guidance -inf"),
  (["--guidance", "1e30"], "--guidance 1e+30"),
  (["--guidance", "-1"], "--guidance -1.0"),
  (["--num", "0"], "--num 0"),
  (["--num", "-5"], "--num -5"),
  (["--num", str(2**31)], f"--num {2**31}"),
  (["--steps", "0"], "--steps 0"),
  (["--steps", "-2"], "--steps -2"),
  (["--steps", "1000000"], "--steps 1000000"),
  (["--seed", "-1"], "--seed -1"),
  (["--seed", str(2**32)], f"--seed {2**32}"),
  (["--seed-index", "-1"], "--seed-index -1"),
  (["--chunk-size", "0"], "--chunk-size 0"),
  (["--chunk-size", "-3"], "--chunk-size -3"),
]


@pytest.mark.parametrize("args, fragment", NUMERIC_CASES)
def test_numeric_arguments_fail_before_restoring(
  workdir, tmp_path, capsys, no_restore, args, fragment
):
  out = tmp_path / "s.npz"
  line = one_line(capsys, _sample(workdir, out, *args))
  assert fragment in line and "must be" in line, line
  assert not out.exists()
  if not args[0].startswith("--guidance"):  # evaluate has no --guidance
    line = one_line(capsys, cli.main(["evaluate", "--workdir", str(workdir), *args]))
    assert fragment in line, line


def test_seed_range_is_what_jax_keys_hold():
  """The bound is real: 2**32 wraps to the key of seed 0; 2**32 - 1 does not."""
  assert (jax.random.PRNGKey(2**32) == jax.random.PRNGKey(0)).all()
  assert not (jax.random.PRNGKey(2**32 - 1) == jax.random.PRNGKey(0)).all()


def test_evaluate_needs_two_samples(workdir, capsys, no_restore):
  line = one_line(capsys, cli.main(["evaluate", "--workdir", str(workdir), "--num", "1"]))
  assert "--num 1: must be an integer in 2 .." in line


def test_non_finite_samples_fail_and_write_nothing(workdir, tmp_path, capsys, fake_restore):
  fake_restore["apply"] = _nan_velocity
  out = tmp_path / "s.npz"
  line = one_line(capsys, _sample(workdir, out, "--num", "9", "--chunk-size", "4"), expected=3)
  assert "9 of 9 samples are not finite" in line and f"nothing was written to {out}" in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


# ---- 19.5: a damaged WORKDIR/config.json -------------------------------------------------------


def _config_cases() -> list[tuple[str, bytes, str, bool]]:
  """``(name, config.json bytes, fragment of the message, whether the file cannot be parsed)``:
  the file as `train` writes it, truncated, emptied, replaced, with a group nulled or a value
  of the wrong type or range."""
  good = config_lib.config_to_json(config_lib.load_config_file(TOY))
  data = json.loads(good)
  cases = [
    (f"truncated at {n}", good[:n].encode(), "is not valid JSON", True)
    for n in (1, 2, len(good) // 3, len(good) // 2, len(good) - 2)
  ]
  cases += [
    ("empty", b"", "is empty", True),
    ("blank", b"  \n", "is empty", True),
    ("brace", b"{", "is not valid JSON", True),
    ("binary", bytes(range(256)) * 4, "is not UTF-8", True),
    ("utf16", good.encode("utf-16"), "is not UTF-8", True),
    ("nul", b"\x00" * 64, "is not valid JSON", True),
    ("empty object", b"{}", "has no 'model' group", True),
    ("array", b"[]", "holds a JSON array", True),
    ("null", b"null", "holds a JSON null", True),
    ("string", b'"config"', "holds a JSON string", True),
    ("number", b"3", "holds a JSON number", True),
    ("only train null", b'{"train": null}', "has train=null", True),
  ]
  for group in ("train", "sample", "optimizer", "data", "objective", "model"):
    cases.append((f"{group} null", json.dumps({**data, group: None}).encode(), f"{group}=", True))
  cases.append(("train list", json.dumps({**data, "train": [1, 2]}).encode(), "train=[1, 2]", True))

  def edited(group, key, value):
    return json.dumps({**data, group: {**data[group], key: value}}).encode()

  cases += [
    ("steps string", edited("sample", "steps", "ten"), "does not match the config schema", True),
    ("batch string", edited("train", "batch_size", "64"), "does not match", True),
    ("steps null", edited("sample", "steps", None), "sample.steps=None: expected", False),
    ("unknown key", edited("sample", "stepz", 3), "unknown key sample.stepz", True),
    ("steps 0", edited("sample", "steps", 0), "sample.steps=0: must be > 0", False),
    ("steps -3", edited("sample", "steps", -3), "sample.steps=-3: must be > 0", False),
    ("num 0", edited("sample", "num", 0), "sample.num=0: must be > 0", False),
    ("ema 2", edited("train", "ema_decay", 2.0), "train.ema_decay=2.0", False),
    ("model name", json.dumps({**data, "model": {"name": "nope"}}).encode(), "nope", False),
  ]
  return cases


CONFIG_CASES = _config_cases()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_damaged_config_json_is_one_line(workdir, tmp_path, capsys, no_restore, command):
  assert len(CONFIG_CASES) >= 30
  path = workdir / "config.json"
  for name, data, fragment, _ in CONFIG_CASES:
    path.write_bytes(data)
    args = ["--out", str(tmp_path / "s.npz")] if command == "sample" else []
    line = one_line(capsys, cli.main([command, "--workdir", str(workdir), *args]))
    assert str(path) in line and fragment in line, (name, line)
    assert "restore it from a copy of the workdir" in line, (name, line)
  assert not (tmp_path / "s.npz").exists()


def test_damaged_config_json_does_not_crash_train(workdir, capsys, no_restore):
  """Every file that cannot be parsed (``[]`` and ``{"train": null}`` among them) stops a
  resume with one line; nothing in the workdir changes."""
  path = workdir / "config.json"
  for name, data, fragment, unparsable in CONFIG_CASES:
    if not unparsable:  # a valid file with other sample.* values: train replaces it
      continue
    path.write_bytes(data)
    code = cli.main(["train", "--config", TOY, "--workdir", str(workdir)])
    line = one_line(capsys, code)
    assert str(path) in line and fragment in line, (name, line)
    assert "train in a new --workdir" in line
    assert path.read_bytes() == data and [p.name for p in workdir.iterdir()] == ["config.json"]


# ---- 19.8: sampling in chunks -----------------------------------------------------------------


def _flow_generator(apply=_velocity, num_classes=0):
  def labelled(params, x, t, cond):
    out = apply(params, x, t, None)
    return out if cond is None else out + 0.1 * cond[:, None].astype(out.dtype)

  return generate_lib.flow_generator(
    apply=labelled,
    source=lambda key, n: jax.random.normal(key, (n, 2)),
    data_shape=(2,),
    num_classes=num_classes,
  )


def _stochastic_generator():
  """A continuous VP diffusion whose eps prediction is analytic; "euler_ancestral" draws fresh
  noise at every step."""
  from diffjax import schedules  # pylint: disable=import-outside-toplevel

  return generate_lib.continuous_diffusion_generator(
    apply=lambda params, x, t, cond: 0.5 * jnp.tanh(x @ params),
    schedule=schedules.get_continuous_schedule("cosine"),
    prediction="eps",
    data_shape=(2,),
  )


@pytest.mark.parametrize(
  "make, options",
  [
    (_flow_generator, dict(sampler="euler")),
    pytest.param(_flow_generator, dict(sampler="dopri5"), marks=pytest.mark.slow),
    (lambda: _flow_generator(num_classes=3), dict(sampler="heun", guidance=2.0)),
    (_stochastic_generator, dict(sampler="euler_ancestral")),
  ],
)
def test_chunked_samples_do_not_depend_on_chunk_size(make, options):
  """Sample ``i`` comes from ``fold_in(key, i)``: any chunk size gives the one-batch draw
  (``chunk_size >= num``); another key gives other samples (the comparison can fail)."""
  generate = make()
  key = jax.random.PRNGKey(3)
  whole = generate(PARAMS, key, 10, steps=4, chunk_size=10, **options)["samples"]
  assert whole.shape == (10, 2) and np.isfinite(whole).all()
  assert len(np.unique(whole.round(6), axis=0)) == 10
  for chunk in (3,):
    part = generate(PARAMS, key, 10, steps=4, chunk_size=chunk, **options)["samples"]
    np.testing.assert_allclose(part, whole, rtol=1e-5, atol=1e-6)
  other = generate(PARAMS, jax.random.PRNGKey(4), 10, steps=4, chunk_size=3, **options)
  assert np.abs(other["samples"] - whole).min() > 1e-4


def test_chunks_share_one_program_and_report_progress():
  """The last chunk is padded: drawing 10 or 25 samples in chunks of 4 traces the model once,
  and ``on_chunk`` sees every sample once."""
  traces = []

  def counting(params, x, t, cond):
    traces.append(x.shape)
    return _velocity(params, x, t, cond)

  generate = _flow_generator(counting)
  seen = []
  out = generate(PARAMS, jax.random.PRNGKey(0), 10, steps=3, chunk_size=4, on_chunk=seen.append)
  assert seen == [4, 4, 2] and out["samples"].shape == (10, 2) and out["nfe"] == 3
  count = len(traces)
  assert count >= 1
  seen.clear()
  generate(PARAMS, jax.random.PRNGKey(1), 25, steps=3, chunk_size=4, on_chunk=seen.append)
  assert len(traces) == count and sum(seen) == 25 and len(seen) == 7
  assert generate.cache_info().currsize == 1


def test_cli_samples_do_not_depend_on_chunk_size(workdir, tmp_path, capsys, fake_restore):
  outs = []
  for chunk in ("3", "1000"):
    out = tmp_path / f"s{chunk}.npz"
    assert _sample(workdir, out, "--num", "11", "--chunk-size", chunk) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [11, 2]
    outs.append(np.load(out)["samples"])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)  # float rounding only


# ---- 13.6: the jit cache is bounded -----------------------------------------------------------


def test_jit_cache_is_bounded_and_reused(monkeypatch):
  traces = []

  def counting(params, x, t, cond):
    traces.append(x.shape)
    return _velocity(params, x, t, cond)

  assert generate_lib.JIT_CACHE_SIZE >= 4
  # Read when a generator is built; small here to keep the test fast: limit + 1 sizes (each a
  # program) overflow it, and an unbounded cache would hold all of them.
  limit = 2
  monkeypatch.setattr(generate_lib, "JIT_CACHE_SIZE", limit)
  generate = _flow_generator(counting)
  for num in range(1, limit + 2):
    generate(PARAMS, jax.random.PRNGKey(0), num, steps=1)
  assert generate.cache_info().currsize == limit
  count = len(traces)
  for seed in range(3):  # the same settings again: no new trace
    generate(PARAMS, jax.random.PRNGKey(seed), limit + 1, steps=1)
  assert len(traces) == count
  generate(PARAMS, jax.random.PRNGKey(0), 1, steps=1)  # evicted long ago: traced again
  assert len(traces) > count


# ---- 19.9: one line, not a traceback ----------------------------------------------------------


def test_out_that_cannot_be_written(workdir, tmp_path, capsys, no_restore):
  folder = tmp_path / "folder.npz"
  folder.mkdir()
  for path in (folder, tmp_path):
    line = one_line(capsys, _sample(workdir, path))
    assert f"--out {path} is a directory" in line
  blocker = tmp_path / "file"
  blocker.write_text("x")
  line = one_line(capsys, _sample(workdir, blocker / "s.npz"))
  assert "is a file, not a folder" in line
  line = one_line(capsys, _sample(workdir, tmp_path / "s.txt"))
  assert "must be an .npz file" in line
  assert blocker.read_text() == "x" and not any(folder.iterdir())


def test_planted_tmp_symlink_is_not_followed(workdir, tmp_path, capsys, fake_restore):
  victim = tmp_path / "victim.txt"
  victim.write_text("outside the output folder")
  folder = tmp_path / "out"
  folder.mkdir()
  out = folder / "s.npz"
  (folder / "s.tmp.npz").symlink_to(victim)
  (folder / ".s.npz.tmp").symlink_to(victim)
  assert _sample(workdir, out, "--num", "5") == 0
  assert victim.read_text() == "outside the output folder"
  assert not out.is_symlink() and np.load(out)["samples"].shape == (5, 2)
  # The picture beside the samples is written the same way.
  (folder / "s.tmp.png").symlink_to(victim)
  assert _sample(workdir, out, "--num", "5") == 0
  assert victim.read_text() == "outside the output folder"
  listing = [".s.npz.tmp", "s.npz", "s.png", "s.tmp.npz", "s.tmp.png"]
  assert sorted(p.name for p in folder.iterdir()) == listing
  # An output that is itself a link is replaced, its target left alone.
  out.unlink()
  out.symlink_to(victim)
  assert _sample(workdir, out, "--num", "5") == 0
  assert victim.read_text() == "outside the output folder" and not out.is_symlink()


def test_data_set_smaller_than_the_batch(tmp_path, capsys, monkeypatch):
  source = images.ImageSource(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int32))
  with pytest.raises(images.DatasetTooSmallError) as caught:
    images.make_loader(source=source, batch_size=8, seed=0)
  assert (caught.value.records, caught.value.total) == (4, 4)
  assert images.make_loader(source=source, batch_size=4, seed=0) is not None

  def train(config, workdir):
    images.make_loader(source=source, batch_size=config.train.batch_size, seed=0)

  monkeypatch.setattr(loop, "train", train)
  code = cli.main(["train", "--config", TOY, "--workdir", str(tmp_path / "w")])
  line = one_line(capsys, code)
  assert "holds 4 records, fewer than train.batch_size=" in line
  assert "--config.train.batch_size to at most 4" in line


def _png_claiming(width: int, height: int) -> bytes:
  """A valid 1x1 PNG whose header (IHDR, with its CRC fixed) claims ``width x height``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  buffer = io.BytesIO()
  Image.new("L", (1, 1)).save(buffer, "PNG")
  data = bytearray(buffer.getvalue())
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


@pytest.mark.parametrize("side", [20000, 10000])  # Pillow: error above 2x its limit, else warning
def test_decompression_bomb_in_an_image_folder(tmp_path, capsys, no_restore, side):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  root = tmp_path / "images"
  (root / "a").mkdir(parents=True)
  Image.new("L", (8, 8)).save(root / "a" / "0.png")
  (root / "a" / "1.png").write_bytes(_png_claiming(side, side))
  with pytest.raises(ValueError, match="too large to decode safely"):
    images.load_folder(root=str(root), channels=1)
  code = cli.main(
    [
      "train",
      "--config",
      DIGITS,
      "--workdir",
      str(tmp_path / "w"),
      "--config.data.target=folder",
      f"--config.data.path={root}",
    ]
  )
  line = one_line(capsys, code)
  assert "1.png" in line and "too large to decode safely" in line and f"{side * side}" in line


def _report_unraisable(message: str) -> None:
  """An exception reported through ``sys.unraisablehook``, as tensorstore's future callbacks
  report theirs (``PyErr_WriteUnraisable``): CPython reports a ``__del__`` error that way."""

  class Callback:
    def __del__(self):
      raise RuntimeError(message)

  Callback()


def test_disk_error_reports_are_held_back(tmp_path, capsys, caplog, monkeypatch):
  """What a full disk sets off around the error (orbax's thread errors with tracebacks, a
  callback into a closed event loop) is replaced by the one line, which names the workdir when
  the error has no file name."""
  workdir = tmp_path / "w"

  def failing_train(config, path):
    wrapped = ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")
    logging.getLogger("absl").error("background save failed", exc_info=wrapped)
    try:
      raise FileNotFoundError(errno.ENOENT, "No such file", "commit.tmp") from wrapped
    except FileNotFoundError:
      logging.getLogger("diffjax").exception("could not finish the checkpoint")
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    _report_unraisable("Event loop is closed")
    raise OSError(errno.ENOSPC, "No space left on device")

  unraisables = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisables.append(str(u.exc_value)))
  monkeypatch.setattr(loop, "train", failing_train)
  code = cli.main(["train", "--config", TOY, "--workdir", str(workdir)])
  line = one_line(capsys, code, expected=3)
  assert not unraisables
  assert f"No space left on device (writing {workdir})" in line and "()" not in line
  assert "the last committed checkpoint is kept" in line
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_held_back_reports_are_written_when_the_run_goes_on(tmp_path, capsys, caplog, monkeypatch):
  def train(config, path):
    logging.getLogger("absl").error("a save failed: No space left on device")
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    _report_unraisable("Event loop is closed")
    _report_unraisable("another object's finaliser failed")
    assert unraisables == ["another object's finaliser failed"]  # not held back: at once
    return loop.TrainResult(  # what the CLI's summary reads
      workdir=str(path),
      step=0,
      total=0,
      start_step=0,
      wall_s=0.0,
      final_losses=None,
      logged_step=None,
      preempted=None,
      plot_files=[],
    )

  unraisables = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisables.append(str(u.exc_value)))
  monkeypatch.setattr(loop, "train", train)
  assert cli.main(["train", "--config", TOY, "--workdir", str(tmp_path / "w")]) == 0
  assert "Event loop is closed" in capsys.readouterr().err
  assert unraisables == ["another object's finaliser failed", "Event loop is closed"]
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
    "a save failed: No space left on device"
  ]


def _can_mount_tmpfs() -> bool:
  if os.geteuid() != 0 or not shutil.which("unshare"):
    return False
  probe = subprocess.run(
    ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
  )
  return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs")
def test_real_full_disk_during_training_is_one_line(tmp_path):
  """`diffjax train` on a 70 MiB tmpfs that a filler fills once the first checkpoint exists:
  exit 3 and one line on stderr, nothing else."""
  mount = tmp_path / "disk"
  mount.mkdir()
  workdir = mount / "w"
  train = [
    sys.executable,
    "-m",
    "diffjax.cli",
    "train",
    "--config",
    TOY,
    "--workdir",
    str(workdir),
    "--config.train.steps=1000000",
    "--config.train.fused_steps=10",
    "--config.train.log_every=10",
    "--config.train.checkpoint_every=10",
    "--config.train.batch_size=64",
    "--config.model.width=32",
    "--config.train.progress_bar=false",
    "--config.train.plot_every=0",
  ]
  fill = (
    f"while [ ! -d {workdir}/checkpoints/10 ]; do sleep 0.2; done; "
    f"dd if=/dev/zero of={mount}/fill bs=1M 2>/dev/null"
  )
  script = (
    f"mount -t tmpfs -o size=70m tmpfs {mount} || exit 1; ({fill}) & "
    f"{' '.join(train)} 2>{tmp_path}/err; echo $? > {tmp_path}/rc"
  )
  subprocess.run(["unshare", "-m", "sh", "-c", script], timeout=600, cwd=ROOT, check=False)
  err = (tmp_path / "err").read_text()
  # The plain progress lines (stderr is not a terminal) are the run's own log, not a report.
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith("train step")]
  assert (tmp_path / "rc").read_text().strip() == "3", err[:3000]
  # One line: tensorstore's reports from callbacks into the closed event loop (through
  # sys.unraisablehook) are held back with the rest.
  assert len(lines) == 1, err[-3000:]
  assert "No space left on device" in lines[0] and lines[0].startswith("diffjax: error"), err
