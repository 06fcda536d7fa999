"""The workdir as a cluster treats it (issue 19, points 3, 6 and 10): one trainer at a time with a
lock that a killed run does not leave held, side files that tolerate damage and vanish during a
run, and fused chunks that end on every logging and checkpoint step."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny  # pylint: disable=wrong-import-order

from diffjax import cli
from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train import trainer as trainer_lib
from diffjax.train.metrics_log import MetricsWriter, read_metrics
from diffjax.train.workdir_lock import LOCK_FILE, WorkdirError, WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Four steps, a checkpoint every two: enough for a lock, a resume and a damaged log.
TINY = [*tiny.TINY, "--config.train.steps=4", "--config.train.checkpoint_every=2"]


def tiny_config(*overrides: str):
  return tiny.tiny_config("--config.train.steps=4", "--config.train.checkpoint_every=2", *overrides)


def train(config, workdir, monkeypatch):
  """loop.train on one device without the end-of-run plot."""
  original = trainer_lib.build_experiment
  monkeypatch.setattr(
    trainer_lib,
    "build_experiment",
    lambda cfg, *, mesh: original(cfg, mesh=mesh)._replace(plot=None),
  )
  config_lib.validate(config, num_devices=1)
  return loop.train(config, workdir, devices=jax.devices()[:1])


def one_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("diffjax: error: "), err
  return lines[0]


@pytest.fixture()
def no_compile(monkeypatch):
  """Building the trainer (the first step towards a compile) fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError("the run got as far as building the trainer")

  monkeypatch.setattr(loop, "make_trainer", refuse)


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
  )
  return env


# ---- 19.3: the workdir lock ----------------------------------------------------------------------


def test_second_lock_is_refused_naming_the_holder_until_released(tmp_path):
  with WorkdirLock(tmp_path / "wd"):
    body = json.loads((tmp_path / "wd" / LOCK_FILE).read_text())
    assert body["pid"] == os.getpid() and body["host"] and body["started"]
    with pytest.raises(WorkdirError) as info:
      WorkdirLock(tmp_path / "wd").acquire()
    message = str(info.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message
    assert f"host {body['host']}" in message and body["started"] in message
  with WorkdirLock(tmp_path / "wd"):  # released: the next run takes it
    pass
  assert WorkdirLock(tmp_path / "other", enabled=False).__enter__()._fd is None


_HOLDER = """
import sys, time
from diffjax.train.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_of_a_sigkilled_process_does_not_block_the_resume(tmp_path):
  """A live holder in another process refuses this one; once it is killed with SIGKILL its lock
  file stays (with its body) but the kernel has dropped the lock."""
  workdir = tmp_path / "wd"
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE, env=_env(), text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=f"pid {holder.pid},"):
      WorkdirLock(workdir).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == holder.pid  # stale file
  with WorkdirLock(workdir):
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("plant", ["symlink", "directory"])
def test_lock_file_of_the_wrong_kind_is_one_line(tmp_path, plant):
  workdir = tmp_path / "wd"
  workdir.mkdir()
  target = tmp_path / "outside.txt"
  target.write_text("keep")
  if plant == "symlink":
    (workdir / LOCK_FILE).symlink_to(target)
  else:
    (workdir / LOCK_FILE).mkdir()
  with pytest.raises(WorkdirError, match=LOCK_FILE) as info:
    WorkdirLock(workdir).acquire()
  assert "\n" not in str(info.value) and target.read_text() == "keep"


def test_cli_train_on_a_held_workdir_exits_2_before_anything(tmp_path, capsys, no_compile):
  workdir = tmp_path / "wd"
  with WorkdirLock(workdir):
    code = cli.main(["train", "--config", tiny.CONFIG, "--workdir", str(workdir), *TINY])
  line = one_line(capsys)
  assert code == 2 and f"pid {os.getpid()}" in line and "in use" in line
  assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]  # no config.json, nothing


@pytest.mark.slow
def test_real_second_trainer_is_refused_then_resumes_after_the_first(tmp_path):
  """Two `diffjax train` processes: the second exits 2 at once naming the first; after the first
  is preempted (SIGTERM, exit 0) the same command resumes from its checkpoint."""
  workdir = tmp_path / "wd"
  args = [
    "--config.train.steps=1000000",
    "--config.train.fused_steps=50",
    "--config.train.log_every=50",
    "--config.train.checkpoint_every=1000000",
    "--config.train.batch_size=32",
    "--config.model.width=16",
    "--config.train.progress_bar=false",
  ]
  command = [sys.executable, "-m", "diffjax.cli", "train", "--config", tiny.CONFIG]
  command += ["--workdir", str(workdir)]
  # A file, not a pipe nobody reads: the progress lines of a long run would fill a pipe.
  log_path = tmp_path / "first.log"
  first_log = open(log_path, "w")  # noqa: SIM115 -- closed when the run ends
  first = subprocess.Popen([*command, *args], env=_env(), stderr=first_log, text=True)
  try:
    deadline = time.monotonic() + 120
    while not (workdir / "metrics.jsonl").is_file() or not read_metrics(workdir / "metrics.jsonl"):
      assert first.poll() is None and time.monotonic() < deadline, log_path.read_text()
      time.sleep(0.2)
    started = time.monotonic()
    second = subprocess.run([*command, *args], env=_env(), capture_output=True, text=True)
    refused_s = time.monotonic() - started
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"pid {first.pid}," in lines[0] and "in use" in lines[0]
    assert refused_s < 15, refused_s  # a Python start and a config load; no compile
    assert first.poll() is None  # the first run never noticed
  finally:
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0
    first_log.close()
  stopped = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  resumed = subprocess.run(
    [*command, *args[1:], f"--config.train.steps={stopped + 50}"],
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from step {stopped}" in resumed.stderr
  assert read_metrics(workdir / "metrics.jsonl")[-1]["step"] == stopped + 50


# ---- 19.6: side files ----------------------------------------------------------------------------


def _rows(*steps):
  return [{"step": s, "loss": 1.0 / s} for s in steps]


def test_damaged_metrics_lines_are_skipped_with_one_warning(tmp_path, caplog):
  """A non-UTF-8 byte, garbage, JSON that is no row: skipped, counted in one warning; the good
  lines kept; a resume rewrites the file without them and appends."""
  path = tmp_path / "metrics.jsonl"
  good = [json.dumps(r).encode() for r in _rows(2, 4, 6, 8)]
  path.write_bytes(
    b"\n".join(
      [
        good[0],
        b'{"step": 3, "loss": 0.\xff5}',  # one byte that is not UTF-8
        good[1],
        b"\x00\x00garbage{{",
        b'{"step": "5"}',
        b"[1, 2]",
        b"[" * 100_000,  # nested past the recursion limit
        good[2],
        good[3],
        b'{"step": 10, "lo',  # a kill's fragment: quiet
      ]
    )
  )
  with caplog.at_level(logging.WARNING, logger="diffjax"):
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6, 8]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "skipped 5 damaged" in warnings[0], warnings
  writer = MetricsWriter(tmp_path, resume_step=6, tensorboard=False)
  writer.write(8, {"loss": 0.5})
  writer.close()
  assert path.read_bytes() == b"".join(
    json.dumps(r).encode() + b"\n" for r in [*_rows(2, 4, 6), {"step": 8, "loss": 0.5}]
  )


def test_planted_tmp_and_metrics_links_are_never_written_through(tmp_path, caplog):
  outside = tmp_path / "outside.txt"
  outside.write_text("precious\n")
  workdir = tmp_path / "wd"
  workdir.mkdir()
  path = workdir / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _rows(2, 4)))
  (workdir / "metrics.jsonl.tmp").symlink_to(outside)
  with caplog.at_level(logging.WARNING, logger="diffjax"):
    MetricsWriter(workdir, resume_step=2, tensorboard=False).close()
  assert outside.read_text() == "precious\n" and not os.path.lexists(workdir / "metrics.jsonl.tmp")
  assert [r["step"] for r in read_metrics(path)] == [2]
  assert any("symbolic link" in r.getMessage() for r in caplog.records)
  (workdir / "metrics.jsonl.tmp").write_text("stale")  # a regular stale tmp file: removed
  MetricsWriter(workdir, resume_step=2, tensorboard=False).close()
  assert [r["step"] for r in read_metrics(path)] == [2]
  path.unlink()
  path.symlink_to(outside)  # metrics.jsonl itself a link: replaced, never read or written
  writer = MetricsWriter(workdir, resume_step=2, tensorboard=False)
  writer.write(4, {"loss": 0.25})
  writer.close()
  assert outside.read_text() == "precious\n" and not path.is_symlink()
  assert [r["step"] for r in read_metrics(path)] == [4]


def test_vanished_side_files_are_recreated_with_a_warning(tmp_path, caplog):
  import shutil

  writer = MetricsWriter(tmp_path, resume_step=0)
  writer.write(1, {"loss": 1.0})
  (tmp_path / "metrics.jsonl").unlink()
  shutil.rmtree(tmp_path / "tensorboard")
  with caplog.at_level(logging.WARNING, logger="diffjax"):
    writer.write(2, {"loss": 0.5})
    writer.write(3, {"loss": 0.25})
  writer.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2 and all("vanished" in w for w in warnings), warnings
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 3]
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().st_size > 0
  # Moved aside (same as deleted for the writer), then a folder in its place: one line.
  writer = MetricsWriter(tmp_path, resume_step=3, tensorboard=False)
  (tmp_path / "metrics.jsonl").rename(tmp_path / "moved.jsonl")
  writer.write(4, {"loss": 0.125})
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [4]
  (tmp_path / "metrics.jsonl").unlink()
  (tmp_path / "metrics.jsonl").mkdir()
  with pytest.raises(WorkdirError, match="metrics.jsonl") as info:
    writer.write(5, {"loss": 0.0625})
  assert "\n" not in str(info.value)
  writer.close()


@pytest.mark.parametrize("plant", ["metrics_dir", "tensorboard_file", "metrics_fifo"])
def test_side_file_of_the_wrong_kind_exits_2_in_one_line(tmp_path, capsys, plant, no_compile):
  workdir = tmp_path / "wd"
  workdir.mkdir()
  if plant == "metrics_dir":
    (workdir / "metrics.jsonl").mkdir()
  elif plant == "metrics_fifo":
    os.mkfifo(workdir / "metrics.jsonl")
  else:
    (workdir / "tensorboard").write_text("not a folder")
  code = cli.main(["train", "--config", tiny.CONFIG, "--workdir", str(workdir), *TINY])
  line = one_line(capsys)
  assert code == 2 and ("metrics.jsonl" in line or "tensorboard" in line), line
  assert "move it out of the workdir" in line


# ---- 19.10: chunks end on every logging and checkpoint step --------------------------------------


def _chunks(plan: loop.ChunkPlan, start: int = 0) -> list[int]:
  ends, step = [], start
  while step < plan.total:
    length = plan.length(step)
    assert 1 <= length <= plan.fused
    step += length
    ends.append(step)
  return ends


@pytest.mark.parametrize(
  "fused, log_every, checkpoint_every, total, lengths",
  [
    (100, 100, 1000, 3000, {100}),  # the common case: one program, as before
    (100, 1, 100, 300, {1}),
    (100, 100, 150, 3000, {100, 50}),
    (100, 7, 100, 1400, {1, 2, 3, 4, 5, 6, 7}),  # seven remainders: compiled as they are
    (100, 13, 1000, 26000, {1, 2, 4, 8}),  # thirteen: powers of two instead
    (100, 1000, 1001, 1_001_000, {1, 2, 4, 8, 16, 32, 64, 100}),
    (100, 100, 1000, 12345, {100, 45}),  # the run's end is a chunk end too
    (64, 3, 5, 60, {1, 2, 3}),
  ],
)
def test_chunk_plan_ends_on_every_log_and_checkpoint_step(
  fused, log_every, checkpoint_every, total, lengths
):
  plan = loop.ChunkPlan(
    fused=fused, log_every=log_every, checkpoint_every=checkpoint_every, total=total
  )
  ends = _chunks(plan)
  steps = set(ends)
  assert set(range(log_every, total + 1, log_every)) <= steps
  assert set(range(checkpoint_every, total + 1, checkpoint_every)) <= steps
  assert ends[-1] == total
  starts = [0, *ends[:-1]]
  assert {b - a for a, b in zip(starts, ends)} == lengths
  assert len(lengths) <= 2 + np.log2(fused)  # programs compiled, whatever the settings
  # A resume at any chunk end cuts the rest of the run where the uninterrupted run did.
  for resume in ends[:: max(1, len(ends) // 7)]:
    assert _chunks(plan, resume) == [e for e in ends if e > resume]


class _Manager:
  directory = "/nonexistent"

  def wait_until_finished(self):
    pass


def _loop_ends(config, *, start=0):
  """(chunk lengths, logged steps, saved steps) of the real loop driven by a trainer that
  only counts steps: the loop's schedule without a compile."""
  from types import SimpleNamespace

  from diffjax.train.preemption import PreemptionWatcher
  from diffjax.train.watchdog import StepWatchdog

  chunks, logged, saved = [], [], []

  def advance(state, num_steps, batch):
    chunks.append(num_steps)
    zeros = np.zeros(num_steps)
    return state + num_steps, {"loss": zeros, "grad_norm": zeros, "nonfinite_streak": zeros}

  trainer = SimpleNamespace(
    experiment=SimpleNamespace(sample_batch=object()), advance=advance, num_seeds=1
  )
  run = loop._Run(
    config,
    trainer,
    _Manager(),
    StepWatchdog(0),
    PreemptionWatcher(),
    checkpoints=pathlib.Path("/nonexistent"),
    fingerprint={},
    is_lead=True,
    start=start,
    resumed=start > 0,
  )
  run.progress = None
  run._record = lambda metrics: logged.append(run.step)
  run._save = lambda state, data_state: saved.append(run.step)
  assert run.loop(start, {}) == config.train.steps
  return chunks, logged, saved


def test_loop_logs_and_saves_on_the_exact_steps():
  config = tiny_config(
    "--config.train.steps=7",
    "--config.train.fused_steps=100",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
  )
  assert _loop_ends(config) == ([1] * 7, [1, 2, 3, 4, 5, 6, 7], [3, 6, 7])
  config = tiny_config(
    "--config.train.steps=650",
    "--config.train.fused_steps=100",
    "--config.train.log_every=100",
    "--config.train.checkpoint_every=150",
  )
  chunks, logged, saved = _loop_ends(config)
  assert chunks == [100, 50, 50, 100, 100, 50, 50, 100, 50]
  assert logged == [100, 200, 300, 400, 500, 600, 650] and saved == [150, 300, 450, 600, 650]
  assert _loop_ends(config, start=150) == (chunks[2:], logged[1:], saved[1:])


@pytest.mark.slow
def test_log_every_1_with_100_fused_steps_logs_every_step(tmp_path, monkeypatch):
  config = tiny_config(
    "--config.train.steps=6",
    "--config.train.fused_steps=100",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
  )
  result = train(config, tmp_path, monkeypatch)
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
  assert result["trace_count"] == 1  # one program of one step, not one per step


@pytest.mark.slow
def test_checkpoint_every_150_saves_at_150_and_300_and_resumes_bit_equal(tmp_path, monkeypatch):
  """fused_steps=100, log_every=100, checkpoint_every=150: chunks of 100 and 50 steps (two
  programs), saves at 150 and 300, logs at 100, 200, 300; a run stopped at 150 and resumed ends
  bit-equal to the uninterrupted one."""
  overrides = [
    "--config.train.fused_steps=100",
    "--config.train.log_every=100",
    "--config.train.checkpoint_every=150",
    "--config.train.keep_checkpoints=5",
  ]
  whole = train(tiny_config(*overrides, "--config.train.steps=300"), tmp_path / "a", monkeypatch)
  assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir()) == [150, 300]
  assert [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")] == [100, 200, 300]
  assert whole["trace_count"] == 2
  train(tiny_config(*overrides, "--config.train.steps=150"), tmp_path / "b", monkeypatch)
  resumed = train(tiny_config(*overrides, "--config.train.steps=300"), tmp_path / "b", monkeypatch)
  assert resumed["start_step"] == 150 and resumed["trace_count"] == 2  # chunks of 50 and 100
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(whole["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  logged = lambda w: [
    (r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(w / "metrics.jsonl")
  ]
  assert [row for row in logged(tmp_path / "b") if row[0] != 150] == logged(tmp_path / "a")
