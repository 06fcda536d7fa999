"""What the Dirac decoupling saves: marginal FM's O(N) training step against I-CFM's, as N grows.

Protocol: configs/toy2d_marginal_fm.py (N(0, I) -> moons, TorchCFM's 3x64 SELU MLP on
``concat(x, t)``, batch 256, Adam 1e-3, I-CFM's path with sigma 0.1), for each data-set size
``N`` in ``--num-points``: the finite set of ``N`` moons points
(:func:`diffjax.objectives.marginal_fm.finite_data_set`, the config's seed), and two objectives
trained on it from the same initial parameters for ``--steps`` steps:

* ``marginal_fm``: the exact marginal field of the ``N`` points as target, ``O(B N D)`` per step;
* ``icfm``: I-CFM (same path and sigma) with ``x1`` drawn uniformly from the same ``N`` points,
  the conditional target ``x1 - x0``, ``O(B D)`` per step whatever ``N``.

A step is :func:`diffjax.train.step.fused_train_steps` (``--chunk`` steps in one jitted
``lax.scan``, state donated, as the trainer runs on-device data): the objective's pairing, then
:func:`diffjax.train.step.update_step` (loss, gradient, Adam, EMA). Timing: one chunk untimed
(compilation), then ``--reps`` chunks timed one by one; a figure is the median (and minimum) of
wall microseconds per step over those chunks, with the process CPU time beside it. The remaining
steps run untimed.

Quality after exactly ``--steps`` steps: the EMA parameters generate ``--eval-samples`` points
with ``--euler-steps`` Euler steps, scored by :func:`diffjax.evaluate.wasserstein2` (exact W2,
POT) against (a) the finite set itself (all of it when ``N <= --eval-samples``, else a uniform
subset of ``--eval-samples`` points, the same for both objectives) and (b) ``--eval-samples``
fresh moons draws. ``w2_finite_set_vs_target`` is (a)'s set against (b)'s draws: the distance
between the two references, i.e. what memorising the set would score against fresh draws.

Usage::

  python scripts/bench_marginal_fm.py                      # N = 256 ... 65536 (minutes)
  python scripts/bench_marginal_fm.py --quick              # smoke run: 2 sizes, 60 steps
  python scripts/bench_marginal_fm.py --render out.json    # the markdown table of a report
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import evaluate, models, objectives
from diffjax.data import toy2d
from diffjax.objectives import marginal_fm as marginal_fm_lib
from diffjax.train import config as config_lib
from diffjax.train import state as state_lib
from diffjax.train.optim import make_optimizer
from diffjax.train.step import fused_train_steps

__all__ = ["parse_args", "run_benchmark", "render_markdown", "main"]

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy2d_marginal_fm.py")
OBJECTIVE_NAMES = ("marginal_fm", "icfm")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument(
    "--num-points", default="256,1024,4096,16384,65536", help="comma-separated data-set sizes N"
  )
  p.add_argument("--steps", type=int, default=2000, help="training steps per objective and N")
  p.add_argument("--chunk", type=int, default=100, help="steps per jitted scan")
  p.add_argument("--reps", type=int, default=5, help="timed chunks per objective and N")
  p.add_argument("--eval-samples", type=int, default=2000)
  p.add_argument("--euler-steps", type=int, default=100)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: N = 256 and 16384, 60 steps in chunks of 10 (3 timed), 256 "
    "evaluation samples, 20 Euler steps",
  )
  p.add_argument(
    "--render", metavar="JSON", help="print the markdown table of a report ('-': stdin) and exit"
  )
  args = p.parse_args(argv)
  if args.render:
    return args
  if args.quick:
    args.num_points, args.steps, args.chunk, args.reps = "256,16384", 60, 10, 3
    args.eval_samples, args.euler_steps = 256, 20
  try:
    args.num_points = [int(n) for n in args.num_points.split(",") if n]
  except ValueError:
    p.error(f"--num-points {args.num_points!r}: comma-separated integers, e.g. 256,1024")
  if not args.num_points or min(args.num_points) < 1:
    p.error("--num-points: at least one size, each >= 1")
  for name in ("steps", "chunk", "reps", "eval_samples", "euler_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.steps < (1 + args.reps) * args.chunk:
    p.error(
      f"--steps {args.steps}: needs at least (1 + reps) * chunk = "
      f"{(1 + args.reps) * args.chunk} (one untimed chunk, then the timed ones)"
    )
  return args


# ---- one objective on one finite set -----------------------------------------------------------


def _trainer(config, objective, sample_batch, *, chunk: int):
  """``advance(state) -> (state, metrics)``: ``chunk`` fused steps, jitted, state donated."""
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  advance = jax.jit(
    functools.partial(
      fused_train_steps,
      num_steps=chunk,
      sample_batch=sample_batch,
      pair_fn=objective.pair_fn,
      loss_fn=objective.loss_fn,
      optimizer=optimizer,
      ema_decay=config.train.ema_decay,
    ),
    donate_argnums=0,
  )
  return optimizer, advance


def _run_objective(name: str, config, model, context, points, references, args) -> dict:
  """Trains objective ``name`` for ``args.steps`` steps on the finite set ``points``; returns
  its per-step timings, last loss and the W2 of its EMA samples to both references."""
  num_points = points.shape[0]
  if name == "marginal_fm":
    keywords = {k: v for k, v in config.objective.items() if k != "name"}
    objective = objectives.get_objective(name, context, **{**keywords, "num_points": num_points})
  else:
    objective = objectives.get_objective(
      name, context, sigma=config.objective.sigma, path=config.objective.path
    )
  batch_size = config.train.batch_size

  def sample_batch(key):
    # The loader of the finite set: I-CFM's x1 (marginal_fm's pair_fn draws its own, equally).
    return {"x": points[jax.random.randint(key, (batch_size,), 0, num_points)]}

  optimizer, advance = _trainer(config, objective, sample_batch, chunk=args.chunk)
  state = state_lib.init_train_state(
    key=jax.random.PRNGKey(config.seed), init_params=model.init, optimizer=optimizer
  )
  state, metrics = advance(state)  # compiles
  jax.block_until_ready(metrics)
  walls, cpus = [], []
  for _ in range(args.reps):
    wall, cpu = time.perf_counter(), time.process_time()
    state, metrics = advance(state)
    jax.block_until_ready(metrics)
    walls.append((time.perf_counter() - wall) / args.chunk * 1e6)
    cpus.append((time.process_time() - cpu) / args.chunk * 1e6)
  for _ in range(args.steps // args.chunk - 1 - args.reps):
    state, metrics = advance(state)
  remainder = args.steps % args.chunk
  if remainder:
    _, tail = _trainer(config, objective, sample_batch, chunk=remainder)
    state, metrics = tail(state)
  assert int(state.step) == args.steps, (int(state.step), args.steps)
  samples = objective.generate(
    state.ema_params,
    jax.random.PRNGKey(config.seed + 1),
    args.eval_samples,
    steps=args.euler_steps,
    sampler="euler",
  )
  samples = np.asarray(samples["samples"], np.float64)
  return {
    "us_per_step_median": round(statistics.median(walls), 1),
    "us_per_step_min": round(min(walls), 1),
    "cpu_us_per_step_median": round(statistics.median(cpus), 1),
    "final_loss": float(np.asarray(metrics["loss"])[-1]),
    "w2_vs_finite_set": evaluate.wasserstein2(samples, references["finite_set"]),
    "w2_vs_target": evaluate.wasserstein2(samples, references["target"]),
  }


def run_size(num_points: int, config, model, args) -> dict:
  """Both objectives on one finite set of ``num_points`` moons points."""
  target = toy2d.get_toy2d(config.data.target)
  points = marginal_fm_lib.finite_data_set(target, seed=config.seed, num_points=num_points)
  context = objectives.ObjectiveContext(
    apply=model.apply,
    source=lambda key, num: jax.random.normal(key, (num, 2), jnp.float32),
    data_shape=(2,),
    target_sampler=target,
    seed=config.seed,
  )
  k_subset, k_target = jax.random.split(jax.random.PRNGKey(config.seed + 2))
  subset = points
  if num_points > args.eval_samples:
    subset = points[jax.random.choice(k_subset, num_points, (args.eval_samples,), replace=False)]
  references = {
    "finite_set": np.asarray(subset, np.float64),
    "target": np.asarray(target(k_target, args.eval_samples), np.float64),
  }
  result: dict[str, Any] = {"num_points": num_points}
  for name in OBJECTIVE_NAMES:
    result[name] = _run_objective(name, config, model, context, points, references, args)
  result["time_ratio"] = round(
    result["marginal_fm"]["us_per_step_median"] / result["icfm"]["us_per_step_median"], 2
  )
  result["w2_finite_set_vs_target"] = evaluate.wasserstein2(
    references["finite_set"], references["target"]
  )
  return result


# ---- report --------------------------------------------------------------------------------------


def _environment() -> dict:
  return {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "jax_version": jax.__version__,
    "jax_backend": jax.default_backend(),
    "jax_devices": jax.device_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
  }


def run_benchmark(args) -> dict:
  config = config_lib.load_config_file(CONFIG)
  model = models.create_model(
    config.model.name, data_shape=(2,), **{k: v for k, v in config.model.items() if k != "name"}
  )
  report: dict[str, Any] = {
    "benchmark": "bench_marginal_fm",
    "protocol": {
      "task": f"N(0, I) -> {config.data.target} (finite set of N points)",
      "model": "MLP 3x64 SELU on concat(x, t)",
      "batch_size": config.train.batch_size,
      "optimizer": f"Adam lr={config.optimizer.learning_rate}",
      "path": config.objective.path,
      "sigma": config.objective.sigma,
      "num_points": args.num_points,
      "steps": args.steps,
      "chunk": args.chunk,
      "reps": args.reps,
      "eval_samples": args.eval_samples,
      "euler_steps": args.euler_steps,
      "quick": args.quick,
    },
    "environment": _environment(),
    "notes": [
      "us_per_step: wall time of a jitted chunk of fused steps (pairing, loss, gradient, "
      "Adam, EMA) over its steps; median and min over the timed chunks",
      "both objectives train on the same finite set from the same initial parameters; "
      "I-CFM draws x1 uniformly from it",
      "w2_vs_finite_set: EMA samples against the set (a uniform subset when N exceeds "
      "eval_samples); w2_vs_target: against fresh target draws",
    ],
    "results": [],
  }
  for num_points in args.num_points:
    report["results"].append(run_size(num_points, config, model, args))
  report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return report


def render_markdown(report: dict) -> str:
  """The report as markdown: the protocol and machine in two lines, then one table row per N
  (wall microseconds per step, process CPU microseconds in parentheses; W2 to both references).
  """
  protocol, env = report["protocol"], report["environment"]
  lines = [
    f"{protocol['task']}, {protocol['model']}, batch {protocol['batch_size']}, "
    f"{protocol['optimizer']}, path {protocol['path']} (sigma {protocol['sigma']}), "
    f"{protocol['steps']} steps per objective and N (fused chunks of {protocol['chunk']}, "
    f"median of {protocol['reps']} timed chunks); W2 of {protocol['eval_samples']} EMA "
    f"samples ({protocol['euler_steps']} Euler steps).",
    "",
    f"Machine: {env['cpu_count']} CPUs, jax {env['jax_version']} ({env['jax_backend']}, "
    f"{env['jax_devices']} device), load average {env['loadavg_start']} at start, "
    f"{env.get('loadavg_end')} at end.",
    "",
    "| N | marginal_fm us/step (CPU) | icfm us/step (CPU) | ratio | W2 to set: marginal_fm "
    "| W2 to set: icfm | W2 to fresh draws: marginal_fm | W2 to fresh draws: icfm "
    "| W2 set vs fresh draws |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in report["results"]:
    m, c = r["marginal_fm"], r["icfm"]
    lines.append(
      f"| {r['num_points']} | {m['us_per_step_median']:.0f} "
      f"({m['cpu_us_per_step_median']:.0f}) | {c['us_per_step_median']:.0f} "
      f"({c['cpu_us_per_step_median']:.0f}) | {r['time_ratio']:.1f} | "
      f"{m['w2_vs_finite_set']:.3f} | {c['w2_vs_finite_set']:.3f} | "
      f"{m['w2_vs_target']:.3f} | {c['w2_vs_target']:.3f} | "
      f"{r['w2_finite_set_vs_target']:.3f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.render:
    text = sys.stdin.read() if args.render == "-" else pathlib.Path(args.render).read_text()
    sys.stdout.write(render_markdown(json.loads(text)))
    return
  report = run_benchmark(args)
  json.dump(report, sys.stdout, indent=2)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
