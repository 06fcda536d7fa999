"""Exact OT on a simulated CPU mesh, run in a fresh process with ``--devices N`` devices.

The device count must be fixed before JAX starts (it sizes the CPU client's thread pool, which is
what a callback inside an SPMD program deadlocked on), so tests/test_ot_mesh.py runs this file as
a subprocess. For each case it trains the protocol-sized config uninterrupted, trains it again in
two runs (stop half-way, resume), and records on the host what the trainer's own advance function
solved for the first chunk, on the N-device mesh and on one device. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument(
    "--case",
    action="append",
    required=True,
    help="toy2d:FSDP:SCOPE or digits:FSDP:SCOPE (repeatable)",
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=200)
  return parser.parse_args()


ARGS = _parse()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after the device count is set)
import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from diffjax.train import config as config_lib  # noqa: E402
from diffjax.train import loop  # noqa: E402
from diffjax.train import sharding as sharding_lib  # noqa: E402
from diffjax.train.trainer import make_trainer  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def case_config(data: str, fsdp: int, scope: str, steps: int):
  """The protocol's config (toy2d: batch 256, 100 fused steps; digits: conditional OT-CFM, the
  digits batch), shortened to ``steps``, on the given mesh and coupling scope."""
  if data == "toy2d":
    config = config_lib.load_config_file(str(CONFIGS / "toy2d_otcfm.py"))
    overrides = [f"--config.train.steps={steps}", f"--config.train.checkpoint_every={steps // 2}"]
  else:
    config = config_lib.load_config_file(str(CONFIGS / "digits_fm.py") + ":cond")
    overrides = [
      "--config.objective.name=otcfm",
      f"--config.train.steps={steps}",
      f"--config.train.checkpoint_every={steps // 2}",
      "--config.model.ch=16",
      "--config.model.num_res_blocks=1",
      "--config.train.batch_size=64",
      "--config.data.device_resident=off",  # the grain path: one host solve per step
    ]
  config_lib.apply_overrides(
    config,
    overrides
    + [
      f"--config.mesh.fsdp={fsdp}",
      f"--config.objective.coupling_scope={scope}",
      "--config.train.progress_bar=false",
      "--config.train.async_checkpoint=false",
      f"--config.train.log_every={steps // 2}",
      "--config.sample.num=256",
      "--config.sample.steps=4",
    ],
  )
  config_lib.validate(config, num_devices=len(jax.devices()))
  return config


def digest(state) -> list[str]:
  import hashlib  # pylint: disable=import-outside-toplevel

  return [hashlib.sha256(np.asarray(x).tobytes()).hexdigest() for x in jax.tree.leaves(state)]


def first_advance(config, devices):
  """What the trainer's advance function sends to the host solve and gets back for step 0:
  ``(problem, solution, proposed batch)`` as NumPy."""
  mesh = sharding_lib.make_mesh(
    data=-1, fsdp=config.mesh.fsdp if len(devices) > 1 else 1, devices=devices
  )
  seen = {}

  def recording_solve(solve, problem):
    seen["problem"] = problem
    seen["solution"] = solve(problem)
    return seen["solution"]

  trainer = make_trainer(config, mesh, host_solve=recording_solve)
  experiment = trainer.experiment
  batch = None if experiment.sample_batch else experiment.next_batch(experiment.make_iterator({}))
  trainer.advance(trainer.create_state(), config.train.fused_steps, batch)
  return seen


def optimality_gap(problem, solution) -> float:
  """Largest relative excess of the solution's cost over scipy's optimum, per problem, on the
  float64 cost (label problems: an infinite cost across classes)."""
  cost = np.asarray(problem[0], np.float64)
  solution = np.asarray(solution)
  cost = cost.reshape((-1,) + cost.shape[-2:])
  solution = solution.reshape((-1, cost.shape[-1]))
  if len(problem) == 3:
    size = cost.shape[-1]
    sources = np.broadcast_to(problem[1], problem[0].shape[:-1]).reshape((-1, size))
    targets = np.broadcast_to(problem[2], problem[0].shape[:-1]).reshape((-1, size))
    cost = np.where(sources[:, :, None] == targets[:, None, :], cost, 1e12)
  gaps = []
  for matrix, perm in zip(cost, solution):
    assert sorted(perm.tolist()) == list(range(len(perm))), "not a permutation"
    rows, cols = linear_sum_assignment(matrix)
    best = matrix[rows, cols].sum()
    gaps.append((matrix[np.arange(len(perm)), perm].sum() - best) / max(best, 1e-12))
  return float(max(gaps))


def run_case(spec: str, workdir: pathlib.Path, steps: int) -> dict:
  data, fsdp, scope = spec.split(":")
  config = case_config(data, int(fsdp), scope, steps)
  devices = jax.devices()
  whole = loop.train(config, workdir / "whole", devices=devices)
  half = case_config(data, int(fsdp), scope, steps)
  with half.unlocked():
    half.train.steps = steps // 2
  loop.train(half, workdir / "split", devices=devices)
  resumed = loop.train(config, workdir / "split", devices=devices)
  losses = np.array([loss for _, loss in whole["losses"]])
  report = dict(
    case=spec,
    devices=len(devices),
    batch=config.train.batch_size,
    finite=bool(np.isfinite(losses).all()),
    losses=losses.tolist(),
    trace_count=whole["trace_count"],
    resumed_from=resumed["start_step"],
    resume_bit_exact=digest(whole["state"]) == digest(resumed["state"]),
    resumed_losses_equal=[l for s, l in resumed["losses"]]
    == [l for s, l in whole["losses"] if s > steps // 2],
  )
  many = first_advance(config, devices)
  report["optimality_gap"] = optimality_gap(many["problem"], many["solution"])
  report["solution_shape"] = list(np.shape(many["solution"]))
  if scope == "global":
    one = first_advance(config, devices[:1])
    report["pairs_equal_one_device"] = bool(np.array_equal(many["solution"], one["solution"]))
    cost_many, cost_one = (np.asarray(x["problem"][0], np.float64) for x in (many, one))
    # float32 rounding of the cost matmul may depend on the layout (64-D digits); pairs may not.
    report["costs_max_rel_diff_one_device"] = float(
      np.max(np.abs(cost_many - cost_one)) / np.max(np.abs(cost_one))
    )
  return report


def main():
  workdir = pathlib.Path(ARGS.workdir)
  # The three runs of a case compile the same programs: the persistent cache compiles them once.
  jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  reports = [run_case(spec, workdir / spec.replace(":", "_"), ARGS.steps) for spec in ARGS.case]
  json.dump(reports, sys.stdout)
  print()


if __name__ == "__main__":
  main()
