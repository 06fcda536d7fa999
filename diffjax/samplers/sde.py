"""Reverse-time SDE samplers for any affine Gaussian process: Euler-Maruyama, stochastic Heun
and predictor-corrector with Langevin dynamics.

The process is ``x_t = alpha x0 + sigma eps`` with ``coefficients_fn(t)`` in its own clock
(diffusion time, ``t = 0`` data; or flow time, ``t = 1`` data: the grid's direction decides).
Its forward SDE is ``dx = f x dt + g dW`` with ``f = d_alpha / alpha`` and ``g^2 = d sigma^2 /
dt - 2 f sigma^2 = 2 sigma k``, where

    k = d_sigma - sigma d_alpha / alpha = sigma d/dt log(sigma / alpha)

(Kingma et al. 2021, https://arxiv.org/abs/2107.00630; Lu et al. 2022,
https://arxiv.org/abs/2206.00927). The samplers integrate the family of reverse SDEs with the
process's marginals at every ``t`` (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902):

    dx = [f x - (1 + eta^2) / 2 g^2 score] dt + eta |g| dW,

``eta = 0`` the probability-flow ODE, ``eta = 1`` the reverse SDE of Anderson (1982) and Song et
al. (2021, eq. 6 and 13, https://arxiv.org/abs/2011.13456). With the posterior means ``x0_hat,
eps_hat`` of :func:`~diffjax.samplers.fields.denoiser` (``score = -eps_hat / sigma``, Tweedie)
the drift and the noise variance per unit time are

    drift = d_alpha x0_hat + d_sigma eps_hat + eta^2 k eps_hat,     var = 2 eta^2 sigma |k|,

where the first two terms are the probability-flow velocity. ``dt`` is signed (negative in
diffusion time, positive in flow time) and ``k dt <= 0`` toward the data in both clocks, so
one formula serves both. A flow model on a Gaussian path gets its ``x0_hat, eps_hat`` (and so
its score) from its velocity through the path's coefficients
(:meth:`diffjax.paths.Path.gaussian_coefficients`): on the linear path ``alpha = t``,
``sigma = 1 - t`` that is ``score = (t v - x) / (1 - t)``.

``f`` and ``k`` are infinite where ``alpha = 0`` (flow time 0 of the linear path: the reverse
SDE contracts the state at rate ``1 / t`` there), so these samplers start where ``alpha > 0``;
``sigma = 0`` at the data end is fine (``g^2 score = -2 k eps_hat`` stays finite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax.samplers.fields import (
  CoefficientsFn,
  Denoiser,
  Predictor,
  SamplerOutput,
  denoiser,
  prepend_initial,
)
from diffjax.samplers.ode import check_times
from diffjax.shapes import broadcast_to_data, concrete

__all__ = [
  "score_field",
  "reverse_sde",
  "check_sde_times",
  "euler_maruyama_sample",
  "euler_maruyama_integrate",
  "sde_heun_sample",
  "pc_sample",
]


def score_field(predict: Predictor, *, target, coefficients_fn: CoefficientsFn):
  """``(x, t) -> score = grad_x log p_t(x) = -eps_hat / sigma`` for any prediction target.

  ``eps_hat = E[eps | x_t]`` comes from ``target.to_x0_eps`` at ``coefficients_fn(t)`` (Tweedie's
  formula; Song et al. 2021, https://arxiv.org/abs/2011.13456). For a velocity model on a
  Gaussian flow path pass the path's :meth:`~diffjax.paths.Path.gaussian_coefficients`: on the
  linear path (``alpha = t``, ``sigma = 1 - t``, ``det = -1`` in
  :func:`~diffjax.parameterization.x0_eps_from_velocity`) ``eps_hat = x - t v`` and the score is
  ``(t v - x) / (1 - t)``.
  """
  denoise = denoiser(predict, target=target, coefficients_fn=coefficients_fn)

  def score(x: Array, t: Array) -> Array:
    _, eps = denoise(x, t)
    return -eps / broadcast_to_data(coefficients_fn(t).sigma, eps)

  return score


def reverse_sde(denoise: Denoiser, *, coefficients_fn: CoefficientsFn, eta: float = 1.0):
  """``(x, t) -> (drift, diffusion)`` of the reverse SDE family (module docstring).

  ``drift = d_alpha x0_hat + d_sigma eps_hat + eta^2 k eps_hat`` and ``diffusion = eta sqrt(2
  sigma |k|)`` (``[batch]``), with ``k = d_sigma - sigma d_alpha / alpha``: the SDE ``dx = [f x -
  (1 + eta^2) / 2 g^2 score] dt + eta |g| dW`` of Zhang & Chen (2022),
  https://arxiv.org/abs/2204.13902, written in posterior means.
  """

  def terms(x: Array, t: Array) -> tuple[Array, Array]:
    c = coefficients_fn(t)
    x0, eps = denoise(x, t)
    k = c.d_sigma - c.sigma * c.d_alpha / c.alpha
    d_alpha, d_sigma, k_data = (broadcast_to_data(v, x) for v in (c.d_alpha, c.d_sigma, k))
    drift = d_alpha * x0 + (d_sigma + eta**2 * k_data) * eps
    diffusion = eta * jnp.sqrt(2.0 * c.sigma * jnp.abs(k))
    return drift, diffusion

  return terms


def check_sde_times(times, coefficients_fn: CoefficientsFn) -> None:
  """A grid of at least one step whose times all have ``alpha > 0`` (where ``f = d log alpha /
  dt`` is finite); raised before tracing, skipped under tracing."""
  check_times(times)
  alphas = concrete(coefficients_fn(jnp.asarray(times)).alpha)
  if alphas is not None and not np.all(alphas > 0):
    first = float(concrete(times)[int(np.argmin(alphas > 0))])
    raise ValueError(
      f"the reverse SDE's drift f = d log alpha / dt is infinite at t={first} where alpha = 0 "
      "(flow time 0 of the linear path); start the grid where alpha > 0, e.g. "
      "edm_grid(num_steps=..., t_start=t_noise, t_end=1.0, coefficients_fn=...) with "
      "sigma / alpha = 80 at t_noise, or use 'dpmpp_2m_sde', which starts at alpha = 0"
    )


def _check_eta(eta) -> None:
  if isinstance(eta, (int, float)) and not eta >= 0:
    raise ValueError(f"eta={eta!r}: must be >= 0 (0: probability-flow ODE, 1: reverse SDE)")


def _full(value, x):
  return jnp.full(x.shape[:1], value, dtype=jnp.result_type(value))


def _step_noises(key: Array, noises: Array | None, x: Array, num_steps: int) -> Array:
  """``[num_steps, *x.shape]`` standard normal draws: ``noises`` when given, else one key per
  step (drawn inside the scan, so only ``noises`` costs memory)."""
  if noises is None:
    return jax.random.split(key, num_steps)
  if noises.shape != (num_steps, *x.shape):
    raise ValueError(
      f"noises of shape {noises.shape}: expected [num_steps, *x.shape] = "
      f"{(num_steps, *x.shape)}, one standard normal draw per step"
    )
  return noises


def _draw(step_input: Array, x: Array, given: bool) -> Array:
  return step_input.astype(x.dtype) if given else jax.random.normal(step_input, x.shape, x.dtype)


def _prepare(key, denoise, x_init, *, times, coefficients_fn, eta, noises):
  """What the one-step SDE schemes share: checked inputs, the step count, each step's noise
  draw (given or from ``key``) and the reverse SDE's drift and diffusion."""
  check_sde_times(times, coefficients_fn)
  _check_eta(eta)
  times = jnp.asarray(times)
  num_steps = times.shape[0] - 1
  draws = _step_noises(key, noises, x_init, num_steps)
  terms = reverse_sde(denoise, coefficients_fn=coefficients_fn, eta=eta)
  return times, num_steps, noises is not None, draws, terms


def euler_maruyama_sample(
  key: Array,
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  eta: float = 1.0,
  noises: Array | None = None,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Euler-Maruyama on the reverse SDE: ``x_{i+1} = x_i + a(x_i, t_i) dt_i + b(t_i) sqrt(|dt_i|)
  z_i`` with ``dt_i = t_{i+1} - t_i`` and ``a``, ``b`` from :func:`reverse_sde`.

  Strong order 1/2, weak order 1 (Kloeden & Platen 1992, Ch. 10 and 14; Song et al. 2021,
  App. F, https://arxiv.org/abs/2011.13456). One network evaluation per step.

  Args:
    key: PRNG key for the Brownian increments (unused when ``noises`` is given).
    denoise: ``(x, t) -> (x0_hat, eps_hat)`` (:func:`~diffjax.samplers.fields.denoiser`).
    x_init: ``[batch, *event]`` state at ``times[0]``.
    times: ``[N + 1]`` model times from noise to data, ``alpha > 0`` at every one.
    coefficients_fn: the process.
    eta: the SDE family's noise level (0: the probability-flow ODE by Euler).
    noises: ``[N, batch, *event]`` the standard normal ``z_i``, or None (drawn from ``key``).
    return_trajectory: also return the ``[N + 1, batch, ...]`` states.
  """
  check_sde_times(times, coefficients_fn)
  _check_eta(eta)
  terms = reverse_sde(denoise, coefficients_fn=coefficients_fn, eta=eta)
  return euler_maruyama_integrate(
    key, terms, x_init, times=times, noises=noises, return_trajectory=return_trajectory
  )


def euler_maruyama_integrate(
  key: Array,
  terms,
  x_init: Array,
  *,
  times: Array,
  noises: Array | None = None,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Euler-Maruyama for any SDE ``dx = a(x, t) dt + b(t) dW`` with additive noise:
  ``x_{i+1} = x_i + a(x_i, t_i) dt_i + b(t_i) sqrt(|dt_i|) z_i`` in one ``jax.lax.scan``.

  Weak order 1, strong order 1/2 (Kloeden & Platen 1992, Ch. 10 and 14). One evaluation of
  ``terms`` per step, at the left end of each step only (``times[-1]`` is never evaluated).

  Args:
    key: PRNG key for the ``z_i`` (unused when ``noises`` is given).
    terms: ``(x, t) -> (a, b)`` with ``t`` and ``b`` of shape ``[batch]`` (e.g.
      :func:`reverse_sde`).
    x_init: ``[batch, *event]`` state at ``times[0]``.
    times: ``[N + 1]`` grid, increasing or decreasing.
    noises: ``[N, batch, *event]`` the standard normal ``z_i``, or None (drawn from ``key``).
    return_trajectory: also return the ``[N + 1, batch, ...]`` states.
  """
  check_times(times)
  times = jnp.asarray(times)
  num_steps = times.shape[0] - 1
  given = noises is not None
  draws = _step_noises(key, noises, x_init, num_steps)

  def body(x, inputs):
    t, t_next, draw = inputs
    dt = t_next - t
    drift, diffusion = terms(x, _full(t, x))
    z = _draw(draw, x, given)
    x_next = x + drift * dt + broadcast_to_data(diffusion, x) * jnp.sqrt(jnp.abs(dt)) * z
    return x_next, (x_next if return_trajectory else None)

  samples, path = jax.lax.scan(body, x_init, (times[:-1], times[1:], draws))
  return SamplerOutput(
    samples=samples, trajectory=prepend_initial(x_init, path), nfe=jnp.asarray(num_steps, jnp.int32)
  )


def sde_heun_sample(
  key: Array,
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  eta: float = 1.0,
  noises: Array | None = None,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Stochastic Heun on the reverse SDE, with the increment ``dW_i = sqrt(|dt_i|) z_i``:

  ``x~ = x_i + a(x_i, t_i) dt_i + b(t_i) dW_i``,
  ``x_{i+1} = x_i + (a(x_i, t_i) + a(x~, t_{i+1})) / 2 dt_i + (b(t_i) + b(t_{i+1})) / 2 dW_i``.

  The noise of the reverse SDE is additive (``b`` depends on ``t`` only), where the Ito and
  Stratonovich solutions agree and this predictor-corrector is the improved Euler scheme of
  Rumelin (1982), https://doi.org/10.1137/0719041 (with ``eta = 0``: Heun's method on the
  probability-flow ODE). It is what diffrax's ``Heun`` computes on ``MultiTerm(ODETerm,
  ControlTerm)`` with the same increments (the tests check that). Two network evaluations per
  step. Arguments as :func:`euler_maruyama_sample`.
  """
  times, num_steps, given, draws, terms = _prepare(
    key, denoise, x_init, times=times, coefficients_fn=coefficients_fn, eta=eta, noises=noises
  )

  def body(x, inputs):
    t, t_next, draw = inputs
    dt = t_next - t
    dw = jnp.sqrt(jnp.abs(dt)) * _draw(draw, x, given)
    drift, diffusion = terms(x, _full(t, x))
    x_euler = x + drift * dt + broadcast_to_data(diffusion, x) * dw
    drift_next, diffusion_next = terms(x_euler, _full(t_next, x))
    mean_diffusion = broadcast_to_data(0.5 * (diffusion + diffusion_next), x)
    x_next = x + 0.5 * (drift + drift_next) * dt + mean_diffusion * dw
    return x_next, (x_next if return_trajectory else None)

  samples, path = jax.lax.scan(body, x_init, (times[:-1], times[1:], draws))
  return SamplerOutput(
    samples=samples,
    trajectory=prepend_initial(x_init, path),
    nfe=jnp.asarray(2 * num_steps, jnp.int32),
  )


def _mean_norm(v: Array) -> Array:
  """The per-example norm ``||v_b||`` averaged over the batch."""
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1)))


def pc_sample(
  key: Array,
  denoise: Denoiser,
  x_init: Array,
  *,
  times: Array,
  coefficients_fn: CoefficientsFn,
  snr: float = 0.16,
  corrector_steps: int = 1,
  eta: float = 1.0,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Predictor-corrector sampling: an Euler-Maruyama step of the reverse SDE, then
  ``corrector_steps`` steps of Langevin dynamics at the time it lands on.

  Corrector (Song et al. 2021, Algorithms 2 and 3, https://arxiv.org/abs/2011.13456), with
  ``s = score(x, t) = -eps_hat / sigma`` and ``z ~ N(0, I)``: ``e = 2 a (snr ||z|| / ||s||)^2``,
  ``x <- x + e s + sqrt(2 e) z``, where ``a = (alpha(t_i) / alpha(t_{i+1}))^2`` (at most 1) is
  the step's ``abar`` ratio (Algorithm 3's ``alpha_i = 1 - beta_i`` for VP, 1 for VE). As in the
  authors' code (``LangevinCorrector`` of yang-song/score_sde), ``||z||`` and ``||s||`` are
  per-example norms averaged over the batch: per-example ratios blow up where ``||s|| ~ 0``,
  which low-dimensional data reaches. So one example's step size depends on its batch (a
  generator's chunked mode samples examples one at a time). No correction where ``sigma = 0``
  (the score is infinite there). The predictor is :func:`euler_maruyama_sample`'s step (the
  paper's reverse-diffusion predictor differs from it by ``O(dt^2)`` per step). ``1 +
  corrector_steps`` network evaluations per step.

  Args:
    key: PRNG key for the predictor's and the corrector's noise.
    denoise, x_init, times, coefficients_fn, eta: as :func:`euler_maruyama_sample`.
    snr: the corrector's signal-to-noise ratio ``r`` (0.16: Song et al.'s VE setting on CIFAR-10).
    corrector_steps: ``M``, Langevin steps after each predictor step.
  """
  check_sde_times(times, coefficients_fn)
  _check_eta(eta)
  if not snr > 0:
    raise ValueError(f"snr={snr!r}: the corrector's signal-to-noise ratio must be > 0")
  if isinstance(corrector_steps, bool) or int(corrector_steps) != corrector_steps:
    raise ValueError(f"corrector_steps={corrector_steps!r}: must be an integer >= 0")
  if corrector_steps < 0:
    raise ValueError(f"corrector_steps={corrector_steps!r}: must be an integer >= 0")
  corrector_steps = int(corrector_steps)
  times = jnp.asarray(times)
  num_steps = times.shape[0] - 1
  coefficients = coefficients_fn(times)
  ratio = jnp.minimum((coefficients.alpha[:-1] / coefficients.alpha[1:]) ** 2, 1.0)
  corrects = coefficients.sigma[1:] > 0
  terms = reverse_sde(denoise, coefficients_fn=coefficients_fn, eta=eta)

  def langevin(x, inputs, t, sigma, a):
    _, eps = denoise(x, _full(t, x))
    score = -eps / sigma
    z = jax.random.normal(inputs, x.shape, x.dtype)
    e = 2.0 * a * (snr * _mean_norm(z) / _mean_norm(score)) ** 2
    return x + e * score + jnp.sqrt(2.0 * e) * z, None

  def body(x, inputs):
    t, t_next, sigma_next, a, correct, step_key = inputs
    key_predictor, key_corrector = jax.random.split(step_key)
    dt = t_next - t
    drift, diffusion = terms(x, _full(t, x))
    z = jax.random.normal(key_predictor, x.shape, x.dtype)
    x = x + drift * dt + broadcast_to_data(diffusion, x) * jnp.sqrt(jnp.abs(dt)) * z

    def correct_fn(x):
      keys = jax.random.split(key_corrector, corrector_steps)
      safe_sigma = jnp.where(correct, sigma_next, 1.0)
      step = lambda x, k: langevin(x, k, t_next, safe_sigma, a)
      return jax.lax.scan(step, x, keys)[0]

    if corrector_steps:
      x = jax.lax.cond(correct, correct_fn, lambda x: x, x)
    return x, (x if return_trajectory else None)

  inputs = (
    times[:-1],
    times[1:],
    coefficients.sigma[1:],
    ratio,
    corrects,
    jax.random.split(key, num_steps),
  )
  samples, path = jax.lax.scan(body, x_init, inputs)
  nfe = num_steps + corrector_steps * jnp.sum(corrects).astype(jnp.int32)
  return SamplerOutput(samples=samples, trajectory=prepend_initial(x_init, path), nfe=nfe)
