"""The one broadcasting helper of diffjax: per-example scalars against data of any shape."""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

__all__ = ["broadcast_to_data"]


def broadcast_to_data(values: Array, data: Array) -> Array:
  """Reshapes per-example ``values`` of shape ``[batch]`` to ``[batch, 1, ..., 1]``.

  The result broadcasts against ``data`` of shape ``[batch, *event]``. A scalar stays a
  scalar, so every function that uses this helper also works on unbatched data. Broadcasting
  happens from the left (the batch axis), which is the only convention used in diffjax.

  Args:
    values: scalar or ``[batch]`` array (times, alphas, sigmas, weights).
    data: ``[batch, *event]`` array the values will multiply.

  Returns:
    ``values`` reshaped to ``[batch] + [1] * len(event)``, or unchanged if scalar.
  """
  values = jnp.asarray(values)
  if values.ndim == 0:
    return values
  if values.ndim > data.ndim:
    raise ValueError(
        f"per-example values of shape {values.shape} have more axes than data of shape "
        f"{data.shape}; pass one value per example (shape [batch]) or a scalar")
  return values.reshape(values.shape + (1,) * (data.ndim - values.ndim))
