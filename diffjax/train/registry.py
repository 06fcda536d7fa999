"""The names a config may use, checked before anything compiles.

Each check looks the name up in the table of the module that owns it (models, toy2d, images,
objectives), so a new entry there is valid here without an edit.
"""

from __future__ import annotations

import ml_collections

__all__ = ["name_problems", "shape_problems"]

_DATA_KINDS = ("toy2d", "images", "npz")
_COMPUTE_DTYPES = ("float32", "bfloat16")


def _choice(problems, key, value, choices):
  if value not in choices:
    problems.append(f"{key}={value!r}: unknown; choose one of {sorted(choices)}")


def name_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Unknown names in ``config``, each as one line naming the key and the valid choices."""
  # pylint: disable-next=import-outside-toplevel
  from diffjax import models, objectives
  from diffjax.data import images, toy2d  # pylint: disable=import-outside-toplevel

  problems: list[str] = []
  _choice(problems, "data.kind", config.data.kind, _DATA_KINDS)
  if config.data.kind == "toy2d":
    _choice(problems, "data.source", config.data.source, toy2d.TOY2D)
    _choice(problems, "data.target", config.data.target, toy2d.TOY2D)
  elif config.data.kind == "images":
    _choice(problems, "data.target", config.data.target, images.DATASETS)
    if config.data.source != "normal":
      problems.append(
        f"data.source={config.data.source!r}: image experiments start from "
        "noise; set data.source='normal'"
      )
  elif config.data.kind == "npz" and config.data.source != "normal":
    if tuple(config.data.shape) != (2,):
      problems.append(
        f"data.source={config.data.source!r} with data.shape={tuple(config.data.shape)}: a toy "
        "source draws 2D points, so only 2D data (data.shape=(2,)) may start from one; set "
        "data.source='normal'"
      )
    else:
      _choice(problems, "data.source", config.data.source, toy2d.TOY2D)
  _choice(problems, "model.name", config.model.name, models.MODELS)
  problems += objectives.objective_problems(config.objective.to_dict())
  spec = objectives.OBJECTIVES.get(config.objective.name)
  if spec is not None and not spec.any_source and config.data.source != "normal":
    problems.append(
      f"data.source={config.data.source!r}: objective "
      f"{config.objective.name!r} starts from N(0, I); set data.source='normal' "
      "(a flow-matching objective transports any source)"
    )
  _choice(problems, "train.compute_dtype", config.train.compute_dtype, _COMPUTE_DTYPES)
  _choice(problems, "optimizer.name", config.optimizer.name, ("adam", "adamw"))
  _choice(problems, "optimizer.decay", config.optimizer.decay, ("constant", "cosine"))
  file_target = "npz" if config.data.kind == "npz" else config.data.target
  if config.data.kind in ("images", "npz") and file_target in ("npz", "folder"):
    import pathlib  # pylint: disable=import-outside-toplevel

    needs = f"data.kind={config.data.kind!r}"
    if config.data.kind == "images":
      needs = f"data.target={config.data.target!r}"
    if not config.data.path:
      problems.append(f"data.path is empty; {needs} needs the path of the npz file or image folder")
    elif not pathlib.Path(config.data.path).exists():
      problems.append(
        f"data.path={config.data.path!r} does not exist; pass an existing {file_target} path"
      )
  return problems


def shape_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The data shape against the dataset and the model, and the model's keywords, checked by
  building the model abstractly (``jax.eval_shape``: shapes only, nothing compiled)."""
  import jax  # pylint: disable=import-outside-toplevel

  from diffjax.train import experiment  # pylint: disable=import-outside-toplevel

  problems: list[str] = []
  shape = tuple(config.data.shape)
  if config.data.kind == "toy2d" and shape != (2,):
    problems.append(f"data.shape={shape}: 2D toy data has shape (2,); set data.shape=(2,)")
    return problems
  if config.data.kind == "npz" and len(shape) not in (1, 3):
    problems.append(
      f"data.shape={shape}: npz data are vectors (d,) (2D points: (2,)) or images "
      "(height, width, channels)"
    )
    return problems
  if config.data.kind == "images":
    if len(shape) != 3:
      problems.append(f"data.shape={shape}: images need (height, width, channels)")
      return problems
    if config.data.target == "digits" and shape != (8, 8, 1):
      problems.append(
        f"data.shape={shape}: scikit-learn digits are (8, 8, 1); set data.shape=(8, 8, 1)"
      )
      return problems
  try:
    model = experiment.create_model(config)
    jax.eval_shape(model.init, jax.random.PRNGKey(0))
  except (TypeError, ValueError) as e:
    problems.append(f"model {config.model.name!r} with data.shape={shape}: {e}")
  return problems
