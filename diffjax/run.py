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
from typing import Any

import ml_collections

from diffjax.train import config as config_lib

__all__ = [
  "UsageError",
  "RunFailed",
  "train_from_cli",
  "restore_for_inference",
  "sample_from_workdir",
  "evaluate_workdir",
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
  """Validates, initialises multi-host if configured, validates the mesh, trains."""
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
    return loop.train(config, workdir)
  except (loop.NonFiniteLossError, ckpt.CheckpointMismatchError) as e:
    raise RunFailed(str(e)) from None
  except images.DatasetTooSmallError as e:  # raised while the input pipeline is built
    per_process = "" if jax.process_count() == 1 else f" ({e.records} on each process)"
    raise UsageError(
      f"the data set {config.data.target!r} holds {e.total} records{per_process}, fewer than "
      f"train.batch_size={config.train.batch_size}; set --config.train.batch_size to at most "
      f"{e.records * jax.process_count()}, or use a larger data set"
    ) from None


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
  if sampler not in spec.samplers:
    raise UsageError(
      f"--sampler {sampler!r}: cannot sample a {config.objective.name!r} "
      f"model (its output is {spec.output}); choose one of "
      f"{sorted(spec.samplers)}"
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


MAX_STEPS = 100_000
MAX_GUIDANCE = 100.0
MAX_NUM = 2**31 - 1  # example indices are int32 on the device
DEFAULT_CHUNK_SIZE = 1000
"""Samples drawn per compiled batch by `sample` and `evaluate` (memory is flat in ``--num``)."""


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

  def within(flag: str, value, low: int, high: int, why: str = "") -> None:
    if isinstance(value, bool) or int(value) != value or not low <= value <= high:
      raise UsageError(f"{flag} {value}: must be an integer in {low} .. {high}{why}")

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
  from diffjax.train import integrity  # pylint: disable=import-outside-toplevel

  # A trainer may delete old steps (train.keep_checkpoints) while they are read; the newest
  # step is then a newer one, so the read starts over.
  for attempt in range(_READ_ATTEMPTS):
    manager = ckpt.make_checkpoint_manager(checkpoints, keep=1000, async_save=False, read_only=True)
    try:
      restored = ckpt.restore_verified(
        manager,
        target,
        config=fingerprint,
        move_bad=False,
        config_differences=config_lib.fingerprint_differences,
      )
      break
    except ckpt.CheckpointMismatchError as e:
      raise UsageError(str(e)) from None
    except FileNotFoundError as e:
      if attempt == _READ_ATTEMPTS - 1:
        raise UsageError(
          f"the checkpoints in {checkpoints} kept vanishing while being read ({e.filename}); "
          "a trainer is rotating them faster than they can be read: try again, or raise "
          "train.keep_checkpoints"
        ) from None
    finally:
      manager.close()
  if restored is None:
    found = len(integrity.step_dirs(checkpoints))
    if found:
      raise UsageError(
        f"none of the {found} checkpoint steps in {checkpoints} is usable (see "
        "the warnings above); train again to write a new one"
      )
    raise UsageError(f"no checkpoint in {checkpoints}; train first")
  step, state, _ = restored
  return step, state


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
) -> dict:
  """Draws ``num`` samples with the EMA parameters, ``chunk_size`` at a time, and writes them to
  ``out`` (.npz) if all are finite; for a run of several seeds, of seed ``seed_index`` or of
  each (``samples`` then has a leading seed axis, and ``seed_index`` lists the seeds). Sample
  ``i`` depends on ``seed`` and ``i`` only, not on ``chunk_size``."""
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
  out_path = _check_out(out)
  config = _load_workdir_config(workdir)
  _check_sampler(config, sampler)
  _check_guidance(workdir, config, guidance)
  _check_seed_index(config, seed_index)
  config, experiment, params, step = restore_for_inference(workdir)
  members = _seed_members(config, params, seed_index)
  steps = steps or config.sample.steps
  with _progress_bar(len(members) * num, "sample") as bar:
    results = [
      experiment.generate(
        member,
        jax.random.PRNGKey(seed),
        num,
        steps=steps,
        sampler=sampler,
        guidance=guidance,
        chunk_size=chunk_size,
        on_chunk=bar.update,
      )
      for _, member in members
    ]
  arrays = {"samples": np.asarray(results[0]["samples"])}
  if members[0][0] is not None:
    arrays = {
      "samples": np.stack([np.asarray(r["samples"]) for r in results]),
      "seed_index": np.array([k for k, _ in members]),
    }
  settings = f"--steps {steps}, --sampler {sampler or 'default'}, --guidance {guidance}"
  _check_finite(
    arrays["samples"], total=len(members) * num, out=out, step=int(step), settings=settings
  )
  _write_npz(out_path, arrays)
  return {
    "out": str(out_path),
    "num": num,
    "shape": list(arrays["samples"].shape),
    "step": int(step),
    "nfe": int(results[0].get("nfe", 0)),
  }


def _held_out_images(config, num: int):
  """``num`` images of the training set in the model's range (the first ones, in order)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax.data import images  # pylint: disable=import-outside-toplevel
  from diffjax.train.image_input import dataset_kwargs  # pylint: disable=import-outside-toplevel

  source = images.get_dataset(config.data.target, **dataset_kwargs(config))
  count = min(num, len(source))
  batch = [source[i]["image"] for i in range(count)]
  return images.to_model_range(np.stack(batch)) if batch[0].dtype == np.uint8 else np.stack(batch)


def _likelihood_metrics(config, experiment, params, data, *, seed: int, steps: int) -> dict:
  """Negative log-likelihood in nats per example (2D) or bits per dimension (images, uniformly
  dequantised), through the probability-flow ODE."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import samplers  # pylint: disable=import-outside-toplevel

  if experiment.log_likelihood is None:
    return {"nll": None, "nll_note": "the source is not N(0, I): its density is not known"}
  key_dequantize, key_probes = jax.random.split(jax.random.PRNGKey(seed + 1))
  data = jax.numpy.asarray(data, jax.numpy.float32)
  if config.data.kind == "images":
    data = samplers.dequantize(key_dequantize, data)
  log_prob = np.asarray(experiment.log_likelihood(params, key_probes, data, steps=steps))
  metrics = {
    "nll": float(-log_prob.mean()),
    "nll_stderr": float(log_prob.std() / np.sqrt(log_prob.size)),
  }
  if config.data.kind == "images":
    dims = int(np.prod(config.data.shape))
    metrics["bits_per_dim"] = float(np.mean(samplers.bits_per_dim(log_prob, num_dims=dims)))
  return metrics


def evaluate_workdir(
  workdir: str,
  *,
  num: int = 2000,
  steps: int | None = None,
  sampler: str | None = None,
  seed: int = 0,
  seed_index: int | None = None,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
  """JSON metrics of the EMA model: for 2D targets the exact 2-Wasserstein distance (POT)
  between ``num`` generated samples and ``num`` fresh target samples; for digits the Frechet
  distance in a digits classifier's features (not FID); the negative log-likelihood of ``num``
  target points (nats; bits/dim for images) through the probability-flow ODE when the source
  is N(0, I). For a run of several seeds: of seed ``seed_index``, or of each, reported per seed
  with the mean and standard deviation over seeds."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  _check_numbers(
    num=num, min_num=2, steps=steps, seed=seed, seed_index=seed_index, chunk_size=chunk_size
  )
  config = _load_workdir_config(workdir)
  _check_sampler(config, sampler)
  _check_seed_index(config, seed_index)
  config, experiment, params, step = restore_for_inference(workdir)
  members = _seed_members(config, params, seed_index)
  reports = [
    _evaluate_params(
      config,
      experiment,
      member,
      step=step,
      num=num,
      steps=steps,
      sampler=sampler,
      seed=seed,
      chunk_size=chunk_size,
    )
    for _, member in members
  ]
  if members[0][0] is None:
    return reports[0]
  numbers = [
    k
    for k, v in reports[0].items()
    if isinstance(v, float) and all(isinstance(r.get(k), float) for r in reports)
  ]
  summary = {
    "step": int(step),
    "num": num,
    "seeds": [k for k, _ in members],
    "per_seed": reports,
    "mean": {k: float(np.mean([r[k] for r in reports])) for k in numbers},
    "std": {k: float(np.std([r[k] for r in reports])) for k in numbers},
  }
  return summary


def _evaluate_params(
  config,
  experiment,
  params,
  *,
  step: int,
  num: int,
  steps: int | None,
  sampler: str | None,
  seed: int,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
  """The metrics of :func:`evaluate_workdir` for one set of parameters."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax import evaluate  # pylint: disable=import-outside-toplevel

  key_samples, key_target = jax.random.split(jax.random.PRNGKey(seed))
  result = experiment.generate(
    params,
    key_samples,
    num,
    steps=steps or config.sample.steps,
    sampler=sampler,
    chunk_size=chunk_size,
  )
  samples = np.asarray(result["samples"])
  metrics = {"step": int(step), "num": num, "nfe": int(result.get("nfe", 0))}
  if experiment.target_sampler is not None:
    target = np.asarray(experiment.target_sampler(key_target, num))
    metrics["w2"] = float(evaluate.wasserstein2(samples, target))
  else:
    target = _held_out_images(config, num)
    if config.data.target == "digits":
      metrics["digits_frechet_distance"] = float(evaluate.digits_frechet_distance(samples))
  metrics.update(
    _likelihood_metrics(
      config, experiment, params, target, seed=seed, steps=steps or config.sample.steps
    )
  )
  return metrics
