"""Diffusion samplers: DDPM ancestral, DDIM, Euler-ancestral and DPM-Solver++ (2M, 3M).

* :func:`ddpm_sample` and :func:`ddim_sample` run on a
  :class:`~diffjax.schedules.DiscreteSchedule` over a (possibly respaced) subsequence of its
  steps, noisiest first (:mod:`diffjax.samplers.grids`). The network sees the model time
  ``time_of_step(step)``, by default ``(step + 1) / T``, the convention of
  :func:`diffjax.losses.discrete_diffusion_example`.
* :func:`euler_ancestral_sample` runs on EDM noise levels with a denoiser ``D(x, sigma)``
  (:func:`~diffjax.samplers.fields.sigma_denoiser`).
* :func:`dpm_solver_pp_sample` runs on continuous model times with any ``coefficients_fn``.

The discrete coefficients are ``alpha_s = sqrt(abar_s)``, ``sigma_s = sqrt(1 - abar_s)``, both
computed from the log-SNR (``abar = sigmoid(lambda)``, ``1 - abar = sigmoid(-lambda)``,
:func:`~diffjax.parameterization.discrete_coefficients`), so steps with ``abar`` close to 1 keep
their precision.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax import parameterization
from diffjax._lookup import lookup
from diffjax.parameterization import Coefficients, PredictionTarget, discrete_coefficients
from diffjax.samplers.fields import (
  CoefficientsFn,
  Denoiser,
  Predictor,
  SamplerOutput,
  SigmaDenoiser,
  prepend_initial,
)
from diffjax.samplers.ode import check_times
from diffjax.schedules import DiscreteSchedule, alpha_sigma_from_log_snr
from diffjax.shapes import concrete, in_compute_dtype

__all__ = [
  "default_time_of_step",
  "discrete_coefficients",
  "interpolated_coefficients_fn",
  "small_variance",
  "large_variance",
  "DDPM_VARIANCES",
  "get_ddpm_variance",
  "ddpm_sample",
  "ddim_sample",
  "euler_ancestral_sample",
  "dpm_solver_pp_sample",
]


def default_time_of_step(steps: Array, *, num_train_steps: int) -> Array:
  """``t_model = (step + 1) / T``: step ``s`` ends at continuous diffusion time ``(s + 1) / T``
  (the training convention of :func:`diffjax.losses.discrete_diffusion_example`)."""
  return (steps + 1).astype(jnp.float32) / num_train_steps


def interpolated_coefficients_fn(
  schedule: DiscreteSchedule, *, log_snr_floor: float = -30.0
) -> CoefficientsFn:
  """A continuous-time view of a discrete schedule, for the continuous samplers.

  ``lambda(t)`` interpolates ``lambda_s`` linearly at the model times ``t_s = (s + 1) / T`` (the
  training convention, :func:`default_time_of_step`), constant outside ``[1/T, 1]``; then
  ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)`` and derivatives by ``jax.jvp``.
  At every training step it reproduces the discrete ``(alpha_s, sigma_s)`` exactly, so a network
  trained on discrete steps can be sampled by "heun", "dpmpp_2m", "edm", ... on grids inside
  ``[1/T, 1]``. A zero-terminal-SNR step (``lambda = -inf``) is floored at ``log_snr_floor``.
  """
  num_steps = schedule.num_steps
  knots = jnp.arange(1, num_steps + 1, dtype=jnp.float32) / num_steps
  values = jnp.maximum(schedule.log_snr, log_snr_floor)

  def alpha_sigma(t):
    return alpha_sigma_from_log_snr(jnp.interp(t, knots, values))

  def coefficients_fn(t: Array) -> Coefficients:
    t = in_compute_dtype(t)
    (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(alpha_sigma, (t,), (jnp.ones_like(t),))
    return Coefficients(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)

  return coefficients_fn


def small_variance(
  *,
  log_alpha_bar: Array,
  log_alpha_bar_prev: Array,
  log_one_minus_alpha_bar: Array,
  log_one_minus_alpha_bar_prev: Array,
) -> Array:
  """The posterior variance ``beta_tilde = (1 - abar_prev) / (1 - abar) beta`` with
  ``beta = 1 - abar / abar_prev`` (Ho et al. 2020, eq. 7, https://arxiv.org/abs/2006.11239;
  respaced as in Nichol & Dhariwal 2021, Sec. 4, https://arxiv.org/abs/2102.09672)."""
  beta = -jnp.expm1(log_alpha_bar - log_alpha_bar_prev)
  return jnp.exp(log_one_minus_alpha_bar_prev - log_one_minus_alpha_bar) * beta


def large_variance(
  *,
  log_alpha_bar: Array,
  log_alpha_bar_prev: Array,
  log_one_minus_alpha_bar: Array,
  log_one_minus_alpha_bar_prev: Array,
) -> Array:
  """The forward variance ``beta = 1 - abar / abar_prev`` (Ho et al. 2020, Sec. 3.2: ``sigma_t^2
  = beta_t`` is optimal for ``x0 ~ N(0, I)``, ``beta_tilde`` for a single data point)."""
  del log_one_minus_alpha_bar, log_one_minus_alpha_bar_prev
  return -jnp.expm1(log_alpha_bar - log_alpha_bar_prev)


DDPM_VARIANCES: dict[str, Callable[..., Array]] = {
  "small": small_variance,
  "large": large_variance,
}


def get_ddpm_variance(name: str) -> Callable[..., Array]:
  """Resolves DDPM's reverse variance by name: "small" (``beta_tilde``) or "large" (``beta``)."""
  return lookup(DDPM_VARIANCES, name, "DDPM variance")


def check_discrete_target(target: PredictionTarget) -> None:
  """:func:`diffjax.parameterization.check_discrete_target`, offering the continuous samplers."""
  parameterization.check_discrete_target(
    target, fix="sample it with a continuous sampler (euler, heun, ...) instead"
  )


def check_steps(steps, num_train_steps: int) -> None:
  """Steps must be a strictly decreasing 1-D sequence in ``[0, T)``; raised before tracing."""
  values = concrete(steps)
  if values is None:
    return
  if values.ndim != 1 or values.size < 1:
    raise ValueError(f"steps must be a 1-D array of step indices, got shape {values.shape}")
  if values.min() < 0 or values.max() >= num_train_steps:
    raise ValueError(
      f"steps must lie in [0, {num_train_steps}), got {values.min()}.."
      f"{values.max()}; build them with get_discrete_steps"
    )
  if values.size > 1 and not np.all(np.diff(values) < 0):
    raise ValueError(
      "steps must be strictly decreasing (noisiest first), e.g. "
      "trailing_steps(num_steps=50, num_train_steps=1000)"
    )


def _discrete_plan(schedule: DiscreteSchedule, steps: Array, time_of_step):
  """Per-step ``(lambda_s, lambda_prev, t_model)``; the step after the last has ``abar = 1``
  (``lambda = +inf``), so the final update returns the data estimate."""
  steps = jnp.asarray(steps, jnp.int32)
  log_snr = schedule.log_snr[steps]
  inf = jnp.full((1,), jnp.inf, log_snr.dtype)
  log_snr_prev = jnp.concatenate([log_snr[1:], inf])
  if time_of_step is None:
    t_model = default_time_of_step(steps, num_train_steps=schedule.num_steps)
  else:
    t_model = jnp.asarray(time_of_step(steps), jnp.float32)
  return log_snr, log_snr_prev, t_model


def _full(value, x):
  return jnp.full(x.shape[:1], value, dtype=jnp.result_type(value))


def ddpm_sample(
  key: Array,
  predict: Predictor,
  x_init: Array,
  *,
  target: PredictionTarget,
  schedule: DiscreteSchedule,
  steps: Array,
  variance: Callable[..., Array] = small_variance,
  time_of_step: Callable[[Array], Array] | None = None,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """DDPM ancestral sampling: ``x_prev ~ N(mu~(x_s, x0_hat), var)`` at each step.

  ``mu~ = sqrt(abar_prev) beta / (1 - abar) x0_hat + sqrt(1 - beta) (1 - abar_prev) / (1 - abar)
  x_s`` with ``beta = 1 - abar_s / abar_prev``, the mean of ``q(x_prev | x_s, x0)`` (Ho et al.
  2020, eqs. 6-7 and Algorithm 2, https://arxiv.org/abs/2006.11239). With a respaced ``steps``
  subsequence, ``prev`` is the next entry of ``steps`` and ``beta`` the effective variance between
  them (Nichol & Dhariwal 2021, Sec. 4). The last update returns ``x0_hat`` without noise.

  Args:
    key: PRNG key for the ancestral noise.
    predict: ``(x, t_model) -> prediction``.
    x_init: ``[batch, *event]`` start at ``steps[0]`` (standard normal noise).
    target: what ``predict`` returns (not "velocity").
    schedule: the discrete schedule the network was trained on.
    steps: ``[K]`` step indices, strictly decreasing
      (:func:`~diffjax.samplers.grids.get_discrete_steps`).
    variance: :func:`small_variance` (``beta_tilde``) or :func:`large_variance` (``beta``).
    time_of_step: ``steps -> t_model``; default :func:`default_time_of_step`.
    return_trajectory: also return the ``[K + 1, batch, ...]`` states.
  """
  check_discrete_target(target)
  check_steps(steps, schedule.num_steps)
  log_snr, log_snr_prev, t_model = _discrete_plan(schedule, steps, time_of_step)
  num_steps = log_snr.shape[0]
  keys = jax.random.split(key, num_steps)
  is_last = jnp.arange(num_steps) == num_steps - 1

  def body(x, inputs):
    lam, lam_prev, t, step_key, last = inputs
    coefficients = discrete_coefficients(_full(lam, x))
    x0, _ = target.to_x0_eps(predict(x, _full(t, x)), x_t=x, coefficients=coefficients)
    logs = dict(
      log_alpha_bar=jax.nn.log_sigmoid(lam),
      log_alpha_bar_prev=jax.nn.log_sigmoid(lam_prev),
      log_one_minus_alpha_bar=jax.nn.log_sigmoid(-lam),
      log_one_minus_alpha_bar_prev=jax.nn.log_sigmoid(-lam_prev),
    )
    beta = -jnp.expm1(logs["log_alpha_bar"] - logs["log_alpha_bar_prev"])
    ratio = jnp.exp(logs["log_one_minus_alpha_bar_prev"] - logs["log_one_minus_alpha_bar"])
    coef_x0 = jnp.exp(0.5 * logs["log_alpha_bar_prev"] - logs["log_one_minus_alpha_bar"]) * beta
    coef_x = jnp.sqrt(1.0 - beta) * ratio
    std = jnp.where(last, 0.0, jnp.sqrt(variance(**logs)))
    noise = jax.random.normal(step_key, x.shape, x.dtype)
    x_prev = coef_x0 * x0 + coef_x * x + std * noise
    return x_prev, (x_prev if return_trajectory else None)

  samples, path = jax.lax.scan(body, x_init, (log_snr, log_snr_prev, t_model, keys, is_last))
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )


def ddim_sample(
  key: Array,
  predict: Predictor,
  x_init: Array,
  *,
  target: PredictionTarget,
  schedule: DiscreteSchedule,
  steps: Array,
  eta: float = 0.0,
  time_of_step: Callable[[Array], Array] | None = None,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """DDIM: ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps_hat + s z``.

  ``s = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)`` (Song, Meng & Ermon
  2021, eqs. 12 and 16, https://arxiv.org/abs/2010.02502). ``eta = 0`` is deterministic and a
  first-order solver of the probability-flow ODE (exact for a constant ``x0_hat`` in log-SNR,
  i.e. DPM-Solver-1); ``eta = 1`` is DDPM ancestral sampling with ``beta_tilde``. Works for any
  subsequence ``steps`` (respacing with ``K < T`` steps).

  Args: as :func:`ddpm_sample`, plus ``eta >= 0``; ``key`` is unused when ``eta = 0``.
  """
  check_discrete_target(target)
  check_steps(steps, schedule.num_steps)
  if isinstance(eta, (int, float)) and eta < 0:
    raise ValueError(f"eta={eta}: must be >= 0 (0 deterministic DDIM, 1 DDPM-like)")
  log_snr, log_snr_prev, t_model = _discrete_plan(schedule, steps, time_of_step)
  num_steps = log_snr.shape[0]
  keys = jax.random.split(key, num_steps)

  def body(x, inputs):
    lam, lam_prev, t, step_key = inputs
    coefficients = discrete_coefficients(_full(lam, x))
    x0, eps = target.to_x0_eps(predict(x, _full(t, x)), x_t=x, coefficients=coefficients)
    log_a, log_a_prev = jax.nn.log_sigmoid(lam), jax.nn.log_sigmoid(lam_prev)
    one_minus, one_minus_prev = jax.nn.sigmoid(-lam), jax.nn.sigmoid(-lam_prev)
    var = eta**2 * (one_minus_prev / one_minus) * -jnp.expm1(log_a - log_a_prev)
    coef_eps = jnp.sqrt(jnp.maximum(one_minus_prev - var, 0.0))
    noise = jax.random.normal(step_key, x.shape, x.dtype)
    x_prev = jnp.exp(0.5 * log_a_prev) * x0 + coef_eps * eps + jnp.sqrt(var) * noise
    return x_prev, (x_prev if return_trajectory else None)

  samples, path = jax.lax.scan(body, x_init, (log_snr, log_snr_prev, t_model, keys))
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )


def check_sigmas(sigmas) -> None:
  """Noise levels must be a decreasing 1-D grid of at least two non-negative values."""
  shape = jnp.shape(sigmas)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(
      f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {shape}; "
      "build one with edm_sigmas"
    )
  values = concrete(sigmas)
  if values is not None and (values.min() < 0 or not np.all(np.diff(values) < 0)):
    raise ValueError(
      "sigmas must be non-negative and strictly decreasing, e.g. edm_sigmas(num_steps=18)"
    )


def euler_ancestral_sample(
  key: Array,
  denoise: SigmaDenoiser,
  x_init: Array,
  *,
  sigmas: Array,
  eta: float = 1.0,
  s_noise: float = 1.0,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Euler-ancestral sampling in variance-exploding coordinates (k-diffusion style).

  Each step splits ``sigma -> sigma_next`` into a deterministic Euler step of the probability-flow
  ODE down to ``sigma_down`` and fresh noise of std ``sigma_up``:
  ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``,
  ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, ``d = (x - D(x, sigma)) / sigma``,
  ``x' = x + (sigma_down - sigma) d + s_noise sigma_up z``. The split is DDIM's (Song et al. 2021,
  eq. 16, ``eta = 1`` being ancestral DDPM) written in EDM's ``sigma`` (Karras et al. 2022,
  https://arxiv.org/abs/2206.00364; Crowson's k-diffusion ``sample_euler_ancestral``).

  Args:
    key: PRNG key for the ancestral noise.
    denoise: ``D(x, sigma) -> x0_hat`` (:func:`~diffjax.samplers.fields.sigma_denoiser`).
    x_init: ``[batch, *event]`` start, ``sigmas[0] * N(0, I)``.
    sigmas: ``[N + 1]`` decreasing noise levels, usually ending at 0 (:func:`edm_sigmas`).
    eta: amount of ancestral noise (0: plain Euler on the ODE).
    s_noise: scale of the added noise (Karras et al.'s ``S_noise``).
  """
  check_sigmas(sigmas)
  sigmas = jnp.asarray(sigmas)
  num_steps = sigmas.shape[0] - 1
  keys = jax.random.split(key, num_steps)

  def body(x, inputs):
    sigma, sigma_next, step_key = inputs
    x0 = denoise(x, _full(sigma, x))
    sigma_up = jnp.minimum(
      sigma_next,
      eta * jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)),
    )
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    x_next = x + (sigma_down - sigma) * (x - x0) / sigma
    x_next = x_next + s_noise * sigma_up * jax.random.normal(step_key, x.shape, x.dtype)
    return x_next, (x_next if return_trajectory else None)

  samples, path = jax.lax.scan(body, x_init, (sigmas[:-1], sigmas[1:], keys))
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )


def dpm_solver_pp_sample(
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  order: int = 2,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """DPM-Solver++ multistep (2M, 3M): data prediction, exponential integrator in log-SNR.

  With ``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s`` and ``phi = 1 - e^{-h}``, the
  exact solution of the probability-flow ODE is ``x_t = sigma_t / sigma_s x_s + sigma_t
  int_{lambda_s}^{lambda_t} e^lambda x0_hat dlambda``; expanding ``x0_hat`` in ``lambda`` through
  the previous evaluations ``m0, m1, m2`` (``r0 = h_prev / h``, ``r1 = h_prev2 / h``):

  * order 1 (DDIM): ``x_t = sigma_t / sigma_s x_s + alpha_t phi m0``;
  * 2M: ``D = m0 + (m0 - m1) / (2 r0)`` in place of ``m0`` (Lu et al. 2022b, Algorithm 2,
    https://arxiv.org/abs/2211.01095);
  * 3M: ``+ alpha_t (1 - phi / h) D1 - alpha_t ((h - phi) / h^2 - 1/2) D2`` with
    ``D1_0 = (m0 - m1) / r0``, ``D1_1 = (m1 - m2) / r1``, ``D1 = D1_0 + r0 / (r0 + r1) (D1_0 -
    D1_1)``, ``D2 = (D1_0 - D1_1) / (r0 + r1)`` (the third-order multistep of Lu et al. 2022a,
    https://arxiv.org/abs/2206.00927, in its data-prediction form, as in the authors' code).

  The first steps use the orders their history allows, and a step to ``sigma = 0`` (``h =
  inf``) is first order (``x_t = alpha_t m0``). One network evaluation per step. A start with
  ``alpha = 0`` (flow time 0) is fine: its ``h`` is infinite and gives the history no weight.

  Args:
    denoise: ``(x, t) -> (x0_hat, eps_hat)`` (:func:`~diffjax.samplers.fields.denoiser`).
    x_init: ``[batch, *event]`` state at ``times[0]``.
    times: ``[N + 1]`` model times from noise to data (any direction).
    coefficients_fn: the process's ``alpha``, ``sigma`` at model time.
    order: 1, 2 or 3.
  """
  check_times(times)
  if order not in (1, 2, 3):
    raise ValueError(f"order={order!r}: DPM-Solver++ multistep supports orders 1, 2 and 3")
  times = jnp.asarray(times)
  coefficients = coefficients_fn(times)
  alphas, sigmas = coefficients.alpha, coefficients.sigma
  lambdas = jnp.log(alphas) - jnp.log(sigmas)
  num_steps = times.shape[0] - 1
  # A finite stand-in for an infinite past step size: it weighs that history by ~0, as h = inf
  # would, without inf / inf in the (unselected) higher-order branches.
  far = jnp.asarray(1e30, lambdas.dtype)

  def body(carry, inputs):
    x, m1, m2, h1, h2 = carry
    i, t, lam_s, lam_t, sigma_s, sigma_t, alpha_t = inputs
    m0, _ = denoise(x, _full(t, x))
    h = lam_t - lam_s
    finite = jnp.isfinite(h)
    hs = jnp.where(finite, h, 1.0)
    phi = -jnp.expm1(-h)
    x1 = (sigma_t / sigma_s) * x + alpha_t * phi * m0
    d1_0 = (m0 - m1) * (hs / h1)
    x2 = x1 + 0.5 * alpha_t * phi * d1_0
    d1_1 = (m1 - m2) * (hs / h2)
    d1 = d1_0 + (h1 / (h1 + h2)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) * (hs / (h1 + h2))
    x3 = x1 + alpha_t * (1.0 - phi / hs) * d1 - alpha_t * ((hs - phi) / hs**2 - 0.5) * d2
    step_order = jnp.where(finite, jnp.minimum(order, i + 1), 1)
    x_next = jnp.where(step_order == 3, x3, jnp.where(step_order == 2, x2, x1))
    h_safe = jnp.where(finite, h, far)
    return (x_next, m0, m1, h_safe, h1), (x_next if return_trajectory else None)

  zeros = jnp.zeros_like(x_init)
  one = jnp.ones((), lambdas.dtype)
  inputs = (
    jnp.arange(num_steps),
    times[:-1],
    lambdas[:-1],
    lambdas[1:],
    sigmas[:-1],
    sigmas[1:],
    alphas[1:],
  )
  (samples, *_), path = jax.lax.scan(body, (x_init, zeros, zeros, one, one), inputs)
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )
