"""Host data for the train loop: a grain loader per process, its batches placed on the mesh.

Two data kinds read host data through the one grain pipeline of :mod:`diffjax.data.images`:
``data.kind="images"`` (a named image dataset: digits, npz, folder, tfds) and
``data.kind="npz"`` (the user's own arrays of any example shape: 2D points ``(N, 2)``, vectors
``(N, d)``, images ``(N, H, W, C)`` or ``(N, C, H, W)``). The config's strings are resolved here,
once: :func:`dataset_kwargs` turns ``config.data`` into the loader's keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from diffjax.data import images
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib

__all__ = [
  "LAYOUTS",
  "source_name",
  "value_range_keywords",
  "dataset_kwargs",
  "host_source",
  "make_reference_points",
  "make_input_hooks",
]

LAYOUTS = {"nhwc": "NHWC", "nchw": "NCHW"}
"""``data.layout`` -> the loader's ``layout``: channel-last or channel-first images."""


def source_name(config) -> str:
  """The :data:`~diffjax.data.images.DATASETS` name ``config.data`` reads: ``"npz"`` for
  ``data.kind="npz"``, else ``data.target``."""
  return "npz" if config.data.kind == "npz" else config.data.target


def value_range_keywords(text: str) -> dict:
  """``data.value_range`` as the loader's keywords: ``"auto"`` -> ``{}`` (integer images in
  [0, 255], float images in [0, 1], vectors as they are), ``"none"`` -> ``keep_values=True``
  (as they are), ``"lo,hi"`` -> ``value_range=(lo, hi)`` (mapped to [-1, 1] by
  ``x = 2 (u - lo) / (hi - lo) - 1``).

  Raises:
    ValueError: naming ``data.value_range`` and the accepted forms.
  """
  spelled = text.strip().lower()
  if spelled == "auto":
    return {}
  if spelled == "none":
    return {"keep_values": True}
  fix = (
    "write 'lo,hi' with lo < hi (e.g. '0,255', '0,1', '-1,1'), 'none' to use the values "
    "as they are, or 'auto'"
  )
  parts = spelled.split(",")
  try:
    lo, hi = (float(part) for part in parts)
  except ValueError:
    raise ValueError(f"data.value_range={text!r}: not a range; {fix}") from None
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    raise ValueError(f"data.value_range={text!r}: needs finite lo < hi; {fix}")
  return {"value_range": (lo, hi)}


def _npz_keywords(config) -> dict:
  layout = config.data.layout.strip().lower()
  if layout not in LAYOUTS:
    raise ValueError(
      f"data.layout={config.data.layout!r}: choose 'nhwc' (channel-last images, [N, H, W, C]) "
      "or 'nchw' (channel-first, [N, C, H, W])"
    )
  return {
    "path": config.data.path,
    "image_key": config.data.key or None,
    # A class-conditional model needs the labels; without one they are read (and checked) only
    # when the file holds them. '' means the file has none.
    "label_key": config.data.label_key,
    "require_labels": bool(config.data.num_classes),
    "layout": LAYOUTS[layout],
    "key_names": ("data.key", "data.label_key"),
    **value_range_keywords(config.data.value_range),
  }


def dataset_kwargs(config) -> dict:
  """``config.data`` as the keywords of :func:`diffjax.data.images.get_dataset` for
  :func:`source_name`; a bad ``data.layout`` or ``data.value_range`` raises ValueError."""
  name = source_name(config)
  if name == "npz":
    return _npz_keywords(config)
  if name == "folder":
    return {"root": config.data.path}
  if name == "tfds":
    return {"name": config.data.tfds_name or "cifar10"}
  return {}


def host_source(config):
  """The grain random-access source of ``config.data`` (the whole data set, in memory for the
  in-memory sources)."""
  return images.get_dataset(source_name(config), **dataset_kwargs(config))


def make_reference_points(config) -> Callable[[jax.Array, int], np.ndarray]:
  """``reference_points(key, num) -> float32 [min(num, N), *shape]``: examples of the data set,
  drawn uniformly without replacement (all of them when ``num >= N``), in the model range.

  What generated samples are compared with (2-Wasserstein, plots) when the data is a file; the
  data set is read on the first call.
  """
  source = []

  def reference_points(key: jax.Array, num: int) -> np.ndarray:
    if not source:
      source.append(host_source(config))
    total = len(source[0])
    count = min(int(num), total)
    indices = jax.random.choice(key, total, (count,), replace=False)
    return images.take(source[0], np.asarray(indices))

  return reference_points


def make_input_hooks(config, mesh, *, arrays=None):
  """``(make_iterator, next_batch, iterator_state)`` for the loop; ``arrays``: the source's
  ``(examples, labels)`` when already loaded (:func:`diffjax.data.images.load_arrays`).

  Each process reads its own shard (``process_index`` of ``process_count``) with a per-process
  batch of ``batch_size / process_count``; :func:`sharding.global_batch_from_local` assembles
  the global batch over the mesh. Every batch's labels are checked against
  ``data.num_classes`` on the host (validation already did so for in-memory data; a TFDS source
  is first seen here, and its first batch is read before the step compiles).
  """
  process_count = jax.process_count()
  loader = images.make_loader(
    source=(
      host_source(config)
      if arrays is None
      else images.ImageSource(*arrays, name=source_name(config))
    ),
    batch_size=config.train.batch_size // process_count,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=process_count,
    augment=config.data.augment_flip,
  )

  def make_iterator(data_state: dict):
    if data_state.get("grain"):
      return images.restore_iterator(loader, data_state["grain"])
    return iter(loader)

  num_classes = config.data.num_classes
  if config.data.kind == "npz":
    origin = f"a batch of data.path={config.data.path!r}"
  else:
    origin = f"a batch of data.target={config.data.target!r}"

  def next_batch(iterator):
    batch = next(iterator)
    local = {
      "x": np.asarray(batch["image"], np.float32),
      "label": np.asarray(batch["label"], np.int32),
    }
    problem = config_lib.label_problem(
      local["label"], num_classes=num_classes, origin=origin, complete=False
    )
    if problem:
      raise config_lib.ConfigError(problem)
    return sharding_lib.global_batch_from_local(local, mesh)

  def iterator_state(iterator) -> dict:
    return {"grain": images.iterator_state(iterator)}

  return make_iterator, next_batch, iterator_state
