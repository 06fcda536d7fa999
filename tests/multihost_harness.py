"""Two `diffjax train` processes of two CPU devices each, jax.distributed over 127.0.0.1 with
gloo collectives: starting them, following their steps in metrics.jsonl, waiting for their exit.

Shared by the multi-host tests that kill, stop or preempt one process (test_reliability_multihost,
test_multihost_dit); each passes its own config and overrides.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "exit_times", "last_step", "start_two", "wait_step"]


def start_two(
  config: str, workdir, overrides, port: int, logs: pathlib.Path, *, env: dict | None = None
) -> list:
  """Processes 0 and 1 of one run of ``config`` on ``workdir``, each logging to
  ``logs/p{i}.log``, with ``env`` added to the environment; a list of ``(Popen, log file)``."""
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    **(env or {}),
  )
  procs = []
  for i in range(2):
    log = open(logs / f"p{i}.log", "w")
    command = [
      sys.executable,
      "-m",
      "diffjax.cli",
      "train",
      "--config",
      config,
      "--workdir",
      str(workdir),
      *overrides,
      "--config.distributed.enabled=true",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
    ]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    procs.append((proc, log))
  return procs


def last_step(workdir: pathlib.Path) -> int:
  """The last step metrics.jsonl logged (0 before the first)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  return max([0] + [int(m.group(1)) for m in re.finditer(r'"step": (\d+)', path.read_text())])


def wait_step(workdir: pathlib.Path, step: int, procs, timeout: float = 300) -> None:
  """Waits until ``step`` is logged; fails if a process ends first or after ``timeout``."""
  start = time.monotonic()
  while last_step(workdir) < step:
    assert all(p.poll() is None for p, _ in procs), "a process ended early"
    assert time.monotonic() - start < timeout
    time.sleep(0.05)


def exit_times(procs, since: float, timeout: float = 200) -> list:
  """Seconds from ``since`` until each process exited; kills both after ``timeout``."""
  times = [None, None]
  while any(t is None for t in times):
    for i, (p, _) in enumerate(procs):
      if times[i] is None and p.poll() is not None:
        times[i] = time.monotonic() - since
    if time.monotonic() - since > timeout:
      for p, _ in procs:
        p.kill()
      raise AssertionError(f"processes still running after {timeout} s: {times}")
    time.sleep(0.05)
  for _, log in procs:
    log.close()
  return times
