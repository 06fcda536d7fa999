"""`diffjax evaluate --sigma-rel`: post-hoc EMA widths reconstructed and scored, at the edge.

A workdir trained with ``train.posthoc_ema.sigma_rels`` holds snapshots of power-function EMAs
(:mod:`diffjax.train.posthoc_ema`; Karras et al. 2024, EDM2, https://arxiv.org/abs/2312.02696).
:func:`check_sigma_rels` checks the request against the snapshots before anything is restored
or compiled; :func:`members` rebuilds one model per ``sigma_rel`` from them;
:func:`sweep_summary` turns one report per model into one table, a row per ``sigma_rel`` (and
sampler, steps). Every problem is one :class:`~diffjax.run.UsageError` line.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_sigma_rels", "check_sigma_rels", "members", "sweep_summary"]


def _usage_error(message: str):
  from diffjax.run import UsageError  # pylint: disable=import-outside-toplevel

  return UsageError(message)


def parse_sigma_rels(value: float | Sequence[float] | None) -> tuple[float, ...]:
  """``None`` -> ``()``; one number -> ``(value,)``; a sequence -> a tuple, repeats dropped;
  anything not a finite number is one line."""
  import math  # pylint: disable=import-outside-toplevel

  if value is None:
    return ()
  values = (value,) if isinstance(value, (int, float)) else tuple(value)
  for v in values:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise _usage_error(f"--sigma-rel {v!r}: must be a number such as 0.05, or a list 0.05,0.1")
  if not values:
    raise _usage_error("--sigma-rel: give at least one value, e.g. 0.05,0.08,0.12")
  return tuple(dict.fromkeys(float(v) for v in values))


def check_sigma_rels(workdir, config, sigma_rels: tuple[float, ...], seed_index: int | None):
  """The :class:`~diffjax.train.posthoc_ema.Reconstruction` of ``sigma_rels`` (``None`` when
  none are asked for), checked against the workdir's snapshots and config; reads the manifest
  and checks each snapshot's digest, restores and compiles nothing."""
  from diffjax.train import posthoc_ema  # pylint: disable=import-outside-toplevel

  if not sigma_rels:
    return None
  if not config.train.posthoc_ema.sigma_rels:
    raise _usage_error(
      f"--sigma-rel: --workdir {workdir} was trained without post-hoc EMA "
      "(train.posthoc_ema.sigma_rels=()); train with e.g. "
      "--config.train.posthoc_ema.sigma_rels='(0.05, 0.1)', or drop --sigma-rel"
    )
  if config.train.num_seeds > 1 and seed_index is None:
    raise _usage_error(
      f"--sigma-rel with train.num_seeds={config.train.num_seeds}: pass --seed-index to "
      "choose the seed whose EMA widths are swept"
    )
  try:
    return posthoc_ema.plan_reconstruction(pathlib.Path(workdir), sigma_rels=sigma_rels)
  except posthoc_ema.PosthocEmaError as e:
    raise _usage_error(str(e)) from None


def members(config, plan, template: Any, seed_index: int | None) -> tuple[int, list]:
  """``(step, [(sigma_rel, params)])``: each planned width rebuilt from the snapshots
  (:func:`diffjax.train.posthoc_ema.reconstruct`) in the structure of ``template`` (the
  checkpoint's EMA), the seed ``seed_index`` taken for a run of several seeds."""
  import jax  # pylint: disable=import-outside-toplevel

  from diffjax.train import posthoc_ema  # pylint: disable=import-outside-toplevel

  try:
    models = posthoc_ema.reconstruct(plan, template=template)
  except posthoc_ema.PosthocEmaError as e:
    raise _usage_error(str(e)) from None
  if config.train.num_seeds > 1:
    models = [jax.tree.map(lambda x, k=seed_index: x[k], m) for m in models]
  return plan.step, list(zip(plan.sigma_rels, models, strict=True))


def sweep_summary(reports: list[dict], plan) -> dict:
  """One report from the reports of each ``sigma_rel`` (each holding ``sigma_rel``): their rows
  in order, each with ``sigma_rel`` and, where computed, that model's ``nll`` and
  ``straightness`` as columns of the table; the reconstruction under ``posthoc_ema``."""
  first = reports[0]
  metrics = dict(first["metrics"])
  if any(r.get("nll") is not None for r in reports):
    metrics["nll"] = "NLL (nats)"
  if any(r.get("straightness") is not None for r in reports):
    metrics["straightness"] = "straightness S"
  rows = []
  for report in reports:
    extra = {name: report.get(name) for name in ("nll", "straightness") if name in metrics}
    rows += [{"sigma_rel": report["sigma_rel"], **row, **extra} for row in report["rows"]]
  info = plan.info()
  residuals = ", ".join(
    f"{s:g}: {r:.2%}" for s, r in zip(plan.sigma_rels, plan.residuals, strict=True)
  )
  note = (
    f"post-hoc EMA (EDM2): each sigma_rel rebuilt at step {plan.step} from {info['snapshots']} "
    f"snapshots (steps {info['snapshot_steps'][0]} to {info['snapshot_steps'][1]}) of the "
    f"tracked sigma_rel {', '.join(f'{s:g}' for s in info['tracked_sigma_rels'])}; "
    f"reconstructable range [{plan.range[0]:.3g}, {plan.range[1]:.3g}]; averaging-profile "
    f"error {residuals}"
  )
  summary = {k: first[k] for k in ("step", "num", "seed", "scored", "floor", "floor_note")}
  for key in ("guidance", "guidance_flags"):
    if key in first:
      summary[key] = first[key]
  nll_note = "per sigma_rel, in the table" if "nll" in metrics else first.get("nll_note")
  summary.update(
    metrics=metrics,
    rows=rows,
    notes=[note, *dict.fromkeys(n for r in reports for n in r["notes"])],
    nll=None,
    nll_note=nll_note,
    sigma_rels=list(plan.sigma_rels),
    posthoc_ema=info,
    per_sigma_rel=reports,
  )
  return summary
