"""Benchmark of the forward process: the isotropic closed form against the sequential chain.

Prints one JSON object to stdout. For each number of steps T it times (median of ``--reps`` runs
after one compiling run, ``block_until_ready`` on every output):

* ``closed``: ``jit(q_sample_closed_form)``, the ``jax.random.normal`` draw included (the noise
  training draws);
* ``sequential``: ``jit(q_sample_sequential)``, the ``lax.scan`` Markov chain over all T steps;
* ``loop``: a Python loop of T calls to one jitted chain step;

and their ratios, plus the closed form's throughput (bytes of ``data`` read and ``x_t`` written per
second). ``closed_form_variants`` splits the closed form into the draw and the affine op;
``noise_share_of_training`` times one training step of configs/digits_ddpm.py against the noise
draw of its batch (the most a faster generator could save in training: docs/benchmarks.md says why
diffjax has none of its own). When torch is importable it times a peer: diffusers'
``DDPMScheduler.add_noise`` with ``torch.randn_like`` if diffusers is installed, otherwise a
faithful torch re-implementation of it (labelled as such). Without torch, ``"peer": null``. The
peer is timed alone first, before JAX starts its CPU thread pool; the ratio of record
(``peer.jax_closed_over_peer``) is head to head: ten alternating segments of the peer (at its
faster thread setting) and our closed form, medians over all runs. Every figure is a median;
``*_min_ms`` fields give the minimum too, steadier on a shared machine.

Usage::

  python scripts/bench_forward.py                 # T in 100, 500, 1000; 64x32x32x3 float32
  python scripts/bench_forward.py --quick         # a smoke run: T = 100, 3 repetitions
  python scripts/bench_forward.py --reps 20 --sizes 100,1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffjax import forward
from diffjax.schedules import get_discrete_schedule

__all__ = ["main", "parse_args", "run_benchmark"]

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHAPE = (64, 32, 32, 3)


_MINIMA: dict[int, float] = {}


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
  """Median wall time of ``fn`` over ``reps`` runs, after one warm-up (compiling) run; the
  minimum is kept in ``_MINIMA[id(fn)]`` for :func:`_timed`."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  _MINIMA[id(fn)] = min(times)
  return statistics.median(times)


def _timed(fn: Callable[[], Any], reps: int) -> dict[str, float]:
  """``{"median_ms", "min_ms"}`` of ``fn``."""
  median = _median_seconds(fn, reps)
  return {"median_ms": _ms(median), "min_ms": _ms(_MINIMA.pop(id(fn)))}


def _ms(seconds: float) -> float:
  return round(seconds * 1e3, 4)


def _time_closed_form_variants(schedule, data, t, reps: int) -> dict[str, dict[str, float]]:
  """The closed form as users run it, its parts, and bfloat16 data."""
  key = jax.random.key(0)
  noise = jax.random.normal(key, SHAPE)
  closed = jax.jit(
    lambda k, x, steps: forward.q_sample_closed_form(data=x, t=steps, key=k, schedule=schedule)
  )
  elementwise = jax.jit(
    lambda x, steps, eps: forward.q_sample(data=x, t=steps, noise=eps, schedule=schedule)
  )
  draw = jax.jit(lambda k: jax.random.normal(k, SHAPE))
  low = data.astype(jnp.bfloat16)
  return {
    "q_sample_closed_form": _timed(lambda: closed(key, data, t), reps),
    "jax.random.normal alone": _timed(lambda: draw(key), reps),
    "q_sample alone (noise given)": _timed(lambda: elementwise(data, t, noise), reps),
    "q_sample_closed_form (bfloat16 data)": _timed(lambda: closed(key, low, t), reps),
  }


def _time_noise_share_of_training(reps: int) -> dict[str, Any]:
  """One training step of configs/digits_ddpm.py (the path ``diffjax train`` runs) against the
  noise draw of its batch: the most a faster generator could save in training."""
  from diffjax.train import config as config_lib  # noqa: PLC0415 - only this figure needs it
  from diffjax.train import sharding as sharding_lib  # noqa: PLC0415
  from diffjax.train.trainer import make_trainer  # noqa: PLC0415

  config = config_lib.load_config_file(str(ROOT / "configs" / "digits_ddpm.py"))
  config_lib.validate(config, num_devices=1)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  trainer = make_trainer(config, mesh)
  shape = (config.train.batch_size, *config.data.shape)
  batch = {"x": jnp.zeros(shape), "label": jnp.zeros(shape[:1], jnp.int32)}
  state = [trainer.create_state()]

  def step():
    state[0], metrics = trainer.advance(state[0], 1, batch)
    return metrics["loss"]

  key = jax.random.key(0)
  draw = jax.jit(lambda k: jax.random.normal(k, shape))
  step_ms, noise_ms = _timed(step, reps), _timed(lambda: draw(key), reps)
  return {
    "config": "configs/digits_ddpm.py",
    "batch_shape": list(shape),
    "train_step": step_ms,
    "noise_draw": noise_ms,
    "noise_share_of_step": round(noise_ms["median_ms"] / step_ms["median_ms"], 5),
  }


def _time_process(num_steps: int, reps: int, loop_reps: int) -> dict[str, Any]:
  schedule = get_discrete_schedule("linear", num_steps=num_steps)
  key = jax.random.key(0)
  data = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1.0, maxval=1.0)
  # The chain runs all T steps for every batch, so time the worst case t = T - 1 for all three.
  t = jnp.full((SHAPE[0],), num_steps - 1, dtype=jnp.int32)

  closed = jax.jit(
    lambda k, x, steps: forward.q_sample_closed_form(data=x, t=steps, key=k, schedule=schedule)
  )
  sequential = jax.jit(
    lambda k, x, steps: forward.q_sample_sequential(data=x, t=steps, key=k, schedule=schedule)
  )

  @jax.jit
  def one_step(x, step_key, step, steps):
    noise = jax.random.normal(step_key, x.shape, x.dtype)
    x_next = jnp.sqrt(schedule.alphas[step]) * x + jnp.sqrt(schedule.betas[step]) * noise
    return jnp.where((step <= steps)[:, None, None, None], x_next, x)

  step_keys = list(jax.random.split(key, num_steps))
  step_indices = [jnp.asarray(s, jnp.int32) for s in range(num_steps)]

  def python_loop():
    x = data
    for step_key, step in zip(step_keys, step_indices):
      x = one_step(x, step_key, step, t)
    return x

  closed_fn, sequential_fn = (lambda: closed(key, data, t)), (lambda: sequential(key, data, t))
  closed_s = _median_seconds(closed_fn, reps)
  closed_min = _MINIMA.pop(id(closed_fn))
  sequential_s = _median_seconds(sequential_fn, max(loop_reps, 1))
  sequential_min = _MINIMA.pop(id(sequential_fn))
  loop_s = _median_seconds(python_loop, max(loop_reps, 1))
  loop_min = _MINIMA.pop(id(python_loop))
  bytes_moved = 2 * data.size * data.dtype.itemsize
  return {
    "T": num_steps,
    "closed_ms": _ms(closed_s),
    "sequential_ms": _ms(sequential_s),
    "loop_ms": _ms(loop_s),
    "closed_min_ms": _ms(closed_min),
    "sequential_min_ms": _ms(sequential_min),
    "loop_min_ms": _ms(loop_min),
    "sequential_over_closed": round(sequential_s / closed_s, 2),
    "loop_over_closed": round(loop_s / closed_s, 2),
    "target_T_over_2_met": sequential_s / closed_s >= num_steps / 2,
    "closed_GBps": round(bytes_moved / closed_s / 1e9, 3),
  }


def _time_peer(
  schedule_steps: int, reps: int
) -> tuple[dict[str, Any], Callable[[int], Any]] | None:
  """diffusers' ``DDPMScheduler.add_noise`` + ``torch.randn_like``, or a faithful torch copy.

  Returns the figures and ``run(threads)``, one ``add_noise`` call with that many torch threads
  (for :func:`_head_to_head`), or ``None`` without torch.
  """
  try:
    import torch  # noqa: PLC0415 - optional peer, imported only to measure it
  except ImportError:
    return None
  x = torch.empty(SHAPE).uniform_(-1.0, 1.0)
  t = torch.randint(0, schedule_steps, (SHAPE[0],))
  try:
    from diffusers import DDPMScheduler  # noqa: PLC0415

    scheduler = DDPMScheduler(num_train_timesteps=schedule_steps, beta_schedule="linear")

    def add_noise():
      return scheduler.add_noise(x, torch.randn_like(x), t)

    label = "diffusers.DDPMScheduler.add_noise + torch.randn_like"
  except ImportError:
    alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, schedule_steps), dim=0)

    def add_noise():
      # diffusers' add_noise, line for line: gather abar[t], sqrt, flatten, unsqueeze to x's rank.
      noise = torch.randn_like(x)
      sqrt_alpha_prod = alphas_cumprod[t].sqrt().flatten()
      sqrt_one_minus = (1.0 - alphas_cumprod[t]).sqrt().flatten()
      while sqrt_alpha_prod.dim() < x.dim():
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
      return sqrt_alpha_prod * x + sqrt_one_minus * noise

    label = (
      "torch re-implementation of diffusers DDPMScheduler.add_noise + torch.randn_like "
      "(diffusers not installed)"
    )
  threads = torch.get_num_threads()

  def run(num_threads: int):
    torch.set_num_threads(num_threads)
    try:
      with torch.no_grad():
        return add_noise()
    finally:
      torch.set_num_threads(threads)

  with torch.no_grad():
    peer = _timed(add_noise, reps)
    randn = _timed(lambda: torch.randn_like(x), reps)
  # One intra-op thread as well: on a busy machine torch's OpenMP barriers stall when a thread
  # is descheduled, and this shape is small enough that one thread is often as fast.
  single = _timed(lambda: run(1), reps)
  return (
    {
      "what": label,
      "torch_version": torch.__version__,
      "torch_threads": threads,
      "add_noise": peer,
      "add_noise_1_thread": single,
      "randn_like": randn,
    },
    run,
  )


def _head_to_head(
  peer_run: Callable[[], Any], closed_run: Callable[[], Any], *, rounds: int, reps: int
) -> dict[str, float]:
  """Medians over ``rounds`` alternating segments of ``reps`` runs each, peer then ours, so that
  both see the same machine (a shared CPU's load drifts within seconds)."""
  peer_times, closed_times = [], []
  jax.block_until_ready(closed_run())
  peer_run()
  for _ in range(rounds):
    for fn, times in ((peer_run, peer_times), (closed_run, closed_times)):
      for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
  peer_s, closed_s = statistics.median(peer_times), statistics.median(closed_times)
  return {
    "rounds": rounds,
    "reps_per_round": reps,
    "peer_median_ms": _ms(peer_s),
    "closed_median_ms": _ms(closed_s),
    "peer_min_ms": _ms(min(peer_times)),
    "closed_min_ms": _ms(min(closed_times)),
    "closed_over_peer": round(closed_s / peer_s, 2),
  }


def run_benchmark(*, sizes: list[int], reps: int, loop_reps: int) -> dict[str, Any]:
  """All figures as one JSON-serialisable dict."""
  # The peer first: JAX's CPU thread pool starts with its first computation.
  timed_peer = _time_peer(max(sizes), reps)
  results = {
    "shape": list(SHAPE),
    "dtype": "float32",
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "reps": reps,
    "processes": [_time_process(n, reps, loop_reps) for n in sizes],
  }
  schedule = get_discrete_schedule("linear", num_steps=max(sizes))
  data = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1.0, maxval=1.0)
  t = jax.random.randint(jax.random.key(2), (SHAPE[0],), 0, max(sizes))
  results["closed_form_variants"] = _time_closed_form_variants(schedule, data, t, reps)
  results["noise_share_of_training"] = _time_noise_share_of_training(reps)
  if timed_peer is None:
    results["peer"] = None
    results["peer_note"] = (
      "torch is not importable; install it (e.g. pip install torch==2.13.0, "
      "CPU wheel) to time diffusers-style add_noise"
    )
    return results
  peer, peer_run = timed_peer
  results["peer"] = peer
  # The target's figure: head to head, against the faster of torch's two thread settings.
  threads = (
    1
    if (peer["add_noise_1_thread"]["median_ms"] <= peer["add_noise"]["median_ms"])
    else peer["torch_threads"]
  )
  closed = jax.jit(
    lambda k, x, steps: forward.q_sample_closed_form(data=x, t=steps, key=k, schedule=schedule)
  )
  key = jax.random.key(0)
  head_to_head = _head_to_head(
    lambda: peer_run(threads), lambda: closed(key, data, t), rounds=10, reps=reps
  )
  head_to_head["torch_threads"] = threads
  peer["head_to_head"] = head_to_head
  peer["jax_closed_over_peer"] = head_to_head["closed_over_peer"]
  peer["target_within_1.5x_met"] = head_to_head["closed_over_peer"] <= 1.5
  return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=20, help="timed runs per figure (median)")
  parser.add_argument(
    "--sizes", type=str, default="100,500,1000", help="comma-separated numbers of steps T"
  )
  parser.add_argument("--quick", action="store_true", help="T = 100 and 3 repetitions")
  args = parser.parse_args(argv)
  try:
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
  if not args.sizes or min(args.sizes) < 2:
    parser.error(f"--sizes needs step counts >= 2, got {args.sizes}")
  if args.reps < 1:
    parser.error(f"--reps must be >= 1, got {args.reps}")
  if args.quick:
    args.sizes, args.reps = [100], 3
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  # The slow paths (T chained steps) get fewer repetitions; at least 5 as the brief asks.
  results = run_benchmark(
    sizes=args.sizes,
    reps=args.reps,
    loop_reps=min(args.reps, 3) if args.quick else max(5, args.reps // 4),
  )
  results = {
    "benchmark": "forward",
    "date": datetime.date.today().isoformat(),
    "command": shlex.join(["python", "scripts/bench_forward.py", *sys.argv[1:]]),
    **results,
  }
  json.dump(results, sys.stdout, indent=2)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
