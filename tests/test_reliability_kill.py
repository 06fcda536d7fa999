"""Kill -9 and preemption of real `diffjax train` processes (docs/reliability.md, items 1, 2, 5).

A chain trains one workdir through many processes, each interrupted at a random step plus a
random delay (some inside a checkpoint save, some in start-up), alternating synchronous and
asynchronous checkpoints; scripts/torture.py runs the same chains at scale. The final state's
digest of every array and every logged loss must equal an uninterrupted run's with ``==``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import random

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _torture():
  spec = importlib.util.spec_from_file_location("diffjax_torture", ROOT / "scripts" / "torture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _chain(tmp_path, *, devices, kills, signals, seed):
  torture = _torture()
  cache = tmp_path / "jax_cache"
  reference = torture.uninterrupted(
    tmp_path / "reference", variant="digits", devices=devices, extra=[], cache=cache
  )
  plan = ["SIGKILL"] * kills + ["SIGTERM", "SIGINT", "SIGTERM", "SIGINT", "SIGTERM"][:signals]
  random.Random(seed).shuffle(plan)
  report = torture.run_chain(
    tmp_path / "chain",
    reference,
    variant="digits",
    devices=devices,
    extra=[],
    cache=cache,
    seed=seed,
    plan=plan,
  )
  events = report["events"]
  failed = [e for e in events if not e["ok"] or e.get("resume_exact") is False or e.get("hung")]
  assert not failed, failed
  # The signals really interrupted training (not a process that had already finished).
  assert sum("sent_at_step" in e for e in events if e["signal"] == "SIGKILL") >= kills - 1
  preempted = [e for e in events if e["signal"] in ("SIGTERM", "SIGINT")]
  # A signal that lands after the last step (during the final plot) has nothing to save.
  assert all("checkpointed_step" in e for e in preempted if 0 <= e.get("sent_at_step", -1) < 40)
  assert sum("checkpointed_step" in e for e in preempted) >= signals - 1
  # Every preemption was followed by a run that resumed at exactly that step.
  assert sum(e.get("resume_exact", False) for e in events) == sum(
    "checkpointed_step" in e for e in preempted
  )
  # Resumes happened mid-epoch (an epoch of digits is 28 steps of 64), twice within one.
  resumes = [e["resumed_from"] for e in events if e["resumed_from"]]
  assert sum(0 < r < 28 for r in resumes) >= 2, resumes
  assert report["all_steps_logged_once"] and report["losses_equal"], report
  assert report["arrays_equal"], report


@pytest.mark.slow
def test_kills_and_preemptions_resume_bit_equal_one_device(tmp_path):
  """5 SIGKILLs and 5 SIGTERM/SIGINTs at random steps of one 40-step digits run (grain data,
  sync and async checkpoints): the end state equals the uninterrupted run's bit for bit."""
  _chain(tmp_path, devices=1, kills=5, signals=5, seed=0)


@pytest.mark.slow
def test_kills_resume_bit_equal_eight_devices(tmp_path):
  """The same on 8 simulated devices (the batch sharded over the mesh)."""
  _chain(tmp_path, devices=8, kills=3, signals=2, seed=1)
