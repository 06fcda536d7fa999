"""The experiment config schema, command-line overrides and validation before any compile.

Every experiment file in ``configs/`` starts from :func:`base_config` and overrides fields, so one
schema holds for all: a locked ``ml_collections.ConfigDict`` where a typo is an error. Each
sub-dict is exactly the keyword arguments of one factory (``model`` feeds
``diffjax.models.create_model``, ``optimizer`` feeds :func:`diffjax.train.optim.make_optimizer`).

:func:`validate` checks what ``ml_collections`` does not (True for an int field, NaN, negative
counts, unknown names, a batch that does not split over the mesh, data that does not fit the
model, labels outside ``data.num_classes``) and raises one :class:`ConfigError` listing every
problem, each naming the key and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

__all__ = [
  "ConfigError",
  "base_config",
  "load_config_file",
  "apply_overrides",
  "validate",
  "config_to_json",
  "config_from_json",
  "resume_fingerprint",
  "fingerprint_differences",
  "check_resume_config",
  "label_problem",
  "objective_group",
]


class ConfigError(ValueError):
  """A config or command-line problem a user can fix; the message lists each problem."""


def objective_group(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.objective`` for objective ``name``: its factory's keywords with their defaults,
  then ``overrides``; an unknown name or keyword raises :class:`ConfigError`."""
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  if name not in objectives.OBJECTIVES:
    raise ConfigError(
      f"objective.name={name!r}: unknown; choose one of {sorted(objectives.OBJECTIVES)}"
    )
  group = {"name": name, **objectives.defaults(objectives.OBJECTIVES[name].build)}
  unknown = sorted(set(overrides) - set(group))
  if unknown:
    raise ConfigError(
      f"objective {name!r} takes no {unknown}; its keywords are {sorted(set(group) - {'name'})}"
    )
  group.update(overrides)
  return ml_collections.ConfigDict(group)


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults (a 2D I-CFM run); experiment files override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data. kind "toy2d": generated on device (fused multi-step training); kind "images": an image
  # dataset through grain; kind "npz": your own arrays in data.path (points (N, 2), vectors
  # (N, d), images (N, H, W, C) or (N, C, H, W)) through the same grain pipeline.
  c.data = ml_collections.ConfigDict(
    dict(
      kind="toy2d",
      source="normal",  # toy2d source distribution (flow matching, 2D data) or "normal"
      target="8gaussians",  # toy2d target, or image dataset name: digits | npz | folder | tfds
      path="",  # the npz file (kind "npz", or "images" with target npz) or image folder
      tfds_name="",  # e.g. "cifar10" when data.target == "tfds"
      shape=(2,),  # data shape without batch: (2,), (d,) or (H, W, C)
      num_classes=0,  # > 0: class-conditional model and label-aware couplings
      augment_flip=False,  # random horizontal flips (images only)
      key="",  # npz: array name of the examples ("": "image", else "x")
      label_key="label",  # npz: the labels' array, needed when num_classes > 0 ("": none)
      layout="nhwc",  # npz images: "nhwc" (channel-last) or "nchw" (channel-first)
      # npz: the raw values' range "lo,hi" (mapped to [-1, 1]), "none" (used as they are) or
      # "auto" (integer images in [0, 255], float images in [0, 1], vectors as they are).
      value_range="auto",
      # npz / digits: "auto" holds the data set on the devices (batches drawn in the jitted,
      # fused step) when it takes at most device_resident_max_mb MiB as float32; "on", "off".
      device_resident="auto",
      device_resident_max_mb=256.0,
    )
  )

  # The keywords of diffjax.models.create_model for this model; an experiment may replace the
  # whole group for another model (e.g. dict(name="unet", ch=32, ...)).
  c.model = ml_collections.ConfigDict(
    dict(
      name="mlp",
      width=64,
      depth=3,
      activation="selu",
    )
  )

  # The objective: a name in diffjax.objectives.OBJECTIVES plus exactly its factory's keywords
  # (experiments of another objective replace the whole group: objective_group(name)).
  c.objective = objective_group("icfm")

  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adam",  # adam | adamw
      learning_rate=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      warmup_steps=0,
      decay="constant",  # constant | cosine
      grad_clip_norm=0.0,  # 0 disables clipping
    )
  )

  c.train = ml_collections.ConfigDict(
    dict(
      steps=1000,
      batch_size=256,  # global batch per optimizer update
      accumulate_steps=1,  # micro-batches per update (gradient accumulation)
      ema_decay=0.999,
      compute_dtype="float32",  # float32 | bfloat16 (parameters stay float32)
      fused_steps=100,  # on-device data: steps per jitted lax.scan
      log_every=100,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpoint=True,
      plot_every=0,  # > 0: also WORKDIR/plots/step_XXXXXX.png every this many steps
      progress_bar=True,  # a live bar on a terminal; else (and off) one line per log step
      max_nonfinite_steps=3,  # consecutive non-finite steps skipped before the run halts
      step_timeout_s=0.0,  # > 0: a step (chunk) slower than this dumps stacks and exits
      save_timeout_s=600.0,  # with step_timeout_s > 0: the same for a checkpoint save or plot
      num_seeds=1,  # > 1: train seeds seed, seed + 1, ... at once (state vmapped)
      # Post-hoc EMA (EDM2): power-function averages of these widths tracked in the state and
      # saved to WORKDIR/posthoc_ema every snapshot_every steps (0: at every checkpoint), so
      # `diffjax evaluate --sigma-rel` reconstructs any width after training; () disables.
      posthoc_ema=ml_collections.ConfigDict(dict(sigma_rels=(), snapshot_every=0)),
    )
  )

  # data x fsdp x tensor devices; the batch is split over data x fsdp, the DiT's heads and MLP
  # over tensor (diffjax.train.sharding).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.distributed = ml_collections.ConfigDict(
    dict(
      enabled=False,
      coordinator_address="",
      num_processes=1,
      process_id=0,
      local_device_ids="",  # e.g. "0,1"; empty: all local devices
      heartbeat_timeout_s=10,  # a dead peer is detected after about this long
      barrier_timeout_s=120,  # every barrier diffjax itself waits at gives up after this
    )
  )

  c.sample = ml_collections.ConfigDict(
    dict(
      num=2000,
      steps=100,
      num_trajectories=32,
    )
  )
  return c


# ---- loading and overrides -----------------------------------------------------------------


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs ``get_config()`` from a Python config file and locks the result.

  ``path`` may end in ``:variant``, passed to ``get_config(variant)`` (big_vision convention).
  A file that declares ``VARIANTS = ("small", ...)`` accepts only those names, alone or joined
  by commas (``:cond,small``): a mistyped variant would otherwise run the full experiment. A
  file without the declaration gets its variant unchecked, as ``get_config`` sees it.
  """
  path, _, variant = path.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist; pass --config configs/<name>.py")
  spec = importlib.util.spec_from_file_location(f"diffjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 -- a user's file: report it in one line
    raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config() function; define one")
  _check_variant(path, variant, getattr(module, "VARIANTS", None))
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except Exception as e:  # noqa: BLE001 -- a user's file: report it in one line
    raise ConfigError(
      f"get_config({variant!r}) in {path!r} failed: {type(e).__name__}: {' '.join(str(e).split())}"
    ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"get_config() in {path!r} returned {type(config).__name__}, expected "
      "an ml_collections.ConfigDict (start from diffjax.train.config.base_config)"
    )
  config.lock()
  return config


def _check_variant(path: str, variant: str, declared: Any) -> None:
  """Raises one :class:`ConfigError` when ``variant`` names a variant the file does not declare
  in its ``VARIANTS`` tuple (``None``: the file declares none, nothing to check)."""
  if declared is None or not variant:
    return
  if not (isinstance(declared, (tuple, list)) and all(isinstance(v, str) for v in declared)):
    raise ConfigError(
      f"VARIANTS in {path!r} is {declared!r}; declare a tuple of variant "
      "names, e.g. VARIANTS = ('small',)"
    )
  unknown = [name for name in variant.split(",") if name not in declared]
  if not unknown:
    return
  close = difflib.get_close_matches(unknown[0], declared, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  known = ", ".join(repr(v) for v in declared) or "none"
  raise ConfigError(
    f"--config {path}:{variant}: unknown variant {unknown[0]!r}{hint}; the "
    f"file's VARIANTS are {known} (join several with ','), or drop "
    f"':{variant}' for the full experiment"
  )


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses an override string into the type of the field it replaces."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected a boolean (true/false)")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"--config.{key}={text}: expected an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"--config.{key}={text}: expected a number") from None
  if isinstance(current, tuple):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ConfigError(f"--config.{key}={text}: expected a tuple such as (1, 2)") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  return text


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
  """Applies ``--config.a.b=value`` overrides, each parsed by the type of the field it replaces.

  ``--config.objective.name=NAME`` first replaces the objective group by NAME's (the keys differ
  per objective): a key both objectives take keeps a value the config set (one that differs
  from the old objective's default), every other key gets NAME's default, and the other
  ``--config.objective.*`` overrides apply to the new group.

  Raises one :class:`ConfigError` listing every unknown key and unparsable value.
  """
  problems = []
  for item in overrides:
    if item.startswith("--config.objective.name="):
      name = item.split("=", 1)[1]
      if name != config.objective.name:
        try:
          before = objective_group(config.objective.name)
          shared = {
            key: value
            for key, value in config.objective.items()
            if key in objective_group(name) and key != "name" and value != before[key]
          }
          with config.unlocked():
            config.objective = objective_group(name, **shared)
        except ConfigError as e:
          problems.append(str(e))
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      problems.append(f"{item}: expected --config.<key>=<value>")
      continue
    key, text = item[len("--config.") :].split("=", 1)
    node = config
    parts = key.split(".")
    try:
      for part in parts[:-1]:
        node = node[part]
      current = node[parts[-1]]
    except (KeyError, AttributeError, TypeError):
      problems.append(
        f"--config.{key}: unknown key; valid keys here are "
        f"{sorted(node.keys()) if hasattr(node, 'keys') else '(none)'}"
      )
      continue
    if isinstance(current, ml_collections.ConfigDict):
      problems.append(f"--config.{key}: is a group; set one of its fields {sorted(current.keys())}")
      continue
    try:
      with node.unlocked():
        node[parts[-1]] = _parse_value(key, text, current)
    except ConfigError as e:
      problems.append(str(e))
  if problems:
    raise ConfigError("\n".join(problems))
  return config


# ---- JSON (the frozen config written to the workdir) ----------------------------------------


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """The accepted config as JSON; `sample` and `evaluate` read this, never a Python file."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of :func:`config_to_json`, over the current schema (new fields keep defaults)."""
  config = base_config()
  loaded = _tuples(json.loads(text))

  def merge(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        raise ConfigError(
          f"config.json: unknown key {prefix}{key}; the workdir was written by "
          "an incompatible diffjax version"
        )
      if isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = value

  # The model and objective groups hold one factory's keywords, which differ per name: the model
  # group is taken whole, the objective group over its objective's defaults.
  config.model = ml_collections.ConfigDict(loaded.pop("model"))
  objective = dict(loaded.pop("objective", {}))
  if "name" not in objective:
    raise ConfigError(
      "config.json: the objective group has no name; the workdir was written by "
      "an incompatible diffjax version (train it again in a new --workdir)"
    )
  config.objective = objective_group(objective.pop("name"))
  merge(config.objective, objective, "objective.")
  merge(config, loaded, "")
  config.lock()
  return config


# ---- semantic validation ---------------------------------------------------------------------

_TYPES = {
  bool: "a boolean",
  int: "an integer",
  float: "a number",
  str: "a string",
  tuple: "a tuple",
}


def _check_types(config, defaults, prefix, problems):
  for key in sorted(set(config.keys()) - set(defaults.keys())):
    problems.append(f"{prefix}{key}: unknown key; valid keys here are {sorted(defaults.keys())}")
  for key in defaults.keys():
    if key not in config:
      problems.append(f"{prefix}{key}: missing; keep every key of base_config()")
      continue
    if not prefix and key == "model":
      continue  # model keywords differ per model; create_model checks them by name
    value, default = config[key], defaults[key]
    if not prefix and key == "objective":
      # The keys are the named objective's keywords (unknown ones: objective_problems).
      default = _objective_defaults(value, problems)
      if default is None:
        continue
    name = f"{prefix}{key}"
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        problems.append(f"{name}={value!r}: expected a group of keys {sorted(default.keys())}")
        continue
      _check_types(value, default, f"{name}.", problems)
      continue
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if expected is int and isinstance(value, bool):
      problems.append(f"{name}={value!r}: expected an integer, got a boolean")
    elif not isinstance(value, expected):
      problems.append(f"{name}={value!r}: expected {_TYPES.get(expected, expected.__name__)}")
    elif expected is float and not math.isfinite(value):
      problems.append(f"{name}={value!r}: must be a finite number")


def _objective_defaults(group, problems) -> ml_collections.ConfigDict | None:
  """The defaults of the objective ``group`` names, restricted to the keys it holds (so only
  their types are compared here); ``None`` after reporting an unusable group."""
  from diffjax import objectives  # pylint: disable=import-outside-toplevel

  if not isinstance(group, ml_collections.ConfigDict) or "name" not in group:
    problems.append(
      f"objective={group!r}: expected a group with a name, one of {sorted(objectives.OBJECTIVES)}"
    )
    return None
  name = group["name"]
  if name not in objectives.OBJECTIVES:
    problems.append(
      f"objective.name={name!r}: unknown; choose one of {sorted(objectives.OBJECTIVES)}"
    )
    return None
  defaults = {"name": name, **objectives.defaults(objectives.OBJECTIVES[name].build)}
  unknown = [key for key in group.keys() if key not in defaults]
  for key in unknown:
    problems.append(
      f"objective.{key}: objective {name!r} does not take it (its keywords: "
      f"{sorted(set(defaults) - {'name'})}); drop it, or start from a config of "
      "an objective that does"
    )
  return ml_collections.ConfigDict({k: v for k, v in defaults.items() if k in group})


def _positive(config, names, problems, allow_zero=False):
  for name in names:
    node = config
    for part in name.split("."):
      node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
      continue
    if node < 0 or (node == 0 and not allow_zero):
      bound = ">= 0" if allow_zero else "> 0"
      problems.append(f"{name}={node!r}: must be {bound}")


def label_problem(labels, *, num_classes: int, origin: str, complete: bool = True) -> str | None:
  """One line when ``labels`` do not all lie in ``0 .. num_classes - 1``, else ``None``.

  A conditional model's label table has ``num_classes + 1`` rows, the last one the null label of
  classifier-free guidance: a label equal to ``num_classes`` would silently train as the null
  label, a larger one reads outside the table (NaN from ``jnp.take``). ``num_classes == 0``
  (an unconditional model) ignores labels. ``complete=False`` (one batch, not the whole data
  set) makes the suggested count a lower bound.
  """
  labels = np.asarray(labels)
  if num_classes == 0 or labels.size == 0:
    return None
  low, high = int(labels.min()), int(labels.max())
  if 0 <= low and high < num_classes:
    return None
  found = f"data.num_classes={num_classes} but the labels in {origin} span {low}..{high}"
  if low < 0:
    return f"{found}; relabel the data to 0 .. N-1, or set data.num_classes=0 (unconditional)"
  count = f"data.num_classes={high + 1}" if complete else f"data.num_classes >= {high + 1}"
  return (
    f"{found} (label {num_classes} is the null label, larger ones lie outside the label "
    f"table); set {count}, or 0 to train unconditionally"
  )


def _unread_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Values of one group that another group makes the run ignore, one line each with the reason
  (within the objective group, each objective's ``check`` reports its own)."""
  problems = []
  dropout = config.objective.get("label_dropout", 0.0)
  if dropout and not config.data.num_classes:
    problems.append(
      f"objective.label_dropout={dropout!r} with data.num_classes=0: label dropout trains the "
      "null label of a class-conditional model, and this model has no labels, so it would be "
      "ignored; set data.num_classes (and labels in the data), or objective.label_dropout=0"
    )
  if config.data.augment_flip and len(config.data.shape) != 3:
    problems.append(
      f"data.augment_flip=True with data.shape={tuple(config.data.shape)}: a horizontal flip "
      "mirrors images (height, width, channels), and these data are not images, so it would "
      "be ignored; set data.augment_flip=false"
    )
  return problems


def _device_resident_problems(config: ml_collections.ConfigDict) -> list[str]:
  from diffjax.train import device_data  # pylint: disable=import-outside-toplevel

  return device_data.setting_problems(config)


def _npz_key_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The npz keys' spelling and combinations (no file is read)."""
  from diffjax.train import image_input  # pylint: disable=import-outside-toplevel

  problems = []
  try:
    image_input.dataset_kwargs(config)
  except ValueError as e:
    problems.append(str(e))
  if config.data.num_classes and not config.data.label_key:
    problems.append(
      f"data.label_key='' (no labels) but data.num_classes={config.data.num_classes}: a "
      "class-conditional model needs labels; name the labels' array in the npz "
      "(data.label_key='label'), or set data.num_classes=0"
    )
  shape = tuple(config.data.shape)
  if len(shape) == 1 and config.data.layout.strip().lower() != "nhwc":
    problems.append(
      f"data.layout={config.data.layout!r} with data.shape={shape}: the layout orders image "
      "axes; vectors have none, so keep data.layout='nhwc'"
    )
  return problems


def _toy2d_label_problems(config: ml_collections.ConfigDict) -> list[str]:
  """A class-conditional 2D toy trains on its mixture's components as labels: the target must
  be a labelled mixture and ``data.num_classes`` its number of components."""
  from diffjax.data import toy2d  # pylint: disable=import-outside-toplevel

  target = config.data.target
  if target not in toy2d.TOY2D_LABELLED:
    return [
      f"data.num_classes={config.data.num_classes}: toy target {target!r} has no labels; "
      f"choose a labelled one ({sorted(toy2d.TOY2D_LABELLED)}) or set data.num_classes=0"
    ]
  count = toy2d.num_classes(target)
  if config.data.num_classes != count:
    return [
      f"data.num_classes={config.data.num_classes}: toy target {target!r} has {count} "
      f"components (its labels); set data.num_classes={count}, or 0 for an unconditional model"
    ]
  return []


def _dataset_problems(config: ml_collections.ConfigDict) -> list[str]:
  """An in-memory dataset (npz file, image folder, digits) is read here, so a corrupt,
  unreadable, mis-shaped or NaN-holding dataset, or labels outside ``data.num_classes``, fail
  before anything compiles (the loader's own checks, one line). Digits are read only when a
  conditional model needs their labels checked: their shape is fixed."""
  from diffjax.train import image_input  # pylint: disable=import-outside-toplevel

  if config.data.kind == "toy2d" and config.data.num_classes:
    return _toy2d_label_problems(config)
  target = image_input.source_name(config)
  if config.data.kind not in ("images", "npz") or target not in ("npz", "folder", "digits"):
    return []
  if target == "npz":
    problems = _npz_key_problems(config)
    if problems:
      return problems
  if target == "digits" and not config.data.num_classes:
    return []
  from diffjax.data import images  # pylint: disable=import-outside-toplevel

  kwargs = image_input.dataset_kwargs(config)
  origin = repr(config.data.path) if kwargs else repr(target)
  try:
    arrays, labels = images.load_arrays(target, **kwargs)
  except (ValueError, OSError) as e:
    key = "data.path" if kwargs else "data.target"
    return [f"{key}={origin}: {' '.join(str(e).split())}"]
  shape = tuple(arrays.shape[1:])
  if kwargs and shape != tuple(config.data.shape):
    what = "vectors" if arrays.ndim == 2 else "images"
    return [
      f"data.shape={tuple(config.data.shape)} but {origin} holds {what} of shape {shape}; "
      f"set data.shape={shape}"
    ]
  problem = label_problem(labels, num_classes=config.data.num_classes, origin=origin)
  if problem:
    return [problem]
  if arrays.shape[0] < config.train.batch_size:
    return [
      f"train.batch_size={config.train.batch_size} but {origin} holds {arrays.shape[0]} "
      f"examples, fewer than one batch; set train.batch_size <= {arrays.shape[0]}, or use "
      "more data"
    ]
  return []


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None) -> None:
  """Checks a config before anything is compiled; raises one :class:`ConfigError` listing all.

  Args:
    config: the experiment config (after overrides).
    num_devices: the global device count the mesh will span; ``None`` skips the mesh checks
      (the CLI validates everything else before ``jax.distributed.initialize``, then the mesh).
  """
  # Imports here keep `diffjax train --help` and config errors fast: validation needs only the
  # name tables, not JAX compilation.
  from diffjax.train import registry

  problems: list[str] = []
  _check_types(config, base_config(), "", problems)
  if problems:  # later checks assume the types are right
    raise ConfigError("\n".join(problems))
  _positive(
    config,
    [
      "train.steps",
      "train.batch_size",
      "train.fused_steps",
      "train.log_every",
      "train.checkpoint_every",
      "train.keep_checkpoints",
      "optimizer.learning_rate",
      "train.accumulate_steps",
      "sample.num",
      "sample.steps",
      "distributed.heartbeat_timeout_s",
      "distributed.barrier_timeout_s",
      "optimizer.eps",
      "train.save_timeout_s",
      "train.num_seeds",
    ],
    problems,
  )
  _positive(
    config,
    [
      "optimizer.warmup_steps",
      "optimizer.weight_decay",
      "optimizer.grad_clip_norm",
      "train.plot_every",
      "sample.num_trajectories",
      "train.max_nonfinite_steps",
      "train.step_timeout_s",
    ],
    problems,
    allow_zero=True,
  )
  for name in ("optimizer.b1", "optimizer.b2"):
    value = config.optimizer[name.split(".")[1]]
    if not 0.0 <= value < 1.0:
      problems.append(f"{name}={value}: must be in [0, 1)")
  if not 0.0 <= config.train.ema_decay < 1.0:
    problems.append(f"train.ema_decay={config.train.ema_decay}: must be in [0, 1)")
  problems += _posthoc_ema_problems(config.train.posthoc_ema)
  if problems:  # before the name tables, whose imports take seconds
    raise ConfigError("\n".join(_one_per_key(problems)))
  problems += registry.name_problems(config)
  if not problems:
    problems += _unread_problems(config) + _device_resident_problems(config)
  if not problems:
    problems += _dataset_problems(config)

  # Mesh and batch.
  data_axis, fsdp_axis, tensor_axis = config.mesh.data, config.mesh.fsdp, config.mesh.tensor
  if tensor_axis < 1:
    problems.append(f"mesh.tensor={tensor_axis}: must be >= 1 (1: no tensor parallelism)")
  elif not problems:
    from diffjax import models  # pylint: disable=import-outside-toplevel

    problem = models.tensor_parallel_problem(config.model.to_dict(), tensor=tensor_axis)
    if problem:
      problems.append(problem)
  if num_devices is None or tensor_axis < 1:
    pass
  elif fsdp_axis < 1 or (data_axis < 1 and data_axis != -1):
    problems.append(
      f"mesh=({data_axis}, {fsdp_axis}): mesh.fsdp must be >= 1 and mesh.data "
      ">= 1 or -1 (all remaining devices)"
    )
  else:
    if data_axis == -1:
      data_axis = num_devices // (fsdp_axis * tensor_axis)
    if data_axis * fsdp_axis * tensor_axis != num_devices:
      problems.append(
        f"mesh.data x mesh.fsdp x mesh.tensor = {data_axis} x {fsdp_axis} x {tensor_axis} "
        f"does not use the {num_devices} devices; set mesh.data=-1 or make the product "
        f"{num_devices}"
      )
    else:
      shards = data_axis * fsdp_axis * config.train.accumulate_steps
      if config.train.batch_size % shards:
        problems.append(
          f"train.batch_size={config.train.batch_size} is not divisible by "
          f"data x fsdp x accumulate_steps = {shards}; use a multiple of {shards}"
        )
  if num_devices is not None:  # builds the model abstractly, which starts the JAX backend
    problems += registry.shape_problems(config)
  if problems:
    raise ConfigError("\n".join(_one_per_key(problems)))


def _posthoc_ema_problems(group: ml_collections.ConfigDict) -> list[str]:
  """``train.posthoc_ema``: distinct widths in (0, sqrt(1/12)) (power-function EMAs with
  exponent > 0, EDM2) and a snapshot period >= 0."""
  from diffjax.train.posthoc_ema import SIGMA_REL_MAX  # pylint: disable=import-outside-toplevel

  problems = []
  values = tuple(group.sigma_rels)
  numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  if not numbers or not all(0.0 < v < SIGMA_REL_MAX for v in values):
    problems.append(
      f"train.posthoc_ema.sigma_rels={values!r}: each must be a number in (0, "
      f"{SIGMA_REL_MAX:.4f}) (EDM2 tracks (0.05, 0.1)); () disables post-hoc EMA"
    )
  elif len(set(values)) != len(values):
    problems.append(f"train.posthoc_ema.sigma_rels={values!r}: drop the repeated values")
  if group.snapshot_every < 0:
    problems.append(
      f"train.posthoc_ema.snapshot_every={group.snapshot_every}: must be >= 0 (0: a snapshot at "
      "every checkpoint)"
    )
  return problems


def _one_per_key(problems: list[str]) -> list[str]:
  """The first problem reported for each key (``a.b=...`` or ``a.b: ...``)."""
  seen, kept = set(), []
  for line in problems:
    key = line.split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]
    if key not in seen:
      seen.add(key)
      kept.append(line)
  return kept


# ---- resuming a workdir ----------------------------------------------------------------------

# Keys that may change when a workdir is resumed: they steer the loop, not the state nor the
# trajectory it follows (the mesh does not change the math; `sample.*` is read at inference).
_FREE_ON_RESUME = (
  "train.steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoint",
  "train.plot_every",
  "train.progress_bar",
  "train.max_nonfinite_steps",
  "train.step_timeout_s",
  "train.save_timeout_s",
  "train.fused_steps",
  "train.posthoc_ema.snapshot_every",
  "mesh.",
  "distributed.",
  "sample.",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def resume_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config keys a checkpoint depends on (all but the loop's knobs), flattened to
  ``{"a.b": value}``; with a decaying learning rate ``train.steps`` shapes the schedule and
  counts too."""
  flat = _flatten(json.loads(config_to_json(config)))
  free = [
    k
    for k in _FREE_ON_RESUME
    if not (k == "train.steps" and flat.get("optimizer.decay") != "constant")
  ]
  return {
    k: v
    for k, v in flat.items()
    if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)
  }


# Runs from before data.device_resident read every data file through grain ("off"); the default
# "auto" may hold the data on the devices instead (a resume then warns that its batches change).
_BEFORE_THE_KEY = {"data.device_resident": "off"}


def fingerprint_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``key: saved -> new`` for each key that differs (missing keys shown as ``<absent>``).

  A key of the data, optimizer or train groups that ``saved`` lacks and ``new`` holds at its
  :func:`base_config` default is no difference: the schema gained it after ``saved`` was
  written, and its default keeps what the older run did. So is a value in
  ``_BEFORE_THE_KEY``, what the older runs did when it differs from the default.
  """
  schema = _flatten(json.loads(config_to_json(base_config())))
  lines = []
  for key in sorted(set(saved) | set(new)):
    if key not in saved and key in schema and not key.startswith(("model.", "objective.")):
      value = _tuples(new.get(key))
      if value == _tuples(schema[key]) or value == _BEFORE_THE_KEY.get(key, schema[key]):
        continue
    a, b = saved.get(key, "<absent>"), new.get(key, "<absent>")
    a, b = _tuples(a), _tuples(b)
    if a != b or isinstance(a, bool) != isinstance(b, bool):
      lines.append(f"{key}: {a!r} -> {b!r}")
  return lines


def check_resume_config(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Raises one :class:`ConfigError` when ``workdir`` was trained with a config whose model,
  optimizer, objective, data or seed differ from ``config`` (a resume would mix two runs)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    return
  try:
    saved = resume_fingerprint(config_from_json(path.read_text(encoding="utf-8")))
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError included
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise ConfigError(
      f"{path} is unreadable ({type(e).__name__}: {first}); restore it or start a new --workdir"
    ) from None
  differences = fingerprint_differences(saved, resume_fingerprint(config))
  if differences:
    raise ConfigError(
      f"--workdir {workdir} was trained with a different config; resuming would mix two "
      f"runs. Differing keys: {'; '.join(differences)}. Start a new --workdir or restore "
      "these values"
    )
