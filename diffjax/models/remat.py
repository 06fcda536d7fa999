"""Rematerialisation (gradient checkpointing) of a model's blocks, and the logical axis names a
model attaches to its parameters.

Remat (Chen et al. 2016, https://arxiv.org/abs/1604.06174; ``jax.checkpoint``) trades compute for
memory: the backward pass recomputes a block's activations from its input instead of reading
them from memory. A policy says what the forward pass may still keep:

- ``none``: no remat, every residual is saved (the plain program);
- ``dots_saveable``: matrix-multiply and convolution outputs are kept, the cheap elementwise
  work between them (norms, activations, softmax) is recomputed
  (``jax.checkpoint_policies.dots_saveable``);
- ``full``: only each block's input is kept, everything inside is recomputed
  (``jax.checkpoint_policies.nothing_saveable``).

Remat changes where values are computed, never what: the gradients of all three are equal up to
floating-point reassociation.

Logical axis names (``"embed"``, ``"heads"``, ``"mlp"``) say what a parameter axis means; only
``diffjax.train.sharding`` maps them to mesh axes, so a model knows nothing of devices and runs
unchanged without a mesh (the names are metadata, not a constraint).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from diffjax._lookup import lookup

__all__ = ["REMAT_POLICIES", "get_remat", "partitioned"]


def _no_remat(fn: Callable) -> Callable:
  return fn


def _policy(policy) -> Callable[[Callable], Callable]:
  return lambda fn: nnx.remat(fn, policy=policy)


# Each entry wraps a block function ``fn(module, *args)`` into its rematerialised version.
REMAT_POLICIES: dict[str, Callable[[Callable], Callable]] = {
  "none": _no_remat,
  "dots_saveable": _policy(jax.checkpoint_policies.dots_saveable),
  "full": _policy(jax.checkpoint_policies.nothing_saveable),
}


def get_remat(name: str) -> Callable[[Callable], Callable]:
  """Resolves a remat policy by name (once, at construction): ``fn -> fn`` rematerialised."""
  return lookup(REMAT_POLICIES, name, "remat policy", hint=" (model.remat)")


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
  """``init`` whose parameter carries the logical axis ``names`` as metadata only.

  ``eager_sharding=False``: Flax would otherwise constrain the value to a mesh at creation,
  which needs one; diffjax lays parameters out in ``train.sharding`` instead.
  """
  return nnx.with_partitioning(init, names, eager_sharding=False)
