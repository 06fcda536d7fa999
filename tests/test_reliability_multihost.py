"""Two CPU processes (jax.distributed over 127.0.0.1, gloo): preemption agreement, a dead peer,
a stuck peer (docs/reliability.md, items 5 and 6). Slow: each scenario starts two processes."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import portpicker
import pytest
from multihost_harness import ROOT, exit_times, start_two, wait_step

pytestmark = pytest.mark.slow

OVERRIDES = [
  "--config.train.steps=400",
  "--config.train.fused_steps=2",
  "--config.train.log_every=2",
  "--config.train.checkpoint_every=20",
  "--config.train.batch_size=64",
  "--config.model.width=32",
  "--config.train.progress_bar=false",
  "--config.train.async_checkpoint=false",
  "--config.sample.num=64",
  "--config.sample.steps=4",
]


def _start(workdir, extra, port, logs):
  config = str(ROOT / "configs" / "toy2d_icfm.py")
  return start_two(config, workdir, [*OVERRIDES, *extra], port, logs)


_wait_step, _exit_times = wait_step, exit_times


@pytest.mark.parametrize("target", [0, 1], ids=["coordinator", "worker"])
def test_sigterm_on_one_process_checkpoints_one_agreed_step(tmp_path, target):
  """SIGTERM to one process: both stop at the same step, write its checkpoint, exit 0; a
  restart of both resumes at exactly that step."""
  workdir = tmp_path / "wd"
  procs = _start(workdir, [], portpicker.pick_unused_port(), tmp_path)
  _wait_step(workdir, 10, procs)
  os.kill(procs[target][0].pid, signal.SIGTERM)
  times = _exit_times(procs, time.monotonic())
  logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
  codes = [p.returncode for p, _ in procs]
  assert codes == [0, 0], (codes, logs)
  steps = {int(m) for log in logs for m in re.findall(r"checkpointed step (\d+)", log)}
  assert len(steps) == 1, logs
  step = steps.pop()
  assert (workdir / "checkpoints" / str(step) / "diffjax_commit.json").exists()
  procs = _start(
    workdir, ["--config.train.steps=" + str(step + 4)], portpicker.pick_unused_port(), tmp_path
  )
  _exit_times(procs, time.monotonic())
  logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
  assert all(f"resumed from step {step} " in log for log in logs), logs
  print(
    json.dumps(
      {
        "preempted_process": target,
        "agreed_step": step,
        "exit_seconds": [round(t, 2) for t in times],
      }
    )
  )


@pytest.mark.parametrize("victim, bound", [(1, 15.0), (0, 5.0)], ids=["worker", "coordinator"])
def test_dead_peer_makes_survivor_exit(tmp_path, victim, bound):
  """kill -9 of one process: the other exits non-zero within the bound (heartbeat 10 s); the
  last committed checkpoint stays restorable and a restart of both resumes from it."""
  workdir = tmp_path / "wd"
  procs = _start(workdir, [], portpicker.pick_unused_port(), tmp_path)
  _wait_step(workdir, 30, procs)
  killed_at = time.monotonic()
  procs[victim][0].kill()
  times = _exit_times(procs, killed_at)
  survivor = procs[1 - victim][0]
  assert survivor.returncode != 0
  print(
    json.dumps(
      {
        "killed": victim,
        "survivor_exit_seconds": round(times[1 - victim], 2),
        "survivor_code": survivor.returncode,
      }
    )
  )
  assert times[1 - victim] < bound, times
  procs = _start(workdir, ["--config.train.steps=44"], portpicker.pick_unused_port(), tmp_path)
  _exit_times(procs, time.monotonic())
  assert [p.returncode for p, _ in procs] == [0, 0]
  log = (tmp_path / "p0.log").read_text()
  assert re.search(r"resumed from step (20|40) ", log), log


def test_stuck_peer_trips_the_step_watchdog(tmp_path):
  """A process stopped with SIGSTOP (alive, not stepping; heartbeat timeout 100 s so only the
  watchdog can notice): the other dumps its stacks and exits within step_timeout + 30 s; the
  stuck one, continued, exits too; the last checkpoint resumes."""
  workdir = tmp_path / "wd"
  extra = ["--config.train.step_timeout_s=10", "--config.distributed.heartbeat_timeout_s=100"]
  procs = _start(workdir, extra, portpicker.pick_unused_port(), tmp_path)
  _wait_step(workdir, 30, procs)
  stopped_at = time.monotonic()
  os.kill(procs[1][0].pid, signal.SIGSTOP)
  while procs[0][0].poll() is None and time.monotonic() - stopped_at < 60:
    time.sleep(0.05)
  first = time.monotonic() - stopped_at
  os.kill(procs[1][0].pid, signal.SIGCONT)
  times = _exit_times(procs, stopped_at)
  log0 = (tmp_path / "p0.log").read_text()
  print(
    json.dumps(
      {
        "watchdog_exit_seconds": round(first, 2),
        "both_exited_seconds": round(max(times), 2),
        "codes": [p.returncode for p, _ in procs],
      }
    )
  )
  assert procs[0][0].returncode == 75 and "no train step finished" in log0
  assert "Thread" in log0 or "File" in log0  # the stack dump
  assert max(times) < 10 + 30
  assert procs[1][0].returncode != 0
  procs = _start(workdir, ["--config.train.steps=44"], portpicker.pick_unused_port(), tmp_path)
  _exit_times(procs, time.monotonic())
  assert [p.returncode for p, _ in procs] == [0, 0]
