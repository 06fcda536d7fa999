"""Bad input fails fast (docs/reliability.md, item 8): more than 200 malformed configs, command-line
overrides, data files and workdirs, each ending `diffjax train` with exit status 2 and one line
naming the key and the fix, no traceback, nothing written and nothing compiled.

Most cases run in this process through ``cli.main`` (with ``loop.train`` replaced by a tripwire);
a handful run as real processes to check the wall time and the absence of a traceback.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from diffjax import cli
from diffjax import run as run_lib
from diffjax.train import config as config_lib
from diffjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "toy2d_icfm.py")
DIGITS = str(ROOT / "configs" / "digits_fm.py")
COUNTS = [
  "train.steps",
  "train.batch_size",
  "train.fused_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.accumulate_steps",
  "sample.num",
  "sample.steps",
  "distributed.heartbeat_timeout_s",
  "distributed.barrier_timeout_s",
]
RATES = [
  "optimizer.learning_rate",
  "optimizer.weight_decay",
  "optimizer.grad_clip_norm",
  "objective.sigma",
  "train.ema_decay",
  "objective.label_dropout",
  "optimizer.eps",
  "train.step_timeout_s",
  "train.save_timeout_s",
]
NAMES = [
  "data.kind",
  "data.target",
  "data.source",
  "model.name",
  "objective.name",
  "train.compute_dtype",
  "optimizer.name",
  "optimizer.decay",
]
# Wrong combinations within one objective, each rejected with its reason.
COMBINATIONS = [
  ("diffusion", ["zero_terminal_snr=true", "prediction=eps"], "zero_terminal_snr"),
  ("diffusion", ["zero_terminal_snr=true", "prediction=v", "weighting=elbo"], "infinite"),
  ("diffusion", ["prediction=velocity"], "d alpha / dt"),
  ("diffusion", ["num_diffusion_steps=1"], "num_diffusion_steps=1"),
  ("otcfm", ["label_dropout=1.0"], "label_dropout=1.0"),
  ("continuous_diffusion", ["schedule=vp", "t_min=0.0"], "t_min"),
  ("continuous_diffusion", ["weighting=elbo", "time_sampler=logit_normal"], "weighting"),
  ("continuous_diffusion", ["prediction=score"], "prediction"),
  ("edm", ["s_tmin=10.0", "s_tmax=1.0"], "s_tmin"),
  ("edm", ["sigma_min=90.0"], "sigma_min"),
  ("marginal_fm", ["path=vp"], "path='vp'"),
  ("marginal_fm", ["num_points=0"], "num_points=0"),
]


def objective_cases() -> list[tuple[str, list[str], str]]:
  """Generated from the objectives table: for every objective, an unknown value for each of its
  string keywords, a negative value for each numeric one its check bounds, a key it does not
  take; and every combination above."""
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  cases = []
  for name, spec in sorted(objectives.OBJECTIVES.items()):
    start = ["--config.data.source=normal", f"--config.objective.name={name}"]
    for key, default in objectives.defaults(spec.build).items():
      if isinstance(default, str):
        bad = {**objectives.defaults(spec.build), key: "nonesuch"}
        if spec.check(**bad):  # a name the objective looks up
          cases.append(
            (CONFIG, [*start, f"--config.objective.{key}=nonesuch"], f"objective.{key}='nonesuch'")
          )
      elif isinstance(default, float) and not isinstance(default, bool):
        bad = {**objectives.defaults(spec.build), key: -0.5}
        if spec.check(**bad):
          cases.append(
            (CONFIG, [*start, f"--config.objective.{key}=-0.5"], f"objective.{key}=-0.5")
          )
    cases.append(
      (CONFIG, [*start, "--config.objective.nonesuch_key=1"], "objective.nonesuch_key: unknown key")
    )
  for name, settings, fragment in COMBINATIONS:
    cases.append(
      (
        CONFIG,
        [
          "--config.data.source=normal",
          f"--config.objective.name={name}",
          *[f"--config.objective.{s}" for s in settings],
        ],
        fragment,
      )
    )
  return cases


def _flat_schema():
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  walk(config_lib.base_config().to_dict(), "")
  return flat


def override_cases() -> list[tuple[str, list[str], str]]:
  """(config file, overrides, fragment the one error line must contain)."""
  cases = []
  for key, default in _flat_schema().items():
    if key.startswith("model."):
      continue  # model keywords belong to the chosen model
    group, _, leaf = key.rpartition(".")
    cases.append(
      (CONFIG, [f"--config.{group + '.' if group else ''}{leaf}_x=1"], f"{leaf}_x: unknown key")
    )
    if isinstance(default, bool):
      cases.append((CONFIG, [f"--config.{key}=maybe"], "expected a boolean"))
    elif isinstance(default, int):
      cases += [
        (CONFIG, [f"--config.{key}=abc"], "expected an integer"),
        (CONFIG, [f"--config.{key}=1.5"], "expected an integer"),
        (CONFIG, [f"--config.{key}=true"], "expected an integer"),
      ]
    elif isinstance(default, float):
      cases.append((CONFIG, [f"--config.{key}=abc"], "expected a number"))
    elif isinstance(default, tuple):
      cases.append((CONFIG, [f"--config.{key}=((1,"], "expected a tuple"))
  for key in COUNTS:
    cases += [
      (CONFIG, [f"--config.{key}=-3"], f"{key}=-3: must be > 0"),
      (CONFIG, [f"--config.{key}=0"], f"{key}=0: must be > 0"),
    ]
  for key in RATES:
    cases += [
      (CONFIG, [f"--config.{key}=nan"], f"{key}=nan: must be a finite number"),
      (CONFIG, [f"--config.{key}=inf"], f"{key}=inf: must be a finite number"),
      (CONFIG, [f"--config.{key}=-0.5"], f"{key}=-0.5"),
    ]
  for key in NAMES:
    cases.append((CONFIG, [f"--config.{key}=nonesuch"], f"{key}='nonesuch': unknown"))
  cases += objective_cases()
  for batch in (60, 12, 100, 4):
    cases.append((CONFIG, [f"--config.train.batch_size={batch}"], "not divisible by"))
  cases += [
    (CONFIG, ["--config.train.accumulate_steps=3"], "not divisible by"),
    (CONFIG, ["--config.mesh.fsdp=3"], "does not use the 8 devices"),
    (CONFIG, ["--config.mesh.data=3"], "does not use the 8 devices"),
    (CONFIG, ["--config.mesh.data=0"], "mesh.data"),
    (CONFIG, ["--config.train.ema_decay=1.0"], "train.ema_decay=1.0"),
    (CONFIG, ["--config.objective.label_dropout=1.0"], "objective.label_dropout=1.0"),
    (CONFIG, ["--config.data.shape=(3,)"], "data.shape=(3,)"),
    (CONFIG, ["--config.data.shape=(2, 2)"], "data.shape=(2, 2)"),
    (CONFIG, ["--config.model.width=-4"], "model 'mlp'"),
    (CONFIG, ["--config.model.depthh=2"], "model.depthh: unknown key"),
    (CONFIG, ["--confg.train.steps=1"], "expected --config.<key>=<value>"),
    (CONFIG, ["train.steps=1"], "expected --config.<key>=<value>"),
    (CONFIG, ["--config.train.steps"], "expected --config.<key>=<value>"),
    (CONFIG, ["--config.train=1"], "is a group"),
    (CONFIG, ["--config.data.kind=images"], "data.target='8gaussians': unknown"),
    (DIGITS, ["--config.data.shape=(16, 16, 1)"], "(8, 8, 1)"),
    (DIGITS, ["--config.data.source=moons"], "data.source='moons'"),
    (CONFIG + ":small", ["--config.train.steps=0"], "train.steps=0"),
    (CONFIG + ":nonesuch_variant", [], "unknown variant 'nonesuch_variant'"),
  ]
  return cases


def file_cases(tmp: pathlib.Path) -> list[tuple[str, list[str], str]]:
  """Config files, data files and paths that are malformed."""
  tmp.mkdir(parents=True, exist_ok=True)

  def config_file(name, body):
    path = tmp / f"{name}.py"
    path.write_text(body)
    return str(path)

  header = "from diffjax.train.config import base_config\n"
  cases = [
    (
      config_file(
        "bool_for_int",
        header + "def get_config():\n  c = base_config()\n  c.train.steps = True\n  return c\n",
      ),
      [],
      "train.steps=True: expected an integer, got a boolean",
    ),
    (
      config_file(
        "nan_for_int",
        header + "def get_config():\n  c = base_config()\n"
        "  c.train.steps = float('nan')\n  return c\n",
      ),
      [],
      "steps",
    ),
    (
      config_file(
        "nan_rate",
        header + "def get_config():\n  c = base_config()\n"
        "  c.optimizer.learning_rate = float('nan')\n  return c\n",
      ),
      [],
      "optimizer.learning_rate=nan",
    ),
    (
      config_file(
        "extra_key",
        header + "def get_config():\n  c = base_config()\n  c.train.stepz = 5\n  return c\n",
      ),
      [],
      "train.stepz: unknown key",
    ),
    (
      config_file(
        "none_value",
        header + "def get_config():\n  c = base_config()\n  c.optimizer.decay = None\n  return c\n",
      ),
      [],
      "optimizer.decay=None",
    ),
    (
      config_file(
        "str_shape",
        header + "def get_config():\n  c = base_config()\n  c.data.shape = '2'\n  return c\n",
      ),
      [],
      "shape",
    ),
    (
      config_file(
        "group_replaced",
        header + "def get_config():\n  c = base_config()\n  c.train = 3\n  return c\n",
      ),
      [],
      "'train'",
    ),
    (
      config_file("returns_dict", "def get_config():\n  return {'seed': 0}\n"),
      [],
      "expected an ml_collections.ConfigDict",
    ),
    (config_file("no_get_config", "x = 1\n"), [], "has no get_config()"),
    (config_file("syntax_error", "def get_config(:\n"), [], "failed to load: SyntaxError"),
    (
      config_file("raises", "def get_config():\n  raise RuntimeError('boom')\n"),
      [],
      "RuntimeError: boom",
    ),
    (
      config_file("no_variant", header + "def get_config():\n  return base_config()\n") + ":small",
      [],
      "TypeError",
    ),
    (config_file("import_error", "import nonesuch_module\n"), [], "ModuleNotFoundError"),
    (str(tmp / "missing.py"), [], "does not exist"),
    (str(tmp), [], "does not exist"),
  ]
  (tmp / "binary.py").write_bytes(bytes(range(256)) * 4)
  cases.append((str(tmp / "binary.py"), [], "failed to load"))

  rng = np.random.default_rng(0)
  good = rng.integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
  labels = np.zeros(16, np.int32)
  npz = {
    "random_bytes": lambda p: p.write_bytes(rng.bytes(300)),
    "empty_file": lambda p: p.write_bytes(b""),
    "truncated_zip": lambda p: (
      np.savez(p, image=good, label=labels),
      p.write_bytes(p.read_bytes()[:200]),
    ),
    "object_array": lambda p: np.savez(p, image=np.array([None, 1], dtype=object), label=labels),
    "no_image_key": lambda p: np.savez(p, pixels=good, label=labels),
    "no_label_key": lambda p: np.savez(p, image=good),
    "three_dims": lambda p: np.savez(p, image=good[..., 0], label=labels),
    "nan_pixels": lambda p: np.savez(
      p, image=np.full((16, 8, 8, 1), np.nan, np.float32), label=labels
    ),
    "wrong_shape": lambda p: np.savez(p, image=np.zeros((16, 4, 4, 1), np.uint8), label=labels),
    "labels_mismatch": lambda p: np.savez(p, image=good, label=labels[:3]),
    "float_labels": lambda p: np.savez(p, image=good, label=labels.astype(np.float32)),
    "empty_array": lambda p: np.savez(p, image=good[:0], label=labels[:0]),
    "out_of_range_ints": lambda p: np.savez(p, image=good.astype(np.int32) * 1000, label=labels),
  }
  for name, write in npz.items():
    path = tmp / f"{name}.npz"
    write(path)
    # Labels are read only for a conditional model; 16 examples hold one batch of 16.
    labels_needed = ["--config.data.num_classes=10"] if name == "no_label_key" else []
    batch = ["--config.train.batch_size=16", *labels_needed]
    cases.append(
      (DIGITS, ["--config.data.target=npz", f"--config.data.path={path}", *batch], "data.")
    )
  cases += [
    (
      DIGITS,
      ["--config.data.target=npz", f"--config.data.path={tmp / 'nope.npz'}"],
      "does not exist",
    ),
    (DIGITS, ["--config.data.target=npz", "--config.data.path="], "data.path is empty"),
    (DIGITS, ["--config.data.target=npz", f"--config.data.path={tmp}"], "data.path="),
    (
      DIGITS,
      ["--config.data.target=folder", f"--config.data.path={tmp / 'nope'}"],
      "does not exist",
    ),
  ]
  (tmp / "empty_folder").mkdir()
  cases.append(
    (
      DIGITS,
      ["--config.data.target=folder", f"--config.data.path={tmp / 'empty_folder'}"],
      "data.path=",
    )
  )
  return cases


@pytest.fixture()
def tripwire(monkeypatch):
  """Reaching the train loop (hence compiling anything) fails the test."""

  def no_training(*args, **kwargs):
    raise AssertionError("a malformed input reached training")

  monkeypatch.setattr(loop, "train", no_training)


def _check_one_line(code, err, fragment, context):
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2, (context, code, err)
  assert len(lines) == 1 and lines[0].startswith("diffjax: error: "), (context, err)
  assert fragment in lines[0], (context, fragment, lines[0])
  assert "Traceback" not in err


def test_more_than_200_malformed_inputs_fail_in_one_line(tmp_path, capsys, tripwire):
  cases = override_cases() + file_cases(tmp_path / "files")
  assert len(cases) >= 200, len(cases)
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("untouched")
  for i, (config, overrides, fragment) in enumerate(cases):
    # Alternate a workdir that does not exist (it must not be created) and one that does (it
    # must be left byte-identical).
    workdir = tmp_path / f"new{i}" if i % 2 else existing
    code = cli.main(["train", "--config", config, "--workdir", str(workdir), *overrides])
    _check_one_line(code, capsys.readouterr().err, fragment, (config, overrides))
    if i % 2:
      assert not workdir.exists(), (config, overrides)
    else:
      assert [p.name for p in existing.iterdir()] == ["keep.txt"], (config, overrides)
      assert (existing / "keep.txt").read_text() == "untouched"


def test_bad_workdirs_and_full_disk(tmp_path, capsys, tripwire, monkeypatch):
  """A file, a file as a parent, no write permission and a nearly full disk (simulated: this
  runs as root on a large disk) each fail in one line before anything is written."""
  tiny = ["--config.train.steps=4"]
  blocker = tmp_path / "file"
  blocker.write_text("x")
  for workdir, fragment in ((blocker, "is a file"), (blocker / "sub", "is a file")):
    code = cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), *tiny])
    _check_one_line(code, capsys.readouterr().err, fragment, workdir)
  assert blocker.read_text() == "x"

  real_access = os.access
  monkeypatch.setattr(
    run_lib.os, "access", lambda p, mode: "readonly_dir" not in str(p) and real_access(p, mode)
  )
  (tmp_path / "readonly_dir").mkdir()
  code = cli.main(
    ["train", "--config", CONFIG, "--workdir", str(tmp_path / "readonly_dir" / "w"), *tiny]
  )
  _check_one_line(code, capsys.readouterr().err, "is not writable", "read-only")

  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(run_lib.shutil, "disk_usage", lambda p: usage._replace(free=5 << 20))
  code = cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "full"), *tiny])
  _check_one_line(code, capsys.readouterr().err, "MiB free", "full disk")
  assert not (tmp_path / "full").exists() and not (tmp_path / "readonly_dir" / "w").exists()


def test_disk_error_during_a_run_is_one_line(tmp_path, capsys, monkeypatch):
  """An ENOSPC raised while the run writes (a failing writer) ends in one line, status 3."""
  import errno

  def failing_train(config, workdir):
    raise OSError(errno.ENOSPC, "No space left on device", str(workdir))

  monkeypatch.setattr(loop, "train", failing_train)
  code = cli.main(
    ["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), "--config.train.steps=4"]
  )
  err = capsys.readouterr().err
  assert code == 3 and "No space left on device" in err and "Traceback" not in err
  assert len([l for l in err.splitlines() if l.strip()]) == 1


SUBPROCESS_CASES = [
  (CONFIG, ["--config.train.stepz=3"], "train.stepz: unknown key"),
  # The schema is checked before jax.distributed.initialize, which would otherwise wait for
  # a coordinator that does not exist.
  (
    CONFIG,
    [
      "--config.distributed.enabled=true",
      "--config.distributed.coordinator_address=127.0.0.1:9",
      "--config.distributed.num_processes=2",
      "--config.train.steps=-1",
    ],
    "train.steps=-1",
  ),
  (DIGITS, ["--config.data.target=npz", "--config.data.path=/nonexistent.npz"], "does not exist"),
]


@pytest.mark.slow
def test_real_processes_fail_fast_without_traceback(tmp_path):
  """Wall time from process start to exit, one line, no traceback, nothing written. The claim
  is 5 s (docs/reliability.md has the figures); the bounds here leave room for a CI host
  running other tests in parallel: 15 s for errors found before the name tables are imported,
  60 s for the npz case, whose checks import the model and loss modules (ott-jax alone takes
  2 to 7 s to import)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  times = []
  for config, overrides, fragment in SUBPROCESS_CASES:
    workdir = tmp_path / "wd"
    start = time.monotonic()
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "diffjax.cli",
        "train",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *overrides,
      ],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=ROOT,
      env=env,
    )
    times.append(time.monotonic() - start)
    _check_one_line(proc.returncode, proc.stderr, fragment, overrides)
    assert not workdir.exists()
  assert max(times[:2]) < 15.0 and times[2] < 60.0, times
  print("fail-fast seconds:", [round(t, 2) for t in times])
  assert not math.isnan(sum(times))
