"""Few-step generation on equal terms: W2 against NFE for reflow, MeanFlow, shortcut and
consistency models beside I-CFM and OT-CFM (the TorchCFM 2D protocol), and digits' Frechet
distance at NFE 1, 2, 4.

Protocol (Tong et al. 2024, https://arxiv.org/abs/2302.00482, as ``scripts/reproduce_2d.py``):
tasks 8gaussians -> moons and N -> moons, seeds 42..46, the 3x64 SELU MLP, batch 256, Adam
1e-3, each method's own config (``configs/toy2d_<method>.py``: steps and method settings stated
there). Methods whose seeds train at once (``train.num_seeds``, the state vmapped) do; reflow
trains one seed at a time, because the 2-RF student of seed ``s`` reads the 1-RF teacher of seed
``s`` from its workdir (``objective.teacher_workdir``).

Each trained model draws 2000 samples with its own sampler (the ODE methods: Euler) at each NFE,
scored by the exact 2-Wasserstein distance (:func:`diffjax.evaluate.wasserstein2`) against 2000
fresh target samples; mean and standard deviation over seeds. The table scores the parameters,
as TorchCFM does (the issue's goal is judged on them); the same draws from the EMA parameters are
scored beside them (``w2_ema``), since the few-step methods gain from the EMA. The
straightness of I-CFM, OT-CFM, 1-RF and 2-RF (Liu et al. 2022, https://arxiv.org/abs/2209.03003)
is :func:`diffjax.evaluate.straightness` of each model's own ODE. Digits:
``configs/digits_meanflow.py`` against ``configs/digits_fm.py`` (the flow-matching teacher at 100
Euler steps), Frechet distance in the digits classifier's feature space.

Writes ``--json`` after every trained cell (a long run leaves its finished part) and renders
``--out`` from it.

Usage::

  python scripts/results_fewstep.py                       # full protocol
  python scripts/results_fewstep.py --quick --out /tmp/f.md --json /tmp/f.json   # smoke run
  python scripts/results_fewstep.py --render               # re-render --out from --json
  python scripts/results_fewstep.py --add-json /tmp/other.json   # add a separate run's cells
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from diffjax import evaluate
from diffjax.train import config as config_lib
from diffjax.train import loop as loop_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.trainer import make_trainer

__all__ = ["TASKS", "METHODS", "add_cells", "main", "run", "to_markdown"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASKS: dict[str, tuple[str, str]] = {
  "8gaussians->moons": ("8gaussians", "moons"),
  "N->moons": ("normal", "moons"),
}
SEEDS = (42, 43, 44, 45, 46)
NFES = (1, 2, 4, 8, 100)

# method -> (display name, config file, overrides); "rf2" reads "rf1"'s workdirs.
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
  "icfm": ("I-CFM", "toy2d_otcfm", ("--config.objective.name=icfm",)),
  "otcfm": ("OT-CFM", "toy2d_otcfm", ()),
  "rf1": ("1-RF (I-CFM, sigma 0)", "toy2d_icfm", ("--config.objective.sigma=0.0",)),
  "rf2": ("2-RF", "toy2d_reflow", ()),
  "meanflow": ("MeanFlow", "toy2d_meanflow", ()),
  "shortcut": ("Shortcut", "toy2d_shortcut", ()),
  "consistency": ("Consistency", "toy2d_consistency", ()),
}
STRAIGHTNESS = ("icfm", "otcfm", "rf1", "rf2")
DIVERGED = 100.0  # W2 between two sets of the unit-scale toys is O(1); 100 means a blown-up model
ONE_SEED_AT_A_TIME = ("rf1", "rf2")

# Digits rows: (row name, config, NFEs scored).
DIGITS_MODELS = {
  "fm": ("flow matching (I-CFM, sigma 0)", "digits_fm", (1, 2, 4, 100)),
  "meanflow": ("MeanFlow", "digits_meanflow", (1, 2, 4)),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--steps", type=int, default=0, help="training steps (0: each config's own)")
  p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--nfe", default=",".join(map(str, NFES)))
  p.add_argument("--eval-samples", type=int, default=2000)
  p.add_argument("--digits", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--digits-steps", type=int, default=0, help="0: the digits configs' own")
  p.add_argument(
    "--digits-models",
    default=",".join(DIGITS_MODELS),
    help="which digits models to train (each can run in its own process, joined by --add-json)",
  )
  p.add_argument("--workroot", default="", help="where reflow's workdirs go (default: a tmp dir)")
  p.add_argument("--quick", action="store_true", help="smoke run: 200 steps, 2 seeds, 200 samples")
  p.add_argument("--render", action="store_true", help="only re-render --out from --json")
  p.add_argument(
    "--merge", action="store_true", help="add this run's cells to those already in --json"
  )
  p.add_argument(
    "--add-json",
    action="append",
    default=[],
    help="no training: add the cells of this run's JSON (repeatable) to --json, then render",
  )
  p.add_argument("--out", default=str(ROOT / "docs" / "results_fewstep.md"))
  p.add_argument("--json", default=str(ROOT / "docs" / "results_fewstep.json"))
  args = p.parse_args(argv)
  args.seeds = tuple(int(s) for s in args.seeds.split(","))
  args.nfe = tuple(int(s) for s in args.nfe.split(","))
  args.tasks = tuple(args.tasks.split(","))
  args.methods = tuple(m for m in args.methods.split(",") if m)  # '': no 2D cells (digits only)
  args.digits_models = tuple(m for m in args.digits_models.split(",") if m)
  for name, valid in (
    ("--tasks", TASKS),
    ("--methods", METHODS),
    ("--digits-models", DIGITS_MODELS),
  ):
    for value in getattr(args, name[2:].replace("-", "_")):
      if value not in valid:
        p.error(f"{name}: {value!r} is not one of {list(valid)}")
  if "rf2" in args.methods and "rf1" not in args.methods:
    p.error("--methods: rf2 is trained from rf1's workdirs; add rf1")
  if args.quick:
    args.steps, args.seeds, args.eval_samples = 200, args.seeds[:2], 200
    args.digits_steps = 50
  return args


def make_config(method: str, task: str, *, steps: int, seed: int, num_seeds: int, extra=()):
  """The method's config on this task, seed and step count, progress bar off."""
  _, config_name, overrides = METHODS[method]
  config = config_lib.load_config_file(str(CONFIGS / f"{config_name}.py"))
  source, target = TASKS[task]
  config_lib.apply_overrides(
    config,
    [
      *overrides,
      f"--config.seed={seed}",
      f"--config.data.source={source}",
      f"--config.data.target={target}",
      f"--config.train.num_seeds={num_seeds}",
      "--config.train.progress_bar=false",
      *extra,
    ],
  )
  if steps:
    config.train.steps = steps
  return config


def _unstack(params, count: int) -> list:
  if count == 1:
    return [params]
  return [jax.tree.map(lambda leaf, k=k: leaf[k], params) for k in range(count)]


def train_together(method: str, task: str, args) -> tuple[Any, list, list, float]:
  """Every seed of one (method, task) in one run (``train.num_seeds``): the trainer ``diffjax
  train`` runs, on one device; returns the experiment, each seed's parameters and EMA
  parameters, and the wall time of the whole run (compilation included) divided by the number
  of seeds."""
  config = make_config(
    method, task, steps=args.steps, seed=args.seeds[0], num_seeds=len(args.seeds)
  )
  config_lib.validate(config, num_devices=1)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  start = time.perf_counter()
  trainer = make_trainer(config, mesh)
  state, done, chunk = trainer.create_state(), 0, config.train.fused_steps
  while done < config.train.steps:
    n = min(chunk, config.train.steps - done)
    state, _ = trainer.advance(state, n, None)
    done += n
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / len(args.seeds)
  count = len(args.seeds)
  return (
    trainer.experiment,
    _unstack(state.params, count),
    _unstack(state.ema_params, count),
    seconds,
  )


def train_in_workdirs(
  method: str, task: str, args, workdirs: dict
) -> tuple[Any, list, list, float]:
  """One seed at a time, each in its own workdir (``workdirs[(method, task, seed)]``), through
  :func:`diffjax.train.loop.train`; the 2-RF student of a seed reads its 1-RF teacher's."""
  params, ema_params, seconds, experiment = [], [], 0.0, None
  for seed in args.seeds:
    workdir = pathlib.Path(args.workroot) / f"{method}_{task.replace('->', '_to_')}_{seed}"
    extra = ()
    if method == "rf2":
      extra = (f"--config.objective.teacher_workdir={workdirs[('rf1', task, seed)]}",)
    config = make_config(method, task, steps=args.steps, seed=seed, num_seeds=1, extra=extra)
    config.train.async_checkpoint = False
    config_lib.validate(config, num_devices=1)
    start = time.perf_counter()
    result = loop_lib.train(config, workdir, devices=jax.devices()[:1])
    seconds += time.perf_counter() - start
    workdirs[(method, task, seed)] = str(workdir)
    params.append(result["state"].params)
    ema_params.append(result["state"].ema_params)
    if experiment is None:
      mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
      experiment = make_trainer(config, mesh).experiment
  return experiment, params, ema_params, seconds / len(args.seeds)


def _w2_or_none(samples: np.ndarray, target: np.ndarray) -> float | None:
  # A diverged seed is reported as such (None), not dropped silently or allowed to end the run.
  return evaluate.wasserstein2(samples, target) if np.isfinite(samples).all() else None


def score(method: str, experiment, params: list, ema_params: list, args) -> list[dict]:
  """Per seed: W2 at each NFE with the method's own sampler from the parameters (``w2``) and
  from the EMA parameters (``w2_ema``, the same source draws and target samples), the NFE it
  used, and (for the ODE methods) the straightness of the parameters' flow."""
  per_seed = []
  for seed, p, ema in zip(args.seeds, params, ema_params):
    k_target, k_sample, k_straight = jax.random.split(jax.random.PRNGKey(seed + 10_000), 3)
    target = np.asarray(experiment.target_sampler(k_target, args.eval_samples))
    row: dict[str, Any] = {"seed": seed, "w2": {}, "w2_ema": {}, "nfe": {}}
    for nfe in args.nfe:
      out = experiment.generate(p, k_sample, args.eval_samples, steps=nfe)
      row["w2"][str(nfe)] = _w2_or_none(np.asarray(out["samples"]), target)
      row["nfe"][str(nfe)] = int(np.max(np.asarray(out["nfe"])))
      out_ema = experiment.generate(ema, k_sample, args.eval_samples, steps=nfe)
      row["w2_ema"][str(nfe)] = _w2_or_none(np.asarray(out_ema["samples"]), target)
    if method in STRAIGHTNESS:
      row["straightness"] = straightness_of(experiment, p, k_straight, args.eval_samples)
    per_seed.append(row)
  return per_seed


def straightness_of(experiment, params, key, num: int) -> float:
  """Straightness of the model's own ODE from ``num`` source draws (128 Euler steps, as
  ``diffjax evaluate``)."""
  velocity = lambda x, t: experiment.model.apply(params, x, t, None)
  source = experiment.source_sampler(key, num)
  return float(np.mean(np.asarray(evaluate.straightness(velocity, source, steps=128))))


def _mean_std(values) -> dict | None:
  """Mean and std over the seeds with a value; ``failed``: seeds whose samples were not finite."""
  known = [float(v) for v in values if v is not None]
  if not known:
    return None
  std = statistics.stdev(known) if len(known) > 1 else 0.0
  return {
    "mean": statistics.fmean(known),
    "std": std,
    "n": len(known),
    "failed": len(values) - len(known),
  }


def summarise(cell: dict, nfes) -> dict:
  """Mean and std over seeds of ``w2`` (and ``w2_ema`` where the seeds have it) per NFE, the
  NFE used, and the straightness."""
  seeds = cell["seeds"]
  summary = {"w2": {}, "nfe": {}}
  kinds = ("w2", "w2_ema") if all("w2_ema" in s for s in seeds) else ("w2",)
  for kind in kinds:
    summary[kind] = {}
    for nfe in map(str, nfes):
      # A diverged seed (W2 beyond DIVERGED, or not finite) is counted apart, not averaged in.
      values = [s[kind][nfe] for s in seeds]
      summary[kind][nfe] = _mean_std([None if v is None or v > DIVERGED else v for v in values])
  for nfe in map(str, nfes):
    summary["nfe"][nfe] = max(s["nfe"][nfe] for s in seeds)
  if "straightness" in seeds[0]:
    summary["straightness"] = _mean_std([s["straightness"] for s in seeds])
  return summary


def digits_part(args) -> dict:
  """Digits: MeanFlow at NFE 1, 2, 4 beside the flow-matching teacher at 1, 2, 4 and 100."""
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  reference = None
  rows = {}
  for model in args.digits_models:
    name, config_name, nfes = DIGITS_MODELS[model]
    config = config_lib.load_config_file(str(CONFIGS / f"{config_name}.py"))
    config.train.progress_bar = False
    if args.digits_steps:
      config.train.steps = args.digits_steps
    config_lib.validate(config, num_devices=1)
    start = time.perf_counter()
    trainer = make_trainer(config, mesh)
    state, done = trainer.create_state(), 0
    while done < config.train.steps:
      n = min(config.train.fused_steps, config.train.steps - done)
      state, _ = trainer.advance(state, n, None)
      done += n
      if done % 500 < n:  # a line now and then: these runs take tens of minutes on a CPU
        jax.block_until_ready(state)
        print(f"{config_name}: step {done}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    row = {"config": f"configs/{config_name}.py", "steps": config.train.steps, "train_s": seconds}
    row["command"] = shlex.join(["python", *sys.argv])
    row["date"] = datetime.datetime.now().isoformat(timespec="minutes")
    row["loadavg"] = list(os.getloadavg())
    row["fd"], row["nfe"] = {}, {}
    for nfe in nfes:
      out = trainer.experiment.generate(
        state.ema_params, jax.random.PRNGKey(7), args.eval_samples, steps=nfe
      )
      samples = np.asarray(out["samples"])
      row["fd"][str(nfe)] = evaluate.digits_frechet_distance(samples, reference, seed=0)
      row["nfe"][str(nfe)] = int(np.max(np.asarray(out["nfe"])))
    rows[name] = row
  return rows


def _git_commit() -> str | None:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def run(args) -> dict:
  report: dict[str, Any] = {
    "command": shlex.join(["python", "scripts/results_fewstep.py", *sys.argv[1:]]),
    "date": datetime.datetime.now().isoformat(timespec="minutes"),
    "commit": _git_commit(),
    "machine": f"{platform.machine()}, {len(jax.devices('cpu'))} CPU device(s), "
    f"jax {jax.__version__}",
    "steps": args.steps or "each config's own",
    "seeds": list(args.seeds),
    "nfe": list(args.nfe),
    "eval_samples": args.eval_samples,
    "cells": {},
  }
  if args.merge and pathlib.Path(args.json).exists():
    earlier = json.loads(pathlib.Path(args.json).read_text())
    for cell in earlier["cells"].values():
      cell.setdefault("command", earlier["command"])
    report["cells"] = earlier["cells"]
    report["superseded"] = earlier.get("superseded", [])
    report["earlier_runs"] = earlier.get("earlier_runs", []) + [
      {k: earlier[k] for k in ("command", "date", "commit")}
    ]
  if not args.workroot:
    args.workroot = tempfile.mkdtemp(prefix="fewstep_")
  workdirs: dict = {}
  for task in args.tasks:
    for method in args.methods:
      if method in ONE_SEED_AT_A_TIME:
        experiment, params, ema, seconds = train_in_workdirs(method, task, args, workdirs)
      else:
        experiment, params, ema, seconds = train_together(method, task, args)
      cell = {"method": method, "task": task, "train_s_per_seed": seconds}
      cell["command"] = report["command"]
      cell["date"] = datetime.datetime.now().isoformat(timespec="minutes")
      cell["loadavg"] = list(os.getloadavg())
      cell["seeds"] = score(method, experiment, params, ema, args)
      cell["summary"] = summarise(cell, args.nfe)
      earlier_cell = report["cells"].get(f"{method}|{task}")
      if earlier_cell is not None:
        # A re-run cell replaces the earlier one in the tables; the earlier one stays on record.
        report.setdefault("superseded", []).append(earlier_cell)
      report["cells"][f"{method}|{task}"] = cell
      pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
      print(f"{method} {task}: {cell['summary']['w2']}", file=sys.stderr, flush=True)
  if args.digits:
    report["digits"] = digits_part(args)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return report


def _cell(stat: dict | None) -> str:
  if stat is None:
    return "-"
  failed = f" ({stat['failed']} seed(s) diverged)" if stat.get("failed") else ""
  if stat["n"] > 1:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}{failed}"
  return f"{stat['mean']:.3f}{failed}"


def _goal_lines(report: dict) -> list[str]:
  """The issue's goal on 8gaussians -> moons, read off the table: the best 1-NFE W2 at most
  1.5x OT-CFM's 100-NFE W2, and the best 4-NFE W2 within OT-CFM's 100-NFE mean + one std.

  Judged on the parameters (the protocol's); the same rule applied to the EMA parameters'
  cells (against the same OT-CFM bound) is reported beside it, not judged."""
  task = "8gaussians->moons"
  reference = report["cells"].get(f"otcfm|{task}")
  if reference is None or "100" not in reference["summary"]["w2"]:
    return []
  ref = reference["summary"]["w2"]["100"]
  lines = [f"## Goal ({task})", ""]
  for nfe, bound, rule in (
    ("1", 1.5 * ref["mean"], "1.5 x OT-CFM's 100-NFE mean"),
    ("4", ref["mean"] + ref["std"], "OT-CFM's 100-NFE mean + one std"),
  ):
    for kind, which in (("w2", "parameters (judged)"), ("w2_ema", "EMA parameters (beside)")):
      few = [
        (cell["summary"][kind][nfe]["mean"], METHODS[cell["method"]][0])
        for key, cell in report["cells"].items()
        if key.endswith(f"|{task}")
        and cell["method"] not in ("icfm", "otcfm")
        and cell["summary"].get(kind, {}).get(nfe) is not None
      ]
      if not few:
        continue
      best, name = min(few)
      verdict = "met" if best <= bound else "not met"
      among = ""
      if kind == "w2_ema":
        among = f" (among the methods with EMA cells: {', '.join(sorted(n for _, n in few))})"
      lines.append(
        f"- NFE {nfe}, {which}: best few-step method {name}, W2 {best:.3f}{among}; bound "
        f"{bound:.3f} ({rule} on its parameters, {ref['mean']:.3f} ± {ref['std']:.3f}): "
        f"**{verdict}**."
      )
  return lines + [""]


def _ema_table(report: dict, task: str, nfes: list[str]) -> list[str]:
  """The EMA parameters' W2 of the cells that have it, and which cells do not."""
  cells = [report["cells"].get(f"{m}|{task}") for m in METHODS]
  cells = [c for c in cells if c is not None]
  with_ema = [c for c in cells if "w2_ema" in c["summary"]]
  if not with_ema:
    return []
  lines = [f"W2 of the EMA parameters ({task}, same draws):", ""]
  lines += ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
  lines.append("|---|" + "---:|" * len(nfes))
  for cell in with_ema:
    w2 = [_cell(cell["summary"]["w2_ema"][n]) for n in nfes]
    lines.append(f"| {METHODS[cell['method']][0]} | " + " | ".join(w2) + " |")
  without = [METHODS[c["method"]][0] for c in cells if "w2_ema" not in c["summary"]]
  if without:
    lines += ["", f"No EMA cells (trained before EMA scoring was added): {', '.join(without)}."]
  return lines + [""]


def _superseded_lines(report: dict) -> list[str]:
  """Cells a later run replaced: their command and parameters' W2, for the record."""
  old = report.get("superseded", [])
  if not old:
    return []
  lines = ["## Superseded cells (replaced by a later run; kept in the JSON)", ""]
  for cell in old:
    w2 = ", ".join(f"NFE {n}: {_cell(stat)}" for n, stat in cell["summary"]["w2"].items())
    diverged = sorted(
      {s["seed"] for s in cell["seeds"] for v in s["w2"].values() if v is None or v > DIVERGED}
    )
    notes = f" Diverged seeds: {diverged}." if diverged else ""
    now = report["cells"].get(f"{cell['method']}|{cell['task']}")
    if now is not None and [s["w2"] for s in now["seeds"]] == [s["w2"] for s in cell["seeds"]]:
      notes += " Its replacement's W2 values are identical, seed by seed."
    lines.append(
      f"- {METHODS[cell['method']][0]}, {cell['task']}, `{cell.get('command', '?')}`: {w2}." + notes
    )
  return lines + [""]


def to_markdown(report: dict) -> str:
  nfes = [str(n) for n in report["nfe"]]
  lines = [
    "# Few-step generation: W2 against NFE (TorchCFM 2D protocol)",
    "",
    "Generated by `scripts/results_fewstep.py` from `docs/results_fewstep.json`; do not edit by "
    "hand (rerun the script).",
    "",
    f"- command: `{report['command']}`",
    *(
      f"- cells of another run: `{run['command']}` ({run['date']}, commit {run['commit']})"
      for run in report.get("earlier_runs", [])
    ),
    f"- date {report['date']}, diffjax commit {report['commit']}; {report['machine']}",
    f"- training steps: {report['steps']}; seeds {report['seeds']}; W2 exact (POT), "
    f"{report['eval_samples']} samples against {report['eval_samples']} fresh target samples, "
    "mean ± std over seeds.",
    "- samplers: each method's own (I-CFM, OT-CFM, 1-RF, 2-RF: Euler on a uniform grid; "
    "MeanFlow: average-velocity jumps; shortcut: step-size-conditioned jumps; consistency: "
    "multistep consistency sampling). NFE = network evaluations per sample.",
    "- the main tables score each model's parameters, not the EMA, as the TorchCFM protocol "
    "does, and the goal is judged on them; the second table of a task scores the EMA "
    "parameters (`train.ema_decay` of each config) on the same source draws and target samples "
    "(few-step methods usually gain from the EMA; `diffjax evaluate` uses it). Cells trained "
    "before EMA scoring was added have no EMA entry (their parameters were not kept).",
    f"- a seed whose W2 exceeds {DIVERGED:g} or whose samples are not finite is counted as "
    "diverged, not averaged in; the JSON holds every seed's values.",
    "- train s/seed: wall time of the run (compilation included) per seed. Methods whose seeds "
    "train at once (`train.num_seeds`) share one vmapped run; 1-RF and 2-RF train one seed at a "
    "time through `diffjax.train.loop.train` (the student of seed s reads its teacher's "
    "workdir), so their figure includes a run's fixed costs, and 2-RF's includes building its "
    "pregenerated pairs but not its 1-RF teacher. Timings are wall time on a shared, loaded "
    "CPU: each cell's JSON entry records its date and `os.getloadavg()` when it finished "
    "training (listed under each table); figures of cells trained at different loads do not "
    "compare.",
    "",
  ]
  done = {c["task"] for c in report["cells"].values()}
  missing = [t for t in TASKS if t not in done]
  if missing:
    lines += [f"**Not run in this report:** {', '.join(missing)}.", ""]
  if not report.get("digits"):
    lines += [
      "**Digits not run in this report** (Frechet distance of `configs/digits_meanflow.py` at "
      "NFE 1, 2, 4 beside `configs/digits_fm.py`; `--digits`).",
      "",
    ]
  tasks = sorted({c["task"] for c in report["cells"].values()}, key=list(TASKS).index)
  for task in tasks:
    lines += [f"## {task}", "", "| method | " + " | ".join(f"NFE {n}" for n in nfes)]
    lines[-1] += " | train s/seed |"
    lines.append("|---|" + "---:|" * (len(nfes) + 1))
    for method in METHODS:
      cell = report["cells"].get(f"{method}|{task}")
      if cell is None:
        continue
      w2 = [_cell(cell["summary"]["w2"][n]) for n in nfes]
      lines.append(
        f"| {METHODS[method][0]} | " + " | ".join(w2) + f" | {cell['train_s_per_seed']:.1f} |"
      )
    lines.append("")
    loads = [
      f"{METHODS[m][0]} {'/'.join(f'{v:.1f}' for v in cell['loadavg'])} ({cell['date']})"
      for m in METHODS
      if (cell := report["cells"].get(f"{m}|{task}")) is not None and "loadavg" in cell
    ]
    if loads:
      lines += [
        "Load average (1/5/15 min, `os.getloadavg()`, 2 cores) when each cell finished "
        "training: " + "; ".join(loads) + ".",
        "",
      ]
    lines += _ema_table(report, task, nfes)
    rows = [
      (METHODS[m][0], report["cells"][f"{m}|{task}"]["summary"].get("straightness"))
      for m in STRAIGHTNESS
      if f"{m}|{task}" in report["cells"]
    ]
    if rows:
      lines += ["Straightness S (lower is straighter; 0 for straight paths):", ""]
      lines += ["| method | S |", "|---|---:|"]
      lines += [f"| {name} | {_cell(stat)} |" for name, stat in rows]
      lines.append("")
  lines += _goal_lines(report)
  lines += _superseded_lines(report)
  digits = report.get("digits")
  if digits:
    lines += ["## Digits (8x8): Frechet distance against NFE", ""]
    lines += ["| model | config | steps | NFE 1 | NFE 2 | NFE 4 | NFE 100 | train s |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, row in digits.items():
      fd = [f"{row['fd'][n]:.2f}" if n in row["fd"] else "-" for n in ("1", "2", "4", "100")]
      lines.append(
        f"| {name} | `{row['config']}` | {row['steps']} | "
        + " | ".join(fd)
        + f" | {row['train_s']:.0f} |"
      )
    lines.append("")
    for name, row in digits.items():
      if "date" in row:  # rows from before these were recorded have only the report's command
        load = ", ".join(f"{x:.1f}" for x in row["loadavg"])
        lines.append(
          f"- {name}: `{row['command']}`, {row['date']}, load average {load} at the end."
        )
    lines += [
      "",
      "Frechet distance in the feature space of the digits classifier (`diffjax.evaluate`), "
      f"{report['eval_samples']} samples of the EMA parameters against all 1,797 digits; train "
      "s is wall time on the 2-core CPU at the load stated (the two rows trained side by side).",
      "",
    ]
  return "\n".join(lines)


def add_cells(report: dict, other: dict) -> dict:
  """``report`` with ``other``'s cells added (a run made apart, e.g. one task in its own
  process): a cell of the same (method, task) replaces the report's, which is kept under
  ``superseded``; ``other``'s run is listed in ``earlier_runs``. The two must share seeds, NFEs
  and sample counts, or the tables would mix protocols."""
  for key in ("seeds", "nfe", "eval_samples"):
    if report[key] != other[key]:
      raise ValueError(
        f"--add-json: {key} {other[key]!r} differs from --json's {report[key]!r}; add only runs "
        "of the same protocol"
      )
  report.setdefault("superseded", [])
  for key, cell in other["cells"].items():
    cell.setdefault("command", other["command"])
    if key in report["cells"]:
      report["superseded"].append(report["cells"][key])
    report["cells"][key] = cell
  report["superseded"] += other.get("superseded", [])
  for name, row in other.get("digits", {}).items():
    row.setdefault("command", other["command"])
    report.setdefault("digits", {})[name] = row
  report["earlier_runs"] = (
    report.get("earlier_runs", [])
    + other.get("earlier_runs", [])
    + [{k: other[k] for k in ("command", "date", "commit")}]
  )
  return report


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.render or args.add_json:
    report = json.loads(pathlib.Path(args.json).read_text())
    for path in args.add_json:
      report = add_cells(report, json.loads(pathlib.Path(path).read_text()))
    if args.add_json:
      pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  else:
    report = run(args)
  pathlib.Path(args.out).write_text(to_markdown(report))
  print(json.dumps({k: v for k, v in report.items() if k not in ("cells", "superseded")}, indent=1))


if __name__ == "__main__":
  main()
