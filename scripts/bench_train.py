"""Training-throughput benchmark on TorchCFM's 2D protocol: diffjax against TorchCFM, same run.

Protocol (Tong et al. 2024, https://arxiv.org/abs/2302.00482; TorchCFM's 2D tutorials): 8gaussians
-> moons, the 3x64 SELU MLP on ``concat(x, t)``, batch 256, Adam 1e-3, sigma 0.1, ``--steps``
steps (20,000), for I-CFM (independent pairs) and OT-CFM (exact minibatch OT).

Ours runs through the real training path: :func:`diffjax.train.experiment.build_experiment` on a
1-device mesh, and the very chunk :func:`diffjax.train.loop.train` runs
(:func:`diffjax.train.trainer.make_trainer`: ``train.fused_steps`` steps in one jitted scan, state
donated; for OT-CFM the chunk's coupling problems, one host solve of all of them, then the scan;
the per-chunk finite check). ``loop_train`` also times :func:`diffjax.train.loop.train` itself
end to end from its metrics.jsonl (``steps_per_second`` between log points, compile excluded).
The peer, when ``torch`` and ``torchcfm`` import, is TorchCFM's own loop: ``ConditionalFlowMatcher``
or ``ExactOptimalTransportConditionalFlowMatcher``, ``torchcfm.models.MLP(dim=2, w=64,
time_varying=True)``, ``torch.optim.Adam``, ``torchcfm.utils.sample_8gaussians`` /
``sample_moons``.

Timing: both models first train one chunk untimed (ours compiles there). The next steps are split
into ``--reps`` equal segments; ours and the peer train their segments alternately (ours, peer,
ours, ...) so both see the same machine load, then both finish the remaining steps untimed. A
figure is the median (and minimum) over segments of steps / wall seconds; ``cpu_us_per_step`` is
the process CPU time per step, steadier than wall time on a shared machine. After exactly
``--steps`` steps each model draws 2000 samples with 100 Euler steps from fresh source samples and
is scored by :func:`diffjax.evaluate.wasserstein2` against 2000 fresh samples of its own training
target (so the speed is compared at equal quality).

``profile`` splits ours into its parts (data sampling, forward, gradient, the optimizer step and
EMA, the OT coupling, the host solvers, a bare ``pure_callback`` round trip) and tries other
``train.fused_steps``; ``host_solvers_ms`` times the exact assignment solvers on the protocol's
cost matrices (``diffjax.couplings.OT_SOLVERS``: POT's network simplex, the default and
TorchCFM's solver, and scipy's ``linear_sum_assignment``).

Usage::

  python scripts/bench_train.py                    # full protocol (long: tens of minutes)
  python scripts/bench_train.py --quick            # smoke run: 200 steps, small evaluation
  python scripts/bench_train.py --steps 4000 --reps 4 --protocols otcfm
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import couplings, evaluate
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.step import train_step
from diffjax.train.trainer import make_trainer

__all__ = ["PROTOCOLS", "TARGET_RATIOS", "main", "parse_args", "run_benchmark"]

# recipe -> (source, target); TorchCFM's 2D tutorials train every CFM variant on this task.
PROTOCOLS: dict[str, tuple[str, str]] = {
  "icfm": ("8gaussians", "moons"),
  "otcfm": ("8gaussians", "moons"),
}
# From the issue: TorchCFM trains ~440 (I-CFM) and ~100 (OT-CFM) steps/s on 2 CPU cores.
TARGET_RATIOS = {"icfm": 10.0, "otcfm": 3.0}
PUBLISHED_PEER_STEPS_PER_S = {"icfm": 440.0, "otcfm": 100.0}
# The protocol's model, batch and optimizer are configs/toy2d_otcfm.py's: one definition.
PROTOCOL_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy2d_otcfm.py")
_PROTOCOL = config_lib.load_config_file(PROTOCOL_CONFIG)
SIGMA = _PROTOCOL.objective.sigma
BATCH = _PROTOCOL.train.batch_size
LEARNING_RATE = _PROTOCOL.optimizer.learning_rate


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--steps", type=int, default=20_000, help="training steps per model")
  p.add_argument("--reps", type=int, default=5, help="timed segments per model")
  p.add_argument("--chunk", type=int, default=0, help="train.fused_steps (0: the config default)")
  p.add_argument("--protocols", default="icfm,otcfm", help=f"subset of {sorted(PROTOCOLS)}")
  p.add_argument("--eval-samples", type=int, default=2000)
  p.add_argument("--euler-steps", type=int, default=100)
  p.add_argument(
    "--loop-steps",
    type=int,
    default=1000,
    help="steps of diffjax.train.loop.train timed end to end (0: skip)",
  )
  p.add_argument("--no-peer", action="store_true", help="skip TorchCFM even if importable")
  p.add_argument("--no-profile", action="store_true", help="skip the profile")
  p.add_argument("--seed", type=int, default=42)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 200 steps, 2 segments, 256 evaluation samples, 20 Euler steps,"
    " no loop.train run, a small profile",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.reps, args.chunk = 200, 2, args.chunk or 50
    args.eval_samples, args.euler_steps, args.loop_steps = 256, 20, 0
  protocols = [name for name in args.protocols.split(",") if name]
  unknown = sorted(set(protocols) - set(PROTOCOLS))
  if unknown:
    p.error(f"--protocols: unknown {unknown}; choose from {sorted(PROTOCOLS)}")
  args.protocols = protocols
  for name in ("steps", "reps", "eval_samples", "euler_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


# ---- small timing helpers ---------------------------------------------------------------------


class Clock:
  """Wall and process-CPU seconds of one block."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu


def _segment_summary(segments: list[dict]) -> dict:
  rates = [s["steps"] / s["wall_s"] for s in segments]
  cpu = [s["cpu_s"] / s["steps"] * 1e6 for s in segments]
  return {
    "steps_per_s_median": round(statistics.median(rates), 2),
    "steps_per_s_max": round(max(rates), 2),
    "cpu_us_per_step_median": round(statistics.median(cpu), 1),
    "segments": segments,
  }


def _per_step_us(fn: Callable[[], Any], steps: int, reps: int = 5) -> dict:
  """Median wall and CPU microseconds per step of ``fn`` (which runs ``steps`` steps)."""
  jax.block_until_ready(fn())
  walls, cpus = [], []
  for _ in range(reps):
    with Clock() as c:
      jax.block_until_ready(fn())
    walls.append(c.wall / steps * 1e6)
    cpus.append(c.cpu / steps * 1e6)
  return {
    "wall_us_median": round(statistics.median(walls), 1),
    "wall_us_min": round(min(walls), 1),
    "cpu_us_median": round(statistics.median(cpus), 1),
  }


# ---- ours ---------------------------------------------------------------------------------------


def make_config(recipe: str, *, steps: int, chunk: int, seed: int):
  """configs/toy2d_otcfm.py with this protocol's recipe, steps, chunk and seed."""
  c = config_lib.load_config_file(PROTOCOL_CONFIG)
  c.seed = seed
  c.data.source, c.data.target = PROTOCOLS[recipe]
  config_lib.apply_overrides(c, [f"--config.objective.name={recipe}"])
  c.train.steps = steps
  if chunk:
    c.train.fused_steps = chunk
  c.train.progress_bar = False
  config_lib.validate(c, num_devices=1)
  return c


class OursTrainer:
  """The jitted chunk of :func:`diffjax.train.loop.train` on a 1-device mesh."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
    # The trainer loop.train runs: one program per chunk, or two with the host's OT solve.
    trainer = make_trainer(config, self.mesh)
    self.experiment, self.optimizer = trainer.experiment, trainer.optimizer
    self.state = trainer.create_state()
    self.step_kwargs = dict(
      pair_fn=self.experiment.pair_fn,
      loss_fn=self.experiment.loss_fn,
      optimizer=self.optimizer,
      ema_decay=config.train.ema_decay,
      accumulate_steps=config.train.accumulate_steps,
    )
    self.advance = trainer.advance
    self.chunk = config.train.fused_steps
    self.metrics = None

  def train(self, steps: int) -> None:
    """``steps`` steps in chunks; like loop.train, reads the non-finite streak after each."""
    done = 0
    while done < steps:
      n = min(self.chunk, steps - done)
      self.state, self.metrics = self.advance(self.state, n)
      # loop.train's check_finite reads the chunk's metrics: one host sync per chunk.
      np.asarray(self.metrics["loss"])
      done += n

  def sample(self, key, num: int, steps: int, *, ema: bool) -> np.ndarray:
    params = self.state.ema_params if ema else self.state.params
    out = self.experiment.generate(params, key, num, steps=steps, sampler="euler")
    return np.asarray(out["samples"])

  def target(self, key, num: int) -> np.ndarray:
    return np.asarray(self.experiment.target_sampler(key, num))


# ---- the peer (TorchCFM) ----------------------------------------------------------------------


def import_peer() -> tuple[dict | None, str]:
  """TorchCFM's pieces, or None and why not."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchcfm  # pylint: disable=import-outside-toplevel
    from torchcfm import conditional_flow_matching as cfm  # pylint: disable=import-outside-toplevel
    from torchcfm.models.models import MLP  # pylint: disable=import-outside-toplevel
    from torchcfm.utils import (  # pylint: disable=import-outside-toplevel
      sample_8gaussians,
      sample_moons,
    )
  except ImportError as e:
    return None, f"peer skipped: torch/torchcfm not importable in {sys.executable} ({e})"
  peer = dict(
    torch=torch,
    cfm=cfm,
    MLP=MLP,
    version=getattr(torchcfm, "__version__", "?"),
    default_threads=torch.get_num_threads(),
    sources={"8gaussians": sample_8gaussians, "normal": lambda n: torch.randn(n, 2)},
    targets={"moons": sample_moons, "8gaussians": sample_8gaussians},
  )
  return peer, "TorchCFM in the same process and run"


class PeerTrainer:
  """TorchCFM's 2D training loop (its tutorials' code path, step for step)."""

  def __init__(self, peer: dict, recipe: str, *, seed: int):
    torch = peer["torch"]
    self.torch = torch
    self.default_threads = peer["default_threads"]
    torch.manual_seed(seed)
    np.random.seed(seed)  # OTPlanSampler draws pairs with np.random.choice
    self.model = peer["MLP"](dim=2, w=64, time_varying=True)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
    matchers = {
      "icfm": lambda: peer["cfm"].ConditionalFlowMatcher(sigma=SIGMA),
      "otcfm": lambda: peer["cfm"].ExactOptimalTransportConditionalFlowMatcher(sigma=SIGMA),
    }
    self.matcher = matchers[recipe]()
    source, target = PROTOCOLS[recipe]
    self.source, self.target_fn = peer["sources"][source], peer["targets"][target]
    self.loss = float("nan")

  def train(self, steps: int, *, fixed_batch: tuple | None = None) -> None:
    """``steps`` TorchCFM steps; ``fixed_batch=(x0, x1)`` skips data sampling (profile only)."""
    torch, model, opt = self.torch, self.model, self.optimizer
    for _ in range(steps):
      opt.zero_grad()
      x0, x1 = fixed_batch or (self.source(BATCH), self.target_fn(BATCH))
      t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
      vt = model(torch.cat([xt, t[:, None]], dim=-1))
      loss = torch.mean((vt - ut) ** 2)
      loss.backward()
      opt.step()
    self.loss = float(loss.detach())

  def sample(self, num: int, steps: int) -> np.ndarray:
    """Euler steps ``x <- x + v(x, i/N) / N`` from fresh source samples (as ours)."""
    torch = self.torch
    with torch.no_grad():
      x = self.source(num).float()
      for i in range(steps):
        t = torch.full((num, 1), i / steps)
        x = x + self.model(torch.cat([x, t], dim=-1)) / steps
    return x.numpy()

  def target(self, num: int) -> np.ndarray:
    return np.asarray(self.target_fn(num), dtype=np.float32)


def choose_peer_threads(trainer: PeerTrainer, warm: int) -> dict:
  """Trains the peer's ``warm`` warm-up steps, probing torch's thread counts on the way.

  On a loaded 2-core machine torch's default 2 intra-op threads can be ~10x slower than 1 (the
  OpenMP threads wait on each other while a core is taken), so the peer keeps whichever count
  trained faster in its probe: the comparison is against the peer at its best here.
  """
  torch = trainer.torch
  default = trainer.default_threads
  candidates = sorted({1, default})
  probe_steps = max(1, warm // (2 * len(candidates)))
  rates = {}
  for threads in candidates:
    torch.set_num_threads(threads)
    with Clock() as c:
      trainer.train(probe_steps)
    rates[threads] = probe_steps / c.wall
  best = max(rates, key=rates.get)
  torch.set_num_threads(best)
  trainer.train(warm - probe_steps * len(candidates))
  return {
    "torch_threads_default": default,
    "torch_threads_used": best,
    "threads_probe_steps_per_s": {str(k): round(v, 2) for k, v in rates.items()},
  }


# ---- one protocol -------------------------------------------------------------------------------


def _schedule(total: int, chunk: int, reps: int) -> tuple[int, int, int]:
  """(warm-up steps, steps per timed segment, untimed remainder); segments are whole chunks."""
  warm = min(chunk, total)
  per = max(chunk, ((total - warm) // reps) // chunk * chunk)
  reps_fit = min(reps, (total - warm) // per) if total > warm else 0
  return warm, per if reps_fit else 0, total - warm - reps_fit * per


def run_protocol(recipe: str, args, peer: dict | None) -> tuple[dict, OursTrainer]:
  """Trains ours and the peer ``--steps`` steps, interleaving the timed segments; returns the
  results and our trainer (reused by the profile)."""
  config = make_config(recipe, steps=args.steps, chunk=args.chunk, seed=args.seed)
  ours = OursTrainer(config)
  theirs = PeerTrainer(peer, recipe, seed=args.seed) if peer else None
  warm, per, rest = _schedule(args.steps, ours.chunk, args.reps)
  if per == 0:
    raise SystemExit(
      f"--steps {args.steps} leaves no timed segment after a warm-up chunk of "
      f"{ours.chunk}; use more steps or a smaller --chunk"
    )
  result: dict[str, Any] = {
    "task": "->".join(PROTOCOLS[recipe]),
    "steps": args.steps,
    "warmup_steps": warm,
    "segment_steps": per,
    "segments": args.reps,
  }

  with Clock() as c:
    ours.train(warm)
  ours_info = {"fused_steps": ours.chunk, "compile_and_first_chunk_s": round(c.wall, 2)}
  if theirs:
    probe = choose_peer_threads(theirs, warm)
  ours_segments, peer_segments = [], []
  for _ in range(args.reps):
    if per * (len(ours_segments) + 1) > args.steps - warm:
      break
    with Clock() as c:
      ours.train(per)
    ours_segments.append({"steps": per, "wall_s": round(c.wall, 4), "cpu_s": round(c.cpu, 4)})
    if theirs:
      with Clock() as c:
        theirs.train(per)
      peer_segments.append({"steps": per, "wall_s": round(c.wall, 4), "cpu_s": round(c.cpu, 4)})
  done = warm + per * len(ours_segments)
  ours.train(args.steps - done)
  if theirs:
    theirs.train(args.steps - done)
  assert int(ours.state.step) == args.steps

  key = jax.random.PRNGKey(args.seed + 1000)
  k_sample, k_target = jax.random.split(key)
  target = ours.target(k_target, args.eval_samples)
  ours_info.update(_segment_summary(ours_segments))
  ours_info["final_loss"] = float(np.mean(np.asarray(ours.metrics["loss"])))
  with Clock() as c:
    ours_info["w2_euler"] = round(
      evaluate.wasserstein2(
        ours.sample(k_sample, args.eval_samples, args.euler_steps, ema=False), target
      ),
      4,
    )
  ours_info["w2_euler_ema"] = round(
    evaluate.wasserstein2(
      ours.sample(k_sample, args.eval_samples, args.euler_steps, ema=True), target
    ),
    4,
  )
  ours_info["eval_s"] = round(c.wall, 2)
  result["ours"] = ours_info
  result["w2_protocol"] = (
    f"W2 of {args.eval_samples} samples ({args.euler_steps} Euler steps) "
    f"vs {args.eval_samples} fresh target samples after {args.steps} steps;"
    " ours with params (as TorchCFM) and with EMA params"
  )
  if theirs:
    peer_info = _segment_summary(peer_segments)
    peer_info.update(probe)
    peer_info["final_loss"] = theirs.loss
    peer_info["w2_euler"] = round(
      evaluate.wasserstein2(
        theirs.sample(args.eval_samples, args.euler_steps), theirs.target(args.eval_samples)
      ),
      4,
    )
    if not args.quick:
      # TorchCFM's sample_8gaussians builds the batch in a Python loop; this is the peer's
      # step without it (after the evaluation, so the scored model is unaffected).
      fixed = (theirs.source(BATCH), theirs.target_fn(BATCH))
      steps = min(per, 500)
      with Clock() as c:
        theirs.train(steps, fixed_batch=fixed)
      peer_info["steps_per_s_without_data_sampling"] = round(steps / c.wall, 2)
      peer_info["cpu_us_per_step_without_data_sampling"] = round(c.cpu / steps * 1e6, 1)
    result["peer"] = peer_info
    ratio = ours_info["steps_per_s_median"] / peer_info["steps_per_s_median"]
    result["ratio_steps_per_s"] = round(ratio, 2)
    result["ratio_cpu_time"] = round(
      peer_info["cpu_us_per_step_median"] / ours_info["cpu_us_per_step_median"], 2
    )
    result["target_ratio"] = TARGET_RATIOS[recipe]
    result["target_met"] = bool(ratio >= TARGET_RATIOS[recipe])
  else:
    result["peer"] = None
    result["ratio_steps_per_s"] = None
    result["target_ratio"] = TARGET_RATIOS[recipe]
    result["target_met"] = None
  result["ratio_vs_published_peer"] = round(
    ours_info["steps_per_s_median"] / PUBLISHED_PEER_STEPS_PER_S[recipe], 2
  )
  result["loop_train"] = time_loop_train(recipe, args) if args.loop_steps else None
  return result, ours


def time_loop_train(recipe: str, args) -> dict:
  """``diffjax.train.loop.train`` end to end; rates from its own metrics.jsonl."""
  from diffjax.train import loop  # pylint: disable=import-outside-toplevel

  config = make_config(recipe, steps=args.loop_steps, chunk=args.chunk, seed=args.seed)
  with config.unlocked():
    config.train.checkpoint_every = args.loop_steps
    config.train.async_checkpoint = False
  with tempfile.TemporaryDirectory() as workdir, Clock() as c:
    loop.train(config, workdir, devices=jax.devices()[:1])
    rows = [
      json.loads(line)
      for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    ]
  rates = [row["steps_per_second"] for row in rows[1:]]  # the first interval includes compiling
  return {
    "steps": args.loop_steps,
    "log_every": config.train.log_every,
    "steps_per_s_median": round(statistics.median(rates), 2) if rates else None,
    "wall_s_total": round(c.wall, 2),
    "note": "includes logging, checkpoint and plot; rates exclude the compiling interval",
  }


# ---- profile (ours) ------------------------------------------------------------------------------


def profile(args, ours: OursTrainer) -> dict:
  """Where an OT-CFM / I-CFM step's time goes, in CPU and wall microseconds per step
  (``--quick``: the host solvers only, which need no compiling)."""
  steps = 200
  exp, state = ours.experiment, ours.state
  out: dict[str, Any] = {"host_solvers_ms": time_host_solvers(args, exp)}
  if args.quick:
    out["parts_us_per_step"] = out["icfm_fused_steps"] = None
    return out
  out["steps_per_measurement"] = steps
  source = exp.source_sampler
  batch = exp.sample_batch(jax.random.PRNGKey(0))
  icfm = OursTrainer(make_config("icfm", steps=1000, chunk=args.chunk, seed=args.seed)).experiment
  icfm_batch = icfm.pair_fn(jax.random.PRNGKey(2), batch)

  def scan(body, init):
    return jax.lax.scan(lambda c, _: (body(c), None), init, None, length=steps)[0]

  def sgd(loss_fn):
    return lambda p: jax.tree.map(
      lambda a, g: a - 1e-6 * g, p, jax.grad(loss_fn)(p, jax.random.PRNGKey(0), icfm_batch)
    )

  def data_only(k):
    x1 = exp.sample_batch(k)["x"]
    x0 = source(jax.random.fold_in(k, 1), BATCH)
    return jax.random.fold_in(k, jnp.sum(x0 + x1).astype(jnp.int32))

  def coupling_only(k):
    x0, x1 = source(k, BATCH), exp.sample_batch(jax.random.fold_in(k, 1))["x"]
    _, x1, _ = couplings.exact_ot_coupling(k, x0, x1)
    return jax.random.fold_in(k, jnp.sum(x1).astype(jnp.int32))

  def trivial_callback(c):
    idx = jax.pure_callback(
      lambda m: np.zeros(m.shape[:-1], np.int32),
      jax.ShapeDtypeStruct((BATCH,), jnp.int32),
      c,
      vmap_method="broadcast_all",
    )
    return c + idx[0].astype(c.dtype)

  def fixed_batch_step(experiment):
    kwargs = dict(ours.step_kwargs, pair_fn=experiment.pair_fn, loss_fn=experiment.loss_fn)
    return jax.jit(lambda s: scan(lambda s: train_step(s, batch, **kwargs)[0], s))

  key = jax.random.PRNGKey(1)
  cost = couplings.squared_euclidean_cost(source(key, BATCH), batch["x"])
  parts = {
    "data sampling (8gaussians + moons)": (jax.jit(lambda k: scan(data_only, k)), key),
    "I-CFM loss forward": (
      jax.jit(
        lambda p: scan(
          lambda p: jax.tree.map(lambda a: a + 1e-9 * icfm.loss_fn(p, key, icfm_batch), p), p
        )
      ),
      state.params,
    ),
    "I-CFM loss gradient": (jax.jit(lambda p: scan(sgd(icfm.loss_fn), p)), state.params),
    "I-CFM train_step (Adam, EMA, finite check)": (fixed_batch_step(icfm), state),
    "OT-CFM coupling alone (data + cost + exact OT callback)": (
      jax.jit(lambda k: scan(coupling_only, k)),
      key,
    ),
    "OT-CFM train_step (one OT callback per step, as without fusing)": (
      fixed_batch_step(exp),
      state,
    ),
    "pure_callback round trip (host fn returns zeros)": (
      jax.jit(lambda c: scan(trivial_callback, c)),
      cost,
    ),
  }
  results = {}
  for name, (fn, arg) in parts.items():
    results[name] = _per_step_us(lambda fn=fn, arg=arg: fn(arg), steps)
  out["parts_us_per_step"] = results
  out["icfm_fused_steps"] = time_chunk_sizes(args)
  return out


def _cost_matrices(exp, num: int, seed: int) -> list[np.ndarray]:
  keys = jax.random.split(jax.random.PRNGKey(seed), num)
  costs = []
  for k in keys:
    k0, k1 = jax.random.split(k)
    x0, x1 = exp.source_sampler(k0, BATCH), exp.target_sampler(k1, BATCH)
    costs.append(np.asarray(couplings.squared_euclidean_cost(x0, x1), np.float64))
  return costs


def _solvers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
  """The library's exact solvers (``diffjax.couplings.OT_SOLVERS``), one ``[B, B]`` cost each."""
  return {
    "POT ot.emd (library default 'emd'; TorchCFM's solver)": couplings.OT_SOLVERS["emd"],
    "scipy.linear_sum_assignment (library 'lsa')": couplings.OT_SOLVERS["lsa"],
  }


def time_host_solvers(args, exp) -> dict:
  costs = _cost_matrices(exp, 8 if args.quick else 40, args.seed)
  out = {}
  for name, solve in _solvers().items():
    times = []
    for cost in costs:
      with Clock() as c:
        solve(cost)
      times.append(c.cpu * 1e3)
    out[name] = {
      "cpu_ms_median": round(statistics.median(times), 3),
      "cpu_ms_min": round(min(times), 3),
    }
  return out


def time_chunk_sizes(args) -> dict:
  out = {}
  for chunk in (10, 100, 1000):
    trainer = OursTrainer(make_config("icfm", steps=10_000, chunk=chunk, seed=args.seed))
    trainer.train(chunk)  # compile
    steps = max(2000, chunk)
    segments = []
    for _ in range(3):
      with Clock() as c:
        trainer.train(steps)
      segments.append({"steps": steps, "wall_s": c.wall, "cpu_s": c.cpu})
    summary = _segment_summary(segments)
    summary.pop("segments")
    out[str(chunk)] = summary
  return out


# ---- main ----------------------------------------------------------------------------------------


def _environment(peer: dict | None) -> dict:
  env = {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "jax_version": jax.__version__,
    "jax_backend": jax.default_backend(),
    "jax_devices": jax.device_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    "torch_version": None,
    "torch_num_threads": None,
    "torchcfm_version": None,
  }
  if peer:
    env["torch_version"] = peer["torch"].__version__
    env["torch_num_threads"] = peer["default_threads"]
    env["torchcfm_version"] = peer["version"]
  return env


def run_benchmark(args) -> dict:
  peer, peer_note = (None, "peer skipped: --no-peer") if args.no_peer else import_peer()
  report: dict[str, Any] = {
    "benchmark": "bench_train",
    "protocol": {
      "task": "8gaussians -> moons",
      "model": "MLP 3x64 SELU on concat(x, t)",
      "batch_size": BATCH,
      "optimizer": f"Adam lr={LEARNING_RATE}",
      "sigma": SIGMA,
      "steps": args.steps,
      "reps": args.reps,
      "quick": args.quick,
    },
    "environment": _environment(peer),
    "peer_note": peer_note,
    "notes": [
      "timings interleave ours and the peer segment by segment; medians over segments",
      "the machine may be shared: see environment.loadavg_*, and prefer cpu_us_per_step",
      "moons: TorchCFM's sample_moons uses torchdyn's generate_moons, diffjax follows "
      "sklearn's make_moons noise; each model is scored against its own training target",
      "TorchCFM's OT-CFM samples B pairs from the exact plan with replacement; diffjax's "
      "exact_ot uses the optimal permutation itself",
      "diffjax's OT-CFM draws and pairs the batches of all train.fused_steps steps of a "
      "chunk before its lax.scan: one host callback solves the chunk's assignments (POT's "
      "network simplex) on a thread pool, so it uses both cores and its CPU-time ratio is "
      "below its wall-clock ratio",
    ],
    "published_peer_steps_per_s": PUBLISHED_PEER_STEPS_PER_S,
    "results": {},
  }
  trainers = {}
  for recipe in args.protocols:
    report["results"][recipe], trainers[recipe] = run_protocol(recipe, args, peer)
  report["profile"] = None
  if not args.no_profile and "otcfm" in trainers:
    report["profile"] = profile(args, trainers["otcfm"])
  report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return report


def main(argv=None) -> None:
  args = parse_args(argv)
  report = run_benchmark(args)
  json.dump(report, sys.stdout, indent=2)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
