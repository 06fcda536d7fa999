"""The discrete (DDPM) forward process: closed forms, the sequential reference, noise models.

Time is DDPM's: integer steps ``t = 0 .. T-1`` toward noise, ``x_{-1} = x_0`` is the data and step
``s`` maps ``x_{s-1}`` to ``x_s = sqrt(alpha_s) x_{s-1} + sqrt(beta_s) n_s`` (Ho et al. 2020,
eq. 2, https://arxiv.org/abs/2006.11239). ``t`` is per example, shape ``[batch]``.

The isotropic shortcut, and exactly where it survives (``abar_t = prod_{s <= t} alpha_s``):

* isotropic ``n_s ~ N(0, I)``: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. eq. 4);
* diagonal ``n_s ~ N(0, diag(d))``: the same per coordinate, ``sqrt((1 - abar_t) d) eps``;
* a fixed covariance ``n_s ~ N(0, Sigma)``, ``L L^T = Sigma``: ``sqrt(1 - abar_t) L eps``, because
  ``sum_s (abar_t / abar_s) beta_s = 1 - abar_t``; stationary colored image noise is the circulant
  case, ``L = F^-1 diag(sqrt(S)) F`` applied by FFT;
* per-step covariances ``Sigma_s``: still Gaussian, ``x_t = sqrt(abar_t) x_0 + chol(C_t) eps`` with
  ``C_t = sum_{s <= t} (abar_t / abar_s) beta_s Sigma_s``, precomputed once by the recursion
  ``C_t = alpha_t C_{t-1} + beta_t Sigma_t``; diagonal in a shared eigenbasis when there is one;
* state-dependent noise ``n_s = g(x_{s-1}) eps`` or non-Gaussian noise (Laplace, uniform): no closed
  form; the marginal is not Gaussian, and only :func:`q_sample_sequential` is exact.

:func:`q_sample_sequential` runs the Markov chain itself with ``jax.lax.scan``; it is the reference
every closed form is tested against (tests/test_forward.py).

Noise is ``jax.random.normal`` in float32 (:func:`standard_normal`), the draw training and the
samplers make; low-precision noise is rounded from it so that it keeps its tails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax._lookup import lookup
from diffjax.schedules import DiscreteSchedule, alpha_sigma_from_log_snr
from diffjax.shapes import broadcast_to_data, compute_dtype, concrete

__all__ = [
  "standard_normal",
  "q_sample",
  "q_sample_closed_form",
  "q_sample_sequential",
  "PosteriorMoments",
  "posterior_mean_variance",
  "IsotropicNoise",
  "DiagonalNoise",
  "FullCovarianceNoise",
  "ColoredNoise",
  "PerStepCovarianceNoise",
  "SharedEigenbasisNoise",
  "HeteroscedasticNoise",
  "LaplaceNoise",
  "UniformNoise",
  "isotropic_noise",
  "diagonal_noise",
  "full_covariance_noise",
  "colored_noise",
  "power_law_spectrum",
  "per_step_covariance_noise",
  "shared_eigenbasis_noise",
  "heteroscedastic_noise",
  "laplace_noise",
  "uniform_noise",
  "accumulated_covariances",
  "NOISE_MODELS",
  "get_noise_model",
]


# --------------------------------------------------------------------------------------------
# Standard normal noise.
# --------------------------------------------------------------------------------------------


def standard_normal(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """``eps ~ N(0, I)`` of ``shape``: ``jax.random.normal(key, shape)`` in float32, then cast.

  Drawing in float32 and rounding keeps the tails of low-precision noise: ``jax.random.normal``
  in bfloat16 transforms a uniform of bfloat16's 8-bit mantissa, 128 distinct values none beyond
  2.9 sigma (tested).

  Args:
    key: a ``jax.random.key`` (or legacy ``uint32[2]``) key.
    shape: output shape.
    dtype: output floating dtype.

  Returns:
    ``[*shape]`` array of ``dtype``.
  """
  return jax.random.normal(key, tuple(int(d) for d in shape), jnp.float32).astype(dtype)


def _scale_and_add_noise(
  *, key: Array, data: Array, signal_scale: Array, noise_scale: Array
) -> Array:
  """``signal_scale * data + noise_scale * eps`` with ``eps = standard_normal(key, data.shape)``;
  the scales broadcast against ``data``, the math runs in at least float32 and the result has
  ``data``'s dtype."""
  dtype = compute_dtype(data)
  eps = standard_normal(key, data.shape, dtype)
  return (signal_scale * data.astype(dtype) + noise_scale * eps).astype(data.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks (before tracing).
# --------------------------------------------------------------------------------------------


def _check_steps(t: Array, data: Array, schedule: DiscreteSchedule) -> Array:
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(
      f"t must be integer step indices 0..T-1 (DDPM time), got dtype {t.dtype}; "
      "for continuous time use diffjax.schedules.ContinuousSchedule"
    )
  if t.ndim > 1 or (t.ndim == 1 and (data.ndim == 0 or t.shape[0] != data.shape[0])):
    raise ValueError(
      f"t of shape {t.shape} does not match data of shape {data.shape}; pass one "
      "step per example (shape [batch]) or a scalar"
    )
  bad = concrete(t)
  if bad is not None:
    num_steps = schedule.num_steps
    if bad.size and (bad.min() < 0 or bad.max() >= num_steps):
      raise ValueError(
        f"step indices must lie in [0, {num_steps - 1}] for a schedule of "
        f"{num_steps} steps, got min {bad.min()} and max {bad.max()}"
      )
  return t


# --------------------------------------------------------------------------------------------
# The isotropic closed form and the sequential reference.
# --------------------------------------------------------------------------------------------


def q_sample(*, data: Array, t: Array, noise: Array, schedule: DiscreteSchedule) -> Array:
  """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``: the isotropic closed form.

  Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", eq. 4,
  https://arxiv.org/abs/2006.11239. One ``[batch]`` gather (``log_snr_t``: ``abar_t =
  sigmoid(log_snr_t)`` and ``1 - abar_t = sigmoid(-log_snr_t)``, precise where ``abar_t`` is
  close to one) and one fused elementwise op; the math runs in at least float32 and the result
  has ``data``'s dtype.

  Args:
    data: ``x_0``, ``[batch, *event]`` (any event shape) or unbatched with scalar ``t``.
    t: integer steps ``[batch]`` in ``0 .. T-1``.
    noise: ``eps``, same shape as ``data``.
    schedule: the discrete schedule.

  Returns:
    ``x_t`` with ``data``'s shape and dtype.
  """
  data, noise = jnp.asarray(data), jnp.asarray(noise)
  if noise.shape != data.shape:
    raise ValueError(f"noise of shape {noise.shape} must match data of shape {data.shape}")
  t = _check_steps(t, data, schedule)
  return _q_sample_kernel(data, t, noise, schedule)


@jax.jit
def _q_sample_kernel(data: Array, t: Array, noise: Array, schedule: DiscreteSchedule) -> Array:
  dtype = compute_dtype(data)
  signal_scale, noise_scale = alpha_sigma_from_log_snr(schedule.log_snr[t])
  x_t = broadcast_to_data(signal_scale, data) * data.astype(dtype) + broadcast_to_data(
    noise_scale, data
  ) * noise.astype(dtype)
  return x_t.astype(data.dtype)


def q_sample_closed_form(
  *, data: Array, t: Array, key: Array, schedule: DiscreteSchedule, noise_model: Any = None
) -> Array:
  """Samples ``q(x_t | x_0)`` in one step, via ``noise_model.sample_marginal``.

  For every Gaussian noise model ``x_t = sqrt(abar_t) x_0 + M_t eps`` with ``M_t M_t^T`` the
  accumulated noise covariance (see the module docstring); models without a closed form (state
  dependent, non-Gaussian) raise ``NotImplementedError`` before anything is traced.

  Args:
    data: ``x_0``, ``[batch, *event]``.
    t: integer steps ``[batch]``.
    key: PRNG key.
    schedule: the discrete schedule.
    noise_model: a noise model from :func:`get_noise_model`; default isotropic.
  """
  noise_model = IsotropicNoise() if noise_model is None else noise_model
  data = jnp.asarray(data)
  t = _check_steps(t, data, schedule)
  return noise_model.sample_marginal(key=key, data=data, t=t, schedule=schedule)


def q_sample_sequential(
  *,
  data: Array,
  t: Array,
  key: Array,
  schedule: DiscreteSchedule,
  noise_model: Any = None,
  return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
  """Runs the Markov chain ``x_s = sqrt(alpha_s) x_{s-1} + sqrt(beta_s) n_s`` for ``s = 0..t``.

  Ho et al. (2020), eq. 2, https://arxiv.org/abs/2006.11239, with ``n_s`` drawn by
  ``noise_model.sample_step_noise(key_s, x_{s-1}, s)`` (``N(0, I)`` by default). One
  ``jax.lax.scan`` over all ``T`` steps; example ``i`` is frozen after its own step ``t_i``
  (``jnp.where``), so per-example ``t`` costs nothing extra. This is the exact reference for every
  closed form, and the only exact sampler for state-dependent or non-Gaussian noise.

  Args:
    data: ``x_0``, ``[batch, *event]``.
    t: integer steps ``[batch]`` in ``0 .. T-1``.
    key: PRNG key; step ``s`` uses the ``s``-th of ``jax.random.split(key, T)``.
    schedule: the discrete schedule.
    noise_model: a noise model from :func:`get_noise_model`; default isotropic.
    return_trajectory: also return the running states.

  Returns:
    ``x_t`` with ``data``'s shape and dtype, and if ``return_trajectory`` the ``[T, *data.shape]``
    states after each step (example ``i`` stays at ``x_{t_i}`` after its step ``t_i``).
  """
  noise_model = IsotropicNoise() if noise_model is None else noise_model
  data = jnp.asarray(data)
  t = _check_steps(t, data, schedule)
  num_steps = schedule.num_steps
  x_start = data.astype(compute_dtype(data))

  def step(x_prev, inputs):
    s, step_key = inputs
    noise = noise_model.sample_step_noise(step_key, x_prev, s)
    x_next = jnp.sqrt(schedule.alphas[s]) * x_prev + jnp.sqrt(schedule.betas[s]) * noise
    x = jnp.where(broadcast_to_data(s <= t, x_prev), x_next, x_prev)
    return x, (x if return_trajectory else None)

  steps = jnp.arange(num_steps, dtype=jnp.int32)
  x_t, trajectory = jax.lax.scan(step, x_start, (steps, jax.random.split(key, num_steps)))
  if return_trajectory:
    return x_t.astype(data.dtype), trajectory.astype(data.dtype)
  return x_t.astype(data.dtype)


# --------------------------------------------------------------------------------------------
# Posterior q(x_{t-1} | x_t, x_0).
# --------------------------------------------------------------------------------------------


class PosteriorMoments(NamedTuple):
  """Moments of ``q(x_{t-1} | x_t, x_0)``; ``variance`` and ``log_variance`` are
  ``[batch, 1, ..., 1]`` so ``mean + exp(log_variance / 2) * noise`` broadcasts."""

  mean: Array
  variance: Array
  log_variance: Array


def posterior_mean_variance(
  *, data: Array, x_t: Array, t: Array, schedule: DiscreteSchedule
) -> PosteriorMoments:
  """``q(x_{t-1} | x_t, x_0) = N(mu_t, var_t I)`` for isotropic noise.

  ``mu_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) /
  (1 - abar_t) x_t`` and ``var_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t`` with ``abar_{-1} = 1``
  (Ho et al. 2020, eqs. 6-7, https://arxiv.org/abs/2006.11239). At ``t = 0`` the posterior is
  the point ``x_0`` (``var_0 = 0``); the log-variance is clipped there to ``log var_1``, as in
  the DDPM code, so ``exp(log_variance / 2)`` stays finite.

  Args:
    data: ``x_0``, ``[batch, *event]``.
    x_t: the noisy sample at step ``t``, same shape.
    t: integer steps ``[batch]``.
    schedule: the discrete schedule.
  """
  data, x_t = jnp.asarray(data), jnp.asarray(x_t)
  if x_t.shape != data.shape:
    raise ValueError(f"x_t of shape {x_t.shape} must match data of shape {data.shape}")
  t = _check_steps(t, data, schedule)
  return _posterior_kernel(data, x_t, t, schedule)


@jax.jit
def _posterior_kernel(
  data: Array, x_t: Array, t: Array, schedule: DiscreteSchedule
) -> PosteriorMoments:
  alpha_bars = schedule.alpha_bars
  alpha_bars_prev = jnp.concatenate([jnp.ones_like(alpha_bars[:1]), alpha_bars[:-1]])
  one_minus = jax.nn.sigmoid(-schedule.log_snr)
  # 1 - abar_{t-1}: equal to 0 at t = 0, from the previous step's sigmoid(-log_snr) otherwise.
  one_minus_prev = jnp.concatenate([jnp.zeros_like(one_minus[:1]), one_minus[:-1]])
  variances = one_minus_prev / one_minus * schedule.betas
  log_variances = jnp.log(jnp.concatenate([variances[1:2], variances[1:]]))
  data_coef = jnp.sqrt(alpha_bars_prev[t]) * schedule.betas[t] / one_minus[t]
  x_t_coef = jnp.sqrt(schedule.alphas[t]) * one_minus_prev[t] / one_minus[t]
  dtype = compute_dtype(data)
  mean = broadcast_to_data(data_coef, data) * data.astype(dtype) + broadcast_to_data(
    x_t_coef, data
  ) * x_t.astype(dtype)
  return PosteriorMoments(
    mean=mean.astype(data.dtype),
    variance=broadcast_to_data(variances[t], data),
    log_variance=broadcast_to_data(log_variances[t], data),
  )


# --------------------------------------------------------------------------------------------
# Noise models.
# --------------------------------------------------------------------------------------------


def _pytree(data_fields: tuple[str, ...] = (), meta_fields: tuple[str, ...] = ()):
  def register(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(
      cls, data_fields=list(data_fields), meta_fields=list(meta_fields)
    )

  return register


def _affine_marginal(
  *, data: Array, t: Array, schedule: DiscreteSchedule, noise_term: Callable[[Any], Array]
) -> Array:
  """``x_t = sqrt(abar_t) x_0 + noise_term``: the shared shape of every Gaussian closed form."""
  dtype = compute_dtype(data)
  signal_scale, _ = alpha_sigma_from_log_snr(schedule.log_snr[t])
  x_t = broadcast_to_data(signal_scale, data) * data.astype(dtype) + noise_term(dtype)
  return x_t.astype(data.dtype)


@jax.jit
def _isotropic_marginal(
  key: Array, data: Array, t: Array, schedule: DiscreteSchedule, noise_std: Array | float
) -> Array:
  """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) std eps``, ``std`` a scalar or per coordinate:
  the isotropic and diagonal closed forms, in one fused op."""
  signal_scale, noise_scale = alpha_sigma_from_log_snr(schedule.log_snr[t])
  return _scale_and_add_noise(
    key=key,
    data=data,
    signal_scale=broadcast_to_data(signal_scale, data),
    noise_scale=broadcast_to_data(noise_scale, data) * noise_std,
  )


def _no_closed_form(name: str) -> NotImplementedError:
  return NotImplementedError(
    f"the {name!r} noise model has no closed-form marginal q(x_t | x_0): its increments do not "
    "add up to a Gaussian with a known covariance, so only the sequential process is exact; use "
    "q_sample_sequential(..., noise_model=...) instead of q_sample_closed_form"
  )


def _check_last_axis(data: Array, size: int, name: str) -> None:
  if data.ndim == 0 or data.shape[-1] != size:
    raise ValueError(
      f"the {name!r} noise model acts on vectors of size {size} in the last axis, "
      f"got data of shape {data.shape}; flatten the event to [batch, {size}]"
    )


def _matvec(matrix: Array, vector: Array) -> Array:
  """``matrix @ vector`` on the last axis; ``matrix`` is ``[d, d]`` or ``[batch, d, d]``."""
  if matrix.ndim == 2:
    return vector @ matrix.T
  return jnp.einsum("...ij,...j->...i", matrix, vector)


@_pytree()
class IsotropicNoise:
  """``n_s ~ N(0, I)``; closed form ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al.
  2020, eq. 4, https://arxiv.org/abs/2006.11239)."""

  name: ClassVar[str] = "isotropic"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    return standard_normal(key, x_prev.shape, x_prev.dtype)

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    return _isotropic_marginal(key, data, t, schedule, 1.0)


@_pytree(data_fields=("variance",))
class DiagonalNoise:
  """``n_s ~ N(0, diag(d))``, one variance per coordinate (``variance`` broadcasts against the
  event shape). Closed form ``x_t = sqrt(abar_t) x_0 + sqrt((1 - abar_t) d) eps``, coordinate by
  coordinate (the isotropic argument, Ho et al. 2020 eq. 4, applied to each coordinate)."""

  variance: Array
  name: ClassVar[str] = "diagonal"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    return jnp.sqrt(self.variance) * standard_normal(key, x_prev.shape, x_prev.dtype)

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    return _isotropic_marginal(key, data, t, schedule, jnp.sqrt(self.variance))


@_pytree(data_fields=("scale",))
class FullCovarianceNoise:
  """``n_s = L eps`` with a fixed ``L L^T = Sigma`` (``[d, d]``, acting on the last axis).

  ``x_t - sqrt(abar_t) x_0 = sum_s sqrt(abar_t / abar_s) sqrt(beta_s) L eps_s`` is Gaussian with
  covariance ``sum_s (abar_t / abar_s) beta_s Sigma = (1 - abar_t) Sigma`` (the sum telescopes:
  ``(abar_t / abar_s) beta_s = abar_t / abar_s - abar_t / abar_{s-1}``), so
  ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) L eps``. Any square root works (Cholesky or
  symmetric); the distribution is the same.
  """

  scale: Array
  name: ClassVar[str] = "full_covariance"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    _check_last_axis(x_prev, self.scale.shape[-1], self.name)
    return _matvec(self.scale, standard_normal(key, x_prev.shape, x_prev.dtype))

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    _check_last_axis(data, self.scale.shape[-1], self.name)

    def noise_term(dtype):
      _, noise_scale = alpha_sigma_from_log_snr(schedule.log_snr[t])
      eps = _matvec(self.scale.astype(dtype), standard_normal(key, data.shape, dtype))
      return broadcast_to_data(noise_scale, data) * eps

    return _affine_marginal(data=data, t=t, schedule=schedule, noise_term=noise_term)


@_pytree(data_fields=("sqrt_spectrum",))
class ColoredNoise:
  """Stationary colored image noise ``n_s = irfft2(sqrt(S) rfft2(eps))`` on ``[..., H, W, C]``.

  With orthonormal FFTs ``A = F^-1 diag(sqrt(S)) F`` is circulant; for a spectrum symmetric under
  ``k -> -k`` its covariance ``A A^T = F^-1 diag(S) F`` is the stationary covariance whose
  power spectrum is ``S`` (Wiener-Khinchin). It is the fixed-covariance case with ``L = A``, so
  ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) A eps``. Per-pixel variance is the mean of ``S``
  over the full frequency grid. ``sqrt_spectrum`` has the ``rfft2`` shape ``[H, W // 2 + 1]``
  and is shared by all channels.
  """

  sqrt_spectrum: Array
  name: ClassVar[str] = "colored"

  def _color(self, white: Array) -> Array:
    height, width = white.shape[-3], white.shape[-2]
    if self.sqrt_spectrum.shape != (height, width // 2 + 1):
      raise ValueError(
        f"colored noise with a spectrum of shape {self.sqrt_spectrum.shape} needs images "
        f"[..., H, W, C] with (H, W // 2 + 1) equal to it, got data of shape {white.shape}"
      )
    spectrum = jnp.fft.rfft2(white, axes=(-3, -2), norm="ortho")
    colored = jnp.fft.irfft2(
      self.sqrt_spectrum[:, :, None] * spectrum, s=(height, width), axes=(-3, -2), norm="ortho"
    )
    return colored.astype(white.dtype)

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    return self._color(standard_normal(key, x_prev.shape, x_prev.dtype))

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    def noise_term(dtype):
      _, noise_scale = alpha_sigma_from_log_snr(schedule.log_snr[t])
      return broadcast_to_data(noise_scale, data) * self._color(
        standard_normal(key, data.shape, dtype)
      )

    return _affine_marginal(data=data, t=t, schedule=schedule, noise_term=noise_term)


@_pytree(data_fields=("step_scales", "marginal_scales"))
class PerStepCovarianceNoise:
  """``n_s ~ N(0, Sigma_s)`` with a covariance per step (``step_scales[s] = chol(Sigma_s)``).

  Still Gaussian: ``x_t = sqrt(abar_t) x_0 + chol(C_t) eps`` with
  ``C_t = sum_{s <= t} (abar_t / abar_s) beta_s Sigma_s = alpha_t C_{t-1} + beta_t Sigma_t``,
  precomputed once for the schedule by :func:`accumulated_covariances`
  (``marginal_scales[t] = chol(C_t)``). Build it with :func:`per_step_covariance_noise` and use it
  with the same schedule. When the ``Sigma_s`` share an eigenbasis every ``C_t`` is diagonal in
  it: :class:`SharedEigenbasisNoise` stores only ``[T, d]`` eigenvalues.
  """

  step_scales: Array
  marginal_scales: Array
  name: ClassVar[str] = "per_step_covariance"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    _check_last_axis(x_prev, self.step_scales.shape[-1], self.name)
    return _matvec(self.step_scales[step], standard_normal(key, x_prev.shape, x_prev.dtype))

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    _check_last_axis(data, self.step_scales.shape[-1], self.name)
    _check_num_steps(self.marginal_scales.shape[0], schedule, self.name)

    def noise_term(dtype):
      eps = standard_normal(key, data.shape, dtype)
      return _matvec(self.marginal_scales[t].astype(dtype), eps)

    return _affine_marginal(data=data, t=t, schedule=schedule, noise_term=noise_term)


@_pytree(data_fields=("basis", "step_eigenvalues", "marginal_eigenvalues"))
class SharedEigenbasisNoise:
  """Per-step covariances ``Sigma_s = U diag(lambda_s) U^T`` with one orthonormal basis ``U``.

  ``C_t = U diag(c_t) U^T`` with ``c_t = alpha_t c_{t-1} + beta_t lambda_t`` (the recursion of
  :class:`PerStepCovarianceNoise`, elementwise), so ``x_t = sqrt(abar_t) x_0 + U (sqrt(c_t) eps)``:
  ``O(d)`` per step to precompute and no Cholesky. Build with :func:`shared_eigenbasis_noise`.
  """

  basis: Array
  step_eigenvalues: Array
  marginal_eigenvalues: Array
  name: ClassVar[str] = "shared_eigenbasis"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    _check_last_axis(x_prev, self.basis.shape[-1], self.name)
    eps = standard_normal(key, x_prev.shape, x_prev.dtype)
    return _matvec(self.basis, jnp.sqrt(self.step_eigenvalues[step]) * eps)

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    _check_last_axis(data, self.basis.shape[-1], self.name)
    _check_num_steps(self.marginal_eigenvalues.shape[0], schedule, self.name)

    def noise_term(dtype):
      eps = standard_normal(key, data.shape, dtype)
      return _matvec(self.basis.astype(dtype), jnp.sqrt(self.marginal_eigenvalues[t]) * eps)

    return _affine_marginal(data=data, t=t, schedule=schedule, noise_term=noise_term)


@_pytree(data_fields=("offset",))
class HeteroscedasticNoise:
  """State-dependent noise ``n_s = g(x_{s-1}) eps`` with ``g(x) = sqrt(c + x^2)`` elementwise.

  The increment's variance depends on where the chain is, so ``x_t`` is a scale mixture of
  Gaussians, not a Gaussian: there is no closed form and only :func:`q_sample_sequential` is
  exact. (Its moments are: ``E x_t = sqrt(abar_t) x_0`` and, since ``alpha_s + beta_s = 1``,
  ``E x_t^2 = x_0^2 + c sum_{s <= t} beta_s``.)
  """

  offset: Array
  name: ClassVar[str] = "heteroscedastic"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    return jnp.sqrt(self.offset + x_prev**2) * standard_normal(key, x_prev.shape, x_prev.dtype)

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    raise _no_closed_form(self.name)


@_pytree()
class LaplaceNoise:
  """Non-Gaussian i.i.d. noise, ``n_s ~ Laplace(0, 1 / sqrt(2))`` (unit variance, excess kurtosis
  3). A sum of a few Laplace increments is not Gaussian; no closed form, sequential only."""

  name: ClassVar[str] = "laplace"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    return jax.random.laplace(key, x_prev.shape, x_prev.dtype) * np.float32(math.sqrt(0.5))

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    raise _no_closed_form(self.name)


@_pytree()
class UniformNoise:
  """Non-Gaussian i.i.d. noise, ``n_s ~ U(-sqrt(3), sqrt(3))`` (unit variance, excess kurtosis
  -6/5). No closed form, sequential only."""

  name: ClassVar[str] = "uniform"

  def sample_step_noise(self, key: Array, x_prev: Array, step: Array) -> Array:
    del step
    bound = math.sqrt(3.0)
    return jax.random.uniform(key, x_prev.shape, x_prev.dtype, minval=-bound, maxval=bound)

  def sample_marginal(
    self, *, key: Array, data: Array, t: Array, schedule: DiscreteSchedule
  ) -> Array:
    raise _no_closed_form(self.name)


def _check_num_steps(num_steps: int, schedule: DiscreteSchedule, name: str) -> None:
  if num_steps != schedule.num_steps:
    raise ValueError(
      f"the {name!r} noise model was precomputed for {num_steps} steps but the "
      f"schedule has {schedule.num_steps}; rebuild it with this schedule"
    )


# --------------------------------------------------------------------------------------------
# Factories (the edge: validate with numpy, then build the pytree).
# --------------------------------------------------------------------------------------------


def _concrete(value, what: str) -> np.ndarray:
  """The float64 value of a noise model's array, which must be known before tracing."""
  try:
    values = concrete(value, dtype=np.float64)
  except TypeError:
    values = None
  if values is None:
    raise ValueError(
      f"{what} must be a concrete array when the noise model is built "
      "(build noise models outside jit)"
    )
  return values


def _check_covariance(covariance: np.ndarray, what: str) -> None:
  if covariance.ndim < 2 or covariance.shape[-1] != covariance.shape[-2]:
    raise ValueError(f"{what} must be square [d, d] matrices, got shape {covariance.shape}")
  if not np.allclose(covariance, np.swapaxes(covariance, -1, -2), rtol=1e-5, atol=1e-6):
    raise ValueError(f"{what} must be symmetric; pass (S + S^T) / 2")
  eigenvalues = np.linalg.eigvalsh(covariance)
  if eigenvalues.min() <= 0:
    raise ValueError(
      f"{what} must be positive definite, smallest eigenvalue "
      f"{eigenvalues.min():.3g}; add a small multiple of the identity"
    )


def isotropic_noise() -> IsotropicNoise:
  """``N(0, I)`` step noise, the DDPM default."""
  return IsotropicNoise()


def diagonal_noise(*, variance) -> DiagonalNoise:
  """Per-coordinate step variances ``d`` (an array broadcasting against the event shape)."""
  values = _concrete(variance, "variance")
  if values.size == 0 or values.min() < 0:
    raise ValueError(f"variance must be a non-empty array of non-negative values, got {values}")
  return DiagonalNoise(variance=jnp.asarray(values, jnp.float32))


def full_covariance_noise(*, covariance=None, scale=None) -> FullCovarianceNoise:
  """A fixed step covariance: give ``covariance`` (``[d, d]``, symmetric positive definite; its
  Cholesky factor is taken here) or any square root ``scale`` with ``scale scale^T = Sigma``."""
  if (covariance is None) == (scale is None):
    raise ValueError("pass exactly one of covariance= or scale= to the 'full_covariance' model")
  if scale is None:
    covariance = _concrete(covariance, "covariance")
    _check_covariance(covariance, "covariance")
    scale = np.linalg.cholesky(covariance)
  scale = _concrete(scale, "scale")
  if scale.ndim != 2 or scale.shape[0] != scale.shape[1]:
    raise ValueError(f"scale must be a square [d, d] matrix, got shape {scale.shape}")
  return FullCovarianceNoise(scale=jnp.asarray(scale, jnp.float32))


def power_law_spectrum(
  *, height: int, width: int, exponent: float = 2.0, cutoff: float = 1.0
) -> np.ndarray:
  """A radial power law ``S(k) = (|k|^2 + k_0^2)^(-exponent / 2)`` on the ``rfft2`` grid.

  ``|k|`` is in cycles per image (``numpy.fft.fftfreq * size``); ``exponent = 2`` is the
  ``1 / f^2`` spectrum of natural images (van der Schaaf & van Hateren 1996,
  https://doi.org/10.1016/0042-6989(96)00002-8); ``k_0 = cutoff`` keeps ``S(0)`` finite. Normalised
  so the mean over the full ``H x W`` grid is 1 (unit per-pixel variance). Symmetric under
  ``k -> -k``, so the covariance is real and circulant.

  Returns:
    ``[height, width // 2 + 1]`` float64 array.
  """
  k_y = np.fft.fftfreq(height) * height
  k_x = np.fft.fftfreq(width) * width
  radius_sq = k_y[:, None] ** 2 + k_x[None, :] ** 2
  full = (radius_sq + cutoff**2) ** (-exponent / 2.0)
  full = full / full.mean()
  return full[:, : width // 2 + 1]


def colored_noise(*, power_spectrum) -> ColoredNoise:
  """Stationary image noise with ``power_spectrum`` on the ``rfft2`` grid ``[H, W // 2 + 1]``
  (e.g. :func:`power_law_spectrum`); non-negative."""
  spectrum = _concrete(power_spectrum, "power_spectrum")
  if spectrum.ndim != 2 or spectrum.min() < 0:
    raise ValueError(
      "power_spectrum must be a non-negative [H, W // 2 + 1] array, got shape "
      f"{spectrum.shape} and minimum {spectrum.min() if spectrum.size else None}"
    )
  return ColoredNoise(sqrt_spectrum=jnp.asarray(np.sqrt(spectrum), jnp.float32))


def accumulated_covariances(*, step_covariances: Array, schedule: DiscreteSchedule) -> Array:
  """``C_t = alpha_t C_{t-1} + beta_t Sigma_t``, ``C_{-1} = 0``, for every ``t`` (one scan).

  Unrolled, ``C_t = sum_{s <= t} (abar_t / abar_s) beta_s Sigma_s``: the covariance of
  ``x_t - sqrt(abar_t) x_0`` when step ``s`` adds ``sqrt(beta_s) N(0, Sigma_s)`` (Ho et al. 2020,
  eq. 2, with correlated increments). Works elementwise too: ``[T, d]`` eigenvalue stacks give the
  diagonal recursion of a shared eigenbasis.

  Args:
    step_covariances: ``[T, ...]`` (``[T, d, d]`` matrices or ``[T, d]`` eigenvalues).
    schedule: the discrete schedule of ``T`` steps.

  Returns:
    ``[T, ...]``, ``C_t`` at index ``t``.
  """

  def step(accumulated, inputs):
    alpha, beta, covariance = inputs
    accumulated = alpha * accumulated + beta * covariance
    return accumulated, accumulated

  step_covariances = jnp.asarray(step_covariances)
  _, stack = jax.lax.scan(
    step, jnp.zeros_like(step_covariances[0]), (schedule.alphas, schedule.betas, step_covariances)
  )
  return stack


def per_step_covariance_noise(*, covariances, schedule: DiscreteSchedule) -> PerStepCovarianceNoise:
  """A covariance per step, ``covariances`` of shape ``[T, d, d]`` (symmetric positive definite),
  with ``C_t`` (:func:`accumulated_covariances`) and both Cholesky stacks precomputed once."""
  values = _concrete(covariances, "covariances")
  if values.ndim != 3 or values.shape[0] != schedule.num_steps:
    raise ValueError(
      f"covariances must have shape [T, d, d] with T = {schedule.num_steps} (the "
      f"schedule's steps), got {values.shape}"
    )
  _check_covariance(values, "covariances")
  step_covariances = jnp.asarray(values, jnp.float32)
  marginal = accumulated_covariances(step_covariances=step_covariances, schedule=schedule)
  return PerStepCovarianceNoise(
    step_scales=jnp.linalg.cholesky(step_covariances), marginal_scales=jnp.linalg.cholesky(marginal)
  )


def shared_eigenbasis_noise(
  *, basis, eigenvalues, schedule: DiscreteSchedule
) -> SharedEigenbasisNoise:
  """Per-step covariances ``U diag(lambda_s) U^T``: ``basis`` ``U`` ``[d, d]`` orthonormal
  (columns are eigenvectors), ``eigenvalues`` ``[T, d]`` non-negative."""
  basis_np = _concrete(basis, "basis")
  values = _concrete(eigenvalues, "eigenvalues")
  if basis_np.ndim != 2 or basis_np.shape[0] != basis_np.shape[1]:
    raise ValueError(f"basis must be a square [d, d] matrix, got shape {basis_np.shape}")
  if not np.allclose(basis_np.T @ basis_np, np.eye(basis_np.shape[0]), atol=1e-5):
    raise ValueError(
      "basis must be orthonormal (U^T U = I); orthonormalise it, e.g. with numpy.linalg.qr"
    )
  if values.shape != (schedule.num_steps, basis_np.shape[0]) or values.min() < 0:
    raise ValueError(
      f"eigenvalues must be non-negative with shape [T, d] = "
      f"[{schedule.num_steps}, {basis_np.shape[0]}], got {values.shape}"
    )
  step_eigenvalues = jnp.asarray(values, jnp.float32)
  return SharedEigenbasisNoise(
    basis=jnp.asarray(basis_np, jnp.float32),
    step_eigenvalues=step_eigenvalues,
    marginal_eigenvalues=accumulated_covariances(
      step_covariances=step_eigenvalues, schedule=schedule
    ),
  )


def heteroscedastic_noise(*, offset: float = 1.0) -> HeteroscedasticNoise:
  """State-dependent step noise ``sqrt(offset + x^2) eps`` (``offset > 0``); sequential only."""
  if not offset > 0:
    raise ValueError(f"offset must be positive, got {offset}")
  return HeteroscedasticNoise(offset=jnp.asarray(offset, jnp.float32))


def laplace_noise() -> LaplaceNoise:
  """Unit-variance Laplace step noise; sequential only."""
  return LaplaceNoise()


def uniform_noise() -> UniformNoise:
  """Unit-variance uniform step noise; sequential only."""
  return UniformNoise()


NOISE_MODELS: dict[str, Callable[..., Any]] = {
  "isotropic": isotropic_noise,
  "diagonal": diagonal_noise,
  "full_covariance": full_covariance_noise,
  "colored": colored_noise,
  "per_step_covariance": per_step_covariance_noise,
  "shared_eigenbasis": shared_eigenbasis_noise,
  "heteroscedastic": heteroscedastic_noise,
  "laplace": laplace_noise,
  "uniform": uniform_noise,
}


def get_noise_model(name: str, **kwargs):
  """Resolves a noise model by name (once, at the edge); ``kwargs`` go to its factory.

  Args:
    name: one of ``NOISE_MODELS``: "isotropic", "diagonal" (``variance=``), "full_covariance"
      (``covariance=`` or ``scale=``), "colored" (``power_spectrum=``), "per_step_covariance"
      (``covariances=``, ``schedule=``), "shared_eigenbasis" (``basis=``, ``eigenvalues=``,
      ``schedule=``), "heteroscedastic" (``offset=``), "laplace", "uniform".
  """
  return lookup(NOISE_MODELS, name, "noise model")(**kwargs)
