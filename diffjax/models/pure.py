"""Turns an NNX module into a pair of pure functions ``(init, apply)`` over a params pytree.

Everything above ``models/`` sees a network as ``apply(params, x_t, t, cond) -> output``, so
losses, samplers and the train step stay pure functions of pytrees. The module's ``GraphDef``
(its static structure) is computed once, abstractly, when the pair is made and captured by
``apply``, which rebuilds the module with ``nnx.merge`` inside whatever transform calls it
(flax ``examples/nnx_toy_examples/01_functional_api.py``).

Contract for a wrapped module: ``module(x, t, cond, *, rngs)`` with ``x`` ``[batch, *data_shape]``,
``t`` float32 ``[batch]`` (``[batch, time_inputs]`` for a model of several times, e.g. MeanFlow's
``u(z, t, s)``), ``cond`` int ``[batch]`` (or None when ``num_classes == 0``), and ``rngs`` an
``nnx.Rngs`` with a ``dropout`` stream or None (dropout off). All of its state must be
``nnx.Param``: no batch statistics, no RNG state.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

__all__ = ["ModelFns", "functionalize", "num_params"]

PyTree = Any


class ModelFns(NamedTuple):
  """A model as pure functions.

  Attributes:
    init: ``key -> params``, a nested dict of arrays (deterministic in ``key``; jittable, so
      ``jax.eval_shape(init, key)`` gives shapes and ``jax.jit(init, out_shardings=...)`` makes
      params born sharded).
    apply: ``apply(params, x_t, t, cond=None, *, dropout_key=None) -> output`` with ``x_t``'s
      shape (its last axis ``output_heads`` times longer for a model of several output heads,
      :func:`~diffjax.models.create_model`), float32. ``x_t`` is ``[batch, *data_shape]`` (or
      one unbatched example), ``t`` is
      ``[batch]`` or a scalar (``[batch, time_inputs]``, or ``[time_inputs]`` for one unbatched
      example, when the model takes several times), ``cond`` int labels ``[batch]`` (None = the
      null label when the model is class-conditional). Dropout is active iff ``dropout_key`` is
      given.
    logical_axes: ``((path, names), ...)``, for each parameter whose module named its axes
      (``nnx.with_partitioning``), its path in the params dict (a tuple of keys) and one logical
      name (or None) per axis; what ``diffjax.train.sharding`` lays the parameters out by (a
      tuple, so the pair stays hashable; ``dict(logical_axes)`` to look a path up).
  """

  init: Callable[[Array], PyTree]
  apply: Callable[..., Array]
  logical_axes: tuple = ()


def num_params(params: PyTree) -> int:
  """Total number of scalars in a params pytree (works on ``jax.eval_shape`` output too)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def functionalize(
  build: Callable[..., nnx.Module],
  *,
  data_shape: tuple[int, ...],
  num_classes: int = 0,
  time_inputs: int = 1,
) -> ModelFns:
  """Wraps ``build(rngs=nnx.Rngs(key))`` as ``(init, apply)``; see :class:`ModelFns`.

  Args:
    build: constructor taking only ``rngs``, e.g. ``functools.partial(MLP, data_shape=(2,))``.
    data_shape: shape of one example (no batch axis).
    num_classes: number of real classes (0: unconditional, ``cond`` must be None).
    time_inputs: times per example the module takes (1: ``t`` is ``[batch]``; more: ``t`` is
      ``[batch, time_inputs]``, e.g. MeanFlow's ``(t, s - t)``).

  Returns:
    :class:`ModelFns`.
  """
  data_shape = tuple(data_shape)
  _check_takes(build, "build", kwargs={"rngs": None}, expected=_BUILD_SIGNATURE)
  # Abstract construction: no FLOPs, no memory; yields the static structure once.
  abstract = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
  _check_takes(
    abstract,
    f"{type(abstract).__name__}.__call__",
    args=(None, None, None),
    kwargs={"rngs": None},
    expected=_CALL_SIGNATURE,
  )
  graphdef, params_state, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
    raise TypeError(
      f"{type(abstract).__name__} holds non-parameter state at {paths}; diffjax "
      "models keep all state in nnx.Param (use GroupNorm/LayerNorm, pass dropout "
      "keys at call time)"
    )
  logical_axes = tuple(
    (tuple(path), tuple(variable.get_metadata()["out_sharding"]))
    for path, variable in nnx.to_flat_state(params_state)
    if variable.get_metadata().get("out_sharding")
  )
  del params_state

  def init(key: Array) -> PyTree:
    _, state = nnx.split(build(rngs=nnx.Rngs(key)))
    return nnx.to_pure_dict(state)

  def apply(
    params: PyTree,
    x_t: Array,
    t: Array,
    cond: Array | None = None,
    *,
    dropout_key: Array | None = None,
  ) -> Array:
    x_t = jnp.asarray(x_t)
    unbatched = x_t.shape == data_shape
    if unbatched:
      x_t = x_t[None]
    if x_t.shape[1:] != data_shape:
      raise ValueError(
        f"x_t has shape {x_t.shape} but the model was built for data_shape="
        f"{data_shape}; pass [batch, *{data_shape}] or rebuild the model"
      )
    batch = x_t.shape[0]
    t = _check_times(t, batch=batch, unbatched=unbatched, time_inputs=time_inputs)
    cond = _check_cond(cond, batch=batch, unbatched=unbatched, num_classes=num_classes)
    module = nnx.merge(graphdef, params)
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    out = module(x_t, t, cond, rngs=rngs).astype(jnp.float32)
    return out[0] if unbatched else out

  return ModelFns(init=init, apply=apply, logical_axes=logical_axes)


_BUILD_SIGNATURE = (
  "build(*, rngs: nnx.Rngs) -> nnx.Module, e.g. functools.partial(MyModel, width=64), whose "
  "__init__ takes rngs"
)
_CALL_SIGNATURE = (
  "__call__(self, x, t, cond, *, rngs): x [batch, *data_shape], t float32 [batch], cond int "
  "labels [batch] or None (unconditional), rngs an nnx.Rngs with a 'dropout' stream or None; "
  "e.g. def __call__(self, x, t, cond=None, *, rngs=None)"
)


def _check_takes(fn, name: str, *, expected: str, args: tuple = (), kwargs: dict) -> None:
  """One ValueError, before anything is traced, when ``fn`` cannot be called as diffjax calls
  it (``fn(*args, **kwargs)``); a callable whose signature Python cannot read is let through."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(
      f"{name}{signature} cannot be called as diffjax calls it ({e}); diffjax expects {expected}"
    ) from None


def _check_times(t: Array, *, batch: int, unbatched: bool, time_inputs: int) -> Array:
  """Validates the times: ``[batch]`` (a scalar is broadcast) for a model of one time,
  ``[batch, time_inputs]`` (``[time_inputs]`` for one unbatched example) otherwise."""
  t = jnp.asarray(t, jnp.float32)
  if time_inputs > 1:
    if unbatched and t.shape == (time_inputs,):
      t = t[None]
    if t.shape != (batch, time_inputs):
      raise ValueError(
        f"t has shape {t.shape} but the model takes {time_inputs} times per example; pass "
        f"shape ({batch}, {time_inputs}) (or rebuild the model with time_inputs=1)"
      )
    return t
  if unbatched and t.shape == (1,):
    t = t[0]
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(
      f"t has shape {t.shape}; pass a scalar or one time per example, shape ({batch},)"
    )
  return t


def _check_cond(
  cond: Array | None, *, batch: int, unbatched: bool, num_classes: int
) -> Array | None:
  """Validates class labels; None becomes the null label ``num_classes`` of a conditional model."""
  if num_classes == 0:
    if cond is not None:
      raise ValueError(
        "cond was given but the model is unconditional (num_classes=0); pass "
        "cond=None or build the model with num_classes > 0"
      )
    return None
  if cond is None:
    return jnp.full((batch,), num_classes, jnp.int32)
  cond = jnp.asarray(cond)
  if not jnp.issubdtype(cond.dtype, jnp.integer):
    raise ValueError(f"cond must be integer class labels, got dtype {cond.dtype}")
  if unbatched and cond.shape == (1,):
    cond = cond[0]
  if cond.ndim == 0:
    cond = jnp.broadcast_to(cond, (batch,))
  if cond.shape != (batch,):
    raise ValueError(f"cond has shape {cond.shape}; pass one label per example, shape ({batch},)")
  return cond
