"""K seeds in one run (``train.num_seeds = K``) against K sequential single-seed runs.

The 2D I-CFM protocol (configs/toy2d_icfm.py's data, model, batch and optimizer; ``--steps``
steps). Both sides run the trainer ``diffjax train`` runs (:func:`diffjax.train.trainer.
make_trainer`, its ``advance`` over fused chunks with the per-chunk host sync of the loop),
without the loop's checkpoint and plot I/O, which is the same for both. Each side first trains one
chunk untimed (compilation), then the timed steps; the K sequential runs are timed one after the
other, their times summed. Repeated ``--reps`` times, alternating the two sides; the figure is the
median ratio ``time(K seeds at once) / time(one seed)`` and ``time(K sequential) / time(K at
once)``. Prints JSON.

Usage::

  python scripts/bench_seeds.py                  # K = 5, 20,000 steps, 3 reps
  python scripts/bench_seeds.py --quick          # smoke run: 2,000 steps, K = 3, 1 rep
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.trainer import make_trainer

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy2d_icfm.py")


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20_000)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.seeds, args.steps, args.reps = 3, 2_000, 1
  return args


def _trainer(num_seeds: int, seed: int, steps: int):
  config = config_lib.load_config_file(CONFIG)
  config_lib.apply_overrides(
    config,
    [
      f"--config.train.num_seeds={num_seeds}",
      f"--config.seed={seed}",
      f"--config.train.steps={steps}",
    ],
  )
  config_lib.validate(config, num_devices=1)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  return make_trainer(config, mesh), config.train.fused_steps


def _compiled(num_seeds: int, seed: int, steps: int):
  """A trainer's ``advance`` and state after one untimed chunk (compilation), and the chunk."""
  trainer, chunk = _trainer(num_seeds, seed, steps)
  state, metrics = trainer.advance(trainer.create_state(), chunk, None)
  np.asarray(metrics["loss"])
  return [trainer.advance, state], chunk


def _timed_chunk(runner, num_steps: int) -> float:
  start = time.perf_counter()
  runner[1], metrics = runner[0](runner[1], num_steps, None)
  np.asarray(metrics["loss"])  # the loop's per-chunk finite check syncs here too
  return time.perf_counter() - start


def main():
  args = _parse()
  together, sequential, one = [], [], []
  for _ in range(args.reps):
    stacked, chunk = _compiled(args.seeds, 0, args.steps)
    singles = [_compiled(1, k, args.steps)[0] for k in range(args.seeds)]
    # Chunk by chunk, alternating the two sides, so both see the same machine load.
    seconds_together, seconds_single = 0.0, [0.0] * args.seeds
    for done in range(0, args.steps, chunk):
      n = min(chunk, args.steps - done)
      seconds_together += _timed_chunk(stacked, n)
      for k, runner in enumerate(singles):
        seconds_single[k] += _timed_chunk(runner, n)
    together.append(seconds_together)
    sequential.append(sum(seconds_single))
    one.append(statistics.median(seconds_single))
  median = statistics.median
  report = {
    "benchmark": "bench_seeds",
    "date": datetime.date.today().isoformat(),
    "command": "python scripts/bench_seeds.py" + (" --quick" if args.quick else ""),
    "protocol": {
      "config": "configs/toy2d_icfm.py",
      "objective": "icfm",
      "seeds": args.seeds,
      "steps": args.steps,
      "reps": args.reps,
    },
    "environment": {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(),
      "loadavg": list(os.getloadavg()),
    },
    "seconds": {"seeds_together": together, "seeds_sequential": sequential, "one_seed": one},
    "ratio_together_over_one_seed": round(median(together) / median(one), 3),
    "speedup_together_over_sequential": round(median(sequential) / median(together), 3),
    "target": "K seeds together in under 2x the time of one seed",
  }
  report["target_met"] = report["ratio_together_over_one_seed"] < 2.0
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
