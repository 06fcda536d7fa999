"""Sampler benchmark on trained 2D flow-matching models: W2 against NFE, and samples per second.

Models: ``configs/toy2d_otcfm.py`` (OT-CFM, 8gaussians -> moons) and ``configs/toy2d_icfm.py``
(I-CFM, N(0, I) -> 8gaussians), TorchCFM's 2D protocol (Tong et al. 2024, "Improving and
generalizing flow-based generative models with minibatch optimal transport",
https://arxiv.org/abs/2302.00482), trained by ``diffjax train`` into ``--workdir-root/<name>``
or reused from there; the EMA parameters are sampled.

For each model, every sampler its objective accepts (:func:`diffjax.objectives.accepted_samplers`:
the flow ODE solvers for both; for I-CFM, whose source is N(0, I) with independent pairs, also the
multistep solvers and the reverse-SDE samplers through the path's Gaussian coefficients) and each
NFE of ``--nfes`` that the sampler hits exactly (``steps = NFE / evaluations per step``; a solver
of two evaluations per step at NFE 1 is skipped): the exact 2-Wasserstein distance
(:func:`diffjax.evaluate.wasserstein2`) of ``--num`` generated samples to ``--num`` target samples,
for each of ``--seeds`` sample seeds (mean and standard deviation), and samples per second at a
batch of ``--timing-batch`` (median of ``--reps`` timed runs after a compile-and-warm-up run). The
adaptive solvers (dopri5, tsit5, rtol = atol = 1e-5) run once with their counted NFE. The
generated samples of a seed are the first ``--num`` of its timed batch.

Peer, where torch, torchcfm and torchdiffeq import: the same EMA weights copied into
``torchcfm.models.MLP(dim=2, w=64, time_varying=True)``, its outputs checked equal to ours to
``TRANSFER_ATOL`` on random inputs first (the peer part is dropped with a line saying why when
they are not), then integrated by torchdiffeq's fixed-grid ``euler``, ``midpoint`` and ``rk4`` on
the same uniform grid, and ``dopri5`` at the same tolerances with its NFE counted (and by
torchdyn's ``NeuralODE`` where torchdyn imports), from the same source draws as ours and scored
against the same target samples. Within one (model, NFE) every timed program, ours and the
peer's, runs once per round for ``--reps`` rounds, so all see the same machine load.

Writes the report as JSON (``--out``, also printed), rendered into markdown with ``--render``.

Usage::

  python scripts/bench_sample.py --out docs/sampler_bench.json      # in an env with torchcfm
  python scripts/bench_sample.py --render docs/sampler_bench.json > docs/sampler_bench.md
  python scripts/bench_sample.py --quick --out /tmp/s.json             # smoke run
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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
  "EVALS_PER_STEP",
  "PEER_EVALS_PER_STEP",
  "MODELS",
  "NFES",
  "TRANSFER_ATOL",
  "steps_for_nfe",
  "plan_cells",
  "goal_summary",
  "merge_model",
  "combine_reports",
  "render_markdown",
  "import_peer",
  "torch_mlp_from_params",
  "transfer_error",
  "main",
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS: dict[str, str] = {
  "otcfm": "configs/toy2d_otcfm.py",
  "icfm": "configs/toy2d_icfm.py",
}
NFES = (1, 2, 4, 8, 16, 32, 100)
GOAL_NFES = (4, 8)
TRANSFER_ATOL = 1e-5
ADAPTIVE_RTOL = ADAPTIVE_ATOL = 1e-5  # the registry's defaults for "dopri5" and "tsit5"

# Network evaluations per step of each sampler in diffjax.samplers.registry; None: adaptive (the
# NFE is counted, not chosen). "pc" is one predictor and corrector_steps = 1 corrector step.
EVALS_PER_STEP: dict[str, int | None] = {
  "euler": 1,
  "heun": 2,
  "midpoint": 2,
  "rk4": 4,
  "dopri5": None,
  "tsit5": None,
  "dpmpp_2m": 1,
  "dpmpp_3m": 1,
  "unipc": 1,
  "deis": 1,
  "dpmpp_2m_sde": 1,
  "euler_maruyama": 1,
  "sde_heun": 2,
  "pc": 2,
}
# torchdiffeq's methods run here: its "rk4" is the 3/8 rule, four evaluations per step.
PEER_EVALS_PER_STEP: dict[str, int | None] = {
  "euler": 1,
  "midpoint": 2,
  "rk4": 4,
  "dopri5": None,
}


PEER_IMPLS = ("torchdiffeq", "torchdyn")

# ---- pure parts: the plan, the goal, the page --------------------------------------------------


def steps_for_nfe(evals_per_step: int | None, nfe: int) -> int | None:
  """Steps of a solver of ``evals_per_step`` evaluations per step that make exactly ``nfe``
  evaluations, or None where no whole number of steps does (or the solver is adaptive)."""
  if evals_per_step is None or nfe < evals_per_step or nfe % evals_per_step:
    return None
  return nfe // evals_per_step


def plan_cells(
  samplers: Sequence[str], nfes: Sequence[int], evals: dict[str, int | None]
) -> list[dict]:
  """``{"sampler", "nfe_target", "steps"}`` per sampler and NFE it hits exactly; an adaptive
  sampler once, with ``nfe_target`` None (its NFE is counted)."""
  cells = []
  for name in samplers:
    if name not in evals:
      raise ValueError(f"sampler {name!r}: no evaluations-per-step entry; add it to the table")
    if evals[name] is None:
      cells.append(dict(sampler=name, nfe_target=None, steps=1))
      continue
    for nfe in nfes:
      steps = steps_for_nfe(evals[name], nfe)
      if steps is not None:
        cells.append(dict(sampler=name, nfe_target=nfe, steps=steps))
  return cells


def _best(cells: list[dict], nfe: int, *, impls: tuple[str, ...], samplers) -> dict | None:
  """The cell of least mean W2 among ``impls`` and ``samplers`` at exactly ``nfe``."""
  rows = [
    c
    for c in cells
    if c["impl"] in impls
    and c["nfe"] == nfe
    and c["sampler"] in samplers
    and c.get("w2_mean") is not None
  ]
  return min(rows, key=lambda c: c["w2_mean"], default=None)


def goal_summary(cells: list[dict], *, nfes: Sequence[int] = GOAL_NFES) -> dict:
  """The issue's goal for one model at each NFE: diffjax's best solver other than Euler against
  diffjax's Euler and against the peer's best (all at that exact NFE, mean W2 over seeds).

  ``met`` is True when the best is lower than both, False when it is not, None when a side is
  missing. ``margin_se`` is each difference in units of its standard error
  ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` over the seeds (how far from seed noise it is)."""

  def versus(best, other) -> dict | None:
    if other is None:
      return None
    se = np.sqrt(best["w2_std"] ** 2 / len(best["w2"]) + other["w2_std"] ** 2 / len(other["w2"]))
    diff = other["w2_mean"] - best["w2_mean"]
    return dict(
      sampler=other["sampler"],
      w2_mean=other["w2_mean"],
      lower=bool(best["w2_mean"] < other["w2_mean"]),
      margin_se=None if se == 0 else round(float(diff / se), 2),
    )

  out = {}
  for nfe in nfes:
    others = {c["sampler"] for c in cells} - {"euler"}
    best = _best(cells, nfe, impls=("diffjax",), samplers=others)
    euler = _best(cells, nfe, impls=("diffjax",), samplers={"euler"})
    peer = _best(cells, nfe, impls=PEER_IMPLS, samplers={c["sampler"] for c in cells})
    if best is None:
      out[str(nfe)] = dict(best=None, euler=None, peer_best=None, met=None)
      continue
    vs_euler, vs_peer = versus(best, euler), versus(best, peer)
    met = None
    if vs_euler is not None and vs_peer is not None:
      met = vs_euler["lower"] and vs_peer["lower"]
    elif (vs_euler is not None and not vs_euler["lower"]) or (
      vs_peer is not None and not vs_peer["lower"]
    ):
      met = False
    out[str(nfe)] = dict(
      best=dict(sampler=best["sampler"], w2_mean=best["w2_mean"], w2_std=best["w2_std"]),
      euler=vs_euler,
      peer_best=vs_peer,
      met=met,
    )
  return out


def _goal_line(model: str, nfe: str, g: dict) -> str:
  if g["best"] is None:
    return f"- {model}, NFE {nfe}: no diffjax solver other than Euler measured at this NFE."
  b = g["best"]
  parts = [f"best diffjax solver `{b['sampler']}` W2 {b['w2_mean']:.4f} ± {b['w2_std']:.4f}"]
  for label, other in (("diffjax Euler", g["euler"]), ("TorchCFM's best", g["peer_best"])):
    if other is None:
      parts.append(f"{label}: not measured")
    else:
      margin = "" if other["margin_se"] is None else f", {other['margin_se']:+.1f} SE"
      name = "" if label == "diffjax Euler" else f" (`{other['sampler']}`)"
      parts.append(f"{label}{name} {other['w2_mean']:.4f}{margin}")
  verdict = {True: "**met**", False: "**not met**", None: "undecided (a side is missing)"}
  return f"- {model}, NFE {nfe}: " + "; ".join(parts) + f" → {verdict[g['met']]}."


def _fmt_w2(c: dict) -> str:
  return f"{c['w2_mean']:.3f} ± {c['w2_std']:.3f}" if c.get("w2_mean") is not None else "–"


def _table(cells: list[dict], nfes: Sequence[int], value: Callable[[dict], str]) -> list[str]:
  adaptive = any(c["nfe_target"] is None for c in cells)
  head = "| implementation | sampler | " + " | ".join(f"NFE {n}" for n in nfes)
  head += " | adaptive (NFE) |" if adaptive else " |"
  lines = [head, "|---|---|" + "---:|" * (len(nfes) + adaptive)]
  rows: dict[tuple[str, str], dict] = {}
  for c in cells:
    rows.setdefault((c["impl"], c["sampler"]), {})[c["nfe_target"]] = c
  for (impl, sampler), by_nfe in rows.items():
    row = [value(by_nfe[n]) if n in by_nfe else "" for n in nfes]
    if adaptive:
      c = by_nfe.get(None)
      row.append(f"{value(c)} ({c['nfe']})" if c else "")
    lines.append(f"| {impl} | {sampler} | " + " | ".join(row) + " |")
  return lines


def render_markdown(report: dict) -> str:
  """The page docs/sampler_bench.md from the report (its JSON)."""
  env, settings = report["environment"], report["settings"]
  lines = [
    "# Samplers on trained 2D flow-matching models",
    "",
    "Generated by `python scripts/bench_sample.py --render docs/sampler_bench.json` from the "
    f"JSON written by `{report['command']}` on {report['date']}.",
    "",
    f"Measured on a shared, loaded {env['cpu_count']}-core CPU (load average "
    f"{env['loadavg_start']} at the start, {env.get('loadavg_end')} at the end); jax "
    f"{env['versions'].get('jax')}, torch {env['versions'].get('torch', 'absent')}, torchcfm "
    f"{env['versions'].get('torchcfm', 'absent')}, torchdiffeq "
    f"{env['versions'].get('torchdiffeq', 'absent')}. W2: exact (POT network simplex), "
    f"{settings['num']} generated against {settings['num']} target samples, mean ± std over "
    f"{settings['seeds']} sample seeds. Samples/s: batch {settings['timing_batch']}, median of "
    f"{settings['reps']} runs after compilation, all programs of one (model, NFE) alternating "
    "(diffjax's timed program also draws its source samples; the peer's starts from them). "
    "NFE: network evaluations per sample, counted by the solver. A solver is listed at an NFE "
    "only where whole steps reach it exactly; dopri5 and tsit5 (rtol = atol = 1e-5) run once "
    "at their own NFE.",
    "",
    f"Peer: {report['peer']['status']}",
    "",
  ]
  if report.get("note"):
    lines += [f"Runs: {report['note']}", ""]
  for run in report.get("runs", []):
    e = run["environment"]
    lines.append(
      f"- `{run['command']}`, {run['date']}, load average {e['loadavg_start']} -> "
      f"{e.get('loadavg_end')}; peer: {run['peer']['status']}"
    )
  if report.get("runs"):
    lines.append("")
  for model in report["models"].values():
    cells = model["cells"]
    lines += [
      f"## {model['title']} (`{model['config']}`, EMA parameters at step {model['step']})",
      "",
      f"W2 of two independent draws of {settings['num']} target samples (the floor): "
      f"{model['w2_floor_mean']:.3f} ± {model['w2_floor_std']:.3f}.",
    ]
    if model.get("transfer_max_abs_diff") is not None:
      lines.append(
        f"Weights copied into TorchCFM's MLP: largest output difference "
        f"{model['transfer_max_abs_diff']:.2g} (required ≤ {TRANSFER_ATOL:g})."
      )
    lines += ["", "W2 (lower is better):", ""]
    nfes = sorted(settings["nfes"])
    lines += _table(cells, nfes, _fmt_w2)
    lines += ["", "Samples per second (thousands):", ""]
    lines += _table(cells, nfes, lambda c: f"{c['samples_per_s'] / 1e3:.3g}")
    lines.append("")
  lines += [
    "## The goal at 4 and 8 NFE",
    "",
    "Goal (issue 16): at 4 and 8 NFE, the best solver's W2 is lower than Euler's and than "
    "TorchCFM's best at the same NFE, in the same run. 'Best' is diffjax's best solver other "
    "than Euler; SE: the difference over its standard error across the seeds.",
    "",
  ]
  for model in report["models"].values():
    for nfe, g in model["goal"].items():
      lines.append(_goal_line(model["title"], nfe, g))
  goal_run = report.get("goal_run")
  if goal_run:
    s = goal_run["settings"]
    lines += [
      "",
      f"### The same at {s['num']} samples per side and {s['seeds']} seeds",
      "",
      f"A second run at NFE {', '.join(map(str, s['nfes']))} only: `{goal_run['command']}`, "
      f"{goal_run['date']}. {goal_run.get('note', '')}",
      "",
    ]
    for model in goal_run["models"].values():
      lines += [f"{model['title']}, W2:", ""]
      lines += _table(model["cells"], sorted(s["nfes"]), _fmt_w2) + [""]
    for model in goal_run["models"].values():
      for nfe, g in model["goal"].items():
        lines.append(_goal_line(model["title"], nfe, g))
  return "\n".join(lines) + "\n"


# ---- the peer ----------------------------------------------------------------------------------


def import_peer() -> tuple[dict | None, str]:
  """torch, torchcfm's MLP, torchdiffeq's odeint (and torchdyn's NeuralODE if it imports), or
  None and why not."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchcfm  # pylint: disable=import-outside-toplevel
    import torchdiffeq  # pylint: disable=import-outside-toplevel
    from torchcfm.models.models import MLP  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"skipped: torch/torchcfm/torchdiffeq not importable in {sys.executable} ({e})"
  peer = dict(
    torch=torch,
    MLP=MLP,
    odeint=torchdiffeq.odeint,
    versions=dict(
      torch=torch.__version__,
      torchcfm=getattr(torchcfm, "__version__", "?"),
      torchdiffeq=getattr(torchdiffeq, "__version__", "?"),
    ),
    neural_ode=None,
  )
  try:
    import torchdyn  # pylint: disable=import-outside-toplevel
    from torchdyn.core import NeuralODE  # pylint: disable=import-outside-toplevel
  except Exception as e:  # noqa: BLE001  a broken install (e.g. torchvision) raises others
    peer["torchdyn"] = f"not importable, skipped ({type(e).__name__}: {str(e)[:120]})"
  else:
    peer["neural_ode"] = NeuralODE
    peer["versions"]["torchdyn"] = getattr(torchdyn, "__version__", "?")
    peer["torchdyn"] = "used"
  return peer, "TorchCFM's MLP with the same weights, in the same process and run"


def torch_mlp_from_params(peer: dict, params: Any):
  """``torchcfm.models.MLP(dim=2, w=64, time_varying=True)`` holding diffjax's MLP parameters:
  layer ``i``'s ``kernel [in, out]`` becomes ``net[2 i].weight [out, in]`` (its transpose),
  ``bias`` is copied; both compute ``W [x, t] + b`` on the same input order."""
  torch = peer["torch"]
  layers = params["layers"]
  model = peer["MLP"](dim=2, w=64, time_varying=True)
  linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
  if len(linears) != len(layers):
    raise ValueError(f"{len(layers)} diffjax layers against {len(linears)} torch Linear layers")
  with torch.no_grad():
    for i, linear in enumerate(linears):
      kernel = np.asarray(layers[i]["kernel"], np.float32)
      linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
      linear.bias.copy_(torch.from_numpy(np.array(layers[i]["bias"], np.float32)))
  return model.eval()


def transfer_error(
  peer: dict, torch_model, apply: Callable, params: Any, *, seed: int = 0
) -> float:
  """Largest ``|ours - peer|`` over random ``x ~ N(0, 4 I)``, ``t ~ U(0, 1)`` (1000 points)."""
  torch = peer["torch"]
  rng = np.random.default_rng(seed)
  x = (2.0 * rng.standard_normal((1000, 2))).astype(np.float32)
  t = rng.uniform(size=(1000,)).astype(np.float32)
  ours = np.asarray(apply(params, x, t, None))
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(np.concatenate([x, t[:, None]], -1))).numpy()
  return float(np.max(np.abs(ours - theirs)))


class _PeerField:
  """``dx/dt = MLP([x, t])`` as torchdiffeq calls it, counting evaluations."""

  def __init__(self, torch, model):
    self.torch, self.model, self.nfe = torch, model, 0

  def __call__(self, t, x):
    self.nfe += 1
    return self.model(self.torch.cat([x, t.reshape(1, 1).expand(x.shape[0], 1)], -1))


def _peer_integrator(peer: dict, model, method: str, steps: int) -> Callable:
  """``x0 [n, 2] (torch) -> (x1 [n, 2] numpy, nfe)``, torchdiffeq's ``method`` on the uniform
  grid of ``steps`` steps (dopri5: from 0 to 1 at the adaptive tolerances)."""
  torch = peer["torch"]

  def run(x0):
    field = _PeerField(torch, model)
    with torch.no_grad():
      if method == "dopri5":
        grid = torch.tensor([0.0, 1.0])
        out = peer["odeint"](field, x0, grid, method=method, rtol=ADAPTIVE_RTOL, atol=ADAPTIVE_ATOL)
      else:
        out = peer["odeint"](field, x0, torch.linspace(0.0, 1.0, steps + 1), method=method)
    return out[-1].numpy(), field.nfe

  return run


def _torchdyn_integrator(peer: dict, model, method: str, steps: int) -> Callable:
  """torchdyn's ``NeuralODE(field, solver=method)`` over the same grid, as TorchCFM's 2D
  tutorials sample (``node.trajectory(x0, t_span)``)."""
  torch = peer["torch"]

  def run(x0):
    field = _PeerField(torch, model)
    node = peer["neural_ode"](field, solver=method, sensitivity="adjoint")
    with torch.no_grad():
      out = node.trajectory(x0, t_span=torch.linspace(0.0, 1.0, steps + 1))
    return out[-1].numpy(), field.nfe

  return run


# ---- ours --------------------------------------------------------------------------------------


def _train_or_reuse(name: str, root: pathlib.Path, *, train_steps: int | None, small: bool) -> str:
  """The workdir of model ``name`` under ``root``: reused when it holds checkpoints, else
  trained there by :func:`diffjax.run.train_from_cli` on MODELS[name]."""
  from diffjax import run as run_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  workdir = root / name
  if (workdir / "checkpoints").is_dir():
    return str(workdir)
  path = str(ROOT / MODELS[name]) + (":small" if small else "")
  config = config_lib.load_config_file(path)
  overrides = ["--config.train.progress_bar=false"]
  if train_steps is not None:
    overrides += [
      f"--config.train.steps={train_steps}",
      f"--config.train.checkpoint_every={train_steps}",
      f"--config.train.fused_steps={min(train_steps, config.train.fused_steps)}",
      f"--config.train.log_every={min(train_steps, config.train.log_every)}",
    ]
  config_lib.apply_overrides(config, overrides)
  run_lib.train_from_cli(config, str(workdir))
  return str(workdir)


def _median_rate(batch: int, seconds: list[float]) -> float:
  return round(batch / statistics.median(seconds), 1)


def _w2_stats(values: list[float]) -> dict:
  return dict(
    w2=[round(v, 5) for v in values],
    w2_mean=round(float(np.mean(values)), 5),
    w2_std=round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 5),
  )


def bench_model(name: str, workdir: str, args, peer: dict | None, log, save=None) -> dict:
  """Every cell of one model, one NFE at a time in the order of ``args.nfes`` (the adaptive
  solvers last): W2 over the seeds, then the timed rounds; ``save(report)`` after each NFE."""
  import jax  # pylint: disable=import-outside-toplevel

  from diffjax import evaluate, objectives  # pylint: disable=import-outside-toplevel
  from diffjax import run as run_lib  # pylint: disable=import-outside-toplevel

  config, experiment, params, step = run_lib.restore_for_inference(workdir)
  params = jax.device_get(params)
  accepted = objectives.accepted_samplers(
    objectives.OBJECTIVES[config.objective.name],
    dict(config.objective),
    source_is_normal=config.data.source == "normal",
  )
  samplers = [s for s in accepted if args.samplers is None or s in args.samplers]
  batch, num = args.timing_batch, args.num
  seed_keys = [jax.random.PRNGKey(1000 + s) for s in range(args.seeds)]
  # generate's own split: the source is drawn from the first of split(key, 3).
  sources = [
    np.asarray(experiment.source_sampler(jax.random.split(k, 3)[0], batch)) for k in seed_keys
  ]
  targets = [
    np.asarray(experiment.target_sampler(jax.random.PRNGKey(2000 + s), num))
    for s in range(args.seeds + 1)
  ]
  floors = [evaluate.wasserstein2(targets[s], targets[s + 1]) for s in range(args.seeds)]
  report = dict(
    title=f"{config.objective.name.upper().replace('CFM', '-CFM')}, "
    f"{config.data.source} -> {config.data.target}",
    config=MODELS[name],
    workdir=workdir,
    step=int(step),
    samplers=list(samplers),
    w2_floor=[round(f, 5) for f in floors],
    w2_floor_mean=round(float(np.mean(floors)), 5),
    w2_floor_std=round(float(np.std(floors, ddof=1)) if len(floors) > 1 else 0.0, 5),
    transfer_max_abs_diff=None,
  )

  # Ours draws the same source points the peer gets: checked once on the trajectory's start.
  check = experiment.generate(
    params, seed_keys[0], 4, steps=1, sampler="euler", return_trajectories=True
  )
  ours_start = np.asarray(check["trajectories"][0])
  same = np.asarray(experiment.source_sampler(jax.random.split(seed_keys[0], 3)[0], 4))
  if not np.allclose(ours_start, same, atol=1e-6):
    raise RuntimeError("the source draws rebuilt here are not the generator's; fix the split")

  torch_model = None
  if peer is not None:
    torch_model = torch_mlp_from_params(peer, params)
    error = transfer_error(peer, torch_model, experiment.model.apply, params)
    report["transfer_max_abs_diff"] = error
    if not error <= TRANSFER_ATOL:
      log(f"{name}: peer dropped, weight transfer differs by {error:.3g} > {TRANSFER_ATOL:g}")
      report["peer_dropped"] = f"outputs differ by {error:.3g} > {TRANSFER_ATOL:g}"
      torch_model = None

  jobs = []  # (cell, draw) with draw(seed_index) -> (samples numpy [batch, 2], nfe)
  for cell in plan_cells(samplers, args.nfes, EVALS_PER_STEP):

    def draw(s, cell=cell):
      out = experiment.generate(
        params, seed_keys[s], batch, steps=cell["steps"], sampler=cell["sampler"]
      )
      return np.asarray(out["samples"]), int(out["nfe"])

    jobs.append((dict(impl="diffjax", **cell), draw))
  if torch_model is not None:
    torch = peer["torch"]
    x0s = [torch.from_numpy(x) for x in sources]
    integrators = [("torchdiffeq", _peer_integrator)]
    if peer["neural_ode"] is not None:
      integrators.append(("torchdyn", _torchdyn_integrator))
    for impl, make in integrators:
      methods = PEER_EVALS_PER_STEP if impl == "torchdiffeq" else {"euler": 1, "rk4": 4}
      for cell in plan_cells(list(methods), args.nfes, methods):
        integrate = make(peer, torch_model, cell["sampler"], cell["steps"])
        jobs.append((dict(impl=impl, **cell), lambda s, integrate=integrate: integrate(x0s[s])))

  by_nfe: dict[Any, list[int]] = {nfe: [] for nfe in (*args.nfes, None)}
  for i, (cell, _) in enumerate(jobs):
    by_nfe[cell["nfe_target"]].append(i)
  # One NFE at a time, so its programs stay in the generator's compile cache while timed.
  for group in by_nfe.values():
    for i in group:  # W2 per seed; the first draw also compiles ours
      cell, draw = jobs[i]
      values, nfe = [], None
      for s in range(args.seeds):
        samples, nfe = draw(s)
        if not np.all(np.isfinite(samples[:num])):
          values = None
          break
        values.append(evaluate.wasserstein2(samples[:num], targets[s]))
      cell.update(nfe=nfe, **(_w2_stats(values) if values else dict(w2=None, w2_mean=None)))
      log(f"{name} {cell['impl']} {cell['sampler']} NFE {nfe}: W2 {cell.get('w2_mean')}")
    seconds = {i: [] for i in group}
    for _ in range(args.reps):  # every program of this NFE once per round, in turn
      for i in group:
        start = time.perf_counter()
        jobs[i][1](0)
        seconds[i].append(time.perf_counter() - start)
    for i in group:
      jobs[i][0]["samples_per_s"] = _median_rate(batch, seconds[i])
      jobs[i][0]["seconds"] = [round(x, 4) for x in seconds[i]]
    report["cells"] = [cell for cell, _ in jobs if "samples_per_s" in cell]
    report["goal"] = goal_summary(report["cells"])
    if save is not None:
      save(report)
  return report


def merge_model(old: dict | None, new: dict) -> dict:
  """``new`` with the cells of ``old`` (an earlier run on the same checkpoint) that it did not
  measure, and the goal recomputed over all; a different checkpoint replaces ``old``."""
  if old is None or (old["workdir"], old["step"]) != (new["workdir"], new["step"]):
    return new
  key = lambda c: (c["impl"], c["sampler"], c["nfe_target"])
  measured = {key(c) for c in new["cells"]}
  cells = [c for c in old["cells"] if key(c) not in measured] + new["cells"]
  commands = [old["command"]] if isinstance(old["command"], str) else list(old["command"])
  return {
    **new,
    "samplers": sorted(set(old["samplers"]) | set(new["samplers"])),
    "cells": cells,
    "goal": goal_summary(cells),
    "command": [*commands, new["command"]],
  }


def combine_reports(reports: list[dict], *, note: str = "") -> dict:
  """One report of several runs: the last run's settings and peer (the one whose peer ran goes
  last), every run's command, date, environment and peer status under ``runs``, and the models
  merged in order with :func:`merge_model`."""
  if not reports:
    raise ValueError("--combine: no report given; pass a comma list of JSON files")
  settings = {k: v for k, v in reports[0]["settings"].items()}
  for r in reports[1:]:
    if r["settings"] != settings:
      raise ValueError(f"--combine: settings differ ({settings} against {r['settings']})")
  combined = {**reports[-1], "models": {}}
  combined["runs"] = [
    dict(command=r["command"], date=r["date"], environment=r["environment"], peer=r["peer"])
    for r in reports
  ]
  combined["command"] = " ; ".join(r["command"] for r in reports)
  if note:
    combined["note"] = note
  for r in reports:
    for name, model in r["models"].items():
      combined["models"][name] = merge_model(combined["models"].get(name), model)
  return combined


# ---- the edge ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--workdir-root",
    default="/tmp/bench_sample_runs",
    help="trained models are read from (or trained into) ROOT/otcfm, ROOT/icfm",
  )
  p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
  p.add_argument("--samplers", default="", help="comma list to keep (default: all accepted)")
  p.add_argument("--nfes", default=",".join(map(str, NFES)))
  p.add_argument("--num", type=int, default=2000, help="samples per side of each W2")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--timing-batch", type=int, default=10_000)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument(
    "--train-steps",
    type=int,
    default=None,
    help="train this many steps where no model exists (default: the config's)",
  )
  p.add_argument("--no-peer", action="store_true", help="skip TorchCFM even where it imports")
  p.add_argument("--out", default="", help="write the JSON report here too")
  p.add_argument(
    "--merge",
    action="store_true",
    help="keep the models of an existing --out that this run does not measure",
  )
  p.add_argument("--render", default="", help="print the markdown page of this JSON and exit")
  p.add_argument(
    "--combine",
    default="",
    help="comma list of report JSONs of separate runs (e.g. one model per process): write "
    "their models merged, in order, to --out and exit",
  )
  p.add_argument("--note", default="", help="a line on how the runs were made, for the page")
  p.add_argument(
    "--goal-run",
    default="",
    help="with --combine: a combined report of a run at the goal's NFEs only (e.g. at more "
    "samples and seeds), kept under 'goal_run' and shown in its own section",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: the :small configs, 200 samples, 1 seed, batch 512, NFE 1,4",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.num, args.seeds, args.timing_batch, args.reps = 200, 1, 512, 1
    args.nfes = "1,4"
  args.models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(args.models) - set(MODELS))
  if unknown:
    p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
  args.samplers = [s for s in args.samplers.split(",") if s] or None
  if args.samplers:
    unknown = sorted(set(args.samplers) - set(EVALS_PER_STEP))
    if unknown:
      p.error(f"--samplers: unknown {unknown}; choose from {list(EVALS_PER_STEP)}")
  try:
    args.nfes = tuple(int(n) for n in args.nfes.split(",") if n)
  except ValueError:
    p.error(f"--nfes {args.nfes!r}: a comma list of positive integers, e.g. 1,2,4,8")
  if not args.nfes or min(args.nfes) < 1:
    p.error(f"--nfes {args.nfes!r}: a comma list of positive integers, e.g. 1,2,4,8")
  for flag in ("num", "seeds", "timing_batch", "reps"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be >= 1")
  if args.num > args.timing_batch:
    p.error(f"--num {args.num} must be at most --timing-batch {args.timing_batch}")
  if args.merge and not args.out:
    p.error("--merge needs --out (the JSON to add this run's models to)")
  return args


def _environment(peer: dict | None) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  versions = dict(jax=jax.__version__, python=platform.python_version())
  if peer is not None:
    versions.update(peer["versions"])
  return dict(
    cpu_count=os.cpu_count(),
    backend=jax.default_backend(),
    platform=platform.platform(),
    loadavg_start=[round(x, 2) for x in os.getloadavg()],
    versions=versions,
  )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.render:
    print(render_markdown(json.loads(pathlib.Path(args.render).read_text())), end="")
    return 0
  if args.combine:
    reports = [json.loads(pathlib.Path(f).read_text()) for f in args.combine.split(",") if f]
    combined = combine_reports(reports, note=args.note)
    if args.goal_run:
      combined["goal_run"] = json.loads(pathlib.Path(args.goal_run).read_text())
    text = json.dumps(combined, indent=1) + "\n"
    if args.out:
      pathlib.Path(args.out).write_text(text)
    print(text, end="")
    return 0
  log = lambda line: print(line, file=sys.stderr, flush=True)
  peer, status = (None, "skipped: --no-peer") if args.no_peer else import_peer()
  if peer is not None:
    peer["torch"].set_num_threads(1)  # the 2-core machine is shared; one intra-op thread
    status += f"; torchdyn {peer['torchdyn']}; torch threads 1"
  log(f"peer: {status}")
  report = dict(
    command="python scripts/bench_sample.py " + " ".join(sys.argv[1:] if argv is None else argv),
    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    environment=_environment(peer),
    settings=dict(
      nfes=list(args.nfes),
      num=args.num,
      seeds=args.seeds,
      timing_batch=args.timing_batch,
      reps=args.reps,
      adaptive_rtol=ADAPTIVE_RTOL,
      adaptive_atol=ADAPTIVE_ATOL,
    ),
    peer=dict(status=status),
    models={},
  )
  out = pathlib.Path(args.out) if args.out else None
  if args.merge and out is not None and out.exists():
    report["models"] = json.loads(out.read_text()).get("models", {})
  root = pathlib.Path(args.workdir_root)
  for name in args.models:
    workdir = _train_or_reuse(name, root, train_steps=args.train_steps, small=args.quick)
    earlier = report["models"].get(name)

    def save(measured, name=name, earlier=earlier):
      """After each NFE, so a long run leaves its finished part."""
      measured["command"] = report["command"]
      report["models"][name] = merge_model(earlier, measured)
      report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
      if out is not None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    save(bench_model(name, workdir, args, peer, log, save=save))
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
