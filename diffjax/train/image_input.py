"""Host data for the train loop: a grain loader per process, its batches placed on the mesh."""

from __future__ import annotations

import jax
import numpy as np

from diffjax.data import images
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib

__all__ = ["dataset_kwargs", "make_input_hooks"]


def dataset_kwargs(config) -> dict:
  """``config.data`` as the keywords of :func:`diffjax.data.images.get_dataset`."""
  name = config.data.target
  if name == "npz":
    return {"path": config.data.path}
  if name == "folder":
    return {"root": config.data.path}
  if name == "tfds":
    return {"name": config.data.tfds_name or "cifar10"}
  return {}


def make_input_hooks(config, mesh):
  """``(make_iterator, next_batch, iterator_state)`` for the loop.

  Each process reads its own shard (``process_index`` of ``process_count``) with a per-process
  batch of ``batch_size / process_count``; :func:`sharding.global_batch_from_local` assembles
  the global batch over the mesh. Every batch's labels are checked against
  ``data.num_classes`` on the host (validation already did so for in-memory data; a TFDS source
  is first seen here, and its first batch is read before the step compiles).
  """
  process_count = jax.process_count()
  loader = images.make_loader(
    source=config.data.target,
    source_kwargs=dataset_kwargs(config),
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
