"""`diffjax sample`: samples of a trained workdir's EMA model, written as .npz with a picture.

:func:`sample_from_workdir` checks every argument against the workdir's config before anything
is restored or compiled (the checks shared with `diffjax evaluate` are in :mod:`diffjax.run`),
restores the model read-only through :func:`diffjax.run.restore_for_inference`, draws the
samples in chunks, and writes them only when all are finite.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence

from diffjax import run, run_guidance
from diffjax.run import RunFailed, UsageError
from diffjax.run_guidance import GuidanceFlags

__all__ = ["sample_from_workdir"]


def _check_out(out: str) -> pathlib.Path:
  """``--out``: an .npz file path whose folder exists or can be created and is writable."""
  path = pathlib.Path(out)
  if path.is_dir():
    raise UsageError(f"--out {out} is a directory; pass a file path such as {path / 'samples.npz'}")
  if path.suffix != ".npz":
    raise UsageError(f"--out {out}: the output must be an .npz file")
  parent = path.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"--out {out}: {parent} is a file, not a folder; choose another path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"--out {out}: {parent} is not writable; choose a folder you can write")
  return path


def _write_npz(path: pathlib.Path, arrays: dict) -> None:
  """Writes ``arrays`` to ``path`` atomically: a temporary file created exclusively in the same
  folder (a planted symlink is never followed), flushed to disk, then renamed over ``path``."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _progress_bar(total: int, desc: str):
  """A tqdm bar on stderr; silent when stderr is not a terminal."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=desc, unit="sample", disable=None, leave=False, file=sys.stderr)


def _check_finite(samples, *, total: int, out: str, step: int, settings: str) -> None:
  """Fails, writing nothing, when any of the ``total`` samples holds a NaN or an infinity."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  finite = np.isfinite(samples)
  if finite.all():
    return
  bad = int((~finite.reshape(total, -1)).any(axis=1).sum())
  raise RunFailed(
    f"{bad} of {total} samples are not finite (NaN or inf); nothing was written to {out}. "
    f"The checkpoint of step {step} diverges with {settings}: try a smaller --guidance, more "
    "--steps or another --sampler, and check metrics.jsonl for a diverged run"
  )


def _check_labels(
  workdir, config, labels: Sequence[int] | None, *, num: int, flag: str = "--labels"
) -> None:
  """``--labels``: only for a class-conditional model, each in ``0 .. num_classes - 1``, at most
  ``num`` of them; checked before anything is restored or compiled."""
  if labels is None:
    return
  shown = ",".join(str(label) for label in labels)
  count = config.data.num_classes
  if not count:
    raise UsageError(
      f"{flag} {shown}: the model in {workdir} is unconditional (data.num_classes=0), so it "
      "takes no labels; drop it, or train a class-conditional model (e.g. "
      "configs/digits_fm.py:cond)"
    )
  if not labels:
    raise UsageError(f"{flag}: no label given; pass labels in 0 .. {count - 1}, e.g. 0,3,7")
  bad = [label for label in labels if isinstance(label, bool) or not 0 <= label < count]
  if bad:
    raise UsageError(
      f"{flag} {shown}: label {bad[0]} is out of range; this model's labels are "
      f"0 .. {count - 1} (data.num_classes={count})"
    )
  if len(labels) > num:
    raise UsageError(
      f"{flag} {shown}: {len(labels)} labels for --num {num}; give at most --num labels "
      "(they repeat in turn to fill --num)"
    )


def _sample_labels(config, labels: Sequence[int] | None, num: int):
  """The ``[num]`` int32 labels to sample: ``labels`` repeated in turn to fill ``num``; for a
  class-conditional model without ``labels``, every class in turn (0, 1, ..., C - 1, 0, ...);
  ``None`` for an unconditional model."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  if not config.data.num_classes:
    return None
  cycle = np.arange(config.data.num_classes) if labels is None else np.asarray(labels)
  return np.resize(cycle, num).astype(np.int32)


def _reference_points(config, experiment, key, num: int):
  """``num`` points of the data distribution to draw under generated 2D samples: the toy's own
  sampler, or examples of a data file; ``None`` where neither exists."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  if experiment.target_sampler is not None:
    return np.asarray(experiment.target_sampler(key, num))
  if config.data.kind == "toy2d":
    return None
  from diffjax.train import image_input  # pylint: disable=import-outside-toplevel

  return image_input.make_reference_points(config)(key, num)


def _plot_samples(
  path: pathlib.Path,
  config,
  experiment,
  *,
  samples,
  labels,
  trajectories,
  key,
  title: str,
) -> str | None:
  """The picture beside the samples: 2D points over the data, with trajectories; a grid of
  images with their labels. Vectors of another length: the first two coordinates; scalars: no
  picture (``None``)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import plots  # pylint: disable=import-outside-toplevel

  shape = tuple(config.data.shape)
  if len(shape) == 3:
    plots.plot_image_grid(path, images=samples, title=title, labels=labels)
    return str(path)
  if len(shape) != 1 or shape[0] < 2:
    return None
  target = _reference_points(config, experiment, key, min(len(samples), plots.MAX_POINTS))
  if shape[0] > 2:
    title = f"{title} (coordinates 0 and 1 of {shape[0]})"
  plots.plot_2d(
    path,
    samples=np.asarray(samples)[:, :2],
    target=None if target is None else np.asarray(target)[:, :2],
    trajectories=None if trajectories is None else np.asarray(trajectories)[..., :2],
    title=title,
    labels=labels,
  )
  return str(path)


def _check_arguments(
  workdir: str,
  *,
  num: int,
  out: str,
  steps: int | None,
  sampler: str | None,
  seed: int,
  guidance: float | None,
  seed_index: int | None,
  chunk_size: int,
  labels: Sequence[int] | None,
  labels_flag: str,
  trajectories: int,
  guidance_flags: GuidanceFlags | None,
):
  """Every argument of :func:`sample_from_workdir`, the numbers first, then against the
  workdir's config: ``(guidance rule, out path)``, before anything is restored or compiled."""
  run.check_numbers(
    num=num,
    min_num=1,
    steps=steps,
    seed=seed,
    seed_index=seed_index,
    chunk_size=chunk_size,
    guidance=guidance,
  )
  rule = run_guidance.check_guidance_flags(guidance_flags, guidance=guidance)
  run.within("--trajectories", trajectories, 0, num, " (at most --num)")
  out_path = _check_out(out)
  config = run.load_workdir_config(workdir)
  run.check_against_config(
    workdir,
    config,
    samplers=(sampler,),
    guidance=guidance,
    guidance_flags=guidance_flags,
    rule=rule,
    seed_index=seed_index,
  )
  _check_labels(workdir, config, labels, num=num, flag=labels_flag)
  return rule, out_path


def _draw(
  experiment,
  members,
  key,
  *,
  num: int,
  labels,
  chunk_size: int,
  trajectories: int,
  options: dict,
) -> tuple[list[dict], list]:
  """``(results, paths)``: the generator's result for each seed member, and with
  ``trajectories = K > 0`` the paths of its first ``K`` samples (else no paths)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  results, paths = [], []
  with _progress_bar(len(members) * num, "sample") as bar:
    for _, member in members:
      results.append(
        experiment.generate(
          member,
          key,
          num,
          labels=labels,
          chunk_size=chunk_size,
          on_chunk=bar.update,
          **options,
        )
      )
      if trajectories:
        # The same keys fold_in(key, i) and labels as the first K samples: their paths.
        drawn = experiment.generate(
          member,
          key,
          trajectories,
          labels=None if labels is None else labels[:trajectories],
          return_trajectories=True,
          chunk_size=min(chunk_size, trajectories),
          **options,
        )
        paths.append(np.asarray(drawn["trajectories"]))
  return results, paths


def _arrays(results: list[dict], paths: list, members, labels) -> dict:
  """What the .npz holds: ``samples`` (and ``trajectories``) of the one model, or stacked over
  the seeds with ``seed_index``; ``label`` for a class-conditional model."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  arrays = {"samples": np.asarray(results[0]["samples"])}
  if paths:
    arrays["trajectories"] = paths[0]
  if members[0][0] is not None:
    arrays = {"samples": np.stack([np.asarray(r["samples"]) for r in results])}
    if paths:
      arrays["trajectories"] = np.stack(paths)
    arrays["seed_index"] = np.array([k for k, _ in members])
  if labels is not None:
    arrays["label"] = labels
  return arrays


def _title(
  config,
  *,
  step: int,
  sampler: str,
  steps: int,
  nfe: int,
  guidance: float | None,
  guidance_flags: GuidanceFlags | None,
  members,
) -> str:
  """The picture's title: objective, step, sampler, steps, NFE, guidance and seed shown."""
  title = f"{config.objective.name}, step {step}: {sampler}, {steps} steps, NFE {nfe}"
  if guidance is not None:
    title += f", guidance {guidance:g}"
    if run_guidance.describe(guidance_flags):
      title += f" ({run_guidance.describe(guidance_flags)})"
  if members[0][0] is not None:
    title += f", seed {members[0][0]} of {config.train.num_seeds}"
  return title


def sample_from_workdir(
  workdir: str,
  *,
  num: int,
  out: str,
  steps: int | None = None,
  sampler: str | None = None,
  seed: int = 0,
  guidance: float | None = None,
  seed_index: int | None = None,
  chunk_size: int = run.DEFAULT_CHUNK_SIZE,
  labels: Sequence[int] | None = None,
  labels_flag: str = "--labels",
  trajectories: int = 0,
  guidance_flags: GuidanceFlags | None = None,
) -> dict:
  """Draws ``num`` samples with the EMA parameters, ``chunk_size`` at a time, and writes them to
  ``out`` (.npz) if all are finite, with a picture beside it (same name, ``.png``): 2D samples
  over the data (and the trajectories), or a grid of the first images with their labels.

  ``labels`` (class-conditional models) repeat in turn to fill ``num``; without them a
  conditional model samples every class in turn. The labels are saved as ``label``.
  ``trajectories = K > 0`` also saves the paths of the first ``K`` samples as ``trajectories
  [steps + 1, K, *shape]`` (the source draw first; the last state is the sample, up to float
  rounding, as they are drawn by a second program). For a run of several seeds: of seed
  ``seed_index`` or of each (``samples`` and ``trajectories`` then have a leading seed axis,
  ``seed_index`` lists the seeds; the picture shows the first). Sample ``i`` depends on
  ``seed``, ``i`` and its label only, not on ``chunk_size``. ``guidance_flags``: the guidance
  interval, an autoguidance guide's workdir, APG (:mod:`diffjax.run_guidance`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  rule, out_path = _check_arguments(
    workdir,
    num=num,
    out=out,
    steps=steps,
    sampler=sampler,
    seed=seed,
    guidance=guidance,
    seed_index=seed_index,
    chunk_size=chunk_size,
    labels=labels,
    labels_flag=labels_flag,
    trajectories=trajectories,
    guidance_flags=guidance_flags,
  )
  # Through the module, so that one patch of run.restore_for_inference reaches every command.
  config, experiment, params, step = run.restore_for_inference(workdir)
  members = run.seed_members(config, params, seed_index)
  steps = steps or config.sample.steps
  label_array = _sample_labels(config, labels, num)
  key = jax.random.PRNGKey(seed)
  options = dict(steps=steps, sampler=sampler, guidance=guidance)
  options.update(run_guidance.generate_options(guidance_flags, rule))
  results, paths = _draw(
    experiment,
    members,
    key,
    num=num,
    labels=label_array,
    chunk_size=chunk_size,
    trajectories=trajectories,
    options=options,
  )
  arrays = _arrays(results, paths, members, label_array)
  settings = f"--steps {steps}, --sampler {sampler or 'default'}, --guidance {guidance}"
  if run_guidance.describe(guidance_flags):
    settings += f", {run_guidance.describe(guidance_flags)}"
  _check_finite(
    arrays["samples"], total=len(members) * num, out=out, step=int(step), settings=settings
  )
  _write_npz(out_path, arrays)
  nfe = int(results[0].get("nfe", 0))
  name = sampler or run.default_sampler(config)
  png = _plot_samples(
    out_path.with_suffix(".png"),
    config,
    experiment,
    samples=np.asarray(results[0]["samples"]),
    labels=label_array,
    trajectories=paths[0] if paths else None,
    key=jax.random.fold_in(key, 1),
    title=_title(
      config,
      step=int(step),
      sampler=name,
      steps=steps,
      nfe=nfe,
      guidance=guidance,
      guidance_flags=guidance_flags,
      members=members,
    ),
  )
  return {
    "out": str(out_path),
    "png": png,
    "num": num,
    "shape": list(arrays["samples"].shape),
    "step": int(step),
    "nfe": nfe,
    "sampler": name,
    "steps": steps,
  }
