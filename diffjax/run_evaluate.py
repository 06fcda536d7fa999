"""`diffjax evaluate`: a trained workdir's EMA model scored per sampler and number of steps.

:func:`evaluate_workdir` checks every argument against the workdir's config before anything is
restored or compiled (the checks shared with `diffjax sample` are in :mod:`diffjax.run`),
restores the model read-only through :func:`diffjax.run.restore_for_inference`, scores the
samples of each (sampler, steps) row beside the two-sample floor of real examples, adds the
sampler-independent numbers of the model (likelihood, straightness), and writes the table as
JSON with its plot; :func:`evaluation_table` prints that report as text.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from diffjax import run, run_guidance, run_posthoc
from diffjax.run import UsageError
from diffjax.run_guidance import GuidanceFlags

__all__ = ["evaluate_workdir", "evaluation_table"]


def _held_out_images(config, num: int):
  """``num`` images of the training set in the model's range (the first ones, in order)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax.data import images  # pylint: disable=import-outside-toplevel
  from diffjax.train.image_input import host_source  # pylint: disable=import-outside-toplevel

  source = host_source(config)
  count = min(num, len(source))
  batch = [source[i]["image"] for i in range(count)]
  return images.to_model_range(np.stack(batch)) if batch[0].dtype == np.uint8 else np.stack(batch)


def _likelihood_metrics(config, experiment, params, data, *, key, steps: int) -> dict:
  """Negative log-likelihood of ``data`` through the probability-flow ODE (RK4, ``steps``
  steps): nats per example; for images (uniformly dequantised 8-bit pixels) also nats and bits
  per dimension. It depends on the model only, not on a sampler."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import samplers  # pylint: disable=import-outside-toplevel

  if experiment.log_likelihood is None:
    return {"nll": None, "nll_note": "the source is not N(0, I): its density is not known"}
  key_dequantize, key_probes = jax.random.split(key)
  data = jax.numpy.asarray(data, jax.numpy.float32)
  pixels = config.data.kind == "images"
  if pixels:
    data = samplers.dequantize(key_dequantize, data)
  log_prob = np.asarray(experiment.log_likelihood(params, key_probes, data, steps=steps))
  metrics = {
    "nll": float(-log_prob.mean()),
    "nll_stderr": float(log_prob.std() / np.sqrt(log_prob.size)),
    "nll_units": "nats per example",
    "nll_count": int(log_prob.size),
    "likelihood_steps": int(steps),
  }
  if pixels:
    dims = int(np.prod(config.data.shape))
    bits = np.asarray(samplers.bits_per_dim(log_prob, num_dims=dims))
    metrics["bits_per_dim"] = float(np.mean(bits))
    metrics["nats_per_dim"] = float(np.mean(bits) * math.log(2.0))
  return metrics


class _Scoring(NamedTuple):
  """How each row's samples are scored, fixed once for every sampler.

  Attributes:
    labels: metric key -> its column label, in column order.
    score: ``samples [count, *shape] -> {key: float}``.
    count: the number of samples scored per row (the first ones).
    floor: each metric of ``count`` real examples drawn apart from the reference.
    floor_note: what the floor is, in words.
    target: the reference examples the metrics compare with (2D toys: whose NLL is reported).
  """

  labels: dict
  score: Callable
  count: int
  floor: dict
  floor_note: str
  target: Any


def _toy_scoring(experiment, *, num: int, key_target, key_floor) -> _Scoring:
  """2D toys: exact W2 and MMD^2 against ``num`` target samples; the floor scores ``num``
  other target samples (another key) the same way."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import evaluate  # pylint: disable=import-outside-toplevel

  target = np.asarray(experiment.target_sampler(key_target, num))
  fresh = np.asarray(experiment.target_sampler(key_floor, num))

  def score(samples) -> dict:
    return {
      "w2": evaluate.wasserstein2(samples, target),
      "mmd": float(evaluate.mmd_rbf(samples, target)),
    }

  return _Scoring(
    labels={"w2": "W2", "mmd": "MMD^2"},
    score=score,
    count=num,
    floor=score(fresh),
    floor_note=f"{num} other target samples (another key) against the same {num} target samples",
    target=target,
  )


_MMD_SCALES = (0.5, 1.0, 2.0)
"""Length scales of the MMD kernel on data files and images, in units of the reference
examples' median pairwise distance."""


def _data_scoring(config, *, num: int, key_target) -> _Scoring:
  """Data read from files (images, arrays): two disjoint random sets of the data set, the
  reference and the floor's, each of ``min(num, N // 2)`` examples. Vectors: W2 and MMD^2;
  images: MMD^2 in pixels and, for digits, the Frechet distance in a digits classifier's
  features. MMD's length scales are ``_MMD_SCALES`` times the reference's median distance."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import evaluate  # pylint: disable=import-outside-toplevel
  from diffjax.data import images  # pylint: disable=import-outside-toplevel
  from diffjax.train import image_input  # pylint: disable=import-outside-toplevel

  source = image_input.host_source(config)
  total = len(source)
  count = min(num, total // 2)
  if count < 2:
    raise UsageError(
      f"the data set of {config.data.target!r} holds {total} examples; evaluation compares "
      "samples with two disjoint sets of real examples: it needs at least 4"
    )
  order = np.asarray(jax.random.permutation(key_target, total))
  target = images.take(source, order[:count])
  floor_set = images.take(source, order[count : 2 * count])
  median = evaluate.median_pairwise_distance(target)
  bandwidths = tuple(scale * median for scale in _MMD_SCALES)
  vectors = len(config.data.shape) == 1
  digits = config.data.kind == "images" and config.data.target == "digits"
  labels = {"w2": "W2"} if vectors else {}
  if digits:
    labels["digits_frechet_distance"] = "FD (digits features)"
  labels["mmd"] = "MMD^2"

  def score(samples) -> dict:
    metrics = {}
    if vectors:
      metrics["w2"] = evaluate.wasserstein2(samples, target)
    if digits:
      metrics["digits_frechet_distance"] = evaluate.digits_frechet_distance(samples, target)
    metrics["mmd"] = float(evaluate.mmd_rbf(samples, target, bandwidths=bandwidths))
    return metrics

  note = (
    f"{count} other examples of the data set against the {count} reference examples "
    "(two disjoint random sets)"
  )
  if count < num:
    note += (
      f"; the data set holds {total} examples, so each set holds {count} and each row "
      f"scores its first {count} samples (same size as the floor)"
    )
  return _Scoring(
    labels=labels, score=score, count=count, floor=score(floor_set), floor_note=note, target=None
  )


def _evaluation_plan(
  samplers: Sequence[str], steps: Sequence[int], *, steps_given: bool
) -> tuple[list[tuple[str, int | None]], list[str]]:
  """``[(sampler, steps)]``, each sampler with each number of steps, an adaptive solver once
  (``steps`` ``None``: its error control chooses its steps), and the notes to print."""
  from diffjax.samplers import ADAPTIVE_SOLVERS  # pylint: disable=import-outside-toplevel

  plan: list[tuple[str, int | None]] = []
  adaptive = [name for name in samplers if name in ADAPTIVE_SOLVERS]
  for name in samplers:
    plan.extend([(name, None)] if name in adaptive else [(name, n) for n in steps])
  notes = []
  if adaptive and steps_given:
    notes.append(
      f"{', '.join(adaptive)}: adaptive (its error control chooses the step sizes), so --steps "
      "does not apply: one row, with the NFE it used"
    )
  return plan, notes


def _evaluate_row(
  experiment,
  params,
  *,
  key,
  num: int,
  sampler: str,
  steps: int | None,
  default_steps: int,
  chunk_size: int,
  scoring: _Scoring,
  options: dict | None = None,
) -> tuple[dict, str | None]:
  """One row of the table: ``num`` samples of ``sampler`` (the same key for every row, so rows
  differ by the sampler only) scored by ``scoring``; a note when some are not finite."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  result = experiment.generate(
    params,
    key,
    num,
    steps=steps or default_steps,
    sampler=sampler,
    chunk_size=chunk_size,
    **(options or {}),
  )
  samples = np.asarray(result["samples"])[: scoring.count]
  row = {"sampler": sampler, "steps": steps, "nfe": int(result.get("nfe", 0))}
  finite = np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1)
  if finite.all():
    row.update(scoring.score(samples))
    return row, None
  row.update({name: None for name in scoring.labels})
  with_steps = "" if steps is None else f" with {steps} steps"
  return row, (
    f"{sampler}{with_steps}: {int((~finite).sum())} of {samples.shape[0]} samples are not "
    "finite; its metrics are left out"
  )


def _check_eval_out(workdir, out: str | None) -> pathlib.Path:
  """``--out`` (a .png file) or, without it, the folder WORKDIR/eval, where the plot and the
  table go: checked before anything is computed."""
  if out is None:
    path = folder = pathlib.Path(workdir) / "eval"
    if path.exists() and not path.is_dir():
      raise UsageError(
        f"{path} is a file where `diffjax evaluate` writes its plot and table; move it, or "
        "pass --out PATH.png"
      )
  else:
    path = pathlib.Path(out)
    if path.is_dir():
      raise UsageError(f"--out {out} is a directory; pass a file path such as {path / 'eval.png'}")
    if path.suffix != ".png":
      raise UsageError(f"--out {out}: the plot must be a .png file (the table goes beside it)")
    folder = path.parent
  parent = folder
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"{folder}: {parent} is a file, not a folder; pass --out PATH.png elsewhere")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{folder} is not writable; pass --out PATH.png in a folder you can write")
  return path


def _as_tuple(value) -> tuple:
  """``None`` -> ``()``; one value -> ``(value,)``; a sequence -> a tuple, repeats dropped."""
  if value is None:
    return ()
  if isinstance(value, (str, int)):
    return (value,)
  return tuple(dict.fromkeys(value))


def _check_arguments(
  workdir: str,
  *,
  samplers: tuple,
  steps_list: tuple,
  num: int,
  seed: int,
  seed_index: int | None,
  chunk_size: int,
  likelihood_steps: int | None,
  out: str | None,
  guidance: float | None,
  guidance_flags: GuidanceFlags | None,
  sigma_rel: float | Sequence[float] | None,
):
  """Every argument of :func:`evaluate_workdir`, the numbers first, then against the workdir's
  config (and its post-hoc EMA snapshots): ``(guidance rule, post-hoc plan or None, out path)``,
  before anything is restored or compiled."""
  run.check_numbers(
    num=num,
    min_num=2,
    steps=None,
    seed=seed,
    seed_index=seed_index,
    chunk_size=chunk_size,
    guidance=guidance,
  )
  rule = run_guidance.check_guidance_flags(guidance_flags, guidance=guidance)
  for value in steps_list:
    run.within("--steps", value, 1, run.MAX_STEPS)
  if likelihood_steps is not None:
    run.within("--likelihood-steps", likelihood_steps, 1, run.MAX_STEPS)
  config = run.load_workdir_config(workdir)
  run.check_against_config(
    workdir,
    config,
    samplers=samplers,
    guidance=guidance,
    guidance_flags=guidance_flags,
    rule=rule,
    seed_index=seed_index,
  )
  # --sigma-rel: post-hoc EMA widths rebuilt from the snapshots, one model (and rows) each.
  posthoc = run_posthoc.check_sigma_rels(
    workdir, config, run_posthoc.parse_sigma_rels(sigma_rel), seed_index
  )
  return rule, posthoc, _check_eval_out(workdir, out)


def _scoring(config, experiment, *, num: int, key_target, key_floor) -> _Scoring:
  """2D toys against their own sampler (:func:`_toy_scoring`), anything else against its data
  set (:func:`_data_scoring`)."""
  if experiment.target_sampler is not None:
    return _toy_scoring(experiment, num=num, key_target=key_target, key_floor=key_floor)
  return _data_scoring(config, num=num, key_target=key_target)


def _evaluate_rows(
  experiment,
  params,
  plan: list[tuple[str, int | None]],
  *,
  key,
  num: int,
  default_steps: int,
  chunk_size: int,
  scoring: _Scoring,
  options: dict,
) -> tuple[list[dict], list[str]]:
  """``(rows, notes)``: one row of one model per ``(sampler, steps)`` of ``plan``
  (:func:`_evaluate_row`), and a note for each row with samples that are not finite."""
  rows, notes = [], []
  for name, n in plan:
    row, note = _evaluate_row(
      experiment,
      params,
      key=key,
      num=num,
      sampler=name,
      steps=n,
      default_steps=default_steps,
      chunk_size=chunk_size,
      scoring=scoring,
      options=options,
    )
    rows.append(row)
    notes += [note] if note else []
  return rows, notes


def _model_metrics(
  config,
  experiment,
  params,
  *,
  scoring: _Scoring,
  num: int,
  likelihood: bool | None,
  likelihood_steps: int | None,
  key,
) -> dict:
  """The numbers of the model itself, the same for every sampler: the likelihood
  (:func:`_likelihood_metrics`; ``likelihood=None``: on for vector data only), or why it is
  not computed, then the straightness (:func:`_straightness_metrics`)."""
  if likelihood is None:
    likelihood = len(config.data.shape) == 1
    off = "off by default for images (slow: a trace estimate per ODE step); pass --likelihood"
  else:
    off = "not computed (--no-likelihood)"
  if likelihood:
    data = scoring.target if scoring.target is not None else _held_out_images(config, num)
    metrics = _likelihood_metrics(
      config,
      experiment,
      params,
      data,
      key=key,
      steps=likelihood_steps or config.sample.steps,
    )
  else:
    metrics = {"nll": None, "nll_note": off}
  metrics.update(_straightness_metrics(config, experiment, params, key=key, num=num))
  return metrics


def _summary(reports: list[dict], members, posthoc) -> dict:
  """The one report written and printed: the only model's, the seeds' (:func:`_seed_summary`),
  or the post-hoc EMA sweep's (:func:`diffjax.run_posthoc.sweep_summary`)."""
  if posthoc is not None:
    return run_posthoc.sweep_summary(reports, posthoc)
  return reports[0] if members[0][0] is None else _seed_summary(reports, members)


def evaluate_workdir(
  workdir: str,
  *,
  num: int = 2000,
  steps: int | Sequence[int] | None = None,
  sampler: str | Sequence[str] | None = None,
  seed: int = 0,
  seed_index: int | None = None,
  chunk_size: int = run.DEFAULT_CHUNK_SIZE,
  likelihood: bool | None = None,
  likelihood_steps: int | None = None,
  out: str | None = None,
  guidance: float | None = None,
  guidance_flags: GuidanceFlags | None = None,
  sigma_rel: float | Sequence[float] | None = None,
) -> dict:
  """Sample metrics of the EMA model for each sampler in ``sampler`` with each number of
  steps in ``steps`` (an adaptive solver once), beside their two-sample noise floor, and the
  likelihood once; the table is written as JSON and plotted against NFE.

  Rows (``rows``, one per pair, in order): ``sampler``, ``steps`` (``None`` for an adaptive
  solver), ``nfe`` (network evaluations used; the largest over the samples) and the metrics
  of ``num`` generated samples, all drawn from one key: for 2D toys the exact 2-Wasserstein
  distance (POT) and the unbiased MMD^2 (Gaussian kernels) against ``num`` fresh target
  samples; for data files, against a random set of the data (see :func:`_data_scoring`;
  digits add the Frechet distance in a digits classifier's features, which is not FID).
  ``floor``: the same metrics of real examples in place of the samples (2D: ``num`` other
  target samples), what a perfect model scores at this sample size.

  ``likelihood`` (default: on for vector data, off for images): the negative log-likelihood
  of ``num`` data points through the probability-flow ODE (RK4, ``likelihood_steps``,
  default ``sample.steps``; nats per example, and per dimension and bits per dimension for
  images), computed once per model. Files: ``out`` (a .png; the JSON beside it) or
  WORKDIR/eval/step_<step>_<samplers>[_steps_<steps>].png and .json. A single pair also has
  its row's keys at the top level. For a run of several seeds: of seed ``seed_index``, or of
  each, with the mean and standard deviation over seeds. ``guidance`` and ``guidance_flags``
  guide every row as in :func:`diffjax.run_sample.sample_from_workdir` (labels drawn uniformly;
  scored against the whole target).

  ``sigma_rel`` (a run trained with ``train.posthoc_ema.sigma_rels``): post-hoc EMA (Karras et
  al. 2024, EDM2, https://arxiv.org/abs/2312.02696); each width is rebuilt at the last
  snapshot's step by the least-squares combination of the stored power-function EMAs
  (:mod:`diffjax.train.posthoc_ema`) and scored as its own rows, each row carrying
  ``sigma_rel`` (:mod:`diffjax.run_posthoc`)."""
  import jax  # pylint: disable=import-outside-toplevel

  samplers, steps_list = _as_tuple(sampler), _as_tuple(steps)
  rule, posthoc, out_path = _check_arguments(
    workdir,
    samplers=samplers,
    steps_list=steps_list,
    num=num,
    seed=seed,
    seed_index=seed_index,
    chunk_size=chunk_size,
    likelihood_steps=likelihood_steps,
    out=out,
    guidance=guidance,
    guidance_flags=guidance_flags,
    sigma_rel=sigma_rel,
  )
  # Through the module, so that one patch of run.restore_for_inference reaches every command.
  config, experiment, params, step = run.restore_for_inference(workdir)
  guided = dict(guidance=guidance) if guidance is not None else {}
  guided.update(run_guidance.generate_options(guidance_flags, rule))
  members = run.seed_members(config, params, seed_index)
  if posthoc is not None:
    step, members = run_posthoc.members(config, posthoc, params, seed_index)
  plan, notes = _evaluation_plan(
    samplers or (run.default_sampler(config),),
    steps_list or (config.sample.steps,),
    steps_given=bool(steps_list),
  )
  key_samples, key_target, key_floor, key_likelihood = jax.random.split(jax.random.PRNGKey(seed), 4)
  scoring = _scoring(config, experiment, num=num, key_target=key_target, key_floor=key_floor)
  reports = []
  for tag, member in members:
    rows, row_notes = _evaluate_rows(
      experiment,
      member,
      plan,
      key=key_samples,
      num=num,
      default_steps=config.sample.steps,
      chunk_size=chunk_size,
      scoring=scoring,
      options=guided,
    )
    report = {
      "step": int(step),
      "num": num,
      "seed": seed,
      "scored": scoring.count,
      "metrics": scoring.labels,
      "rows": rows,
      "floor": scoring.floor,
      "floor_note": scoring.floor_note,
      "notes": notes + row_notes,
    }
    if guidance is not None:
      report["guidance"] = guidance
      report["guidance_flags"] = run_guidance.describe(guidance_flags)
    report.update(
      _model_metrics(
        config,
        experiment,
        member,
        scoring=scoring,
        num=num,
        likelihood=likelihood,
        likelihood_steps=likelihood_steps,
        key=key_likelihood,
      )
    )
    if len(rows) == 1:
      report.update(rows[0])
    if posthoc is not None:
      report["sigma_rel"] = tag
    reports.append(report)
  summary = _summary(reports, members, posthoc)
  _write_evaluation(out_path, summary, config=config, plan=plan)
  return summary


STRAIGHTNESS_STEPS = 128


def _straightness_metrics(config, experiment, params, *, key, num: int) -> dict:
  """The straightness ``S`` of a flow model's own ODE (Liu et al. 2022,
  :func:`diffjax.evaluate.straightness`) from ``num`` source draws, with its standard error:
  for objectives whose model is the velocity of one time (flow matching, reflow); empty for
  the others, where a single velocity field is not what the network outputs."""
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  spec = objectives.OBJECTIVES[config.objective.name]
  if spec.output != "velocity" or spec.time_inputs != 1:
    return {}
  velocity = functools.partial(experiment.model.apply, params, cond=None)
  source = experiment.source_sampler(jax.random.fold_in(key, 1), num)
  values = np.asarray(evaluate_lib.straightness(velocity, source, steps=STRAIGHTNESS_STEPS))
  return {
    "straightness": float(values.mean()),
    "straightness_stderr": float(values.std(ddof=1) / np.sqrt(len(values))),
    "straightness_steps": STRAIGHTNESS_STEPS,
  }


def _seed_summary(reports: list[dict], members) -> dict:
  """Reports of several seeds: each, the mean and std over seeds of every number, and the rows
  with each metric's mean (``key``) and std (``key_std``)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  first = reports[0]
  numbers = [
    k
    for k, v in first.items()
    if isinstance(v, float) and all(isinstance(r.get(k), float) for r in reports)
  ]
  rows = []
  for i, row in enumerate(first["rows"]):
    merged = {
      "sampler": row["sampler"],
      "steps": row["steps"],
      "nfe": max(r["rows"][i]["nfe"] for r in reports),
    }
    for name in first["metrics"]:
      values = [r["rows"][i][name] for r in reports]
      known = None not in values
      merged[name] = float(np.mean(values)) if known else None
      merged[f"{name}_std"] = float(np.std(values)) if known else None
    rows.append(merged)
  return {
    "step": first["step"],
    "num": first["num"],
    "seed": first["seed"],
    "scored": first["scored"],
    "seeds": [k for k, _ in members],
    "metrics": first["metrics"],
    "rows": rows,
    "floor": first["floor"],
    "floor_note": first["floor_note"],
    "notes": list(dict.fromkeys(note for r in reports for note in r["notes"])),
    "per_seed": reports,
    "mean": {k: float(np.mean([r[k] for r in reports])) for k in numbers},
    "std": {k: float(np.std([r[k] for r in reports])) for k in numbers},
  }


def _write_evaluation(path: pathlib.Path, report: dict, *, config, plan) -> None:
  """The table as JSON and its plot (each metric against NFE), at ``path`` (a .png) or, for a
  folder, under a name made of the step, the samplers and the numbers of steps. Adds their
  paths to ``report`` as ``plot`` and ``table``."""
  from diffjax import plots  # pylint: disable=import-outside-toplevel
  from diffjax.train.atomic_write import write_atomic  # pylint: disable=import-outside-toplevel

  if path.suffix != ".png":
    samplers = "_".join(dict.fromkeys(name for name, _ in plan))
    counts = "-".join(str(n) for n in dict.fromkeys(n for _, n in plan if n is not None))
    path = path / (f"step_{report['step']}_{samplers}" + (f"_steps_{counts}" if counts else ""))
    if report.get("sigma_rels"):
      path = path.with_name(
        path.name + "_sigma_rel_" + "-".join(f"{s:g}" for s in report["sigma_rels"])
      )
    path = path.with_name(path.name + ".png")
  path.parent.mkdir(parents=True, exist_ok=True)
  report["plot"], report["table"] = str(path), str(path.with_suffix(".json"))
  write_atomic(path.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
  plots.plot_metric_vs_nfe(
    path,
    rows=[
      dict(row, sampler=f"{row['sampler']}, sigma_rel {row['sigma_rel']:g}")
      if "sigma_rel" in row
      else row
      for row in report["rows"]
    ],
    metrics=report["metrics"],
    floor=report["floor"],
    title=f"{config.objective.name}, step {report['step']}: {report['scored']} samples per row",
  )


def _number(value) -> str:
  return "n/a" if value is None else f"{value:.4g}"


def evaluation_table(report: dict) -> str:
  """The report of :func:`evaluate_workdir` as text: one table (sampler, steps, NFE, each
  metric; several seeds: mean +- std), its last line the two-sample floor, then the notes,
  the likelihood and the files written."""
  names = list(report["metrics"])
  seeds = report.get("seeds")
  sweep = ["sigma_rel"] if any("sigma_rel" in row for row in report["rows"]) else []
  header = [*sweep, "sampler", "steps", "NFE", *report["metrics"].values()]
  lines = []
  for row in report["rows"]:
    cells = [f"{row['sigma_rel']:g}"] if sweep else []
    cells += [row["sampler"], "adaptive" if row["steps"] is None else str(row["steps"])]
    cells.append(str(row["nfe"]))
    for name in names:
      cell = _number(row.get(name))
      if seeds and row.get(f"{name}_std") is not None:
        cell += f" +- {row[f'{name}_std']:.2g}"
      cells.append(cell)
    lines.append(cells)
  floor = [_number(report["floor"].get(name)) for name in names]
  lines.append(["floor", *(["-"] * len(sweep)), "-", "-", *floor])
  widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

  def format_row(cells) -> str:
    # Names left, numbers right.
    padded = [
      cell.ljust(width) if i == 0 else cell.rjust(width)
      for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(padded)

  over = f", seeds {seeds} (mean +- std over seeds)" if seeds else ""
  text = [
    f"step {report['step']}: {report['scored']} samples per row, seed {report['seed']}{over}",
    format_row(header),
    *(format_row(cells) for cells in lines),
    f"floor: {report['floor_note']}",
    *(f"note: {note}" for note in report["notes"]),
    _likelihood_line(report),
    *_straightness_line(report),
  ]
  if report.get("plot"):
    text.append(f"wrote {report['plot']} and {report['table']}")
  return "\n".join(text)


def _straightness_line(report: dict) -> list[str]:
  """The straightness in one line (sampler-independent), or nothing where it is undefined."""
  source = report["per_seed"][0] if "per_seed" in report else report
  if source.get("straightness") is None:
    return []
  values = report.get("mean", source)
  spread = (
    f" +- {report['std']['straightness']:.2g} over seeds"
    if "std" in report and "straightness" in report["std"]
    else f" +- {source['straightness_stderr']:.2g} (standard error)"
  )
  return [
    f"straightness: S {values['straightness']:.4g}{spread} (E ||(x1 - x0) - v(x_t, t)||^2 along "
    f"the model's own Euler path, {source['straightness_steps']} steps; 0 for straight paths)"
  ]


def _likelihood_line(report: dict) -> str:
  """The likelihood in one line, with its units (sampler-independent)."""
  source = report["per_seed"][0] if "per_seed" in report else report
  if source.get("nll") is None:
    return f"likelihood: {source.get('nll_note', 'not computed')}"
  values = report.get("mean", source)
  spread = (
    f" +- {report['std']['nll']:.2g} over seeds"
    if "std" in report
    else f" +- {source['nll_stderr']:.2g} (standard error)"
  )
  line = f"likelihood: NLL {values['nll']:.4g}{spread} nats per example"
  if "bits_per_dim" in source:
    line += (
      f" = {values['nats_per_dim']:.4g} nats per dim = {values['bits_per_dim']:.4g} bits per "
      "dim (uniformly dequantised pixels)"
    )
  return (
    f"{line}; {source['nll_count']} data points, probability-flow ODE (RK4, "
    f"{source['likelihood_steps']} steps); the same for every sampler"
  )
