"""Reliability in one process: no pickle, metrics appends, the non-finite policy, checkpoint
integrity and fallback, config mismatch on resume (docs/reliability.md, items 3, 4, 7, 9, 10).

Each train run here is a 2D toy run of a few fused steps with the end-of-run plot switched off;
the runs are shared through module fixtures so the file compiles a handful of times.
"""

from __future__ import annotations

import ast
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import CONFIG, TINY, tiny_config  # pylint: disable=wrong-import-order

from diffjax import cli
from diffjax.train import checkpoint as ckpt
from diffjax.train import config as config_lib
from diffjax.train import integrity, loop
from diffjax.train import trainer as trainer_lib
from diffjax.train.metrics_log import MetricsWriter, read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _step_key_matches(key, base_key, steps, *, data: bool):
  """Whether ``key`` is the loss key (or the data key) of one of ``steps``: the loop derives
  both from the step alone (``step.step_keys``), so a test can aim at a step."""
  from diffjax.train.step import step_keys

  hits = []
  # Always four comparisons (a step never reached pads the list): runs with and without NaN
  # compile programs of one shape. Their constants differ, which XLA's CPU code may round
  # differently, so states of two such runs are compared to rounding, not bit for bit.
  for s in (tuple(steps) + (10_000,) * 4)[:4]:
    data_key, _, loss_key = step_keys(base_key, jnp.int32(s))
    hits.append(jnp.all(key == (data_key if data else loss_key)))
  return jnp.any(jnp.stack(hits))


def train_with(config, workdir, *, nan_data_steps=(), nan_grad_steps=()):
  """loop.train on one device with NaN injected into the data or the gradients of the given
  (0-based) steps, and no end-of-run plot."""
  original = trainer_lib.build_experiment
  base_key = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # init_train_state's split

  @jax.custom_vjp
  def poison_grad(x, bad):
    return x

  def poison_fwd(x, bad):
    return x, bad

  def poison_bwd(bad, g):
    return jax.tree.map(lambda a: jnp.where(bad, jnp.nan, a), g), None

  poison_grad.defvjp(poison_fwd, poison_bwd)

  def build(cfg, *, mesh):
    experiment = original(cfg, mesh=mesh)
    sample_batch, loss_fn = experiment.sample_batch, experiment.loss_fn

    def bad_sample_batch(key):
      batch = sample_batch(key)
      bad = _step_key_matches(key, base_key, nan_data_steps, data=True)
      return {**batch, "x": jnp.where(bad, jnp.nan, batch["x"])}

    def bad_loss_fn(params, key, batch):
      bad = _step_key_matches(key, base_key, nan_grad_steps, data=False)
      return loss_fn(poison_grad(params, bad), key, batch)

    return experiment._replace(sample_batch=bad_sample_batch, loss_fn=bad_loss_fn, plot=None)

  trainer_lib.build_experiment = build
  try:
    config_lib.validate(config, num_devices=1)
    return loop.train(config, workdir, devices=jax.devices()[:1])
  finally:
    trainer_lib.build_experiment = original


def abstract_state(config):
  """The restore target of ``config`` on one device (shapes only, nothing compiled)."""
  from diffjax.train import sharding as sharding_lib
  from diffjax.train.experiment import build_experiment
  from diffjax.train.optim import make_optimizer

  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  experiment = build_experiment(config, mesh=mesh)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  abstract, shardings, _ = trainer_lib.make_initial_state(
    experiment, optimizer, seed=config.seed, mesh=mesh
  )
  return ckpt.abstract_with_shardings(abstract, shardings)


def restore(workdir, config, target=None, *, move_bad=True):
  if move_bad:  # before the manager, as in the loop (orbax would delete tmp folders itself)
    ckpt.prepare_directory(workdir / "checkpoints")
  manager = ckpt.make_checkpoint_manager(workdir / "checkpoints", keep=100, async_save=False)
  try:
    return ckpt.restore_verified(
      manager,
      abstract_state(config) if target is None else target,
      config=config_lib.resume_fingerprint(config),
      move_bad=move_bad,
      config_differences=config_lib.fingerprint_differences,
    )
  finally:
    manager.close()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  """12 uninterrupted steps, checkpoints at 4, 8, 12."""
  workdir = tmp_path_factory.mktemp("clean")
  result = train_with(tiny_config(), workdir)
  return workdir, result


# ---- 10. no pickle -----------------------------------------------------------------------------


def test_package_never_uses_pickle():
  """No module of diffjax imports pickle/dill/cloudpickle/shelve/marshal or calls np.load with
  allow_pickle=True (a negative control checks the scanner catches each pattern)."""
  banned = {"pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}

  def offences(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.Import):
        found += [a.name for a in node.names if a.name.split(".")[0] in banned]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned:
        found.append(node.module)
      elif isinstance(node, ast.Call):
        for kw in node.keywords:
          if kw.arg == "allow_pickle" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False
          ):
            found.append("allow_pickle=" + ast.unparse(kw.value))
    return found

  for bad in (
    "import pickle",
    "from dill import loads",
    "import cloudpickle as cp",
    "np.load(p, allow_pickle=True)",
    "np.load(p, allow_pickle=flag)",
  ):
    assert offences(bad), bad
  assert not offences("np.load(p, allow_pickle=False)")
  files = sorted((ROOT / "diffjax").rglob("*.py")) + [ROOT / "scripts" / "torture.py"]
  assert len(files) > 20
  problems = {str(f.relative_to(ROOT)): offences(f.read_text()) for f in files if f.exists()}
  assert not {k: v for k, v in problems.items() if v}


# ---- 9. metrics appends survive kills -----------------------------------------------------------


def test_metrics_truncated_line_and_duplicates(tmp_path):
  """A kill mid-write leaves a truncated last line; a resume from step 4 keeps steps <= 4 once
  each (the last written wins), drops the rest and the fragment, and appends after them."""
  path = tmp_path / "metrics.jsonl"
  lines = [
    {"step": 2, "loss": 1.0},
    {"step": 4, "loss": 0.5},
    {"step": 4, "loss": 0.25},
    {"step": 6, "loss": 0.1},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')
  assert [r["step"] for r in read_metrics(path)] == [2, 4, 4, 6]  # fragment skipped
  writer = MetricsWriter(tmp_path, resume_step=4, tensorboard=False)
  writer.write(6, {"loss": 0.125})
  writer.write(8, {"loss": float("nan")})
  writer.close()
  rows = read_metrics(path)
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert rows[1]["loss"] == 0.25 and rows[2]["loss"] == 0.125
  assert rows[3]["loss"] is None and rows[3]["nonfinite"] == ["loss"]  # strict JSON, flagged
  assert path.read_text().endswith("\n") and path.read_text().count("\n") == 4


def test_clean_run_metrics_and_markers(clean_run):
  workdir, result = clean_run
  assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12]
  for step in (4, 8, 12):
    record, reason = integrity.read_commit(workdir / "checkpoints" / str(step))
    assert reason is None and record["step"] == step
    assert integrity.verify_files(workdir / "checkpoints" / str(step), record) is None
  record, _ = integrity.read_commit(workdir / "checkpoints" / "12")
  assert record["arrays"] == integrity.array_digests(result["state"])


# ---- 7. non-finite losses ---------------------------------------------------------------------


def test_first_nonfinite_excess():
  assert (
    loop.first_nonfinite_excess([0, 1, 2, 3, 0], [1, 2, 3, 4, 5], first_step=11, max_steps=3)
    is None
  )
  assert loop.first_nonfinite_excess(
    [1, 2, 3, 4, 5], [9, 8, 7, 6, 5], first_step=11, max_steps=3
  ) == (14, 6.0, 4)
  assert loop.first_nonfinite_excess([1], [np.nan], first_step=1, max_steps=0)[0] == 1


def test_nonfinite_within_limit_leaves_state_bit_identical(tmp_path):
  """NaN gradients at steps 3 and 4 (two, within the limit): the checkpoint at step 4 holds the
  parameters, EMA and optimizer state of step 2 (recomputed by a 2-step run), its step is 4
  and its skip counter 2; the run continues and ends finite."""
  config = tiny_config("--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=10")
  result = train_with(config, tmp_path / "a", nan_grad_steps=(2, 3))
  assert int(result["state"].step) == 12 and int(result["state"].nonfinite_streak) == 0
  two = restore_step(tmp_path / "a", config, 2)
  four = restore_step(tmp_path / "a", config, 4)
  assert int(four.step) == 4 and int(four.nonfinite_streak) == 2
  for name in ("params", "ema_params", "opt_state"):
    a, b = jax.tree.leaves(getattr(two, name)), jax.tree.leaves(getattr(four, name))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
  assert np.isfinite(np.asarray(jax.tree.leaves(result["state"].params)[0])).all()


def restore_step(workdir, config, step):
  """The state of one checkpoint step (through orbax directly)."""
  import orbax.checkpoint as ocp

  manager = ckpt.make_checkpoint_manager(workdir / "checkpoints", keep=100, async_save=False)
  try:
    return manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state(config)), data=ocp.args.JsonRestore()
      ),
    )["state"]
  finally:
    manager.close()


@pytest.mark.slow  # fast: test_user_errors.py::test_run_without_a_finite_step_halts
def test_nonfinite_halts_keeping_last_good_checkpoint_across_resume(clean_run, tmp_path):
  """NaN in the data of steps 7..10 (the default limit is 3), checkpoints every 4, a first run
  stopped at 8: steps 7, 8 are skipped and the checkpoint at 8 carries a streak of 2; the
  resumed run skips 9, reaches a streak of 4 at step 10 and halts with the step, the loss and
  the hint, writing no checkpoint, leaving the one at step 4 bit for bit as the first run wrote
  it, and that one is the clean run's step 4."""
  workdir = tmp_path / "resume"
  first = train_with(tiny_config("--config.train.steps=8"), workdir, nan_data_steps=(6, 7, 8, 9))
  assert int(first["state"].nonfinite_streak) == 2
  commit_4 = workdir / "checkpoints/4" / integrity.COMMIT_FILE
  written = json.loads(commit_4.read_text())["arrays"]
  with pytest.raises(loop.NonFiniteLossError) as info:
    train_with(tiny_config(), workdir, nan_data_steps=(6, 7, 8, 9))
  message = str(info.value)
  assert "4 consecutive steps up to step 10" in message and "loss nan" in message
  assert "optimizer.learning_rate" in message and "grad_clip_norm" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
  assert json.loads(commit_4.read_text())["arrays"] == written
  # Against the clean run to rounding, not bit for bit: the clean run's program compares the
  # step keys with other constants, and XLA's CPU code for two programs may round differently.
  mine, clean = (restore_step(w, tiny_config(), 4) for w in (workdir, clean_run[0]))
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(mine, name)), jax.tree.leaves(getattr(clean, name))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=name)


# ---- 3. integrity and fallback ----------------------------------------------------------------


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != integrity.COMMIT_FILE]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path, count=64, seed=0):
  data = bytearray(path.read_bytes())
  rng = np.random.default_rng(seed)
  for i in rng.choice(len(data), size=min(count, len(data)), replace=False):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _rewrite_marker_config(step_dir):
  path = step_dir / integrity.COMMIT_FILE
  record = json.loads(path.read_text())
  record["config"]["optimizer.learning_rate"] = 0.5
  path.write_text(json.dumps(record))


CORRUPTIONS = {
  # name: (mutation of step 12, expected step, fragment of the reason)
  "missing_metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), 8, "missing file"),
  "missing_data_file": (lambda d: _largest_file(d).unlink(), 8, "missing file"),
  "truncated_data_file": (
    lambda d: _largest_file(d).write_bytes(_largest_file(d).read_bytes()[:-7]),
    8,
    "truncated",
  ),
  "flipped_bytes": (lambda d: _flip(_largest_file(d)), 8, "corrupted bytes"),
  "zero_length_files": (
    lambda d: [
      p.write_bytes(b"") for p in d.rglob("*") if p.is_file() and p.name != integrity.COMMIT_FILE
    ],
    8,
    "zeroed",
  ),
  "no_commit_marker": (lambda d: (d / integrity.COMMIT_FILE).unlink(), 8, "no commit marker"),
  "garbled_marker": (
    lambda d: (d / integrity.COMMIT_FILE).write_text("{\"fi"),
    8,
    "unreadable commit marker",
  ),
  "iterator_state_edited": (  # same size, other step: only the digest can tell
    lambda d: (d / "data" / "metadata").write_text(
      (d / "data" / "metadata").read_text().replace("12", "11")
    ),
    8,
    "digest",
  ),
  "other_config": (_rewrite_marker_config, 8, "written by another config"),
  "stray_empty_step": (lambda d: (d.parent / "16").mkdir(), 12, "no commit marker"),
  "leftover_tmp_dir": (
    lambda d: (d.parent / "16.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True),
    12,
    None,
  ),
  "stray_file_as_step": (lambda d: (d.parent / "20").write_text("x"), 12, "not a directory"),
}


def test_corruption_modes_fall_back_to_newest_valid_step(clean_run, tmp_path, caplog):
  """Each corruption of the newest step (or beside it) restores the newest valid step, whose
  arrays equal the digest recorded when it was saved; the bad step is moved aside, not
  deleted, with one warning naming it and the reason; a temporary folder is removed."""
  workdir, _ = clean_run
  config = tiny_config()
  target = abstract_state(config)
  recorded = {
    s: json.loads((workdir / f"checkpoints/{s}" / integrity.COMMIT_FILE).read_text())
    for s in (8, 12)
  }
  for name, (mutate, expected, fragment) in CORRUPTIONS.items():
    copy = tmp_path / name
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    mutate(copy / "checkpoints" / "12")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffjax"):
      step, state, data = restore(copy, config, target)
    assert step == expected, name
    assert integrity.array_digests(state) == recorded[expected]["arrays"], name
    assert data == {"step": expected}, name
    warnings = [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()]
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert not any(integrity.TMP_MARKER in n for n in names), name
    if fragment is None:
      assert not warnings and any("interrupted save" in r.getMessage() for r in caplog.records)
      continue
    assert len(warnings) == 1 and fragment in warnings[0], (name, warnings)
    bad_step = next(n for n in ("20", "16", "12") if f"step {n} " in warnings[0])
    assert bad_step not in names, name
    moved = list((copy / ckpt.QUARANTINE).iterdir())
    assert any(p.name.startswith(bad_step + "-") for p in moved), name
    assert any(p.name.endswith(".REASON.txt") for p in moved), name


def test_resume_after_corruption_matches_uninterrupted(clean_run, tmp_path):
  """A full resume through loop.train after 64 flipped bytes in step 12 and no marker on 8:
  falls back to step 4, retrains 8 steps and ends bit-equal to the clean run."""
  workdir, result = clean_run
  copy = tmp_path / "wd"
  shutil.copytree(workdir, copy)
  _flip(_largest_file(copy / "checkpoints" / "12"))
  (copy / "checkpoints" / "8" / integrity.COMMIT_FILE).unlink()
  resumed = train_with(tiny_config(), copy)
  assert resumed["start_step"] == 4
  assert integrity.state_digest(resumed["state"]) == integrity.state_digest(result["state"])
  assert [r["step"] for r in read_metrics(copy / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12]


# ---- 4. mismatch fails loudly -----------------------------------------------------------------

MUTATIONS = [
  "--config.model.width=24",
  "--config.model.depth=3",
  "--config.model.activation=relu",
  "--config.model.name=unet",
  "--config.optimizer.name=adamw",
  "--config.optimizer.learning_rate=0.002",
  "--config.optimizer.b1=0.8",
  "--config.optimizer.b2=0.99",
  "--config.optimizer.eps=1e-6",
  "--config.optimizer.weight_decay=0.1",
  "--config.optimizer.warmup_steps=5",
  "--config.optimizer.decay=cosine",
  "--config.optimizer.grad_clip_norm=1.0",
  "--config.train.compute_dtype=bfloat16",
  "--config.train.batch_size=64",
  "--config.train.accumulate_steps=2",
  "--config.train.ema_decay=0.99",
  "--config.seed=1",
  "--config.objective.name=otcfm",
  "--config.objective.sigma=0.2",
  "--config.objective.time_sampler=logit_normal",
  "--config.data.target=moons",
  "--config.data.source=8gaussians",
  "--config.objective.name=diffusion",
]


def test_changed_config_fails_listing_the_keys(clean_run):
  workdir, _ = clean_run
  for mutation in MUTATIONS:
    config = tiny_config(mutation)
    key = mutation[len("--config.") :].split("=")[0]
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.check_resume_config(workdir, config)
    assert key in str(info.value) and "new --workdir" in str(info.value), mutation
    assert "\n" not in str(info.value)
  # The loop's knobs may change on resume.
  config_lib.check_resume_config(
    workdir,
    tiny_config(
      "--config.train.steps=40",
      "--config.train.log_every=4",
      "--config.mesh.data=1",
      "--config.train.async_checkpoint=true",
      "--config.sample.steps=9",
    ),
  )


def test_changed_array_dtype_or_shape_fails_listing_the_arrays(clean_run):
  """Orbax would cast float32 -> bfloat16 silently; the digest's dtypes catch it."""
  workdir, _ = clean_run
  config = tiny_config()
  target = abstract_state(config)
  leaves, treedef = jax.tree.flatten(target)
  for change in ("dtype", "shape"):
    new = list(leaves)
    x = new[1]
    new[1] = jax.ShapeDtypeStruct(
      x.shape if change == "dtype" else x.shape + (1,),
      jnp.bfloat16 if change == "dtype" else x.dtype,
      sharding=x.sharding,
    )
    with pytest.raises(ckpt.CheckpointMismatchError) as info:
      restore(workdir, config, jax.tree.unflatten(treedef, new), move_bad=False)
    assert "params" in str(info.value) and ("bfloat16" in str(info.value) or change == "shape")


def test_cli_resume_with_other_model_exits_2_and_writes_nothing(clean_run, capsys):
  workdir, _ = clean_run
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  code = cli.main(
    ["train", "--config", CONFIG, "--workdir", str(workdir), *TINY, "--config.model.width=48"]
  )
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("diffjax: error:")]
  assert code == 2 and len(lines) == 1 and "model.width: 16 -> 48" in lines[0], err
  assert "Traceback" not in err
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_sample_reads_json_never_python(clean_run, tmp_path, capsys):
  """A config.py planted in the workdir is never executed by `diffjax sample`."""
  workdir, _ = clean_run
  copy = tmp_path / "wd"
  shutil.copytree(workdir, copy)
  marker = tmp_path / "executed"
  (copy / "config.py").write_text(
    f"open({str(marker)!r}, 'w').write('x')\ndef get_config():\n  raise SystemExit(9)\n"
  )
  out = tmp_path / "s.npz"
  # --num 8 --steps 3: the sampling program of test_user_errors.py's edited workdir (the same
  # tiny model), found in the compilation cache when that test compiled it first.
  assert (
    cli.main(["sample", "--workdir", str(copy), "--num", "8", "--out", str(out), "--steps", "3"])
    == 0
  )
  assert not marker.exists()
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 12


# ---- 10. fuzzed checkpoint directories ---------------------------------------------------------


@pytest.mark.slow
def test_fuzzed_checkpoint_directories(clean_run, tmp_path):
  """200 random damages (1 to 3 each of: flipped, truncated, deleted, zeroed, extended or
  added files, garbage or foreign markers, stray steps, tmp folders, copies under a newer
  number): each restore gives the newest undamaged step, its arrays equal to its digest, or
  None when all are damaged; never another exception, never over 60 s."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("diffjax_torture", ROOT / "scripts" / "torture.py")
  torture = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torture)
  workdir, _ = clean_run
  config = tiny_config()
  target = abstract_state(config)
  logging.getLogger("diffjax").setLevel(logging.ERROR)  # 200 fallback warnings
  try:
    report = torture.fuzz_checkpoints(
      workdir,
      config,
      trials=200,
      seed=0,
      scratch=tmp_path,
      restore=lambda copy: restore(copy, config, target),
    )
  finally:
    logging.getLogger("diffjax").setLevel(logging.NOTSET)
  counts = report["counts"]
  assert counts["wrong"] == 0, report
  assert counts["trials"] == 200 and counts["fell_back"] > 50 and counts["newest_kept"] > 10
  assert counts["max_seconds"] < 60


_WATCHDOG_SCRIPT = """
import time
from diffjax.train.watchdog import StepWatchdog
watchdog = StepWatchdog(0.3, poll_s=0.02)
with watchdog:
  watchdog.beat(5)
  with watchdog.allow(1.5, "checkpoint save", setting="train.save_timeout_s"):
    time.sleep(0.8)  # longer than a step may take, within a save's allowance
  watchdog.beat(6)
  print("survived the slow save", flush=True)
  with watchdog.allow(0.5, "checkpoint save", setting="train.save_timeout_s"):
    time.sleep(30)  # stuck inside a save
"""


def test_watchdog_allows_slow_saves_but_catches_a_stuck_one():
  """A save may outlast train.step_timeout_s, up to train.save_timeout_s; a process stuck in a
  save is still caught (stacks dumped, exit 75) instead of hanging (docs/reliability.md, 6)."""
  import subprocess
  import sys
  import time

  started = time.monotonic()
  proc = subprocess.run(
    [sys.executable, "-c", _WATCHDOG_SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT
  )
  elapsed = time.monotonic() - started
  assert proc.returncode == 75, proc.stderr[-2000:]
  assert "survived the slow save" in proc.stdout
  assert "no checkpoint save finished" in proc.stderr
  assert "train.save_timeout_s=0.5" in proc.stderr and "after step 6" in proc.stderr
  assert "File" in proc.stderr  # the stack dump
  assert elapsed < 20, elapsed  # far below the 30 s sleep: the watchdog ended it
