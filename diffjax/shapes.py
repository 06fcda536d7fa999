"""Array conventions shared by every math layer, each written once.

* :func:`broadcast_to_data`, the one broadcasting helper: per-example scalars against data of any
  shape;
* :func:`compute_dtype`, :func:`in_compute_dtype`, :func:`as_floating`: the math runs in at least
  float32 and returns a floating dtype;
* :func:`concrete`: a value known before tracing, for the checks made at the edge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

__all__ = ["broadcast_to_data", "compute_dtype", "in_compute_dtype", "as_floating", "concrete"]


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
      f"{data.shape}; pass one value per example (shape [batch]) or a scalar"
    )
  return values.reshape(values.shape + (1,) * (data.ndim - values.ndim))


def compute_dtype(*arrays):
  """``promote_types(result_type(*arrays), float32)``: the dtype the math runs in.

  At least float32, because bfloat16 keeps 8 bits of mantissa: ``1 - abar`` near ``t = 0``,
  ``expm1`` near zero, ``t (1 - t)`` and the small residuals of a late loss all round away.
  Integer inputs compute in float32; float64 (with x64) stays float64.
  """
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def in_compute_dtype(x) -> Array:
  """``x`` as an array of :func:`compute_dtype` (integers and bfloat16 become float32)."""
  x = jnp.asarray(x)
  return x.astype(compute_dtype(x))


def as_floating(x) -> Array:
  """``x`` (times, betas, log-SNRs) as a floating array: integers become float32, floating
  arrays keep their dtype, so a function can compute in :func:`compute_dtype` and return the
  caller's dtype."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def concrete(value, *, dtype=None) -> np.ndarray | None:
  """``np.asarray(value, dtype)`` when the value is known outside tracing, else None.

  Value checks (step ranges, positive definiteness, monotone grids) run before tracing; under
  ``jit`` the value is a tracer and the caller skips the check (or says to build outside jit).
  """
  try:
    return np.asarray(value, dtype=dtype)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
