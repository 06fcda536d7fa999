"""Devices live here and nowhere else: the mesh, parameter and batch shardings, and the
per-device variant of a coupling.

The mesh has two axes, ``data`` and ``fsdp`` (big_vision / maxtext naming). The batch is split
over both (every device sees ``batch / (data * fsdp)`` examples); each parameter and optimizer
leaf is split over ``fsdp`` along its largest axis that ``fsdp`` divides, and replicated otherwise.
With ``fsdp = 1`` this is plain data parallelism.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import couplings as couplings_lib

__all__ = [
  "BATCH_AXES",
  "make_mesh",
  "batch_sharding",
  "replicated",
  "fsdp_spec",
  "state_shardings",
  "num_batch_shards",
  "per_device_coupling",
  "to_host",
  "put_replicated",
  "global_batch_from_local",
]

BATCH_AXES = ("data", "fsdp")


def make_mesh(*, data: int, fsdp: int, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all global devices); ``data=-1`` takes
  every device that ``fsdp`` leaves."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if data == -1:
    data = devices.size // fsdp
  if data * fsdp != devices.size:
    raise ValueError(
      f"mesh data x fsdp = {data} x {fsdp} does not match the {devices.size} "
      "devices; set mesh.data=-1 or make the product equal the device count"
    )
  return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data x fsdp``; other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Shards the largest axis that ``fsdp_size`` divides (ties: the last such axis), else none.

  The rule depends only on the shape, so a parameter, its EMA copy and its Adam moments get
  the same layout without any name matching.
  """
  if fsdp_size == 1 or not shape:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return P(*spec)


def state_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for every leaf of an abstract pytree (``jax.eval_shape`` output)."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size)), abstract_tree
  )


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into (the product of the batch axes)."""
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def per_device_coupling(coupling: Callable, mesh: Mesh) -> Callable:
  """Runs ``coupling(key, x0, x1, labels)`` on each device's shard only (TorchCFM's behaviour,
  cheaper but a worse plan); the default in diffjax solves on the gathered global batch.

  The batch axis is split over the devices in order, so one block of
  :func:`diffjax.couplings.blockwise_coupling` per device is exactly each device's shard.
  """
  return couplings_lib.blockwise_coupling(coupling, num_blocks=num_batch_shards(mesh))


def to_host(tree):
  """The global value of every array in ``tree`` as NumPy, on every process (a process holds
  only its own shards of a multi-host array, so those are all-gathered)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return multihost_utils.process_allgather(tree, tiled=True)


def put_replicated(tree, mesh: Mesh):
  """Host values that every process holds identically, replicated over the mesh."""
  return jax.device_put(tree, replicated(mesh))


def global_batch_from_local(local_batch, mesh: Mesh):
  """Assembles each process's slice of the batch into one global array sharded over the mesh
  (multi-host: every process loads its own shard of the data)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
