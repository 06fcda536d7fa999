"""Noise schedules as pure functions.

Two families, each in the time direction of its literature:

* Discrete (DDPM) schedules index steps ``0 .. T-1`` toward noise. ``betas[i]`` is the variance
  added by step ``i``; ``alpha_bars[i] = prod_{j <= i} (1 - betas[j])`` is the signal variance
  after it. A :class:`DiscreteSchedule` is a pytree (a NamedTuple of arrays), so it passes through
  ``jit`` and ``vmap``.
* Continuous schedules map diffusion time ``t in [0, 1]`` (``t = 0`` data, ``t = 1`` noise) to
  ``alpha(t)`` and ``sigma(t)`` of the marginal ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)``. A
  :class:`ContinuousSchedule` wraps one pure function ``t -> (log alpha, log sigma)``; time
  derivatives come from ``jax.jvp``, never by hand.

Flow-matching paths run the other way (``t = 0`` noise, ``t = 1`` data); the map between the two
is :func:`diffjax.parameterization.flow_coefficients`.

Name clash: Chen (2023)'s *sigmoid schedule* is a continuous ``alpha_bar(t)`` built from a
sigmoid (:func:`sigmoid_log_alpha_sigma`, :func:`sigmoid_betas`); GeoDiff's (Xu et al. 2022)
"sigmoid" squashes a linear ramp of *betas* (:func:`geodiff_sigmoid_betas`). They are different.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "DiscreteSchedule",
    "discrete_schedule",
    "linear_betas",
    "scaled_linear_betas",
    "cosine_betas",
    "sigmoid_betas",
    "geodiff_sigmoid_betas",
    "rescale_zero_terminal_snr",
    "get_discrete_schedule",
    "ContinuousSchedule",
    "vp_log_alpha_sigma",
    "ve_log_alpha_sigma",
    "cosine_log_snr",
    "shifted_cosine_log_snr",
    "linear_log_snr",
    "edm_sigma",
    "sigmoid_log_alpha_sigma",
    "vp_schedule",
    "ve_schedule",
    "cosine_schedule",
    "shifted_cosine_schedule",
    "edm_schedule",
    "sigmoid_schedule",
    "log_snr_schedule",
    "linear_log_snr_schedule",
    "get_continuous_schedule",
    "CONTINUOUS_SCHEDULES",
    "DISCRETE_SCHEDULES",
]


# --------------------------------------------------------------------------------------------
# Discrete schedules (DDPM time: step 0 is the first step away from data).
# --------------------------------------------------------------------------------------------


class DiscreteSchedule(NamedTuple):
  """A discrete DDPM schedule of ``T`` steps; every field has shape ``[T]``.

  Attributes:
    betas: ``beta_s``, the variance of the noise added at step ``s``.
    alphas: ``alpha_s = 1 - beta_s``.
    alpha_bars: ``abar_t = prod_{s <= t} alpha_s``, so ``q(x_t | x_0) = N(sqrt(abar_t) x_0,
      (1 - abar_t) I)`` (Ho et al. 2020, eq. 4).
    log_snr: ``log(abar_t / (1 - abar_t))``; ``-inf`` at a zero-terminal-SNR final step.
  """

  betas: Array
  alphas: Array
  alpha_bars: Array
  log_snr: Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[-1]


def discrete_schedule(betas: Array) -> DiscreteSchedule:
  """Builds a :class:`DiscreteSchedule` from its betas.

  ``log abar_t = sum_{s <= t} log1p(-beta_s)`` (a sum of logs instead of a product, so 1000
  factors close to one lose no precision), and
  ``log_snr_t = log abar_t - log(1 - abar_t)`` with ``1 - abar_t = -expm1(log abar_t)``.

  Args:
    betas: ``[T]`` variances in ``(0, 1]``.
  """
  betas = jnp.asarray(betas)
  if not jnp.issubdtype(betas.dtype, jnp.floating):
    betas = betas.astype(jnp.float32)
  log_alpha_bars = jnp.cumsum(jnp.log1p(-betas), axis=-1)
  alpha_bars = jnp.exp(log_alpha_bars)
  log_snr = log_alpha_bars - jnp.log(-jnp.expm1(log_alpha_bars))
  return DiscreteSchedule(betas=betas, alphas=1.0 - betas, alpha_bars=alpha_bars, log_snr=log_snr)


def linear_betas(*, num_steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> Array:
  """DDPM's linear schedule: ``beta_s = beta_start + s / (T - 1) (beta_end - beta_start)``.

  Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", Sec. 4,
  https://arxiv.org/abs/2006.11239 (defaults 1e-4 to 0.02 for T = 1000).
  """
  return jnp.linspace(beta_start, beta_end, num_steps, dtype=jnp.float32)


def scaled_linear_betas(*, num_steps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> Array:
  """Stable Diffusion's "scaled linear" schedule: linear in ``sqrt(beta)``.

  ``beta_s = (sqrt(beta_start) + s / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2``;
  Rombach et al. (2022), https://arxiv.org/abs/2112.10752 (the released configs; the name
  follows diffusers).
  """
  return jnp.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=jnp.float32)**2


def _betas_from_alpha_bar(alpha_bar_fn: Callable[[Array], Array], num_steps: int,
                          max_beta: float) -> Array:
  """``beta_s = min(1 - abar((s+1)/T) / abar(s/T), max_beta)`` for a continuous ``abar``."""
  grid = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  alpha_bar = alpha_bar_fn(grid)
  return jnp.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def cosine_betas(*, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Array:
  """Nichol & Dhariwal's cosine schedule.

  ``abar(t) = f(t) / f(0)`` with ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)`` and
  ``beta_s = min(1 - abar((s+1)/T) / abar(s/T), 0.999)``; the clip keeps the last steps away from
  ``beta = 1``. Nichol & Dhariwal (2021), "Improved DDPM", eq. 17,
  https://arxiv.org/abs/2102.09672.
  """
  def alpha_bar(t):
    return jnp.cos((t + s) / (1 + s) * jnp.pi / 2)**2 / math.cos(s / (1 + s) * math.pi / 2)**2
  return _betas_from_alpha_bar(alpha_bar, num_steps, max_beta)


def _chen_sigmoid_alpha_bar(t: Array, *, start: float, end: float, tau: float) -> Array:
  """Chen (2023), Algorithm 1: ``gamma(t) = (v_end - sigmoid((t (end - start) + start) / tau)) /
  (v_end - v_start)`` with ``v = sigmoid(. / tau)`` at the ends; ``gamma`` is ``abar``."""
  v_start = jax.nn.sigmoid(start / tau)
  v_end = jax.nn.sigmoid(end / tau)
  return (v_end - jax.nn.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)


def sigmoid_betas(*, num_steps: int = 1000, start: float = -3.0, end: float = 3.0,
                  tau: float = 1.0, max_beta: float = 0.999) -> Array:
  """Chen's sigmoid schedule, discretised: ``beta_s = min(1 - gamma((s+1)/T) / gamma(s/T), 0.999)``.

  ``gamma`` is :func:`sigmoid_log_alpha_sigma`'s ``abar``. Chen (2023), "On the Importance of
  Noise Scheduling for Diffusion Models", Algorithm 1, https://arxiv.org/abs/2301.10972.
  Not GeoDiff's sigmoid (see :func:`geodiff_sigmoid_betas`).
  """
  alpha_bar = functools.partial(_chen_sigmoid_alpha_bar, start=start, end=end, tau=tau)
  return _betas_from_alpha_bar(alpha_bar, num_steps, max_beta)


def geodiff_sigmoid_betas(*, num_steps: int = 1000, beta_start: float = 1e-7,
                          beta_end: float = 2e-3) -> Array:
  """GeoDiff's "sigmoid" betas: ``beta_s = sigmoid(linspace(-6, 6, T))_s (end - start) + start``.

  Xu et al. (2022), "GeoDiff", https://arxiv.org/abs/2203.02923 (their released code). A
  squashed ramp of *betas*, unrelated to Chen's sigmoid schedule of ``abar``.
  """
  ramp = jax.nn.sigmoid(jnp.linspace(-6.0, 6.0, num_steps, dtype=jnp.float32))
  return ramp * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: Array) -> Array:
  """Rescales betas so the final step has zero SNR (Lin et al. 2024, Algorithm 1).

  With ``r_t = sqrt(abar_t)``: ``r'_t = (r_t - r_{T-1}) r_0 / (r_0 - r_{T-1})`` keeps the first
  step and sends the last to zero; then ``abar'_t = r'^2_t``, ``alpha'_t = abar'_t / abar'_{t-1}``
  and ``beta'_t = 1 - alpha'_t`` (so ``beta'_{T-1} = 1``). Lin et al., "Common Diffusion Noise
  Schedules and Sample Steps are Flawed", https://arxiv.org/abs/2305.08891.
  """
  betas = jnp.asarray(betas)
  root_alpha_bars = jnp.sqrt(jnp.cumprod(1.0 - betas))
  first, last = root_alpha_bars[0], root_alpha_bars[-1]
  root_alpha_bars = (root_alpha_bars - last) * first / (first - last)
  alpha_bars = root_alpha_bars**2
  alphas = jnp.concatenate([alpha_bars[:1], alpha_bars[1:] / alpha_bars[:-1]])
  return 1.0 - alphas


DISCRETE_SCHEDULES: dict[str, Callable[..., Array]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "geodiff_sigmoid": geodiff_sigmoid_betas,
}


def get_discrete_schedule(name: str, *, zero_terminal_snr: bool = False,
                          **kwargs) -> DiscreteSchedule:
  """Resolves a discrete schedule by name (at the edge, once) and builds it.

  Args:
    name: one of ``DISCRETE_SCHEDULES`` ("linear", "scaled_linear", "cosine", "sigmoid",
      "geodiff_sigmoid").
    zero_terminal_snr: apply :func:`rescale_zero_terminal_snr` to the betas.
    **kwargs: keyword arguments of the beta function (``num_steps``, ``beta_start``, ...).
  """
  if name not in DISCRETE_SCHEDULES:
    raise ValueError(f"unknown discrete schedule {name!r}; choose one of "
                     f"{sorted(DISCRETE_SCHEDULES)}")
  betas = DISCRETE_SCHEDULES[name](**kwargs)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return discrete_schedule(betas)


# --------------------------------------------------------------------------------------------
# Continuous schedules (diffusion time: t = 0 data, t = 1 noise).
# --------------------------------------------------------------------------------------------


def _compute_dtype(t: Array):
  """Schedules compute in at least float32 (bfloat16 has 8 bits of mantissa: not enough for
  ``expm1`` near zero) and return the caller's floating dtype."""
  return jnp.promote_types(t.dtype, jnp.float32)


def _as_float_time(t) -> Array:
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(jnp.float32)
  return t


@dataclasses.dataclass(frozen=True)
class ContinuousSchedule:
  """A continuous-time schedule: ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``, t in [0, 1].

  Wraps one pure function ``log_alpha_sigma(t) -> (log alpha(t), log sigma(t))``; working in logs
  keeps ``log_snr = 2 (log alpha - log sigma)`` finite where ``alpha`` or ``sigma`` underflow.
  Frozen and hashable, so it can be a static argument of ``jax.jit``. All methods are
  elementwise in ``t`` (any shape) and safe under ``jit``, ``vmap`` and ``grad``.

  Attributes:
    name: a label for logs and plots.
    log_alpha_sigma: the pure function defining the schedule.
  """

  name: str
  log_alpha_sigma: Callable[[Array], tuple[Array, Array]]

  def _eval(self, fn, t):
    t = _as_float_time(t)
    out = fn(t.astype(_compute_dtype(t)))
    return jax.tree.map(lambda x: x.astype(t.dtype), out)

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    """``(alpha(t), sigma(t))``."""
    return self._eval(lambda u: tuple(jnp.exp(v) for v in self.log_alpha_sigma(u)), t)

  def alpha(self, t) -> Array:
    return self.alpha_sigma(t)[0]

  def sigma(self, t) -> Array:
    return self.alpha_sigma(t)[1]

  def log_snr(self, t) -> Array:
    """``lambda(t) = log(alpha^2 / sigma^2) = 2 (log alpha - log sigma)``, decreasing in t."""
    def fn(u):
      log_alpha, log_sigma = self.log_alpha_sigma(u)
      return 2.0 * (log_alpha - log_sigma)
    return self._eval(fn, t)

  def alpha_sigma_and_derivatives(self, t) -> tuple[Array, Array, Array, Array]:
    """``(alpha, sigma, d alpha / dt, d sigma / dt)`` with derivatives by ``jax.jvp``."""
    def fn(u):
      primal = lambda v: tuple(jnp.exp(w) for w in self.log_alpha_sigma(v))
      (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(primal, (u,), (jnp.ones_like(u),))
      return alpha, sigma, d_alpha, d_sigma
    return self._eval(fn, t)

  def d_log_snr(self, t) -> Array:
    """``d lambda / dt`` by ``jax.jvp`` (negative for every schedule here)."""
    def fn(u):
      def log_snr(v):
        log_alpha, log_sigma = self.log_alpha_sigma(v)
        return 2.0 * (log_alpha - log_sigma)
      return jax.jvp(log_snr, (u,), (jnp.ones_like(u),))[1]
    return self._eval(fn, t)


def _vp_from_log_snr(log_snr: Array) -> tuple[Array, Array]:
  """Variance preserving ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``;
  ``log_sigmoid`` keeps both logs finite for any ``lambda``."""
  return 0.5 * jax.nn.log_sigmoid(log_snr), 0.5 * jax.nn.log_sigmoid(-log_snr)


def vp_log_alpha_sigma(t: Array, *, beta_min: float = 0.1,
                       beta_max: float = 20.0) -> tuple[Array, Array]:
  """VP SDE: ``log alpha(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min``,
  ``sigma(t) = sqrt(1 - alpha(t)^2)``.

  ``alpha(t) = exp(-1/2 int_0^t beta(s) ds)`` with ``beta(s) = beta_min + s (beta_max -
  beta_min)``; Song et al. (2021), "Score-Based Generative Modeling through SDEs", eq. 29,
  https://arxiv.org/abs/2011.13456. ``log sigma = 1/2 log(-expm1(2 log alpha))`` stays accurate
  as ``t -> 0``.
  """
  log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
  return log_alpha, 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def ve_log_alpha_sigma(t: Array, *, sigma_min: float = 0.01,
                       sigma_max: float = 50.0) -> tuple[Array, Array]:
  """VE SDE: ``alpha(t) = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

  Song et al. (2021), eq. 31, https://arxiv.org/abs/2011.13456 (the marginal std; the SDE's
  perturbation kernel omits ``sigma_min`` at ``t = 0``, a difference of 1e-2 we do not model).
  """
  log_sigma = math.log(sigma_min) + t * math.log(sigma_max / sigma_min)
  return jnp.zeros_like(t), log_sigma


def cosine_log_snr(t: Array, *, log_snr_min: float = -15.0,
                   log_snr_max: float = 15.0) -> Array:
  """Cosine schedule in log-SNR: ``lambda(t) = -2 log tan(t_min + t (t_max - t_min))``.

  With ``t_min = atan(exp(-lambda_max / 2))`` and ``t_max = atan(exp(-lambda_min / 2))`` the
  range is clipped to ``[lambda_min, lambda_max]``. For an unclipped range this is exactly
  ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (Nichol & Dhariwal 2021 with s = 0).
  Hoogeboom et al. (2023), "simple diffusion", Sec. 3, https://arxiv.org/abs/2301.11093.
  """
  t_min = math.atan(math.exp(-0.5 * log_snr_max))
  t_max = math.atan(math.exp(-0.5 * log_snr_min))
  return -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))


def shifted_cosine_log_snr(t: Array, *, resolution: int = 64, base_resolution: int = 64,
                           log_snr_min: float = -15.0, log_snr_max: float = 15.0) -> Array:
  """Resolution-shifted cosine: ``lambda(t) = lambda_cosine(t) + 2 log(base / resolution)``.

  Larger images keep more signal at equal noise, so the SNR is divided by
  ``(resolution / base)^2``. Hoogeboom et al. (2023), "simple diffusion", eq. 4,
  https://arxiv.org/abs/2301.11093.
  """
  shift = 2.0 * math.log(base_resolution / resolution)
  return cosine_log_snr(t, log_snr_min=log_snr_min, log_snr_max=log_snr_max) + shift


def linear_log_snr(t: Array, *, log_snr_min: float = -10.0, log_snr_max: float = 10.0) -> Array:
  """Linear in log-SNR: ``lambda(t) = lambda_max + t (lambda_min - lambda_max)``.

  The simplest member of the general log-SNR family (Kingma et al. 2021, VDM, Sec. 3;
  https://arxiv.org/abs/2107.00630); pass any decreasing ``t -> lambda(t)`` to
  :func:`log_snr_schedule` for others.
  """
  return log_snr_max + t * (log_snr_min - log_snr_max)


def edm_sigma(t: Array, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0) -> Array:
  """EDM's noise levels as a function of time: ``sigma(t) = (sigma_min^(1/rho) + t
  (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, ``alpha = 1``.

  Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models",
  eq. 5 (with t running from data to noise), https://arxiv.org/abs/2206.00364.
  """
  lo, hi = sigma_min**(1.0 / rho), sigma_max**(1.0 / rho)
  return (lo + t * (hi - lo))**rho


def sigmoid_log_alpha_sigma(t: Array, *, start: float = -3.0, end: float = 3.0,
                            tau: float = 1.0, clip_min: float = 1e-9) -> tuple[Array, Array]:
  """Chen's sigmoid schedule: ``abar(t) = gamma(t)`` clipped to ``[clip_min, 1]`` (Chen 2023,
  Algorithm 1, https://arxiv.org/abs/2301.10972); ``alpha = sqrt(abar)``,
  ``sigma = sqrt(1 - abar)``, variance preserving."""
  alpha_bar = jnp.clip(_chen_sigmoid_alpha_bar(t, start=start, end=end, tau=tau), clip_min, 1.0)
  log_alpha_bar = jnp.log(alpha_bar)
  return 0.5 * log_alpha_bar, 0.5 * jnp.log(-jnp.expm1(log_alpha_bar))


def _log_alpha_sigma_from_log_snr(log_snr_fn, t):
  return _vp_from_log_snr(log_snr_fn(t))


def _ve_from_sigma(sigma_fn, t):
  return jnp.zeros_like(t), jnp.log(sigma_fn(t))


def log_snr_schedule(log_snr_fn: Callable[[Array], Array],
                     name: str = "log_snr") -> ContinuousSchedule:
  """The general variance-preserving family given by its log-SNR: ``alpha^2 = sigmoid(lambda(t))``,
  ``sigma^2 = sigmoid(-lambda(t))`` (Kingma et al. 2021, VDM, eq. 4 and Kingma & Gao 2023).

  Args:
    log_snr_fn: a pure, decreasing function ``t -> lambda(t)``; use a module-level function or a
      ``functools.partial`` of one so the schedule stays hashable for ``jit``.
  """
  return ContinuousSchedule(name, functools.partial(_log_alpha_sigma_from_log_snr, log_snr_fn))


def vp_schedule(*, beta_min: float = 0.1, beta_max: float = 20.0) -> ContinuousSchedule:
  """The VP SDE schedule, :func:`vp_log_alpha_sigma`."""
  return ContinuousSchedule(
      "vp", functools.partial(vp_log_alpha_sigma, beta_min=beta_min, beta_max=beta_max))


def ve_schedule(*, sigma_min: float = 0.01, sigma_max: float = 50.0) -> ContinuousSchedule:
  """The VE SDE schedule, :func:`ve_log_alpha_sigma`."""
  return ContinuousSchedule(
      "ve", functools.partial(ve_log_alpha_sigma, sigma_min=sigma_min, sigma_max=sigma_max))


def cosine_schedule(*, log_snr_min: float = -15.0, log_snr_max: float = 15.0) -> ContinuousSchedule:
  """Variance-preserving cosine schedule, :func:`cosine_log_snr`."""
  fn = functools.partial(cosine_log_snr, log_snr_min=log_snr_min, log_snr_max=log_snr_max)
  return log_snr_schedule(fn, name="cosine")


def shifted_cosine_schedule(*, resolution: int = 64, base_resolution: int = 64,
                            log_snr_min: float = -15.0,
                            log_snr_max: float = 15.0) -> ContinuousSchedule:
  """Variance-preserving shifted cosine schedule, :func:`shifted_cosine_log_snr`."""
  fn = functools.partial(shifted_cosine_log_snr, resolution=resolution,
                         base_resolution=base_resolution, log_snr_min=log_snr_min,
                         log_snr_max=log_snr_max)
  return log_snr_schedule(fn, name="shifted_cosine")


def linear_log_snr_schedule(*, log_snr_min: float = -10.0,
                            log_snr_max: float = 10.0) -> ContinuousSchedule:
  """Variance-preserving schedule linear in log-SNR, :func:`linear_log_snr`."""
  fn = functools.partial(linear_log_snr, log_snr_min=log_snr_min, log_snr_max=log_snr_max)
  return log_snr_schedule(fn, name="linear_log_snr")


def edm_schedule(*, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> ContinuousSchedule:
  """EDM's variance-exploding schedule, :func:`edm_sigma` (``alpha = 1``)."""
  fn = functools.partial(edm_sigma, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  return ContinuousSchedule("edm", functools.partial(_ve_from_sigma, fn))


def sigmoid_schedule(*, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                     clip_min: float = 1e-9) -> ContinuousSchedule:
  """Chen's (2023) sigmoid schedule, :func:`sigmoid_log_alpha_sigma`."""
  return ContinuousSchedule("sigmoid", functools.partial(
      sigmoid_log_alpha_sigma, start=start, end=end, tau=tau, clip_min=clip_min))


CONTINUOUS_SCHEDULES: dict[str, Callable[..., ContinuousSchedule]] = {
    "vp": vp_schedule,
    "ve": ve_schedule,
    "cosine": cosine_schedule,
    "shifted_cosine": shifted_cosine_schedule,
    "linear_log_snr": linear_log_snr_schedule,
    "edm": edm_schedule,
    "sigmoid": sigmoid_schedule,
}


def get_continuous_schedule(name: str, **kwargs) -> ContinuousSchedule:
  """Resolves a continuous schedule by name (at the edge, once); ``kwargs`` go to its factory."""
  if name not in CONTINUOUS_SCHEDULES:
    raise ValueError(f"unknown continuous schedule {name!r}; choose one of "
                     f"{sorted(CONTINUOUS_SCHEDULES)}")
  return CONTINUOUS_SCHEDULES[name](**kwargs)
