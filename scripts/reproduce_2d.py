"""The TorchCFM paper's 2D table: I-CFM, OT-CFM, SB-CFM and Lipman's FM on four 2D tasks, and
an SF2M row.

Tong et al. (2024), "Improving and generalizing flow-based generative models with minibatch
optimal transport", https://arxiv.org/abs/2302.00482, 2D experiments: the recipes "icfm",
"otcfm", "sbcfm" and "fm" of :mod:`diffjax.losses` on N -> 8gaussians, N -> moons, 8gaussians ->
moons and N -> scurve (FM needs a Gaussian source, so it skips 8gaussians -> moons, as the
paper's runner does), seeds 42..46, the 3x64 SELU MLP on ``concat(x, t)``, batch 256, Adam
1e-3, ``--steps`` steps (TorchCFM's 2D tutorials: 20,000). sigma = 0.1 for I-CFM, OT-CFM and FM
(``sigma_min``); SB-CFM uses sigma = 1.0 with the entropic plan of regularisation ``2 sigma^2``
(TorchCFM's runner, ``runner/configs/model/sbcfm.yaml``: ``sigma_min: 1.0``,
``ot_sampler: sinkhorn``; ``cfm_module.py``: ``OTPlanSampler(reg=2 * sigma_min**2)``).

For each (method, task) the seeds train at once, with the trainer ``diffjax train`` runs
(:func:`diffjax.train.trainer.make_trainer` with ``train.num_seeds``: the train state of every
seed stacked, every program vmapped over seeds; exact OT solves all seeds' assignments of a chunk
in one host call). Seeds that are not consecutive train one after another (``"vectorised":
false``).

Each trained model (its parameters, not the EMA, as TorchCFM evaluates) draws 2000 samples from
fresh source samples with 100 Euler steps and with dopri5 (diffrax, rtol = atol = 1e-5; its
number of network evaluations, NFE, is reported), scored by :func:`diffjax.evaluate.wasserstein2`
against 2000 fresh target samples. When torch and torchcfm import, TorchCFM trains the same
tasks and seeds in the same run (``ConditionalFlowMatcher``, ``ExactOptimalTransport...``,
``SchrodingerBridgeConditionalFlowMatcher(sigma=1, ot_method="sinkhorn")``,
``TargetConditionalFlowMatcher``; its MLP and Adam; Euler in torch, dopri5 with torchdiffeq at
the same tolerances) and its rows sit beside ours.

SF2M (Tong et al. 2023, "Simulation-free Schrodinger bridges via score and flow matching",
https://arxiv.org/abs/2307.03672; ``--methods sf2m``, not part of the paper's table): sigma = 1.0
(TorchCFM's 2D SF2M example), pairs from the entropic plan with regularisation ``2 sigma^2``, one
3x64 MLP with two output heads (velocity and score) for ours, two 3x64 MLPs (TorchCFM's example)
for the peer, trained with ``SchrodingerBridgeConditionalFlowMatcher(sigma=1,
ot_method="sinkhorn")`` and its ``compute_lambda`` score weighting. Both are scored on the
probability-flow ODE (Euler, dopri5) and on the SDE ``dx = [v + sigma^2 / 2 s] dt + sigma dW``
by Euler-Maruyama with ``--euler-steps`` steps (ours: the "euler_maruyama" sampler; the peer:
torchsde's ``sdeint(method="euler", dt=1 / steps)``).

Writes ``--out`` (markdown table + the JSON), rewritten after every (method, task) so a long run
leaves its finished part; prints the JSON.

Usage::

  python scripts/reproduce_2d.py                                  # full protocol (hours)
  python scripts/reproduce_2d.py --steps 5000 --peer-seeds 42     # a reduced run
  python scripts/reproduce_2d.py --quick --out /tmp/r.md          # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from diffjax import evaluate
from diffjax import samplers as samplers_lib
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.trainer import make_trainer

__all__ = ["TASKS", "METHODS", "SIGMAS", "DSBM_TABLE2", "main", "parse_args", "run"]

# task name -> (source, target) in diffjax.data.toy2d names
TASKS: dict[str, tuple[str, str]] = {
  "N->8gaussians": ("normal", "8gaussians"),
  "N->moons": ("normal", "moons"),
  "8gaussians->moons": ("8gaussians", "moons"),
  "N->scurve": ("normal", "scurve"),
}
PAPER_METHODS = ("icfm", "otcfm", "sbcfm", "fm")
"""The TorchCFM paper's 2D table; a run with all of them is the full protocol."""
METHODS = (*PAPER_METHODS, "sf2m")
METHOD_NAMES = {
  "icfm": "I-CFM",
  "otcfm": "OT-CFM",
  "sbcfm": "SB-CFM",
  "fm": "FM (Lipman)",
  "sf2m": "SF2M",
}
SIGMAS = {"icfm": 0.1, "otcfm": 0.1, "sbcfm": 1.0, "fm": 0.1, "sf2m": 1.0}
SDE_METHODS = ("sf2m",)
"""Methods whose model also gives the score: scored on their SDE too."""
SEEDS = (42, 43, 44, 45, 46)
# The protocol's model, batch and optimizer are configs/toy2d_otcfm.py's: one definition.
PROTOCOL_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy2d_otcfm.py")
_PROTOCOL = config_lib.load_config_file(PROTOCOL_CONFIG)
BATCH = _PROTOCOL.train.batch_size
LEARNING_RATE = _PROTOCOL.optimizer.learning_rate

# Secondary reference, quoted from the issue: Shi et al. (2023), "Diffusion Schrodinger Bridge
# Matching", https://arxiv.org/abs/2303.16852, Table 2: OT-CFM's 2-Wasserstein distance with 20
# Euler steps (their own training setup, not this protocol).
DSBM_TABLE2 = {
  "method": "OT-CFM",
  "euler_steps": 20,
  "w2": {"moons": 0.111, "scurve": 0.102, "8gaussians": 0.253, "moons->8gaussians": 0.716},
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--steps", type=int, default=20_000)
  p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  p.add_argument(
    "--peer-seeds",
    default=None,
    help="seeds TorchCFM trains (default: --seeds; 'none' skips the peer)",
  )
  p.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {list(TASKS)}")
  p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {list(METHODS)}")
  p.add_argument("--chunk", type=int, default=0, help="train.fused_steps (0: config default)")
  p.add_argument("--eval-samples", type=int, default=2000)
  p.add_argument("--euler-steps", type=int, default=100)
  p.add_argument(
    "--peer-threads",
    type=int,
    default=1,
    help="torch.set_num_threads for the peer (1: fastest on a loaded 2-core box)",
  )
  p.add_argument("--out", default="docs/results_2d.md")
  p.add_argument(
    "--render",
    default=None,
    metavar="REPORT",
    help="only rewrite --out from a report this script printed (.json) or wrote (.md) earlier",
  )
  p.add_argument(
    "--merge",
    nargs="+",
    default=[],
    metavar="REPORT",
    help="with --render: fill the (method, task) cells the first report lacks from "
    "other reports of the same protocol (e.g. a second run of the methods a "
    "long run did not reach); their commands are listed",
  )
  p.add_argument(
    "--bench-json",
    default=None,
    metavar="BENCH_JSON",
    help="add the throughput section from scripts/bench_train.py's JSON",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 100 steps, seeds 42,43, N->moons, I-CFM and OT-CFM, 200 "
    "evaluation samples, 20 Euler steps",
  )
  args = p.parse_args(argv)
  if args.merge and not args.render:
    p.error("--merge needs --render (it combines reports written earlier)")
  if args.quick:
    args.steps, args.seeds = 100, "42,43"
    args.tasks, args.methods = "N->moons", "icfm,otcfm"
    args.chunk = args.chunk or 50
    args.eval_samples, args.euler_steps = 200, 20
  args.seeds = _ints(p, "--seeds", args.seeds)
  args.peer_seeds = (
    args.seeds
    if args.peer_seeds is None
    else ()
    if args.peer_seeds.lower() == "none"
    else _ints(p, "--peer-seeds", args.peer_seeds)
  )
  args.tasks = _names(p, "--tasks", args.tasks, TASKS)
  args.methods = _names(p, "--methods", args.methods, METHODS)
  for name in ("steps", "eval_samples", "euler_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


def _ints(parser, flag: str, text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    parser.error(f"{flag}={text!r}: expected comma-separated integers such as 42,43")
  if not values:
    parser.error(f"{flag} is empty; give at least one seed")
  return values


def _names(parser, flag: str, text: str, valid) -> tuple[str, ...]:
  names = tuple(v.strip() for v in text.split(",") if v.strip())
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    parser.error(f"{flag}={text!r}: unknown {unknown}; choose from {list(valid)}")
  return names


def applicable(method: str, task: str) -> bool:
  """Lipman's FM path ``x_t = t x1 + (1 - (1 - sigma_min) t) x0`` assumes ``x0 ~ N(0, I)``."""
  return not (method == "fm" and TASKS[task][0] != "normal")


# ---- ours ----------------------------------------------------------------------------------------


def make_config(method: str, task: str, *, steps: int, chunk: int, seed: int):
  """configs/toy2d_otcfm.py with this cell's method, sigma, task, steps, chunk and seed."""
  c = config_lib.load_config_file(PROTOCOL_CONFIG)
  c.seed = seed
  c.data.source, c.data.target = TASKS[task]
  # Lipman's FM names its noise level sigma_min (TorchCFM's TargetConditionalFlowMatcher sigma).
  noise = "sigma_min" if method == "fm" else "sigma"
  config_lib.apply_overrides(
    c, [f"--config.objective.name={method}", f"--config.objective.{noise}={SIGMAS[method]}"]
  )
  c.train.steps = steps
  if chunk:
    c.train.fused_steps = chunk
  c.train.progress_bar = False
  config_lib.validate(c, num_devices=1)
  return c


def _consecutive(seeds) -> bool:
  return list(seeds) == list(range(seeds[0], seeds[0] + len(seeds)))


def train_ours(method: str, task: str, args, generators: dict) -> dict:
  """Trains every seed of one (method, task) with the trainer ``diffjax train`` runs: all seeds
  in one run (``train.num_seeds``, the state vmapped) when they are consecutive, else one run
  per seed.

  ``generators`` caches one sample generator per source distribution: every model here is the
  same MLP, so one jitted Euler / dopri5 program per source serves all methods and tasks (the
  experiment's ``apply`` is a pure function of the parameters it is given).
  """
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  together = _consecutive(args.seeds)
  runs = [args.seeds] if together else [[s] for s in args.seeds]
  params, firsts, rests = [], [], []
  for seeds in runs:
    config = make_config(method, task, steps=args.steps, chunk=args.chunk, seed=seeds[0])
    config_lib.apply_overrides(config, [f"--config.train.num_seeds={len(seeds)}"])
    trainer = make_trainer(config, mesh)
    experiment, chunk = trainer.experiment, config.train.fused_steps
    start = time.perf_counter()
    state, _ = trainer.advance(trainer.create_state(), min(chunk, args.steps), None)
    jax.block_until_ready(state)
    firsts.append(time.perf_counter() - start)
    start, done = time.perf_counter(), min(chunk, args.steps)
    while done < args.steps:
      n = min(chunk, args.steps - done)
      state, _ = trainer.advance(state, n, None)
      done += n
    jax.block_until_ready(state)
    rests.append(time.perf_counter() - start)
    params += (
      [jax.tree.map(lambda leaf, k=k: leaf[k], state.params) for k in range(len(seeds))]
      if len(seeds) > 1
      else [state.params]
    )
  info: dict[str, Any] = {
    "fused_steps": chunk,
    "vectorised": together and len(args.seeds) > 1,
    "compile_and_first_chunk_s": round(sum(firsts), 2),
    "train_s_all_seeds": round(sum(rests), 2),
  }
  timed_steps = max(args.steps - min(chunk, args.steps), 0)
  info["train_s_per_seed"] = round(info["train_s_all_seeds"] / len(args.seeds), 2)
  info["seed_steps_per_s"] = (
    round(timed_steps * len(args.seeds) / info["train_s_all_seeds"], 1)
    if info["train_s_all_seeds"] > 0
    else None
  )

  source_name = TASKS[task][0]
  if method in SDE_METHODS:  # a model of two heads: its objective's own generator
    generate = experiment.generate
  else:
    if source_name not in generators:
      generators[source_name] = samplers_lib.flow_generator(
        apply=experiment.model.apply, source=experiment.source_sampler, data_shape=(2,)
      )
    generate = generators[source_name]
  per_seed = []
  for seed, p in zip(args.seeds, params):
    key = jax.random.PRNGKey(seed + 10_000)
    k_target, k_euler, k_dopri = jax.random.split(key, 3)
    target = np.asarray(experiment.target_sampler(k_target, args.eval_samples))
    euler = generate(p, k_euler, args.eval_samples, steps=args.euler_steps, sampler="euler")
    dopri = generate(p, k_dopri, args.eval_samples, steps=1, sampler="dopri5")
    per_seed.append(
      {
        "seed": seed,
        "w2_euler": evaluate.wasserstein2(np.asarray(euler["samples"]), target),
        "w2_dopri5": evaluate.wasserstein2(np.asarray(dopri["samples"]), target),
        "nfe_dopri5": int(dopri["nfe"]),
      }
    )
    if method in SDE_METHODS:
      k_sde = jax.random.fold_in(key, 1)
      sde = generate(p, k_sde, args.eval_samples, steps=args.euler_steps, sampler="euler_maruyama")
      per_seed[-1]["w2_sde"] = evaluate.wasserstein2(np.asarray(sde["samples"]), target)
      per_seed[-1]["nfe_sde"] = int(sde["nfe"])
  info["seeds"] = per_seed
  return info


# ---- the peer (TorchCFM) -------------------------------------------------------------------------


def import_peer():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchcfm  # pylint: disable=import-outside-toplevel
    import torchdiffeq  # pylint: disable=import-outside-toplevel
    from sklearn.datasets import make_s_curve  # pylint: disable=import-outside-toplevel
    from torchcfm import conditional_flow_matching as cfm  # pylint: disable=import-outside-toplevel
    from torchcfm.models.models import MLP  # pylint: disable=import-outside-toplevel
    from torchcfm.utils import (  # pylint: disable=import-outside-toplevel
      sample_8gaussians,
      sample_moons,
    )
  except ImportError as e:
    return None, (
      f"peer skipped: torch/torchcfm/torchdiffeq not importable in {sys.executable} ({e})"
    )

  def scurve(n):
    # diffjax's s_curve defaults (noise 0.1, scale 1): sklearn's make_s_curve on (x, z).
    return torch.from_numpy(make_s_curve(n, noise=0.1)[0][:, [0, 2]]).float()

  samplers = {
    "normal": lambda n: torch.randn(n, 2),
    "8gaussians": sample_8gaussians,
    "moons": lambda n: sample_moons(n).float(),
    "scurve": scurve,
  }
  matchers = {
    "icfm": lambda: cfm.ConditionalFlowMatcher(sigma=SIGMAS["icfm"]),
    "otcfm": lambda: cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=SIGMAS["otcfm"]),
    "sbcfm": lambda: cfm.SchrodingerBridgeConditionalFlowMatcher(
      sigma=SIGMAS["sbcfm"], ot_method="sinkhorn"
    ),
    "fm": lambda: cfm.TargetConditionalFlowMatcher(sigma=SIGMAS["fm"]),
    "sf2m": lambda: cfm.SchrodingerBridgeConditionalFlowMatcher(
      sigma=SIGMAS["sf2m"], ot_method="sinkhorn"
    ),
  }
  return (
    dict(
      torch=torch,
      odeint=torchdiffeq.odeint,
      MLP=MLP,
      samplers=samplers,
      matchers=matchers,
      version=getattr(torchcfm, "__version__", "?"),
    ),
    "TorchCFM in the same process and run",
  )


def _peer_sf2m_sde(peer: dict, model, score_model, x0, *, steps: int, sigma: float, nfe: list):
  """TorchCFM's SF2M example's SDE, ``dx = [v + s'] dt + sigma dW`` (its score network ``s'``
  is trained on ``lambda(t) s' + z``, i.e. it is ``sigma^2 / 2`` times the score), by torchsde's
  Euler-Maruyama with ``steps`` steps of ``1 / steps``; ``nfe[0]`` counts drift evaluations."""
  torch = peer["torch"]
  import torchsde  # pylint: disable=import-outside-toplevel

  class SDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def f(self, t, y):
      nfe[0] += 1
      x = torch.cat([y, t.expand(y.shape[0], 1)], dim=-1)
      return model(x) + score_model(x)

    def g(self, t, y):
      return torch.ones_like(y) * sigma

  ts = torch.linspace(0.0, 1.0, steps + 1)
  return torchsde.sdeint(SDE(), x0, ts, method="euler", dt=1.0 / steps)[-1]


def train_peer(peer: dict, method: str, task: str, seed: int, args) -> dict:
  """TorchCFM's 2D loop for one seed, then Euler and dopri5 sampling (and, for SF2M, its SDE)
  and W2."""
  torch = peer["torch"]
  torch.manual_seed(seed)
  np.random.seed(seed)  # OTPlanSampler and sklearn draw from NumPy's global generator
  source, target = (peer["samplers"][name] for name in TASKS[task])
  model = peer["MLP"](dim=2, w=64, time_varying=True)
  sde = method in SDE_METHODS
  # TorchCFM's SF2M example: a second MLP for the score, one Adam over both.
  score_model = peer["MLP"](dim=2, w=64, time_varying=True) if sde else None
  parameters = [*model.parameters(), *(score_model.parameters() if sde else ())]
  optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
  matcher = peer["matchers"][method]()
  start = time.perf_counter()
  for _ in range(args.steps):
    optimizer.zero_grad()
    if sde:
      t, xt, ut, eps = matcher.sample_location_and_conditional_flow(
        source(BATCH), target(BATCH), return_noise=True
      )
      inputs = torch.cat([xt, t[:, None]], dim=-1)
      flow_loss = torch.mean((model(inputs) - ut) ** 2)
      lambda_t = matcher.compute_lambda(t)
      loss = flow_loss + torch.mean((lambda_t[:, None] * score_model(inputs) + eps) ** 2)
    else:
      t, xt, ut = matcher.sample_location_and_conditional_flow(source(BATCH), target(BATCH))
      loss = torch.mean((model(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2)
    loss.backward()
    optimizer.step()
  train_s = time.perf_counter() - start

  nfe = [0]

  def field(t, x):
    nfe[0] += 1
    return model(torch.cat([x, t.expand(x.shape[0], 1)], dim=-1))

  with torch.no_grad():
    x = source(args.eval_samples).float()
    for i in range(args.euler_steps):
      x = x + field(torch.tensor(i / args.euler_steps), x) / args.euler_steps
    euler = x.numpy()
    nfe[0] = 0
    dopri = peer["odeint"](
      field,
      source(args.eval_samples).float(),
      torch.tensor([0.0, 1.0]),
      method="dopri5",
      rtol=1e-5,
      atol=1e-5,
    )[-1].numpy()
    nfe_dopri5 = nfe[0]
    sde_samples = None
    if sde:
      nfe[0] = 0
      x0 = source(args.eval_samples).float()
      sde_samples = _peer_sf2m_sde(
        peer, model, score_model, x0, steps=args.euler_steps, sigma=SIGMAS[method], nfe=nfe
      ).numpy()
  reference = target(args.eval_samples).float().numpy()
  out = {
    "seed": seed,
    "train_s": round(train_s, 2),
    "w2_euler": evaluate.wasserstein2(euler, reference),
    "w2_dopri5": evaluate.wasserstein2(dopri, reference),
    "nfe_dopri5": nfe_dopri5,
  }
  if sde:
    out["w2_sde"] = evaluate.wasserstein2(sde_samples, reference)
    out["nfe_sde"] = nfe[0]
  return out


# ---- summary and markdown ------------------------------------------------------------------------


def _mean_std(values) -> dict | None:
  values = [v for v in values if v is not None]
  if not values:
    return None
  return {
    "mean": round(statistics.fmean(values), 4),
    "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    "n": len(values),
  }


def summarise(seeds: list[dict]) -> dict:
  keys = ("w2_euler", "w2_dopri5", "nfe_dopri5")
  if "w2_sde" in seeds[0]:
    keys += ("w2_sde", "nfe_sde")
  return {key: _mean_std([s[key] for s in seeds]) for key in keys}


def _cell(stat: dict | None, digits: int = 3) -> str:
  if stat is None:
    return "-"
  text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
  return text if stat["n"] > 1 else f"{stat['mean']:.{digits}f} (1 seed)"


def to_markdown(report: dict) -> str:
  """The tables; every number comes from ``report``."""
  run = report["run"]
  tasks, methods = run["tasks"], run["methods"]
  full = (
    run["steps"] == 20_000
    and tuple(run["seeds"]) == SEEDS
    and tuple(tasks) == tuple(TASKS)
    and set(PAPER_METHODS) <= set(methods)
  )
  peer_seeds = tuple(run["peer_seeds"])
  if full and peer_seeds == SEEDS:
    what = "the full protocol"
  elif full:
    what = (
      "the full protocol for diffjax; TorchCFM REDUCED to seed(s) "
      f"{', '.join(map(str, peer_seeds))}"
      if peer_seeds
      else "the full protocol for diffjax; TorchCFM not run"
    )
  else:
    what = "a REDUCED run, not the full protocol"
  lines = [
    "# 2D reproduction: I-CFM, OT-CFM, SB-CFM, FM (TorchCFM protocol)"
    + (", and SF2M" if "sf2m" in methods else ""),
    "",
    "Generated by `scripts/reproduce_2d.py`; do not edit by hand (rerun the script).",
    "",
    f"**What was run: {what}** ({report['status']}).",
    "",
    f"- command: `{run['command']}`",
    f"- steps: {run['steps']} per model (the protocol: 20000); seeds (ours): "
    f"{', '.join(map(str, run['seeds']))}; seeds (TorchCFM): "
    f"{', '.join(map(str, run['peer_seeds'])) or 'none'} (the protocol: 42-46 for both)",
    f"- tasks: {', '.join(tasks)}; methods: {', '.join(METHOD_NAMES[m] for m in methods)}",
    "- full protocol command: `python scripts/reproduce_2d.py` (in an environment with "
    "torch and torchcfm for the TorchCFM rows)",
    f"- diffjax commit {run.get('diffjax_commit') or 'unknown'} (uncommitted changes not recorded)",
    f"- date {run['date']}; {run['machine']}; load average at start "
    f"{run['loadavg_start']}; {report['peer_note']}",
    *[
      f"- cells this run did not reach, from a second run of the same protocol: "
      f"`{m['command']}` ({m['date']}, diffjax commit {m['diffjax_commit']}, load average at "
      f"start {m['loadavg_start']})"
      for m in run.get("merged", [])
    ],
    "",
    "Protocol (Tong et al. 2024, https://arxiv.org/abs/2302.00482): 3x64 SELU MLP on "
    "concat(x, t), batch 256, Adam lr 1e-3, sigma 0.1 (I-CFM, OT-CFM, FM's sigma_min), "
    "SB-CFM sigma 1.0 with the entropic plan of regularisation 2 sigma^2 (TorchCFM's runner "
    "`runner/configs/model/sbcfm.yaml`: `sigma_min: 1.0`, `ot_sampler: sinkhorn`; "
    "`cfm_module.py`: `OTPlanSampler(reg=2 * sigma_min**2)`). FM needs a Gaussian source and "
    "skips 8gaussians->moons. Score: exact 2-Wasserstein distance (POT) between "
    f"{run['eval_samples']} generated and {run['eval_samples']} fresh target samples, mean ± "
    "std over seeds, from the trained parameters (no EMA, as TorchCFM). Ours trains the seeds "
    "of one (method, task) at once (`jax.vmap` over the train state); TorchCFM trains one "
    "seed at a time with torch.set_num_threads("
    f"{run['peer_threads']}). Data: TorchCFM's `sample_moons` uses torchdyn's moons noise, "
    "diffjax sklearn's; each model is scored against its own training distribution. "
    "TorchCFM's paper runner itself used batch 512, AdamW (weight decay 1e-5) and 1000 "
    "epochs; this table follows its 2D tutorials (batch 256, Adam, 20k steps).",
    "",
  ]
  if "sf2m" in methods:
    lines += [
      "SF2M (Tong et al. 2023, https://arxiv.org/abs/2307.03672; not in the paper's table): "
      "sigma 1.0 (TorchCFM's 2D SF2M example), entropic plan of regularisation 2 sigma^2, "
      "flow and score losses summed with TorchCFM's `compute_lambda` weighting; diffjax: one "
      "3x64 MLP with two output heads (velocity, score); TorchCFM: two 3x64 MLPs "
      "(`SchrodingerBridgeConditionalFlowMatcher(sigma=1, ot_method='sinkhorn')`, its SF2M "
      "example), one Adam over both, the protocol's lr and batch. Euler and dopri5 rows: the "
      "probability-flow ODE (velocity alone); the SDE rows: dx = [v + sigma^2 / 2 s] dt + "
      "sigma dW by Euler-Maruyama (diffjax's `euler_maruyama`; TorchCFM: torchsde "
      "`sdeint(method='euler', dt=1/steps)`).",
      "",
    ]

  def table(title: str, key: str, with_nfe: bool, rows_of=None):
    rows = [
      f"### {title}",
      "",
      "| method | impl. | " + " | ".join(tasks) + " |",
      "|---|---|" + "---|" * len(tasks),
    ]
    for method in rows_of or methods:
      for impl in ("diffjax", "TorchCFM"):
        cells = []
        for task in tasks:
          entry = report["results"].get(method, {}).get(task)
          side = None if entry is None else entry.get("ours" if impl == "diffjax" else "peer")
          if entry is not None and entry.get("not_applicable"):
            cells.append("n/a")
          elif not side:
            cells.append("-")
          else:
            text = _cell(side["summary"][key])
            if with_nfe and side["summary"]["nfe_dopri5"]:
              text += f" (NFE {side['summary']['nfe_dopri5']['mean']:.0f})"
            cells.append(text)
        rows.append(f"| {METHOD_NAMES[method]} | {impl} | " + " | ".join(cells) + " |")
    return rows + [""]

  lines += table(
    f"W2, {run['euler_steps']} Euler steps (NFE {run['euler_steps']})", "w2_euler", False
  )
  lines += table("W2, dopri5 (rtol = atol = 1e-5; mean NFE in parentheses)", "w2_dopri5", True)
  sde_methods = [m for m in methods if m in SDE_METHODS]  # only these models have a score
  if sde_methods:
    lines += table(
      f"W2, SDE by Euler-Maruyama ({run['euler_steps']} steps, NFE {run['euler_steps']})",
      "w2_sde",
      False,
      rows_of=sde_methods,
    )

  lines += [
    "### Training time",
    "",
    "Seconds of training after the first (compiling) chunk. diffjax: all seeds of a "
    "(method, task) at once (vmapped), and that time divided by the number of seeds; "
    "TorchCFM: mean seconds per seed.",
    "",
    "| method | task | diffjax all seeds (s) | diffjax per seed (s) | diffjax compile (s) "
    "| TorchCFM per seed (s) | ratio |",
    "|---|---|---|---|---|---|---|",
  ]
  for method in methods:
    for task in tasks:
      entry = report["results"].get(method, {}).get(task)
      if not entry or entry.get("not_applicable") or not entry.get("ours"):
        continue
      ours = entry["ours"]
      peer = entry.get("peer")
      peer_s = statistics.fmean(s["train_s"] for s in peer["seeds"]) if peer else None
      ratio = (
        f"{peer_s / ours['train_s_per_seed']:.1f}x" if peer_s and ours["train_s_per_seed"] else "-"
      )
      lines.append(
        f"| {METHOD_NAMES[method]} | {task} | {ours['train_s_all_seeds']:.1f} | "
        f"{ours['train_s_per_seed']:.1f} | {ours['compile_and_first_chunk_s']:.1f} | "
        f"{'-' if peer_s is None else f'{peer_s:.1f}'} | {ratio} |"
      )
  if report.get("bench"):
    lines += bench_markdown(report["bench"])
  dsbm = report["secondary_reference"]
  lines += [
    "",
    "### Secondary reference (published, different setup)",
    "",
    f"Shi et al. (2023), Diffusion Schrodinger Bridge Matching, Table 2 "
    f"(https://arxiv.org/abs/2303.16852), {dsbm['method']}, {dsbm['euler_steps']} Euler "
    "steps, their own training setup; numbers as quoted in the issue, not re-checked "
    "here. Not comparable cell by cell with the tables above (other step counts, "
    "networks and tasks: their moons->8gaussians runs the other way).",
    "",
    "| " + " | ".join(dsbm["w2"]) + " |",
    "|" + "---|" * len(dsbm["w2"]),
    "| " + " | ".join(f"{v:.3f}" for v in dsbm["w2"].values()) + " |",
    "",
  ]
  lines += [
    "<details><summary>JSON</summary>",
    "",
    "```json",
    json.dumps(report, indent=1),
    "```",
    "",
    "</details>",
    "",
  ]
  return "\n".join(lines)


def _fmt(side: dict | None, key: str) -> str:
  return "-" if not side or side.get(key) is None else f"{side[key]:.3f}"


def bench_markdown(bench: dict) -> list[str]:
  """The training-throughput section, from ``scripts/bench_train.py``'s JSON."""
  env, proto = bench["environment"], bench["protocol"]
  lines = [
    "",
    "### Training throughput (`scripts/bench_train.py`)",
    "",
    f"8gaussians -> moons, batch {proto['batch_size']}, {proto['steps']} steps per model, "
    f"{proto['reps']} timed segments interleaved with TorchCFM's; load average "
    f"{env['loadavg_start']} at start, {env.get('loadavg_end')} at the end on "
    f"{env['cpu_count']} CPUs (shared machine: wall-clock rates are noisy, CPU time per "
    "step is steadier); torch "
    f"{env['torch_version']} with {env['torch_num_threads']} default threads. "
    f"{bench['peer_note']}.",
    "",
    "| protocol | diffjax steps/s | TorchCFM steps/s (threads) | ratio (wall) | ratio "
    "(CPU time) | target | diffjax W2 | TorchCFM W2 |",
    "|---|---|---|---|---|---|---|---|",
  ]
  verdict = {True: "met", False: "missed", None: "no peer"}
  for recipe, r in bench["results"].items():
    ours, peer = r["ours"], r.get("peer")
    ratio = f"{r['ratio_steps_per_s']}x" if peer else "-"
    ratio_cpu = f"{r['ratio_cpu_time']}x" if peer else "-"
    peer_rate = (
      f"{peer['steps_per_s_median']:.0f} ({peer.get('torch_threads_used')})" if peer else "-"
    )
    lines.append(
      f"| {METHOD_NAMES.get(recipe, recipe)} | {ours['steps_per_s_median']:.0f} | {peer_rate} "
      f"| {ratio} | {ratio_cpu} | "
      f">= {r['target_ratio']:.0f}x ({verdict[r['target_met']]}) | "
      f"{ours['w2_euler']:.3f} | {_fmt(peer, 'w2_euler')} |"
    )
  first = next(iter(bench["results"].values()), {})
  lines += [
    "",
    f"Medians over segments. {first.get('w2_protocol', '')}. Full numbers: the "
    "JSON below (`bench` key).",
    "",
  ]
  lines += [f"- {note}" for note in bench.get("notes", [])]
  for recipe, r in bench["results"].items():
    peer = r.get("peer") or {}
    if peer.get("steps_per_s_without_data_sampling"):
      lines.append(
        f"- {METHOD_NAMES.get(recipe, recipe)}: TorchCFM without its data sampling "
        f"(fixed batch): {peer['steps_per_s_without_data_sampling']:.0f} steps/s, "
        f"{peer['cpu_us_per_step_without_data_sampling']:.0f} CPU us/step; diffjax "
        f"{r['ours']['cpu_us_per_step_median']:.0f} CPU us/step with its data."
      )
    if r.get("loop_train"):
      lines.append(
        f"- {METHOD_NAMES.get(recipe, recipe)}: `diffjax.train.loop.train` end to end "
        f"({r['loop_train']['steps']} steps): "
        f"{r['loop_train']['steps_per_s_median']} steps/s between log points."
      )
  profile = bench.get("profile") or {}
  if profile.get("parts_us_per_step"):
    lines += [
      "",
      "Profile of one diffjax step (microseconds per step inside a jitted `lax.scan`, median):",
      "",
      "| part | CPU us | wall us |",
      "|---|---|---|",
    ]
    for name, v in profile["parts_us_per_step"].items():
      lines.append(f"| {name} | {v['cpu_us_median']:.0f} | {v['wall_us_median']:.0f} |")
  if profile.get("host_solvers_ms"):
    lines += [
      "",
      "Host OT solvers on this task's 256 x 256 cost matrices (CPU ms per solve):",
      "",
      "| solver | median | min |",
      "|---|---|---|",
    ]
    for name, v in profile["host_solvers_ms"].items():
      lines.append(f"| {name} | {v['cpu_ms_median']:.2f} | {v['cpu_ms_min']:.2f} |")
  if profile.get("icfm_fused_steps"):
    lines += [
      "",
      "I-CFM by `train.fused_steps` (steps per jitted chunk): "
      + ", ".join(
        f"{k}: {v['steps_per_s_median']:.0f} steps/s ({v['cpu_us_per_step_median']:.0f} CPU us)"
        for k, v in profile["icfm_fused_steps"].items()
      )
      + ".",
    ]
  return lines + [""]


# ---- main ----------------------------------------------------------------------------------------


def _git_commit() -> str | None:
  """The checkout's HEAD (the library version a table was made with), if this is a checkout."""
  import subprocess  # pylint: disable=import-outside-toplevel

  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      check=True,
      timeout=10,
      cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def run(args) -> dict:
  peer, peer_note = import_peer() if args.peer_seeds else (None, "peer skipped: --peer-seeds none")
  if peer:
    peer["torch"].set_num_threads(args.peer_threads)
  combos = [(m, t) for m in args.methods for t in args.tasks]
  generators: dict = {}
  report: dict[str, Any] = {
    "script": "reproduce_2d",
    "run": {
      "command": "python scripts/reproduce_2d.py " + " ".join(sys.argv[1:]),
      "steps": args.steps,
      "seeds": list(args.seeds),
      "peer_seeds": list(args.peer_seeds) if peer else [],
      "tasks": list(args.tasks),
      "methods": list(args.methods),
      "eval_samples": args.eval_samples,
      "euler_steps": args.euler_steps,
      "sigmas": {m: SIGMAS[m] for m in args.methods},
      "batch_size": BATCH,
      "learning_rate": LEARNING_RATE,
      "peer_threads": args.peer_threads,
      "date": datetime.datetime.now().isoformat(timespec="minutes"),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
      + (f", torch {peer['torch'].__version__}, torchcfm {peer['version']}" if peer else ""),
      "loadavg_start": [round(x, 2) for x in os.getloadavg()],
      "diffjax_commit": _git_commit(),
    },
    "peer_note": peer_note,
    "status": f"partial: 0 of {len(combos)} (method, task) done",
    "results": {},
    "secondary_reference": DSBM_TABLE2,
  }
  if args.bench_json:
    report["bench"] = json.loads(pathlib.Path(args.bench_json).read_text())
  for done, (method, task) in enumerate(combos, 1):
    entry: dict[str, Any] = {}
    if not applicable(method, task):
      entry["not_applicable"] = "FM needs a Gaussian source"
    else:
      ours = train_ours(method, task, args, generators)
      ours["summary"] = summarise(ours["seeds"])
      entry["ours"] = ours
      if peer:
        seeds = [train_peer(peer, method, task, s, args) for s in args.peer_seeds]
        entry["peer"] = {"seeds": seeds, "summary": summarise(seeds)}
      else:
        entry["peer"] = None
    report["results"].setdefault(method, {})[task] = entry
    report["status"] = (
      "complete" if done == len(combos) else f"partial: {done} of {len(combos)} (method, task) done"
    )
    report["run"]["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
      out = pathlib.Path(args.out)
      out.parent.mkdir(parents=True, exist_ok=True)
      tmp = out.with_name(out.name + ".tmp")
      tmp.write_text(to_markdown(report))
      os.replace(tmp, out)
  return report


def _load_report(path: str) -> dict:
  text = pathlib.Path(path).read_text()
  if path.endswith(".md"):  # a markdown this script wrote: its embedded JSON
    text = text.split("```json\n", 1)[1].split("\n```", 1)[0]
  return json.loads(text)


# Run settings two reports must share for their cells to sit in one table.
_PROTOCOL_KEYS = (
  "steps",
  "seeds",
  "peer_seeds",
  "eval_samples",
  "euler_steps",
  "batch_size",
  "learning_rate",
)


def merge_reports(report: dict, other: dict, *, name: str) -> None:
  """Adds ``other``'s finished (method, task) cells that ``report`` lacks (in place)."""
  for key in _PROTOCOL_KEYS:
    if report["run"][key] != other["run"][key]:
      raise SystemExit(
        f"--merge {name}: run.{key} is {other['run'][key]!r} there but "
        f"{report['run'][key]!r} in --render; merge only runs of one protocol"
      )
  for method, cells in other["results"].items():
    for task, entry in cells.items():
      report["results"].setdefault(method, {}).setdefault(task, entry)
  # Methods and tasks only the other run has join the table (cells neither ran stay "-").
  for key in ("methods", "tasks"):
    report["run"][key] += [v for v in other["run"][key] if v not in report["run"][key]]
  report["run"].setdefault("merged", []).append(
    {key: other["run"].get(key) for key in ("command", "date", "diffjax_commit", "loadavg_start")}
  )
  combos = [(m, t) for m in report["run"]["methods"] for t in report["run"]["tasks"]]
  done = sum(t in report["results"].get(m, {}) for m, t in combos)
  report["status"] = (
    "complete" if done == len(combos) else f"partial: {done} of {len(combos)} (method, task) done"
  )


def render(args) -> dict:
  """Rewrites ``--out`` from a saved report (and bench JSON) without training anything."""
  report = _load_report(args.render)
  for path in args.merge:
    merge_reports(report, _load_report(path), name=path)
  if args.bench_json:
    report["bench"] = json.loads(pathlib.Path(args.bench_json).read_text())
  pathlib.Path(args.out).write_text(to_markdown(report))
  return report


def main(argv=None) -> None:
  args = parse_args(argv)
  report = render(args) if args.render else run(args)
  json.dump(report, sys.stdout, indent=1)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
