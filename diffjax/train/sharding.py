"""Devices live here and nowhere else: the mesh, parameter and batch shardings, the logical
axis rules, and the per-device variant of a coupling.

The mesh has three axes, ``data``, ``fsdp`` and ``tensor`` (big_vision / maxtext naming). The
batch is split over ``data x fsdp`` (every device sees ``batch / (data * fsdp)`` examples; the
``tensor`` devices of one batch shard see the same examples). A parameter leaf is laid out in two
passes:

1. tensor parallelism (Megatron-LM, Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053): the
   logical axis names a model attaches to its parameters (``nnx.with_partitioning``; the DiT
   names its attention-head and MLP-hidden axes) are mapped to mesh axes by
   :data:`LOGICAL_AXIS_RULES`, the one table of such rules;
2. FSDP (ZeRO-3, Rajbhandari et al. 2019, https://arxiv.org/abs/1910.02054): the largest axis
   not taken by pass 1 that ``fsdp`` divides is split over ``fsdp``; none: replicated. A leaf
   that pass 1 left whole (the DiT's adaLN, norms, embeddings) is split over ``fsdp x tensor``
   instead when that product divides an axis: the tensor devices then hold it FSDP-style
   (gathered where used) rather than each a full copy, so parameters and optimizer state per
   device stay near ``total / (fsdp tensor)``.

The EMA copy and the optimizer moments get their parameter's layout (matched by path). With
``fsdp = tensor = 1`` this is plain data parallelism.
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
  "MESH_AXES",
  "LOGICAL_AXIS_RULES",
  "make_mesh",
  "batch_sharding",
  "is_cpu_mesh",
  "replicated",
  "fsdp_spec",
  "param_spec",
  "state_shardings",
  "num_batch_shards",
  "per_device_coupling",
  "to_host",
  "put_replicated",
  "global_batch_from_local",
]

BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")

# Logical parameter axis -> mesh axis (None: not split by this pass; FSDP may still take it).
# The one place where a model's axis names meet the devices.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
  "embed": None,  # the residual width: FSDP's to take
  "heads": "tensor",  # attention heads (q, k, v outputs; the attention output's input)
  "mlp": "tensor",  # the MLP hidden layer
}


def make_mesh(*, data: int, fsdp: int, tensor: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all global devices); ``data=-1``
  takes every device that ``fsdp x tensor`` leave. ``tensor`` is the fastest-varying axis, so
  its devices are neighbours (on a GPU host: the NVLink-connected ones)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if data == -1:
    data = devices.size // (fsdp * tensor)
  if data * fsdp * tensor != devices.size:
    raise ValueError(
      f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} does not match the "
      f"{devices.size} devices; set mesh.data=-1 or make the product equal the device count"
    )
  return Mesh(devices.reshape(data, fsdp, tensor), MESH_AXES)


def is_cpu_mesh(mesh: Mesh) -> bool:
  """The mesh's devices are CPUs (the trainer compiles convolution-heavy chunks differently
  there: see :func:`diffjax.train.trainer.chunk_advancer`)."""
  return mesh.devices.flat[0].platform == "cpu"


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


def param_spec(
  shape: tuple[int, ...], logical_axes: tuple[str | None, ...] | None, *, fsdp: int, tensor: int
) -> P:
  """The two-pass layout of the module docstring for one leaf.

  A logical axis whose rule names ``tensor`` is split over ``tensor`` (when ``tensor > 1``;
  validation has checked that it divides that axis); then :func:`fsdp_spec` picks among the
  axes left. A leaf with no tensor axis is split over ``("fsdp", "tensor")`` where their product
  divides an axis, else over ``fsdp`` alone. With ``tensor = 1`` this is :func:`fsdp_spec`.
  """
  spec: list[str | None] = [None] * len(shape)
  if logical_axes is not None and tensor > 1:
    for axis, name in enumerate(logical_axes):
      if name is not None and LOGICAL_AXIS_RULES.get(name) == "tensor":
        if shape[axis] % tensor:
          raise ValueError(
            f"mesh.tensor={tensor} does not divide the {name!r} axis (size {shape[axis]}) of a "
            f"parameter of shape {shape}; choose a mesh.tensor that divides it"
          )
        spec[axis] = "tensor"
        break  # one tensor axis per leaf (Megatron: column- or row-parallel)
  if tensor > 1 and not any(spec):
    joint = fsdp_spec(shape, fsdp * tensor)
    if any(joint):
      return P(*(("fsdp", "tensor") if name else None for name in joint))
  free = tuple(1 if spec[axis] else size for axis, size in enumerate(shape))
  for axis, name in enumerate(fsdp_spec(free, fsdp)):
    if name is not None:
      spec[axis] = name
  return P(*spec) if any(spec) else P()


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def state_shardings(abstract_tree, mesh: Mesh, logical_axes=()):
  """NamedShardings for every leaf of an abstract pytree (``jax.eval_shape`` output).

  ``logical_axes`` pairs a parameter's path (a tuple of dict keys) with its logical axis names
  (:attr:`diffjax.models.ModelFns.logical_axes`). A leaf whose path ends with such a path (the
  parameter itself, its EMA copy, its Adam moments ``mu`` / ``nu``) and has its rank gets that
  parameter's names; other leaves (step counters) follow the FSDP rule alone.
  """
  fsdp_size, tensor_size = mesh.shape["fsdp"], mesh.shape.get("tensor", 1)
  logical_axes = dict(logical_axes or ())

  def names_for(keys: tuple, ndim: int):
    for start in range(len(keys)):
      names = logical_axes.get(keys[start:])
      if names is not None:
        return tuple(names) if len(names) == ndim else None
    return None

  def sharding(path, leaf):
    names = names_for(_path_keys(path), len(leaf.shape))
    return NamedSharding(mesh, param_spec(leaf.shape, names, fsdp=fsdp_size, tensor=tensor_size))

  return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


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
