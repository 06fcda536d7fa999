"""Devices live here and nowhere else: the mesh, parameter and batch shardings, and the
per-device variant of a coupling.

The mesh has two axes, ``data`` and ``fsdp`` (big_vision / maxtext naming). The batch is split
over both (every device sees ``batch / (data * fsdp)`` examples); each parameter and optimizer
leaf is split over ``fsdp`` along its largest axis that ``fsdp`` divides, and replicated otherwise.
With ``fsdp = 1`` this is plain data parallelism.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "BATCH_AXES",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "fsdp_spec",
    "state_shardings",
    "per_device_coupling",
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
    raise ValueError(f"mesh data x fsdp = {data} x {fsdp} does not match the {devices.size} "
                     "devices; set mesh.data=-1 or make the product equal the device count")
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
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size)),
                      abstract_tree)


def per_device_coupling(coupling: Callable, mesh: Mesh) -> Callable:
  """Runs ``coupling(key, x0, x1, labels)`` on each device's shard only (TorchCFM's behaviour,
  cheaper but a worse plan); the default in diffjax solves on the gathered global batch.

  Each shard gets its own key (``fold_in`` of the device's position), so shards differ.
  """
  def local(key, x0, x1, labels):
    index = jax.lax.axis_index(BATCH_AXES)
    return coupling(jax.random.fold_in(key[0], index), x0, x1, labels)

  spec = P(BATCH_AXES)

  @functools.wraps(coupling)
  def wrapped(key, x0, x1, labels=None):
    has_labels = labels is not None
    labels_in = labels if has_labels else np.zeros((x0.shape[0],), np.int32)
    keys = jax.numpy.broadcast_to(key, (1,) + key.shape)

    def body(k, a, b, c):
      out0, out1, out2 = local(k, a, b, c if has_labels else None)
      return out0, out1, (out2 if has_labels else c)

    out = jax.shard_map(body, mesh=mesh, in_specs=(P(), spec, spec, spec),
                        out_specs=(spec, spec, spec), check_vma=False)(keys, x0, x1, labels_in)
    return out[0], out[1], (out[2] if has_labels else None)

  return wrapped


def global_batch_from_local(local_batch, mesh: Mesh):
  """Assembles each process's slice of the batch into one global array sharded over the mesh
  (multi-host: every process loads its own shard of the data)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
