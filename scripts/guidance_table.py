"""Guidance beyond CFG on a class-conditional 2D task: per-class W2 against the guidance weight.

Task: ``configs/toy2d_cfg.py``, class-conditional I-CFM from N(0, I) to the 8 Gaussians with
their 8 components as labels (label dropout 0.15). The main model is that config; the guide of
autoguidance is ``configs/toy2d_cfg.py:guide`` (a smaller MLP trained for fewer steps, its own
workdir, read like ``diffjax sample --guide-workdir`` reads it). Each guidance rule draws
``--per-class`` samples of every class (Euler, ``--steps`` steps, one key) from the EMA
parameters at each weight ``w``; each class's samples are scored by the exact 2-Wasserstein
distance (:func:`diffjax.evaluate.wasserstein2`) against as many fresh samples of that class of
the target, and the table gives the per-class W2 and its mean over classes. The floor is the same
distance between two independent target sets of each class (what a perfect model scores at this
size). ``w = 1`` is the conditional model for every rule.

Rules (:mod:`diffjax.samplers.guidance`): CFG; CFG on a flow-time interval; autoguidance; APG
(eta 0, norm cap r) with and without reverse momentum.

Usage::

  python scripts/guidance_table.py                           # docs/guidance.json and .md
  python scripts/guidance_table.py --quick --json /tmp/g.json --out /tmp/g.md   # smoke run
  python scripts/guidance_table.py --render                  # re-render --out from --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import evaluate
from diffjax import run as run_lib
from diffjax.data import toy2d
from diffjax.samplers.guidance import APG, Guidance
from diffjax.train import config as config_lib
from diffjax.train import loop as loop_lib

__all__ = ["RULES", "WEIGHTS", "main", "run", "to_markdown"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy2d_cfg.py"
WEIGHTS = (1.0, 1.5, 2.0, 3.0, 4.0)
NUM_CLASSES = 8
INTERVAL = (0.2, 0.8)  # flow time: sigma / alpha = (1 - t) / t in [0.25, 4]
APG_NORM = 2.0
APG_MOMENTUM = -0.5

# name -> (display name, Guidance or None, uses the guide)
RULES: dict[str, tuple[str, Guidance | None, bool]] = {
  "cfg": ("CFG", None, False),
  "interval": (
    f"CFG on flow times [{INTERVAL[0]}, {INTERVAL[1]}]",
    Guidance(interval=INTERVAL),
    False,
  ),
  "autoguidance": ("autoguidance (guide: :guide workdir)", None, True),
  "apg": (
    f"APG (eta 0, r {APG_NORM:g})",
    Guidance(apg=APG(eta=0.0, norm_threshold=APG_NORM)),
    False,
  ),
  "apg_momentum": (
    f"APG (eta 0, r {APG_NORM:g}, beta {APG_MOMENTUM:g})",
    Guidance(apg=APG(eta=0.0, norm_threshold=APG_NORM, momentum=APG_MOMENTUM)),
    False,
  ),
}


def _train(variant: str, workdir: pathlib.Path, overrides: list[str]) -> tuple[dict, float]:
  config = config_lib.load_config_file(f"{CONFIG}:{variant}" if variant else str(CONFIG))
  config_lib.apply_overrides(
    config,
    ["--config.train.progress_bar=false", "--config.train.async_checkpoint=false", *overrides],
  )
  config_lib.validate(config, num_devices=1)
  start = time.perf_counter()
  loop_lib.train(config, workdir, devices=jax.devices()[:1])
  seconds = time.perf_counter() - start
  summary = dict(
    variant=variant or "(default)",
    steps=config.train.steps,
    width=config.model.width,
    depth=config.model.depth,
    label_dropout=config.objective.label_dropout,
    train_seconds=round(seconds, 1),
  )
  return summary, seconds


def _class_reference(key, per_class: int) -> list[np.ndarray]:
  """``per_class`` target samples of each class (the labelled sampler, filtered by label)."""
  points, labels = toy2d.eight_gaussians_labelled(key, 3 * NUM_CLASSES * per_class)
  points, labels = np.asarray(points), np.asarray(labels)
  out = [points[labels == c][:per_class] for c in range(NUM_CLASSES)]
  if any(len(p) < per_class for p in out):
    raise RuntimeError("too few reference samples drawn for a class; raise the factor 3")
  return out


def _shape_of_classes(samples: np.ndarray, per_class: int) -> dict:
  """Where the W2 comes from: each class's sample std (mean over the two axes and the classes;
  the target's is ``0.1 ** 0.25 = 0.562``), the distance of its sample mean from its true centre,
  and the norm of its sample mean (the centres lie at radius 5), averaged over classes."""
  by_class = samples.reshape(NUM_CLASSES, per_class, 2)
  angles = np.arange(NUM_CLASSES) * np.pi / 4
  centres = 5.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  means = by_class.mean(axis=1)
  return dict(
    std=float(by_class.std(axis=1).mean()),
    centre_offset=float(np.linalg.norm(means - centres, axis=1).mean()),
    radius=float(np.linalg.norm(means, axis=1).mean()),
  )


def run(args) -> dict:
  root = pathlib.Path(args.workroot or tempfile.mkdtemp(prefix="guidance_table_"))
  quick = ["--config.train.steps=200", "--config.train.checkpoint_every=100"] if args.quick else []
  main_dir, guide_dir = root / "main", root / "guide"
  main_summary, _ = _train("", main_dir, quick)
  guide_summary, _ = _train("guide", guide_dir, ["--config.train.steps=50"] if args.quick else [])
  _, experiment, params, _ = run_lib.restore_for_inference(main_dir)
  _, guide_experiment, guide_params, _ = run_lib.restore_for_inference(guide_dir)
  guide = dict(guide_apply=guide_experiment.model.apply, guide_params=guide_params)

  per_class = args.per_class
  key_samples, key_ref, key_floor = jax.random.split(jax.random.PRNGKey(args.seed), 3)
  reference = _class_reference(key_ref, per_class)
  floor_sets = _class_reference(key_floor, per_class)
  floor = [evaluate.wasserstein2(a, b) for a, b in zip(reference, floor_sets, strict=True)]
  labels = jnp.repeat(jnp.arange(NUM_CLASSES, dtype=jnp.int32), per_class)

  results = {}
  start = time.perf_counter()
  for name, (label, rule, uses_guide) in RULES.items():
    options = dict(guide) if uses_guide else {}
    if rule is not None:
      options["guidance_rule"] = rule
    rows = []
    for w in WEIGHTS:
      drawn = experiment.generate(
        params,
        key_samples,
        NUM_CLASSES * per_class,
        steps=args.steps,
        sampler="euler",
        labels=labels,
        guidance=w,
        **options,
      )
      samples = np.asarray(drawn["samples"])
      w2 = []
      for c in range(NUM_CLASSES):
        own = samples[c * per_class : (c + 1) * per_class]
        w2.append(evaluate.wasserstein2(own, reference[c]) if np.isfinite(own).all() else None)
      finite = [v for v in w2 if v is not None]
      mean = float(np.mean(finite)) if len(finite) == len(w2) else None
      rows.append(dict(w=w, per_class=w2, mean=mean, **_shape_of_classes(samples, per_class)))
      print(f"{name} w={w:g}: mean W2 {mean}", file=sys.stderr, flush=True)
    results[name] = dict(label=label, rows=rows)
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
  ).stdout.strip()
  return dict(
    command="python scripts/guidance_table.py " + " ".join(sys.argv[1:]),
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    commit=commit,
    loadavg=list(os.getloadavg()),
    machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared and loaded: see loadavg)",
    quick=bool(args.quick),
    main=main_summary,
    guide=guide_summary,
    sampler="euler",
    steps=args.steps,
    per_class=per_class,
    seed=args.seed,
    weights=list(WEIGHTS),
    interval=list(INTERVAL),
    floor=dict(per_class=floor, mean=float(np.mean(floor))),
    sampling_seconds=round(time.perf_counter() - start, 1),
    rules=results,
  )


def _fmt(value) -> str:
  return "diverged" if value is None else f"{value:.3f}"


def _observations(report: dict) -> list[str]:
  """What the table shows, read off the numbers (the best weight of each rule by mean W2)."""
  lines = []
  for entry in report["rules"].values():
    rows = [r for r in entry["rows"] if r["mean"] is not None]
    base = next(r["mean"] for r in entry["rows"] if r["w"] == 1.0)
    best = min(rows, key=lambda r: r["mean"])
    worst = max(rows, key=lambda r: r["mean"])
    lines.append(
      f"- {entry['label']}: lowest mean W2 {best['mean']:.3f} at w = {best['w']:g} (w = 1: "
      f"{base:.3f}); highest {worst['mean']:.3f} at w = {worst['w']:g}."
    )
  return lines


def to_markdown(report: dict) -> str:
  header = "| w | " + " | ".join(f"class {c}" for c in range(NUM_CLASSES)) + " | mean |"
  header += " std | centre offset | radius |"
  rule = "|---" * (NUM_CLASSES + 5) + "|"
  main, guide = report["main"], report["guide"]
  out = [
    "# Guidance beyond CFG: per-class W2 against the guidance weight",
    "",
    "Generated by `scripts/guidance_table.py` from `docs/guidance.json`; do not edit by hand.",
    "",
    f"- command: `{report['command']}`",
    f"- date {report['date']} (UTC), diffjax commit {report['commit']}; {report['machine']}; "
    f"load average at the end {', '.join(f'{v:.1f}' for v in report['loadavg'])}",
    "- task: `configs/toy2d_cfg.py`, class-conditional I-CFM, N(0, I) -> 8 Gaussians, the 8 "
    f"components as labels; main model MLP {main['depth']}x{main['width']}, {main['steps']} "
    f"steps, label dropout {main['label_dropout']} ({main['train_seconds']} s to train); guide "
    f"(`:guide`) MLP {guide['depth']}x{guide['width']}, {guide['steps']} steps "
    f"({guide['train_seconds']} s).",
    f"- sampling: {report['sampler']}, {report['steps']} steps, EMA parameters, "
    f"{report['per_class']} samples per class from one key; exact W2 "
    "(`diffjax.evaluate.wasserstein2`) against "
    f"{report['per_class']} fresh samples of the same class of the target.",
    f"- floor (two independent target sets per class): mean {report['floor']['mean']:.3f}; per "
    "class " + ", ".join(f"{v:.3f}" for v in report["floor"]["per_class"]) + ".",
    "- w = 1 is the conditional model for every rule (the rows must agree there).",
    "- beside the W2, where it comes from (means over classes): `std`, each class's sample std "
    "(target: 0.1^(1/4) = 0.562); `centre offset`, the distance of its sample mean from its "
    "true centre; `radius`, the norm of its sample mean (true centres at radius 5).",
    "",
  ]
  if report.get("quick"):
    out += ["**Quick smoke run (200/50 training steps): not a result.**", ""]
  for entry in report["rules"].values():
    out += [f"## {entry['label']}", "", header, rule]
    for row in entry["rows"]:
      cells = " | ".join(_fmt(v) for v in row["per_class"])
      shape = f"{row['std']:.3f} | {row['centre_offset']:.3f} | {row['radius']:.3f}"
      out.append(f"| {row['w']:g} | {cells} | {_fmt(row['mean'])} | {shape} |")
    out.append("")
  out += ["## What the numbers show", "", *_observations(report), ""]
  if report.get("notes"):
    out += [report["notes"], ""]
  return "\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=str(ROOT / "docs" / "guidance.json"))
  parser.add_argument("--out", default=str(ROOT / "docs" / "guidance.md"))
  parser.add_argument("--workroot", default=None, help="where the two workdirs go (a temp dir)")
  parser.add_argument("--per-class", type=int, default=1000)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="a smoke run: few training steps")
  parser.add_argument("--render", action="store_true", help="only re-render --out from --json")
  args = parser.parse_args(argv)
  if args.render:
    report = json.loads(pathlib.Path(args.json).read_text())
  else:
    report = run(args)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  pathlib.Path(args.out).write_text(to_markdown(report))
  print(json.dumps({"json": args.json, "out": args.out}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
