"""What reflow's two modes cost: seconds per 1000 training steps, and the build of the fixed set.

configs/toy2d_reflow.py (8gaussians -> moons, 3x64 SELU MLP, batch 256) with a 1-RF teacher
(its ``:rf1`` variant) trained ``--teacher-steps`` steps in a temporary folder first (the
teacher's quality does not change the cost). Three trainers, each the one ``diffjax train`` runs
(:func:`diffjax.train.trainer.make_trainer`, fused chunks with the loop's per-chunk sync, no
checkpoint or plot I/O): the teacher's own objective (I-CFM, sigma 0: the cost of a plain
flow-matching step), reflow "online" (the teacher's ODE solved for every batch) and reflow
"pregenerated" (pairs picked from the fixed set). Each first trains one chunk untimed
(compilation); then ``--steps`` steps are timed chunk by chunk, alternating the trainers so all
see the same machine load, ``--reps`` times. ``build_s`` is ``make_trainer``'s wall time (the
teacher's read and, pregenerated, the set's solve with its compilation), and ``set_build_s``
the fixed set alone (:func:`diffjax.objectives.reflow.coupling_set`, compilation included) for
several sizes. Prints JSON.

Usage::

  python scripts/bench_reflow.py > docs/reflow_bench.json
  python scripts/bench_reflow.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from diffjax.objectives import reflow as reflow_lib
from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train import sharding as sharding_lib
from diffjax.train import teacher as teacher_lib
from diffjax.train.experiment import build_experiment
from diffjax.train.trainer import make_trainer

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy2d_reflow.py")
QUIET = ["--config.train.progress_bar=false", "--config.train.async_checkpoint=false"]


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000, help="timed steps per trainer and rep")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--teacher-steps", type=int, default=500)
  parser.add_argument("--set-sizes", type=str, default="10000,50000,200000")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.steps, args.reps, args.teacher_steps, args.set_sizes = 200, 1, 100, "10000"
  return args


def _config(variant: str, overrides: list[str]):
  config = config_lib.load_config_file(CONFIG + variant)
  config_lib.apply_overrides(config, [*QUIET, *overrides])
  config_lib.validate(config, num_devices=1)
  return config


def _mesh():
  return sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])


def _compiled(config):
  """``[advance, state]`` after one untimed chunk, the chunk length, and the build seconds."""
  start = time.perf_counter()
  trainer = make_trainer(config, _mesh())
  build = time.perf_counter() - start
  chunk = config.train.fused_steps
  state, metrics = trainer.advance(trainer.create_state(), chunk, None)
  np.asarray(metrics["loss"])
  return [trainer.advance, state], chunk, build


def _timed_chunk(runner, num_steps: int) -> float:
  start = time.perf_counter()
  runner[1], metrics = runner[0](runner[1], num_steps, None)
  np.asarray(metrics["loss"])  # the loop's per-chunk finite check syncs here too
  return time.perf_counter() - start


def _set_build_seconds(teacher_dir: pathlib.Path, online_config, sizes: list[int]) -> dict:
  """The fixed set's solve alone, for each size (the online experiment gives the source)."""
  teacher = teacher_lib.load_teacher(str(teacher_dir), data=online_config.data, mesh=_mesh())
  objective = online_config.objective
  endpoints = reflow_lib.teacher_endpoints(
    teacher, sampler=objective.teacher_sampler, steps=objective.teacher_steps
  )
  source = build_experiment(online_config, mesh=_mesh()).source_sampler
  seconds = {}
  for size in sizes:
    start = time.perf_counter()
    pairs = reflow_lib.coupling_set(endpoints, source, seed=online_config.seed, num_pairs=size)
    np.asarray(pairs["x"])
    seconds[str(size)] = round(time.perf_counter() - start, 3)
  return seconds


def main():
  args = _parse()
  with tempfile.TemporaryDirectory() as tmp:
    teacher_dir = pathlib.Path(tmp) / "rf1"
    teacher_config = _config(
      ":rf1", [f"--config.train.steps={args.teacher_steps}", "--config.sample.num=16"]
    )
    loop.train(teacher_config, teacher_dir, devices=jax.devices()[:1])
    reflow = [f"--config.objective.teacher_workdir={teacher_dir}"]
    configs = {
      "icfm_sigma0": teacher_config,
      "reflow_online": _config("", [*reflow, "--config.objective.mode=online"]),
      "reflow_pregenerated": _config("", [*reflow, "--config.objective.mode=pregenerated"]),
    }
    per_1000, builds = {name: [] for name in configs}, {name: [] for name in configs}
    for _ in range(args.reps):
      runners = {}
      for name, config in configs.items():
        runner, chunk, build = _compiled(config)
        runners[name] = runner
        builds[name].append(round(build, 3))
      seconds = dict.fromkeys(configs, 0.0)
      for done in range(0, args.steps, chunk):
        n = min(chunk, args.steps - done)
        for name, runner in runners.items():
          seconds[name] += _timed_chunk(runner, n)
      for name in configs:
        per_1000[name].append(round(1000.0 * seconds[name] / args.steps, 3))
    sizes = [int(s) for s in args.set_sizes.split(",")]
    set_build = _set_build_seconds(teacher_dir, configs["reflow_online"], sizes)

  median = statistics.median
  objective = configs["reflow_online"].objective
  report = {
    "benchmark": "bench_reflow",
    "date": datetime.date.today().isoformat(),
    "command": "python scripts/bench_reflow.py" + (" --quick" if args.quick else ""),
    "protocol": {
      "config": "configs/toy2d_reflow.py",
      "batch_size": configs["reflow_online"].train.batch_size,
      "fused_steps": configs["reflow_online"].train.fused_steps,
      "teacher": "configs/toy2d_reflow.py:rf1 (I-CFM, sigma 0)",
      "teacher_train_steps": args.teacher_steps,
      "teacher_ode": f"{objective.teacher_sampler}, {objective.teacher_steps} steps",
      "num_pairs": configs["reflow_pregenerated"].objective.num_pairs,
      "timed_steps": args.steps,
      "reps": args.reps,
    },
    "environment": {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(),
      "loadavg": list(os.getloadavg()),
    },
    "seconds_per_1000_steps": per_1000,
    "median_seconds_per_1000_steps": {k: median(v) for k, v in per_1000.items()},
    "make_trainer_seconds": builds,
    "set_build_seconds_by_num_pairs": set_build,
  }
  m = report["median_seconds_per_1000_steps"]
  report["online_over_pregenerated"] = round(m["reflow_online"] / m["reflow_pregenerated"], 2)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
