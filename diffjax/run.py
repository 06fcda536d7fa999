"""What the ``diffjax`` subcommands do, as importable functions (the CLI only parses arguments).

``train_from_cli`` validates the config before anything else (before ``jax.distributed``, before
any compile), then trains. ``sample_from_workdir`` and ``evaluate_workdir`` rebuild the experiment
from WORKDIR/config.json (never from a Python file in a workdir) and restore the EMA parameters.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections

from diffjax import run_guidance, run_posthoc
from diffjax.run_guidance import GuidanceFlags
from diffjax.train import config as config_lib

__all__ = [
  "UsageError",
  "RunFailed",
  "train_from_cli",
  "restore_for_inference",
  "sample_from_workdir",
  "evaluate_workdir",
  "evaluation_table",
]


class UsageError(ValueError):
  """A command-line mistake (missing workdir, bad output path...)."""


class RunFailed(RuntimeError):
  """The run stopped itself with an explanation: non-finite losses, a checkpoint of another
  model or optimizer."""


# Free space a run needs before it starts (checkpoints of small models, logs, plots); a fuller
# disk fails here in one line instead of in the middle of a checkpoint save.
MIN_FREE_BYTES = 64 << 20


def _check_workdir_writable(workdir: pathlib.Path) -> None:
  """Reads only: a file in the way, no write permission, or a nearly full disk."""
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f"--workdir {workdir} is a file; pass a directory path")
  parent = workdir if workdir.exists() else workdir.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"--workdir {workdir}: {parent} is a file; pass a directory path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"--workdir {workdir} is not writable; choose a directory you can write")
  free = shutil.disk_usage(parent).free
  if free < MIN_FREE_BYTES:
    raise UsageError(
      f"--workdir {workdir}: only {free >> 20} MiB free on its disk (need "
      f"{MIN_FREE_BYTES >> 20} MiB); free space or choose another disk"
    )


def _initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` from ``config.distributed`` (a no-op when disabled)."""
  d = config.distributed
  if not d.enabled:
    return
  import jax  # pylint: disable=import-outside-toplevel

  kwargs = {}
  if d.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in d.local_device_ids.split(",")]
  # The heartbeat bounds how long a survivor waits on a dead peer (JAX's default of 100 s
  # makes it wait about 97 s); the shutdown barrier likewise gets the barrier timeout.
  jax.distributed.initialize(
    coordinator_address=d.coordinator_address or None,
    num_processes=d.num_processes,
    process_id=d.process_id,
    heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
    shutdown_timeout_seconds=int(d.barrier_timeout_s),
    initialization_timeout=int(d.barrier_timeout_s),
    **kwargs,
  )


def train_from_cli(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates, initialises multi-host if configured, validates the mesh, trains, and prints
  the run's summary on stdout (process 0)."""
  workdir = pathlib.Path(workdir)
  config_lib.validate(config, num_devices=None)
  _check_workdir_writable(workdir)
  if (workdir / "config.json").is_file():  # a damaged one fails here in one line
    _parse_workdir_config(workdir / "config.json", fix=_TRAIN_FIX)
  config_lib.check_resume_config(workdir, config)
  _initialize_distributed(config)
  import jax  # pylint: disable=import-outside-toplevel

  config_lib.validate(config, num_devices=jax.device_count())
  from diffjax.data import images  # pylint: disable=import-outside-toplevel
  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from diffjax.train import loop  # pylint: disable=import-outside-toplevel

  try:
    result = loop.train(config, workdir)
  except (loop.NonFiniteLossError, ckpt.CheckpointMismatchError) as e:
    raise RunFailed(str(e)) from None
  except images.DatasetTooSmallError as e:  # raised while the input pipeline is built
    per_process = "" if jax.process_count() == 1 else f" ({e.records} on each process)"
    raise UsageError(
      f"the data set {config.data.target!r} holds {e.total} records{per_process}, fewer than "
      f"train.batch_size={config.train.batch_size}; set --config.train.batch_size to at most "
      f"{e.records * jax.process_count()}, or use a larger data set"
    ) from None
  if jax.process_index() == 0:
    print(result.summary(), flush=True)
  return result


_TRAIN_FIX = "restore it from a copy of the workdir, or train in a new --workdir"
_READ_FIX = (
  "restore it from a copy of the workdir (it is written by `diffjax train`), or train again "
  "in a new --workdir"
)


def _json_problem(data: bytes) -> str | None:
  """Why ``data`` is not a JSON object (the shape config.json always has), or ``None``."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    return f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
  if not text.strip():
    return "is empty"
  try:
    loaded = json.loads(text)
  except json.JSONDecodeError as e:
    return f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated?)"
  if not isinstance(loaded, dict):
    kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
      type(loaded), "number"
    )
    return f"holds a JSON {kind}, not an object of config groups"
  groups = config_lib.base_config()
  for key, value in loaded.items():
    if key in groups and isinstance(groups[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        return f"has {key}={json.dumps(value)} where the group of {key} keys belongs"
  return None


def _parse_workdir_config(path: pathlib.Path, *, fix: str) -> ml_collections.ConfigDict:
  """``path`` (a WORKDIR/config.json) as a config; a damaged or hand-broken file raises one
  :class:`UsageError` naming the file, what is wrong and ``fix``."""
  try:
    data = path.read_bytes()
  except OSError as e:
    raise UsageError(f"{path} cannot be read ({e.strerror}); {fix}") from None
  problem = _json_problem(data)
  if problem is None:
    try:
      return config_lib.config_from_json(data.decode("utf-8"))
    except KeyError as e:
      problem = f"has no {e.args[0]!r} group"
    except (ValueError, TypeError, AttributeError) as e:  # a null group, a string for a number
      problem = f"does not match the config schema ({type(e).__name__}: {' '.join(str(e).split())})"
  raise UsageError(f"{path} {problem}; {fix}")


def _load_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, parsed and validated (types, ranges, names): a damaged file fails in
  one line naming it. The data files are not required (sampling does not read them)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise UsageError(f"{path} not found; --workdir must be a directory written by `diffjax train`")
  config = _parse_workdir_config(path, fix=_READ_FIX)
  try:
    config_lib.validate(config, num_devices=None)
  except config_lib.ConfigError as e:
    # A data set moved away after training does not stop sampling (evaluate reads it later).
    problems = [line for line in str(e).splitlines() if not line.startswith("data.path=")]
    if problems:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      raise UsageError(
        f"{path}: {problems[0]}{more}; correct the value in the file, or {_READ_FIX}"
      ) from None
  return config


def _check_sampler(config, sampler: str | None) -> None:
  """An unknown ``--sampler`` fails before anything is restored or compiled."""
  if sampler is None:
    return
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  spec = objectives.OBJECTIVES[config.objective.name]
  choices = objectives.accepted_samplers(
    spec, dict(config.objective), source_is_normal=config.data.source == "normal"
  )
  if sampler not in choices:
    raise UsageError(
      f"--sampler {sampler!r}: cannot sample a {config.objective.name!r} "
      f"model (its output is {spec.output}); choose one of "
      f"{sorted(choices)}"
    )


def _check_guidance(workdir, config, guidance: float | None) -> None:
  """``--guidance`` needs a class-conditional model trained with label dropout: guidance mixes
  the conditional prediction with the null label's, which only label dropout trains."""
  if guidance is None:
    return
  if not config.data.num_classes:
    raise UsageError(
      f"--guidance {guidance}: the model in {workdir} is unconditional "
      "(data.num_classes=0), so there is nothing to guide; drop --guidance, or "
      "train a class-conditional model (e.g. configs/digits_fm.py:cond)"
    )
  if not config.objective.get("label_dropout", 0.0) > 0:
    raise UsageError(
      f"--guidance {guidance}: the model in {workdir} was trained without label "
      "dropout (objective.label_dropout=0), so its unconditional (null-label) "
      "prediction is untrained; drop --guidance, or train with "
      "--config.objective.label_dropout=0.1"
    )


def _check_guidance_flags(workdir, config, guidance, flags, rule, *, samplers) -> None:
  """``--guidance`` and the guidance flags against the model (and the guide's config): an
  autoguidance guide replaces the null label, so the main model needs no label dropout."""
  if flags is None or flags.guide_workdir is None:
    _check_guidance(workdir, config, guidance)
  run_guidance.check_against_model(
    workdir, config, flags, rule, samplers=samplers, default_sampler=_default_sampler(config)
  )


MAX_STEPS = 100_000
MAX_GUIDANCE = 100.0
MAX_NUM = 2**31 - 1  # example indices are int32 on the device
DEFAULT_CHUNK_SIZE = 1000
"""Samples drawn per compiled batch by `sample` and `evaluate` (memory is flat in ``--num``)."""


def _within(flag: str, value, low: int, high: int, why: str = "") -> None:
  """``value`` is an integer in ``low .. high``; else one :class:`UsageError` naming ``flag``."""
  if isinstance(value, bool) or int(value) != value or not low <= value <= high:
    raise UsageError(f"{flag} {value}: must be an integer in {low} .. {high}{why}")


def _check_numbers(
  *,
  num: int,
  min_num: int,
  steps: int | None,
  seed: int,
  seed_index: int | None,
  chunk_size: int,
  guidance: float | None = None,
) -> None:
  """Every numeric argument of `sample` and `evaluate`, before anything is read or compiled."""
  _within("--num", num, min_num, MAX_NUM)
  if steps is not None:
    _within("--steps", steps, 1, MAX_STEPS)
  _within("--seed", seed, 0, 2**32 - 1, " (JAX keys take 32-bit seeds)")
  if seed_index is not None:
    _within("--seed-index", seed_index, 0, MAX_NUM)
  _within("--chunk-size", chunk_size, 1, MAX_NUM)
  if guidance is not None and not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
    raise UsageError(
      f"--guidance {guidance}: must be a finite number in [0, {MAX_GUIDANCE:g}] (0 is the "
      "unconditional model, 1 the conditional one, larger values guide harder; 1 to 10 is usual)"
    )


def _check_seed_index(config, seed_index: int | None) -> None:
  count = config.train.num_seeds
  if seed_index is None or (count == 1 and seed_index == 0):
    return
  if count == 1:
    raise UsageError(
      f"--seed-index {seed_index}: the run in the workdir trained one seed; drop --seed-index"
    )
  if not seed_index < count:
    raise UsageError(
      f"--seed-index {seed_index}: the run trained train.num_seeds={count} "
      f"seeds; choose 0 .. {count - 1}, or drop it for all"
    )


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


def _check_config_matches_checkpoints(
  workdir, checkpoints: pathlib.Path, fingerprint: dict
) -> None:
  """A WORKDIR/config.json edited after training no longer matches the config recorded with
  the checkpoints; the restore would skip every step as another run's. Say so, with the keys."""
  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel

  mismatch = ckpt.config_mismatch(
    checkpoints, config=fingerprint, config_differences=config_lib.fingerprint_differences
  )
  if mismatch is None:
    return
  step, differences = mismatch
  shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
  raise UsageError(
    f"{pathlib.Path(workdir) / 'config.json'} no longer matches the config its "
    f"checkpoints were trained with (step {step}, checkpoint -> config.json: "
    f"{shown}); restore those values in config.json, or train in a new --workdir"
  )


_READ_ATTEMPTS = 5


def restore_for_inference(workdir: str | pathlib.Path):
  """The experiment and the EMA parameters of the newest checkpoint in ``workdir``.

  Read-only: it creates, deletes, moves and writes nothing in ``checkpoints/`` (a trainer may
  be saving there), and skips a damaged or unfinished step with a warning instead of moving it.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.trainer import make_trainer  # pylint: disable=import-outside-toplevel

  config = _load_workdir_config(workdir)
  fingerprint = config_lib.resume_fingerprint(config)
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  ckpt.check_directory(checkpoints)
  _check_config_matches_checkpoints(workdir, checkpoints, fingerprint)
  # Inference runs on the local devices with data parallelism only.
  devices = jax.local_devices()
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.train.batch_size = len(devices)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=devices)
  trainer = make_trainer(config, mesh)
  if not checkpoints.is_dir():
    raise UsageError(f"no checkpoint in {checkpoints}; train first")
  target = ckpt.abstract_with_shardings(trainer.abstract_state, trainer.shardings)
  step, state = _read_newest_step(checkpoints, target, fingerprint)
  return config, trainer.experiment, state.ema_params, step


def _read_newest_step(checkpoints: pathlib.Path, target, fingerprint: dict):
  """``(step, state)`` of the newest step in ``checkpoints`` whose digests verify, read without
  changing anything there (a damaged step is reported, not moved)."""
  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel

  try:
    return ckpt.read_newest_step(
      checkpoints,
      target,
      config=fingerprint,
      config_differences=config_lib.fingerprint_differences,
      attempts=_READ_ATTEMPTS,
    )
  except (ckpt.CheckpointMismatchError, ckpt.NoUsableCheckpointError) as e:
    raise UsageError(str(e)) from None


def _seed_members(config, params, seed_index: int | None) -> list[tuple[int | None, Any]]:
  """``[(index, params)]`` of the trained seeds to use: the one model of a single-seed run, the
  seed ``seed_index`` of a ``train.num_seeds`` run, or each of its seeds (``None``)."""
  import jax  # pylint: disable=import-outside-toplevel

  count = config.train.num_seeds
  if count == 1:
    if seed_index not in (None, 0):
      raise UsageError(
        f"--seed-index {seed_index}: the run in the workdir trained one seed; drop --seed-index"
      )
    return [(None, params)]
  if seed_index is not None and not 0 <= seed_index < count:
    raise UsageError(
      f"--seed-index {seed_index}: the run trained train.num_seeds={count} "
      f"seeds; choose 0 .. {count - 1}, or drop it for all"
    )
  indices = range(count) if seed_index is None else [seed_index]
  return [(k, jax.tree.map(lambda x, k=k: x[k], params)) for k in indices]


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
  chunk_size: int = DEFAULT_CHUNK_SIZE,
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

  _check_numbers(
    num=num,
    min_num=1,
    steps=steps,
    seed=seed,
    seed_index=seed_index,
    chunk_size=chunk_size,
    guidance=guidance,
  )
  rule = run_guidance.check_guidance_flags(guidance_flags, guidance=guidance)
  _within("--trajectories", trajectories, 0, num, " (at most --num)")
  out_path = _check_out(out)
  config = _load_workdir_config(workdir)
  _check_sampler(config, sampler)
  _check_guidance_flags(workdir, config, guidance, guidance_flags, rule, samplers=(sampler,))
  _check_seed_index(config, seed_index)
  _check_labels(workdir, config, labels, num=num, flag=labels_flag)
  config, experiment, params, step = restore_for_inference(workdir)
  members = _seed_members(config, params, seed_index)
  steps = steps or config.sample.steps
  label_array = _sample_labels(config, labels, num)
  key = jax.random.PRNGKey(seed)
  options = dict(steps=steps, sampler=sampler, guidance=guidance)
  options.update(run_guidance.generate_options(guidance_flags, rule))
  results, paths = [], []
  with _progress_bar(len(members) * num, "sample") as bar:
    for _, member in members:
      results.append(
        experiment.generate(
          member,
          key,
          num,
          labels=label_array,
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
          labels=None if label_array is None else label_array[:trajectories],
          return_trajectories=True,
          chunk_size=min(chunk_size, trajectories),
          **options,
        )
        paths.append(np.asarray(drawn["trajectories"]))
  arrays = {"samples": np.asarray(results[0]["samples"])}
  if trajectories:
    arrays["trajectories"] = paths[0]
  if members[0][0] is not None:
    arrays = {"samples": np.stack([np.asarray(r["samples"]) for r in results])}
    if trajectories:
      arrays["trajectories"] = np.stack(paths)
    arrays["seed_index"] = np.array([k for k, _ in members])
  if label_array is not None:
    arrays["label"] = label_array
  settings = f"--steps {steps}, --sampler {sampler or 'default'}, --guidance {guidance}"
  if run_guidance.describe(guidance_flags):
    settings += f", {run_guidance.describe(guidance_flags)}"
  _check_finite(
    arrays["samples"], total=len(members) * num, out=out, step=int(step), settings=settings
  )
  _write_npz(out_path, arrays)
  nfe = int(results[0].get("nfe", 0))
  name = sampler or _default_sampler(config)
  title = f"{config.objective.name}, step {int(step)}: {name}, {steps} steps, NFE {nfe}"
  if guidance is not None:
    title += f", guidance {guidance:g}"
    if run_guidance.describe(guidance_flags):
      title += f" ({run_guidance.describe(guidance_flags)})"
  if members[0][0] is not None:
    title += f", seed {members[0][0]} of {config.train.num_seeds}"
  png = _plot_samples(
    out_path.with_suffix(".png"),
    config,
    experiment,
    samples=np.asarray(results[0]["samples"]),
    labels=label_array,
    trajectories=paths[0] if trajectories else None,
    key=jax.random.fold_in(key, 1),
    title=title,
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


def _default_sampler(config) -> str:
  """The sampler a model's objective uses when none is named."""
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  return objectives.OBJECTIVES[config.objective.name].default_sampler


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


def evaluate_workdir(
  workdir: str,
  *,
  num: int = 2000,
  steps: int | Sequence[int] | None = None,
  sampler: str | Sequence[str] | None = None,
  seed: int = 0,
  seed_index: int | None = None,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
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
  guide every row as in :func:`sample_from_workdir` (labels drawn uniformly; scored against the
  whole target).

  ``sigma_rel`` (a run trained with ``train.posthoc_ema.sigma_rels``): post-hoc EMA (Karras et
  al. 2024, EDM2, https://arxiv.org/abs/2312.02696); each width is rebuilt at the last
  snapshot's step by the least-squares combination of the stored power-function EMAs
  (:mod:`diffjax.train.posthoc_ema`) and scored as its own rows, each row carrying
  ``sigma_rel`` (:mod:`diffjax.run_posthoc`)."""
  import jax  # pylint: disable=import-outside-toplevel

  samplers, steps_list = _as_tuple(sampler), _as_tuple(steps)
  _check_numbers(
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
    _within("--steps", value, 1, MAX_STEPS)
  if likelihood_steps is not None:
    _within("--likelihood-steps", likelihood_steps, 1, MAX_STEPS)
  config = _load_workdir_config(workdir)
  for name in samplers:
    _check_sampler(config, name)
  _check_guidance_flags(workdir, config, guidance, guidance_flags, rule, samplers=samplers)
  _check_seed_index(config, seed_index)
  # --sigma-rel: post-hoc EMA widths rebuilt from the snapshots, one model (and rows) each.
  posthoc = run_posthoc.check_sigma_rels(
    workdir, config, run_posthoc.parse_sigma_rels(sigma_rel), seed_index
  )
  out_path = _check_eval_out(workdir, out)
  config, experiment, params, step = restore_for_inference(workdir)
  guided = dict(guidance=guidance) if guidance is not None else {}
  guided.update(run_guidance.generate_options(guidance_flags, rule))
  members = _seed_members(config, params, seed_index)
  if posthoc is not None:
    step, members = run_posthoc.members(config, posthoc, params, seed_index)
  plan, notes = _evaluation_plan(
    samplers or (_default_sampler(config),),
    steps_list or (config.sample.steps,),
    steps_given=bool(steps_list),
  )
  key_samples, key_target, key_floor, key_likelihood = jax.random.split(jax.random.PRNGKey(seed), 4)
  if experiment.target_sampler is not None:
    scoring = _toy_scoring(experiment, num=num, key_target=key_target, key_floor=key_floor)
  else:
    scoring = _data_scoring(config, num=num, key_target=key_target)
  if likelihood is None:
    likelihood = len(config.data.shape) == 1
    off = "off by default for images (slow: a trace estimate per ODE step); pass --likelihood"
  else:
    off = "not computed (--no-likelihood)"
  reports = []
  for tag, member in members:
    rows, row_notes = [], []
    for name, n in plan:
      row, note = _evaluate_row(
        experiment,
        member,
        key=key_samples,
        num=num,
        sampler=name,
        steps=n,
        default_steps=config.sample.steps,
        chunk_size=chunk_size,
        scoring=scoring,
        options=guided,
      )
      rows.append(row)
      row_notes += [note] if note else []
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
    if likelihood:
      data = scoring.target if scoring.target is not None else _held_out_images(config, num)
      report.update(
        _likelihood_metrics(
          config,
          experiment,
          member,
          data,
          key=key_likelihood,
          steps=likelihood_steps or config.sample.steps,
        )
      )
    else:
      report.update({"nll": None, "nll_note": off})
    report.update(_straightness_metrics(config, experiment, member, key=key_likelihood, num=num))
    if len(rows) == 1:
      report.update(rows[0])
    if posthoc is not None:
      report["sigma_rel"] = tag
    reports.append(report)
  if posthoc is not None:
    summary = run_posthoc.sweep_summary(reports, posthoc)
  else:
    summary = reports[0] if members[0][0] is None else _seed_summary(reports, members)
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
