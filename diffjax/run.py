"""The workdir layer of the ``diffjax`` subcommands: training into a workdir, reading one back,
and the argument checks `sample` and `evaluate` share (the CLI only parses arguments).

``train_from_cli`` validates the config before anything else (before ``jax.distributed``, before
any compile), then trains. ``restore_for_inference`` rebuilds the experiment from
WORKDIR/config.json (never from a Python file in a workdir) and restores the EMA parameters of
the newest checkpoint, read-only. The checks the commands share (``check_numbers``, then
``check_against_config``) raise one :class:`UsageError` before anything is restored or compiled.

The commands are beside this module, which imports neither: :mod:`diffjax.run_sample` (`diffjax
sample`) and :mod:`diffjax.run_evaluate` (`diffjax evaluate`). They call
``run.restore_for_inference`` through this module, the one place to replace it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Any

import ml_collections

from diffjax import run_guidance
from diffjax.train import config as config_lib

__all__ = [
  "UsageError",
  "RunFailed",
  "train_from_cli",
  "restore_for_inference",
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


def load_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
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


def default_sampler(config) -> str:
  """The sampler a model's objective uses when none is named."""
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  return objectives.OBJECTIVES[config.objective.name].default_sampler


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
    workdir, config, flags, rule, samplers=samplers, default_sampler=default_sampler(config)
  )


MAX_STEPS = 100_000
MAX_GUIDANCE = 100.0
MAX_NUM = 2**31 - 1  # example indices are int32 on the device
DEFAULT_CHUNK_SIZE = 1000
"""Samples drawn per compiled batch by `sample` and `evaluate` (memory is flat in ``--num``)."""


def within(flag: str, value, low: int, high: int, why: str = "") -> None:
  """``value`` is an integer in ``low .. high``; else one :class:`UsageError` naming ``flag``."""
  if isinstance(value, bool) or int(value) != value or not low <= value <= high:
    raise UsageError(f"{flag} {value}: must be an integer in {low} .. {high}{why}")


def check_numbers(
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
  within("--num", num, min_num, MAX_NUM)
  if steps is not None:
    within("--steps", steps, 1, MAX_STEPS)
  within("--seed", seed, 0, 2**32 - 1, " (JAX keys take 32-bit seeds)")
  if seed_index is not None:
    within("--seed-index", seed_index, 0, MAX_NUM)
  within("--chunk-size", chunk_size, 1, MAX_NUM)
  if guidance is not None and not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
    raise UsageError(
      f"--guidance {guidance}: must be a finite number in [0, {MAX_GUIDANCE:g}] (0 is the "
      "unconditional model, 1 the conditional one, larger values guide harder; 1 to 10 is usual)"
    )


def _check_seed_index(config, seed_index: int | None) -> None:
  """``--seed-index``: a seed the run in the workdir trained (none: each seed of the run)."""
  count = config.train.num_seeds
  if seed_index is None or (count == 1 and seed_index == 0):
    return
  if count == 1:
    raise UsageError(
      f"--seed-index {seed_index}: the run in the workdir trained one seed; drop --seed-index"
    )
  if not 0 <= seed_index < count:
    raise UsageError(
      f"--seed-index {seed_index}: the run trained train.num_seeds={count} "
      f"seeds; choose 0 .. {count - 1}, or drop it for all"
    )


def check_against_config(
  workdir, config, *, samplers, guidance, guidance_flags, rule, seed_index: int | None
) -> None:
  """The arguments `sample` and `evaluate` share, against the workdir's config: each of
  ``samplers`` (``None`` for the default), the guidance (``rule`` from
  :func:`diffjax.run_guidance.check_guidance_flags`), the seed index."""
  for name in samplers:
    _check_sampler(config, name)
  _check_guidance_flags(workdir, config, guidance, guidance_flags, rule, samplers=samplers)
  _check_seed_index(config, seed_index)


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

  config = load_workdir_config(workdir)
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


def seed_members(config, params, seed_index: int | None) -> list[tuple[int | None, Any]]:
  """``[(index, params)]`` of the trained seeds to use: the one model of a single-seed run, the
  seed ``seed_index`` of a ``train.num_seeds`` run, or each of its seeds (``None``)."""
  import jax  # pylint: disable=import-outside-toplevel

  _check_seed_index(config, seed_index)
  count = config.train.num_seeds
  if count == 1:
    return [(None, params)]
  indices = range(count) if seed_index is None else [seed_index]
  return [(k, jax.tree.map(lambda x, k=k: x[k], params)) for k in indices]
