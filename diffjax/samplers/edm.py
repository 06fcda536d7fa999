"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), on noise levels ``sigma``.

It runs in variance-exploding coordinates, ``x = x0 + sigma eps``, with a denoiser ``D(x, sigma)``
(:func:`~diffjax.samplers.fields.sigma_denoiser` builds one for a network trained on any
process). With ``s_churn = 0`` it is EDM's deterministic Heun sampler (Algorithm 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.samplers.diffusion import check_sigmas
from diffjax.samplers.fields import SamplerOutput, SigmaDenoiser, prepend_initial

__all__ = ["edm_sample"]


def edm_sample(
  key: Array,
  denoise: SigmaDenoiser,
  x_init: Array,
  *,
  sigmas: Array,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = math.inf,
  s_noise: float = 1.0,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """EDM's stochastic sampler: churn, then a Heun step of the probability-flow ODE.

  For ``i = 0..N-1`` (``sigma_N`` is usually 0):
  ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` if ``S_tmin <= sigma_i <= S_tmax`` else 0;
  ``sigma_hat = (1 + gamma_i) sigma_i``;
  ``x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z``;
  ``d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat``; ``x_{i+1} = x_hat + (sigma_{i+1} -
  sigma_hat) d``; if ``sigma_{i+1} != 0``, the second-order correction ``x_{i+1} = x_hat +
  (sigma_{i+1} - sigma_hat) (d + d') / 2`` with ``d' = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) /
  sigma_{i+1}``. Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
  Generative Models", Algorithm 2, https://arxiv.org/abs/2206.00364.

  Args:
    key: PRNG key for the churn noise (unused when ``s_churn = 0``).
    denoise: ``D(x, sigma) -> x0_hat`` with ``sigma`` ``[batch]``.
    x_init: ``[batch, *event]`` start, ``sigmas[0] * N(0, I)``.
    sigmas: ``[N + 1]`` decreasing noise levels (:func:`~diffjax.samplers.grids.edm_sigmas`).
    s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s ``S_churn``, ``S_tmin``, ``S_tmax``,
      ``S_noise``.
    return_trajectory: also return the ``[N + 1, batch, ...]`` states ``x_i``.

  Returns:
    :class:`~diffjax.samplers.fields.SamplerOutput`; ``nfe = 2 N - (number of steps to 0)``.
  """
  check_sigmas(sigmas)
  if not (s_churn >= 0 and s_noise >= 0):
    raise ValueError(f"s_churn={s_churn}, s_noise={s_noise}: both must be >= 0")
  sigmas = jnp.asarray(sigmas)
  num_steps = sigmas.shape[0] - 1
  keys = jax.random.split(key, num_steps)
  in_range = (sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax)
  gammas = jnp.where(in_range, min(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)

  def full(value, x):
    return jnp.full(x.shape[:1], value, dtype=x.dtype)

  def body(x, inputs):
    sigma, sigma_next, gamma, step_key = inputs
    sigma_hat = (1.0 + gamma) * sigma
    noise = jax.random.normal(step_key, x.shape, x.dtype)
    # sqrt(sigma_hat^2 - sigma^2) written without the cancellation (it can round below zero).
    x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * noise
    d = (x_hat - denoise(x_hat, full(sigma_hat, x))) / sigma_hat
    x_euler = x_hat + (sigma_next - sigma_hat) * d

    def heun(x_euler):
      d_next = (x_euler - denoise(x_euler, full(sigma_next, x))) / sigma_next
      return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)

    # No correction at sigma = 0 (D is not evaluated there): cond skips the second call.
    x_next = jax.lax.cond(sigma_next == 0, lambda y: y, heun, x_euler)
    return x_next, (x_next if return_trajectory else None)

  samples, path = jax.lax.scan(body, x_init, (sigmas[:-1], sigmas[1:], gammas, keys))
  nfe = 2 * num_steps - jnp.sum(sigmas[1:] == 0).astype(jnp.int32)
  return SamplerOutput(samples=samples, trajectory=prepend_initial(x_init, path), nfe=nfe)
