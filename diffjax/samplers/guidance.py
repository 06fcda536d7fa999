"""Classifier-free guidance: ``pred = uncond + w (cond - uncond)``, for any prediction target.

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance", eq. 6,
https://arxiv.org/abs/2207.12598, guide the noise prediction: ``eps~ = (1 + w') eps(x, c) - w'
eps(x)``, i.e. ``w = 1 + w'`` here (``w = 1``: the conditional model, ``w = 0``: the
unconditional one). Flow-matching models guide the velocity the same way (Zheng et al. 2023,
"Guided Flows", https://arxiv.org/abs/2311.13443).

Which target space the two predictions are mixed in does not matter: every conversion between
targets (:mod:`diffjax.parameterization`) is affine in the prediction at fixed ``(x_t, t)``, and
``(1 - w) uncond + w cond`` is an affine combination (weights sum to one), so mixing eps, x0, v,
velocity or score predictions gives the same guided ``(x0, eps)``. The guided closure therefore
returns the network's own target and goes to any sampler unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.samplers.fields import Predictor
from diffjax.shapes import broadcast_to_data

__all__ = ["classifier_free_guidance", "batched_classifier_free_guidance"]


def _mix(uncond: Array, cond: Array, scale) -> Array:
  """``uncond + w (cond - uncond)`` with ``w`` a scalar or one weight per example."""
  w = broadcast_to_data(jnp.asarray(scale, cond.dtype), cond)
  return uncond + w * (cond - uncond)


def classifier_free_guidance(
  predict_cond: Predictor, predict_uncond: Predictor, *, scale: float | Array
) -> Predictor:
  """``(x, t) -> uncond(x, t) + scale (cond(x, t) - uncond(x, t))`` (Ho & Salimans 2022, eq. 6).

  Args:
    predict_cond: the network with the condition, ``(x, t) -> prediction``.
    predict_uncond: the network with the null condition, same target.
    scale: guidance weight ``w`` (1 = no guidance); a scalar or ``[batch]``.
  """

  def predict(x: Array, t: Array) -> Array:
    return _mix(predict_uncond(x, t), predict_cond(x, t), scale)

  return predict


def batched_classifier_free_guidance(
  apply: Callable[..., Array], params: Any, *, cond: Any, null_cond: Any, scale: float | Array
) -> Predictor:
  """Classifier-free guidance with one network call on a doubled batch.

  ``apply(params, [x; x], [t; t], [cond; null_cond])`` is split into the conditional and
  unconditional halves and combined as in :func:`classifier_free_guidance`: half the calls of
  two separate evaluations, the usual implementation (Ho & Salimans 2022, Sec. 3.2).

  Args:
    apply: ``apply(params, x_t, t, cond) -> prediction``.
    params: the network's parameters.
    cond: per-example conditions (a pytree with leading axis ``[batch]``).
    null_cond: the null condition in the same structure (e.g. labels equal to ``num_classes``).
    scale: guidance weight ``w``.
  """
  both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)

  def predict(x: Array, t: Array) -> Array:
    out = apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond_out, uncond_out = jnp.split(out, 2)
    return _mix(uncond_out, cond_out, scale)

  return predict
