"""Exact OT assignment: the in-graph auction (``ot_solver=jax``) against POT's ``ot.emd``.

For each batch size ``B`` the problem is the OT-CFM protocol's: ``B`` source points from
8gaussians and ``B`` data points from moons, the float32 squared Euclidean cost of
:func:`diffjax.couplings.squared_euclidean_cost`. The JAX solver
(:func:`diffjax.assignment.auction_permutation`) is jitted, run once to compile and warm up,
then timed ``--reps`` times (median and minimum, wall and process CPU seconds). POT's network
simplex (``diffjax.couplings.OT_SOLVERS["emd"]``, the library's default) solves the same matrix
in float64 on the host, in the same run. Both costs are evaluated in float64 on that matrix and
compared; the auction's float64 certificate (:func:`diffjax.assignment.auction_assignment`'s
potentials) is reported beside its bound ``3 B eps``.

``chunk`` times what a training chunk pairs: ``--chunk`` problems of ``B = 256`` (the protocol's
100 fused steps), vmapped in one program for the auction, and solved on the host's threads for
emd (the trainer's host solve).

A solver whose single run exceeds ``--cap-s`` seconds is not repeated (its one run is
reported, marked ``capped``), and larger sizes are skipped for it.

Usage::

  python scripts/bench_ot.py > docs/ot_bench.json
  python scripts/bench_ot.py --sizes 256,1024 --reps 3 --chunk 20    # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import numpy as np

from diffjax import assignment, couplings
from diffjax.data import toy2d


def protocol_costs(size: int, num: int, seed: int = 0) -> jax.Array:
  """``[num, size, size]`` float32 costs between 8gaussians and moons draws."""
  keys = jax.random.split(jax.random.key(seed), 2 * num)
  source = jax.vmap(lambda k: toy2d.eight_gaussians(k, size))(keys[:num])
  target = jax.vmap(lambda k: toy2d.moons(k, size))(keys[num:])
  return jax.jit(jax.vmap(couplings.squared_euclidean_cost))(source, target)


def _timed(fn, reps: int, cap_s: float) -> dict:
  """Wall and CPU seconds of ``fn()`` over ``reps`` runs; one run if the first exceeds ``cap_s``."""
  wall, cpu = [], []
  for _ in range(reps):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
    if wall[-1] > cap_s:
      break
  return dict(
    out=out,
    median_s=statistics.median(wall),
    min_s=min(wall),
    cpu_median_s=statistics.median(cpu),
    runs=len(wall),
    capped=wall[0] > cap_s,
  )


def _summary(timing: dict) -> dict:
  return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in timing.items() if k != "out"}


def single_problem(size: int, *, reps: int, cap_s: float, skip: set) -> dict:
  cost = protocol_costs(size, 1, seed=size)[0]
  matrix = np.asarray(cost, np.float64)
  row = {"B": size}
  if "jax" not in skip:
    solve = jax.jit(assignment.auction_permutation)
    start = time.perf_counter()
    jax.block_until_ready(solve(cost))
    row["jax_compile_and_first_run_s"] = round(time.perf_counter() - start, 3)
    timing = _timed(lambda: jax.block_until_ready(solve(cost)), reps, cap_s)
    row["jax"] = _summary(timing)
    perm = np.asarray(timing["out"])
    result = jax.jit(assignment.auction_assignment)(cost)
    v = np.asarray(result.column_potential, np.float64) + np.asarray(
      result.column_residual, np.float64
    )
    jax_cost = matrix[np.arange(size), perm].sum()
    certificate = jax_cost - ((matrix - v[None, :]).min(axis=1).sum() + v.sum())
    row["jax"].update(
      rounds=int(result.rounds),
      certificate=float(certificate),
      certificate_bound=float(3 * size * result.epsilon),
      is_permutation=bool(np.array_equal(np.sort(perm), np.arange(size))),
    )
  if "emd" not in skip:
    couplings.OT_SOLVERS["emd"](matrix[:8, :8])  # import POT before timing
    timing = _timed(lambda: couplings.OT_SOLVERS["emd"](matrix), reps, cap_s)
    row["emd"] = _summary(timing)
    emd_cost = matrix[np.arange(size), timing["out"]].sum()
  if "jax" not in skip and "emd" not in skip:
    row["cost_rel_diff"] = float(abs(jax_cost - emd_cost) / emd_cost)
    row["costs_equal_1e-6"] = row["cost_rel_diff"] <= 1e-6
    row["same_permutation"] = bool(np.array_equal(perm, timing["out"]))
  return row


def chunk(size: int, num: int, *, reps: int, cap_s: float) -> dict:
  costs = protocol_costs(size, num, seed=1)
  matrices = np.asarray(costs, np.float64)
  solve = jax.jit(assignment.auction_permutation)  # a [num, B, B] stack: one vmapped program
  jax.block_until_ready(solve(costs))
  jax_timing = _timed(lambda: jax.block_until_ready(solve(costs)), reps, cap_s)
  host_solve = couplings.exact_ot_stages(solver="emd").solve  # what the trainer's host runs
  host_solve((matrices[:2],))
  emd_timing = _timed(lambda: host_solve((matrices,)), reps, cap_s)
  rows = np.arange(size)
  jax_costs = np.array([m[rows, p].sum() for m, p in zip(matrices, np.asarray(jax_timing["out"]))])
  emd_costs = np.array([m[rows, p].sum() for m, p in zip(matrices, emd_timing["out"])])
  return {
    "B": size,
    "problems": num,
    "jax": _summary(jax_timing),
    "emd_threads": _summary(emd_timing),
    "max_cost_rel_diff": float(np.max(np.abs(jax_costs - emd_costs) / emd_costs)),
  }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="256,1024,4096", help="comma-separated batch sizes B")
  parser.add_argument("--reps", type=int, default=5, help="timed runs per figure (median)")
  parser.add_argument("--chunk", type=int, default=100, help="problems of B=256 in a chunk")
  parser.add_argument("--cap-s", type=float, default=120.0, help="no repeats above this")
  args = parser.parse_args(argv)
  try:
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
  if not args.sizes or min(args.sizes) < 2 or args.reps < 1 or args.chunk < 0:
    parser.error("--sizes needs integers >= 2, --reps >= 1 and --chunk >= 0")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  sizes, skip = [], set()
  for size in args.sizes:
    row = single_problem(size, reps=args.reps, cap_s=args.cap_s, skip=set(skip))
    sizes.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    skip |= {name for name in ("jax", "emd") if row.get(name, {}).get("capped")}
  results = {
    "benchmark": "ot",
    "date": datetime.date.today().isoformat(),
    "command": shlex.join(["python", "scripts/bench_ot.py", *sys.argv[1:]]),
    "problem": "8gaussians -> moons, float32 squared Euclidean cost (the OT-CFM protocol)",
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "reps": args.reps,
    "cap_s": args.cap_s,
    "sizes": sizes,
    "skipped_after_cap": sorted(skip),
  }
  if args.chunk:
    results["chunk"] = chunk(256, args.chunk, reps=args.reps, cap_s=args.cap_s)
  results["loadavg_at_end"] = list(os.getloadavg())
  json.dump(results, sys.stdout, indent=2)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
