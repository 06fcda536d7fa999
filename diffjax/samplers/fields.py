"""What a sampler integrates: adaptors from a network's prediction to denoisers and fields.

A trained network reaches the samplers as a closure ``predict(x, t) -> prediction`` (``x`` is
``[batch, *event]``, ``t`` is ``[batch]`` float model time). What the prediction means is a
:class:`~diffjax.parameterization.PredictionTarget` ("eps", "x0", "v", "velocity", "score") and
the process is its :class:`~diffjax.parameterization.Coefficients` as a function of that same time,
``coefficients_fn(t) -> Coefficients``: ``diffusion_coefficients`` of a continuous schedule
(diffusion time, ``t = 0`` data), ``flow_coefficients`` or a path's ``gaussian_coefficients``
(:mod:`diffjax.paths`; flow time, ``t = 0`` noise, ``t = 1`` data), or any user function. Every
conversion goes through ``target.to_x0_eps``, so every sampler works with every target:

* :func:`denoiser`: ``(x, t) -> (x0_hat, eps_hat)``, the posterior means (Tweedie);
* :func:`velocity_field`: ``(x, t) -> dx/dt`` of the probability-flow ODE, in the time of
  ``coefficients_fn`` (``d_alpha x0_hat + d_sigma eps_hat``; Song et al. 2021, Lipman et al. 2023);
* :func:`sigma_denoiser`: EDM's ``D(x, sigma)`` in variance-exploding coordinates
  ``x / alpha`` at noise level ``sigma / alpha`` (Karras et al. 2022, eq. 7 and Algorithm 1);
* :func:`time_of_log_snr`: the inverse of ``t -> log-SNR(t)``, by bisection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from diffjax._jax_compat import is_tracer
from diffjax.parameterization import Coefficients, PredictionTarget, velocity_from_x0_eps
from diffjax.shapes import broadcast_to_data, compute_dtype, in_compute_dtype

__all__ = [
  "Predictor",
  "CoefficientsFn",
  "Denoiser",
  "VelocityField",
  "SigmaDenoiser",
  "SamplerOutput",
  "log_snr_of",
  "denoiser",
  "velocity_field",
  "ode_field",
  "time_of_log_snr",
  "sigma_denoiser",
  "prepend_initial",
]

Predictor = Callable[[Array, Array], Array]
"""``predict(x, t) -> prediction``: ``x`` ``[batch, *event]``, ``t`` ``[batch]`` model time."""

CoefficientsFn = Callable[[Array], Coefficients]
"""``coefficients_fn(t) -> Coefficients`` of ``x_t = alpha x0 + sigma eps``, elementwise in t."""

Denoiser = Callable[[Array, Array], tuple[Array, Array]]
"""``denoise(x, t) -> (x0_hat, eps_hat)``."""

VelocityField = Callable[[Array, Array], Array]
"""``velocity(x, t) -> dx/dt`` with ``t`` ``[batch]``."""

SigmaDenoiser = Callable[[Array, Array], Array]
"""``D(x, sigma) -> x0_hat`` in variance-exploding coordinates; ``sigma`` is ``[batch]``."""


class SamplerOutput(NamedTuple):
  """What every sampler returns.

  Attributes:
    samples: ``[batch, *event]`` the final state.
    trajectory: ``[num_steps + 1, batch, *event]`` every state from the first (the scaled noise)
      to the last, or ``None`` unless ``return_trajectory=True``.
    nfe: number of network evaluations (int scalar; for adaptive solvers read from diffrax's
      step counts at run time).
  """

  samples: Array
  trajectory: Array | None
  nfe: Array


def log_snr_of(coefficients: Coefficients) -> Array:
  """``lambda = log(alpha^2 / sigma^2) = 2 (log alpha - log sigma)``; ``-inf`` where ``alpha = 0``
  and ``+inf`` where ``sigma = 0``."""
  return 2.0 * (jnp.log(coefficients.alpha) - jnp.log(coefficients.sigma))


def denoiser(
  predict: Predictor, *, target: PredictionTarget, coefficients_fn: CoefficientsFn
) -> Denoiser:
  """``(x, t) -> (x0_hat, eps_hat) = target.to_x0_eps(predict(x, t))`` at ``coefficients_fn(t)``.

  With an exact prediction these are the posterior means ``E[x0 | x_t]`` and ``E[eps | x_t]``,
  related by ``x_t = alpha x0_hat + sigma eps_hat`` (Tweedie's formula; Efron 2011, and Ho et al.
  2020, eq. 15, https://arxiv.org/abs/2006.11239).
  """

  def denoise(x: Array, t: Array) -> tuple[Array, Array]:
    return target.to_x0_eps(predict(x, t), x_t=x, coefficients=coefficients_fn(t))

  return denoise


def velocity_field(
  predict: Predictor, *, target: PredictionTarget, coefficients_fn: CoefficientsFn
) -> VelocityField:
  """The probability-flow ODE field ``dx/dt = d_alpha x0_hat + d_sigma eps_hat``.

  Differentiating ``x_t = alpha x0 + sigma eps`` and taking conditional means gives the marginal
  velocity ``E[d_alpha x0 + d_sigma eps | x_t]``, whose flow has the marginals of the process at
  every ``t`` (Song et al. 2021, eq. 13, https://arxiv.org/abs/2011.13456, written with
  ``f = d_alpha / alpha``; Lipman et al. 2023, Theorem 1, https://arxiv.org/abs/2210.02747). It is
  in the time of ``coefficients_fn``: integrate it toward decreasing diffusion time, or toward
  increasing flow time.
  """

  def velocity(x: Array, t: Array) -> Array:
    coefficients = coefficients_fn(t)
    x0, eps = target.to_x0_eps(predict(x, t), x_t=x, coefficients=coefficients)
    return velocity_from_x0_eps(x0, eps, coefficients=coefficients)

  return velocity


def ode_field(velocity: VelocityField) -> Callable[[Array, Array], Array]:
  """``(x, t_scalar) -> velocity(x, t)`` with the scalar solver time repeated over the batch
  (``t = full([batch], t_scalar)``), the form the ODE integrators of this package call."""

  def field(x: Array, t: Array) -> Array:
    return velocity(x, jnp.full(x.shape[:1], t, dtype=compute_dtype(t)))

  return field


def _bisect_log_snr(
  target: Array, coefficients_fn: CoefficientsFn, t_min: float, t_max: float, num_iters: int
) -> Array:
  dtype = target.dtype

  def lam(t):
    return log_snr_of(coefficients_fn(t))

  lo = jnp.full(target.shape, t_min, dtype)
  hi = jnp.full(target.shape, t_max, dtype)
  lam_lo, lam_hi = lam(lo), lam(hi)
  side_lo = jnp.sign(lam_lo - target)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    same_side = jnp.sign(lam(mid) - target) == side_lo
    return jnp.where(same_side, mid, lo), jnp.where(same_side, hi, mid)

  lo, hi = jax.lax.fori_loop(0, num_iters, halve, (lo, hi))
  increasing = lam_hi > lam_lo
  t_high_snr = jnp.where(increasing, t_max, t_min).astype(dtype)
  t_low_snr = jnp.where(increasing, t_min, t_max).astype(dtype)
  t = jnp.where(target >= jnp.maximum(lam_lo, lam_hi), t_high_snr, 0.5 * (lo + hi))
  return jnp.where(target <= jnp.minimum(lam_lo, lam_hi), t_low_snr, t)


# Compiled once per (coefficients_fn, bounds): grids call this eagerly, at the edge.
_bisect_log_snr_jit = jax.jit(_bisect_log_snr, static_argnums=(1, 2, 3, 4))


def time_of_log_snr(
  log_snr: Array,
  *,
  coefficients_fn: CoefficientsFn,
  t_min: float = 0.0,
  t_max: float = 1.0,
  num_iters: int = 48,
) -> Array:
  """Inverts ``t -> lambda(t)`` on ``[t_min, t_max]`` by bisection (elementwise in ``log_snr``).

  ``lambda`` must be monotone in ``t`` (decreasing in diffusion time, increasing in flow time;
  the direction is read from the end points). Targets beyond the range map to the nearer end,
  so ``lambda = +inf`` (``sigma = 0``) gives the data end. ``num_iters = 48`` halvings reach the
  float32 resolution of ``[0, 1]``.
  """
  target = in_compute_dtype(log_snr)
  args = (coefficients_fn, float(t_min), float(t_max), int(num_iters))
  if is_tracer(target):  # already inside a trace: a per-trace closure would fill jit's cache
    return _bisect_log_snr(target, *args)
  try:
    hash(args)
  except TypeError:  # an unhashable coefficients_fn: run uncompiled
    return _bisect_log_snr(target, *args)
  return _bisect_log_snr_jit(target, *args)


def sigma_denoiser(
  predict: Predictor,
  *,
  target: PredictionTarget,
  coefficients_fn: CoefficientsFn,
  time_of_sigma: Callable[[Array], Array] | None = None,
  t_min: float = 0.0,
  t_max: float = 1.0,
) -> SigmaDenoiser:
  """EDM's denoiser ``D(x, sigma)`` for a network trained on any affine process.

  In variance-exploding coordinates ``x_ve = x / alpha`` the process is ``x_ve = x0 + sigma_ve
  eps`` with ``sigma_ve = sigma / alpha = exp(-lambda / 2)``. So ``D(x_ve, sigma_ve) = x0_hat(
  alpha(t) x_ve, t)`` at the time ``t`` whose log-SNR is ``-2 log sigma_ve`` (Karras et al. 2022,
  eq. 7 and Algorithm 1 with ``s(t) = alpha(t)``, https://arxiv.org/abs/2206.00364).

  Args:
    predict, target, coefficients_fn: the network and its process (see module docstring).
    time_of_sigma: ``sigma_ve [batch] -> t [batch]``; default: :func:`time_of_log_snr` on
      ``[t_min, t_max]`` (bisection). Pass a closed form when there is one (e.g. EDM's
      ``sigma(t)`` inverted), or to use the network's own noise-level input.
  """
  if time_of_sigma is None:

    def time_of_sigma(sigma):
      return time_of_log_snr(
        -2.0 * jnp.log(sigma), coefficients_fn=coefficients_fn, t_min=t_min, t_max=t_max
      )

  def denoise(x: Array, sigma: Array) -> Array:
    t = time_of_sigma(sigma)
    coefficients = coefficients_fn(t)
    x_t = broadcast_to_data(coefficients.alpha, x) * x
    x0, _ = target.to_x0_eps(predict(x_t, t), x_t=x_t, coefficients=coefficients)
    return x0

  return denoise


def prepend_initial(x_init: Array, path: Array | None) -> Array | None:
  """``[x_init, *path]``: a scanned path of ``N`` states becomes the ``[N + 1, ...]`` trajectory
  (``None`` stays ``None``)."""
  if path is None:
    return None
  return jnp.concatenate([x_init[None].astype(path.dtype), path])
