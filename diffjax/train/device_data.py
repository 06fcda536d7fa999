"""A small in-memory data set held on the devices, its batches drawn inside the jitted step.

``data.device_resident`` chooses where the examples of an in-memory source (``data.kind="npz"``,
or ``data.kind="images"`` with target ``npz`` or ``digits``) live during training:

* ``"auto"`` (default): on the devices when the data set, as float32 examples in the model range
  plus int32 labels, takes at most ``data.device_resident_max_mb`` MiB (each device holds all of
  it), else through grain;
* ``"on"``: on the devices whatever its size;
* ``"off"``: through grain (:mod:`diffjax.train.image_input`).

Image folders, TFDS sources and data sets over the limit always go through grain. A resident data
set is read once by the same loader as grain's (:func:`diffjax.data.images.load_arrays`: same
layout, value range and checks), mapped to the model range on the host, and replicated over the
mesh. Each step draws its batch from the step's data key, as the 2D toys do, so the fused chunks
of ``train.fused_steps`` apply and the data state of a checkpoint is the step alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax.data import images
from diffjax.train import config as config_lib
from diffjax.train import image_input
from diffjax.train import sharding as sharding_lib

__all__ = [
  "MODES",
  "IN_MEMORY_SOURCES",
  "DeviceData",
  "resident_bytes",
  "fits_on_devices",
  "setting_problems",
  "load_in_memory",
  "draw_batch",
  "place",
]

MODES = ("auto", "on", "off")
"""The values of ``data.device_resident``."""

IN_MEMORY_SOURCES = ("npz", "digits")
"""The :func:`~diffjax.train.image_input.source_name` values a data set may be resident for."""

_MIB = 2**20


class DeviceData(NamedTuple):
  """A data set on the devices.

  Attributes:
    arrays: ``{"x": float32 [N, *shape], "label": int32 [N]}``, replicated over the mesh. The
      trainer passes them to its jitted programs as an argument: an array a jitted function
      closes over is compiled into the program as a constant (slow to compile, and held twice).
    draw: ``draw(key, arrays) -> {"x": [B, *shape], "label": [B]}``, the batch of one step.
  """

  arrays: dict
  draw: Callable[[jax.Array, dict], dict]


def resident_bytes(*, num_examples: int, example_shape: tuple[int, ...]) -> int:
  """Bytes of a resident data set on each device: ``N (4 prod(shape) + 4)``, float32 examples
  in the model range and int32 labels (a uint8 image takes four times its file's bytes)."""
  return int(num_examples) * (4 * math.prod(example_shape) + 4)


def fits_on_devices(*, mode: str, num_bytes: int, max_mb: float) -> bool:
  """Whether an in-memory data set of ``num_bytes`` per device is held on the devices:
  ``mode == "on"``, or ``mode == "auto"`` and ``num_bytes <= max_mb * 2**20``."""
  return mode == "on" or (mode == "auto" and num_bytes <= max_mb * _MIB)


def _is_in_memory(config: ml_collections.ConfigDict) -> bool:
  return config.data.kind in ("images", "npz") and (
    image_input.source_name(config) in IN_MEMORY_SOURCES
  )


def setting_problems(config: ml_collections.ConfigDict) -> list[str]:
  """``data.device_resident`` and ``data.device_resident_max_mb`` against each other and the
  data, one line each naming the value and the fix (no file is read)."""
  mode, max_mb = config.data.device_resident, config.data.device_resident_max_mb
  if mode not in MODES:
    return [
      f"data.device_resident={mode!r}: unknown; choose 'auto' (on the devices when the data "
      "set fits data.device_resident_max_mb), 'on' or 'off' (read through grain)"
    ]
  if not max_mb > 0:
    return [
      f"data.device_resident_max_mb={max_mb!r}: must be a positive number of MiB per device "
      f"(default {config_lib.base_config().data.device_resident_max_mb:g})"
    ]
  if config.data.kind == "toy2d" and mode != "auto":
    return [
      f"data.device_resident={mode!r} with data.kind='toy2d': toy data are always drawn on "
      "the device, so the setting would be ignored; keep data.device_resident='auto'"
    ]
  in_memory = _is_in_memory(config)
  if mode == "on" and not in_memory:
    return [
      f"data.device_resident='on' but data.target={config.data.target!r} is read through "
      "grain (image folders and TFDS are); only in-memory arrays (data.kind='npz', or "
      "data.target 'npz' or 'digits') can be held on the devices: set "
      "data.device_resident='auto' or 'off'"
    ]
  default = config_lib.base_config().data.device_resident_max_mb
  if max_mb != default and (mode != "auto" or not in_memory):
    why = f"data.device_resident={mode!r}" if mode != "auto" else "this data is not in memory"
    return [
      f"data.device_resident_max_mb={max_mb!r} is read only by data.device_resident='auto' for "
      f"in-memory data (npz, digits), and {why}, so it would be ignored; drop it"
    ]
  return []


def load_in_memory(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray] | None:
  """The raw ``(examples, labels)`` of an in-memory source (:func:`images.load_arrays` with
  :func:`image_input.dataset_kwargs`), or ``None`` when ``config.data`` reads no in-memory
  source or ``data.device_resident="off"``."""
  if config.data.device_resident == "off" or not _is_in_memory(config):
    return None
  name = image_input.source_name(config)
  return images.load_arrays(name, **image_input.dataset_kwargs(config))


def draw_batch(
  key: jax.Array,
  arrays: dict,
  *,
  batch_size: int,
  flip: bool = False,
  sharding=None,
) -> dict:
  """The rows ``i_1 .. i_B`` of the data set, drawn independently and uniformly with
  replacement: ``i_b ~ U{0, ..., N - 1}``, ``x_b = X[i_b]``, ``label_b = Y[i_b]`` (plain
  minibatch SGD sampling, Bottou, Curtis & Nocedal 2018, https://arxiv.org/abs/1606.04838,
  Sec. 3), images then mirrored left-right with probability 1/2 each when ``flip`` (Ho et al.
  2020, https://arxiv.org/abs/2006.11239, App. B).

  With replacement rather than a permutation per epoch: the batch is then a function of the
  step's key alone at O(B) cost whatever N, so fused chunks draw all their batches up front and
  a resume replays them exactly with no data state; a permutation costs O(N log N) per epoch
  and its batches straddle epochs. Each batch is an unbiased draw from the data set either way.

  Args:
    key: the step's data key (:func:`diffjax.train.step.step_keys`).
    arrays: ``{"x": float32 [N, *shape], "label": int32 [N]}``.
    batch_size: ``B``.
    flip: mirror ``[H, W, C]`` examples along ``W``.
    sharding: the batch sharding (:func:`~diffjax.train.sharding.batch_sharding`): each device
      gathers only its own rows from its replica.

  Returns:
    ``{"x": float32 [B, *shape], "label": int32 [B]}``.
  """
  index_key, flip_key = jax.random.split(key)
  num_examples = arrays["x"].shape[0]
  indices = jax.random.randint(index_key, (batch_size,), 0, num_examples)
  if sharding is not None:
    indices = jax.lax.with_sharding_constraint(indices, sharding)
  x, label = jnp.asarray(arrays["x"])[indices], jnp.asarray(arrays["label"])[indices]
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1], x)
  batch = {"x": x, "label": label}
  if sharding is not None:
    batch = jax.lax.with_sharding_constraint(batch, sharding)
  return batch


def place(
  config: ml_collections.ConfigDict, examples: np.ndarray, labels: np.ndarray, *, mesh
) -> DeviceData | None:
  """The data set of :func:`load_in_memory` on the devices of ``mesh`` when
  :func:`fits_on_devices` says so, else ``None`` (read it through grain).

  Labels outside ``data.num_classes`` raise :class:`~diffjax.train.config.ConfigError` (the
  check grain's pipeline makes per batch, made once on the whole set).
  """
  num_bytes = resident_bytes(num_examples=examples.shape[0], example_shape=examples.shape[1:])
  if not fits_on_devices(
    mode=config.data.device_resident,
    num_bytes=num_bytes,
    max_mb=config.data.device_resident_max_mb,
  ):
    return None
  num_classes = config.data.num_classes
  origin = repr(config.data.path) if config.data.path else repr(config.data.target)
  problem = config_lib.label_problem(labels, num_classes=num_classes, origin=origin)
  if problem:
    raise config_lib.ConfigError(problem)
  arrays = {
    "x": images.to_model_range(examples),  # on the host: the values grain's batches hold
    "label": np.asarray(labels, np.int32),
  }
  draw = lambda key, arrays: draw_batch(
    key,
    arrays,
    batch_size=config.train.batch_size,
    flip=config.data.augment_flip,
    sharding=sharding_lib.batch_sharding(mesh),
  )
  return DeviceData(arrays=sharding_lib.put_replicated(arrays, mesh), draw=draw)
