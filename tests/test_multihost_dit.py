"""Multi-host at model scale: configs/digits_dit.py:small trained by two processes of two CPU
devices each (jax.distributed over 127.0.0.1, gloo) with its parameters sharded FSDP over all
four devices, one process killed with SIGKILL mid-run, both restarted: the resumed run must end
bit-equal to an uninterrupted run of the same steps on the same mesh."""

from __future__ import annotations

import json
import time

import portpicker
import pytest
from multihost_harness import ROOT, exit_times, start_two, wait_step

pytestmark = pytest.mark.slow

CONFIG = f"{ROOT / 'configs' / 'digits_dit.py'}:small"
STEPS, CHECKPOINT_EVERY = 24, 8
OVERRIDES = [
  f"--config.train.steps={STEPS}",
  "--config.train.fused_steps=2",
  "--config.train.log_every=2",
  f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
  "--config.train.keep_checkpoints=5",
  "--config.train.async_checkpoint=false",
  "--config.train.progress_bar=false",
  "--config.mesh.data=1",
  "--config.mesh.fsdp=4",
  "--config.sample.num=16",
  "--config.sample.steps=2",
  "--config.sample.num_trajectories=4",
  # Process 0 alone draws the final samples and plot while process 1 waits at the shutdown
  # barrier: on a loaded machine that takes longer than the default 120 s.
  "--config.distributed.barrier_timeout_s=900",
]
# Generous bounds: on a loaded machine each run (compiling included) can take minutes.
TIMEOUT = 900
# Both processes compile every program themselves. With the suite's persistent cache one of them
# can load programs the other still compiles, and gloo gives the first collective's peers 30 s
# to meet: on a loaded machine the early process then fails before step 1.
ENV = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def _run(workdir, logs):
  """Both processes from start (or resume) to the end; asserts both exit 0."""
  procs = start_two(CONFIG, workdir, OVERRIDES, portpicker.pick_unused_port(), logs, env=ENV)
  exit_times(procs, time.monotonic(), timeout=TIMEOUT)
  codes = [p.returncode for p, _ in procs]
  assert codes == [0, 0], (codes, [(logs / f"p{i}.log").read_text()[-2000:] for i in range(2)])


def _final(workdir) -> dict:
  """The final checkpoint's array digests and every logged loss (each step logged once)."""
  commit = json.loads((workdir / "checkpoints" / str(STEPS) / "diffjax_commit.json").read_text())
  losses = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    assert row["step"] not in losses, f"step {row['step']} logged twice"
    losses[row["step"]] = row["loss"]
  return {"arrays": commit["arrays"], "losses": losses}


def test_dit_fsdp_over_two_processes_resumes_bit_equal_after_sigkill(tmp_path):
  reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
  (tmp_path / "logs_ref").mkdir()
  _run(reference_dir, tmp_path / "logs_ref")
  reference = _final(reference_dir)
  # FSDP across the processes: the DiT's weight matrices are saved as four distinct shards
  # (digest "start:stop,...=sha;..." per shard), not as one replicated block.
  sharded = [d for name, d in reference["arrays"].items() if "params" in name and d.count("=") == 4]
  assert sharded, reference["arrays"]

  logs = tmp_path / "logs_kill"
  logs.mkdir()
  procs = start_two(CONFIG, killed_dir, OVERRIDES, portpicker.pick_unused_port(), logs, env=ENV)
  # Past the first checkpoint, before the second: the resume must redo logged steps.
  wait_step(killed_dir, CHECKPOINT_EVERY + 2, procs, timeout=TIMEOUT)
  procs[1][0].kill()
  exit_times(procs, time.monotonic(), timeout=60)
  assert procs[1][0].returncode == -9
  assert procs[0][0].returncode != 0  # the survivor notices its dead peer and stops

  resume_logs = tmp_path / "logs_resume"
  resume_logs.mkdir()
  _run(killed_dir, resume_logs)
  texts = [(resume_logs / f"p{i}.log").read_text() for i in range(2)]
  assert all("resumed from step " in text for text in texts), texts
  resumed = _final(killed_dir)
  assert resumed["losses"] == reference["losses"]
  assert resumed["arrays"] == reference["arrays"]
