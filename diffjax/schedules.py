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
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.shapes import as_floating, in_compute_dtype

__all__ = [
  "DiscreteSchedule",
  "discrete_schedule",
  "linear_betas",
  "scaled_linear_betas",
  "cosine_betas",
  "sigmoid_betas",
  "geodiff_sigmoid_betas",
  "rescale_zero_terminal_snr",
  "log_alpha_sigma_from_log_snr",
  "alpha_sigma_from_log_snr",
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


def _require(ok: bool, message: str) -> None:
  """Raises a user-facing ValueError before anything is traced."""
  if not ok:
    raise ValueError(message)


# --------------------------------------------------------------------------------------------
# Variance preserving coefficients from the log-SNR (both families).
# --------------------------------------------------------------------------------------------


def log_alpha_sigma_from_log_snr(log_snr: Array) -> tuple[Array, Array]:
  """``log alpha = 1/2 log sigmoid(lambda)``, ``log sigma = 1/2 log sigmoid(-lambda)``: the
  variance-preserving marginal with ``alpha^2 + sigma^2 = 1`` and ``lambda = log(alpha^2 /
  sigma^2)`` (Kingma et al. 2021, VDM, eq. 4, https://arxiv.org/abs/2107.00630).

  ``log_sigmoid`` keeps both logs exact for any ``lambda``: ``1 - sigmoid(lambda)`` rounds to 0 in
  float32 from ``lambda = 17`` on, and ``log sigmoid`` stays finite where ``sigmoid`` underflows.
  ``lambda = -inf`` (a zero-terminal-SNR step) gives ``(-inf, 0)``, ``lambda = +inf`` ``(0, -inf)``.
  """
  return 0.5 * jax.nn.log_sigmoid(log_snr), 0.5 * jax.nn.log_sigmoid(-log_snr)


def alpha_sigma_from_log_snr(log_snr: Array) -> tuple[Array, Array]:
  """``alpha = sqrt(sigmoid(lambda))``, ``sigma = sqrt(sigmoid(-lambda))``, elementwise.

  The exponentials of :func:`log_alpha_sigma_from_log_snr`, so ``sigma = sqrt(1 - abar)`` keeps its
  precision where ``abar = sigmoid(lambda)`` is close to 1 (Ho et al. 2020's ``sqrt(1 - abar_t)``,
  https://arxiv.org/abs/2006.11239, for a discrete schedule's ``log_snr``). ``lambda = -inf``
  gives ``(0, 1)``. Computed in at least float32, returned in ``log_snr``'s floating dtype.
  """
  log_snr = as_floating(log_snr)
  log_alpha, log_sigma = log_alpha_sigma_from_log_snr(in_compute_dtype(log_snr))
  return jnp.exp(log_alpha).astype(log_snr.dtype), jnp.exp(log_sigma).astype(log_snr.dtype)


# --------------------------------------------------------------------------------------------
# Discrete schedules (DDPM time: step 0 is the first step away from data).
# --------------------------------------------------------------------------------------------


class DiscreteSchedule(NamedTuple):
  """A discrete DDPM schedule of ``T`` steps; every field has shape ``[T]`` (or ``[..., T]``).

  A NamedTuple of arrays is a pytree, so a schedule is an ordinary argument of ``jax.jit`` and
  can be stacked and ``jax.vmap``-ed over.

  Attributes:
    betas: ``beta_i``, the variance of the noise added at step ``i``.
    alphas: ``alpha_i = 1 - beta_i``.
    alpha_bars: ``abar_i = prod_{j <= i} alpha_j``, so ``q(x_i | x_0) = N(sqrt(abar_i) x_0,
      (1 - abar_i) I)`` (Ho et al. 2020, eq. 4, https://arxiv.org/abs/2006.11239).
    log_snr: ``log(abar_i / (1 - abar_i))``; ``-inf`` at a zero-terminal-SNR final step.
  """

  betas: Array
  alphas: Array
  alpha_bars: Array
  log_snr: Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[-1]


def discrete_schedule(betas: Array) -> DiscreteSchedule:
  """Builds a :class:`DiscreteSchedule` from its betas (Ho et al. 2020, eq. 4).

  ``log abar_i = sum_{j <= i} log1p(-beta_j)`` (a sum of logs instead of a product, so 1000
  factors close to one lose no precision), and
  ``log_snr_i = log abar_i - log(1 - abar_i)`` with ``1 - abar_i = -expm1(log abar_i)``.
  Computed in at least float32 and returned in the dtype of ``betas``.

  Args:
    betas: ``[..., T]`` variances in ``(0, 1]``; leading axes are independent schedules.
  """
  betas = as_floating(betas)
  # A bfloat16 cumulative sum over 1000 steps would keep ~3 significant digits.
  work = in_compute_dtype(betas)
  log_alpha_bars = jnp.cumsum(jnp.log1p(-work), axis=-1)
  alpha_bars = jnp.exp(log_alpha_bars)
  log_snr = log_alpha_bars - jnp.log(-jnp.expm1(log_alpha_bars))
  cast = lambda x: x.astype(betas.dtype)
  return DiscreteSchedule(
    betas=betas, alphas=cast(1.0 - work), alpha_bars=cast(alpha_bars), log_snr=cast(log_snr)
  )


def _check_steps(num_steps: int) -> None:
  _require(
    isinstance(num_steps, numbers.Integral) and num_steps >= 1,
    f"num_steps must be a positive integer, got {num_steps!r}",
  )


def _check_beta_range(beta_start: float, beta_end: float) -> None:
  _require(
    0.0 < beta_start <= beta_end <= 1.0,
    f"betas must satisfy 0 < beta_start <= beta_end <= 1, got beta_start={beta_start}, "
    f"beta_end={beta_end}",
  )


def linear_betas(
  *, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Array:
  """DDPM's linear schedule: ``beta_i = beta_start + i / (T - 1) (beta_end - beta_start)``.

  Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", Sec. 4,
  https://arxiv.org/abs/2006.11239 (defaults 1e-4 to 0.02 for T = 1000).
  """
  _check_steps(num_steps)
  _check_beta_range(beta_start, beta_end)
  return jnp.linspace(beta_start, beta_end, num_steps, dtype=jnp.float32)


def scaled_linear_betas(
  *, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Array:
  """Stable Diffusion's "scaled linear" schedule: linear in ``sqrt(beta)``.

  ``beta_i = (sqrt(beta_start) + i / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2``;
  Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models",
  https://arxiv.org/abs/2112.10752 (the released configs, 0.00085 to 0.012; the name follows
  diffusers).
  """
  _check_steps(num_steps)
  _check_beta_range(beta_start, beta_end)
  return jnp.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=jnp.float32) ** 2


def cosine_betas(*, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Array:
  """Nichol & Dhariwal's cosine schedule.

  ``abar(t) = f(t) / f(0)`` with ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)`` and
  ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``; the clip (0.999) keeps the last step
  away from ``beta = 1``. Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic
  Models", eq. 17, https://arxiv.org/abs/2102.09672.

  Evaluated as ``beta_i = sin(c_i + c_{i+1}) sin(c_i - c_{i+1}) / sin^2(c_i)`` with
  ``c_i = (T - i) / (T (1 + s)) * pi / 2`` (``cos^2 a - cos^2 b = sin(a + b) sin(b - a)``):
  ``1 - ratio`` in float32 would lose three digits on the first betas (~4e-5).
  """
  _check_steps(num_steps)
  _require(s >= 0.0, f"cosine schedule offset s must be >= 0, got s={s}")
  _require(0.0 < max_beta <= 1.0, f"max_beta must be in (0, 1], got max_beta={max_beta}")
  index = jnp.arange(num_steps, dtype=jnp.float32)
  scale = math.pi / (2.0 * num_steps * (1.0 + s))  # c_i = (T - i) scale, c_i - c_{i+1} = scale
  # sin(c_i + c_{i+1}) = sin(pi - c_i - c_{i+1}); both angles are formed from exact integers
  # ((2T - 2i - 1) and (2i + 1 + 2Ts)) and the smaller is used, so neither is a cancellation.
  angle_sum = (
    jnp.minimum(2.0 * (num_steps - index) - 1.0, 2.0 * index + 1.0 + 2.0 * num_steps * s) * scale
  )
  betas = jnp.sin(angle_sum) * math.sin(scale) / jnp.sin((num_steps - index) * scale) ** 2
  return jnp.minimum(betas, max_beta)


def _check_sigmoid(start: float, end: float, tau: float) -> None:
  _require(
    start < end and tau > 0.0,
    f"Chen's sigmoid schedule needs start < end and tau > 0, got start={start}, "
    f"end={end}, tau={tau}",
  )


def sigmoid_betas(
  *,
  num_steps: int = 1000,
  start: float = -3.0,
  end: float = 3.0,
  tau: float = 1.0,
  max_beta: float = 0.999,
) -> Array:
  """Chen's sigmoid schedule, discretised: ``beta_i = min(1 - gamma((i+1)/T) / gamma(i/T),
  max_beta)``.

  ``gamma(t) = (sigmoid(end / tau) - sigmoid(u(t))) / (sigmoid(end / tau) - sigmoid(start /
  tau))`` with ``u(t) = (t (end - start) + start) / tau`` is :func:`sigmoid_log_alpha_sigma`'s
  ``abar``. Chen (2023), "On the Importance of Noise Scheduling for Diffusion Models",
  Algorithm 1, https://arxiv.org/abs/2301.10972. Not GeoDiff's sigmoid
  (see :func:`geodiff_sigmoid_betas`).

  Evaluated as ``beta_i = sigmoid(u_{i+1}) / sigmoid(u_end) * expm1(u_i - u_{i+1}) /
  expm1(u_i - u_end)`` (from ``sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a-b))``),
  which has no cancellation for small betas.
  """
  _check_steps(num_steps)
  _check_sigmoid(start, end, tau)
  _require(0.0 < max_beta <= 1.0, f"max_beta must be in (0, 1], got max_beta={max_beta}")
  width = (end - start) / tau
  index = jnp.arange(num_steps, dtype=jnp.float32)
  u_next = ((index + 1.0) / num_steps * (end - start) + start) / tau
  to_end = -(num_steps - index) / num_steps * width  # u_i - u_end from exact integers
  betas = (
    jax.nn.sigmoid(u_next)
    / jax.nn.sigmoid(end / tau)
    * math.expm1(-width / num_steps)
    / jnp.expm1(to_end)
  )
  return jnp.minimum(betas, max_beta)


def geodiff_sigmoid_betas(
  *, num_steps: int = 1000, beta_start: float = 1e-7, beta_end: float = 2e-3
) -> Array:
  """GeoDiff's "sigmoid" betas: ``beta_i = sigmoid(linspace(-6, 6, T))_i (end - start) + start``.

  Xu et al. (2022), "GeoDiff", https://arxiv.org/abs/2203.02923 (their released code). A
  squashed ramp of *betas*, unrelated to Chen's sigmoid schedule of ``abar``.
  """
  _check_steps(num_steps)
  _check_beta_range(beta_start, beta_end)
  ramp = jax.nn.sigmoid(jnp.linspace(-6.0, 6.0, num_steps, dtype=jnp.float32))
  return ramp * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: Array) -> Array:
  """Rescales betas so the final step has zero SNR (Lin et al. 2024, Algorithm 1).

  With ``r_i = sqrt(abar_i)``: ``r'_i = (r_i - r_{T-1}) r_0 / (r_0 - r_{T-1})`` keeps the first
  step and sends the last to zero; then ``abar'_i = r'^2_i``, ``alpha'_i = abar'_i / abar'_{i-1}``
  (``alpha'_0 = abar'_0``) and ``beta'_i = 1 - alpha'_i`` (so ``beta'_{T-1} = 1``). Lin et al.,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed",
  https://arxiv.org/abs/2305.08891.

  Evaluated without cancellation (the literal ``1 - abar'_i / abar'_{i-1}`` loses three digits
  of the ~1e-4 first betas in float32): with the positive gaps ``D_i = r'_{i-1} - r'_i =
  k r_{i-1} beta_i / (1 + sqrt(1 - beta_i))``, ``k = r_0 / (r_0 - r_{T-1})``,
  ``r'_i = sum_{j > i} D_j`` and ``beta'_i = D_i (r'_{i-1} + r'_i) / r'^2_{i-1}``; ``beta'_0 =
  beta_0`` because ``r'_0 = r_0``.

  Args:
    betas: ``[..., T]``; leading axes are independent schedules.
  """
  betas = jnp.asarray(betas)
  roots = jnp.exp(0.5 * jnp.cumsum(jnp.log1p(-betas), axis=-1))  # r_i
  gaps = roots[..., :-1] * betas[..., 1:] / (1.0 + jnp.sqrt(1.0 - betas[..., 1:]))  # r_{i-1} - r_i
  gaps = gaps * roots[..., :1] / jnp.sum(gaps, axis=-1, keepdims=True)  # D_i = k (r_{i-1} - r_i)
  # r'_{i-1} = sum_{j >= i} D_j for i = 1 .. T-1; r'_{T-1} = 0.
  roots_prev = jnp.flip(jnp.cumsum(jnp.flip(gaps, axis=-1), axis=-1), axis=-1)
  roots_new = jnp.concatenate([roots_prev[..., 1:], jnp.zeros_like(roots_prev[..., :1])], axis=-1)
  rescaled = gaps * (roots_prev + roots_new) / roots_prev**2
  return jnp.concatenate([betas[..., :1], rescaled], axis=-1)


DISCRETE_SCHEDULES: dict[str, Callable[..., Array]] = {
  "linear": linear_betas,
  "scaled_linear": scaled_linear_betas,
  "cosine": cosine_betas,
  "sigmoid": sigmoid_betas,
  "geodiff_sigmoid": geodiff_sigmoid_betas,
}


def get_discrete_schedule(
  name: str, *, zero_terminal_snr: bool = False, **kwargs
) -> DiscreteSchedule:
  """Resolves a discrete schedule by name (at the edge, once) and builds it.

  Args:
    name: one of ``DISCRETE_SCHEDULES`` ("linear", "scaled_linear", "cosine", "sigmoid" (Chen),
      "geodiff_sigmoid").
    zero_terminal_snr: apply :func:`rescale_zero_terminal_snr` to the betas.
    **kwargs: keyword arguments of the beta function (``num_steps``, ``beta_start``, ...).
  """
  betas = lookup(DISCRETE_SCHEDULES, name, "discrete schedule")(**kwargs)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return discrete_schedule(betas)


# --------------------------------------------------------------------------------------------
# Continuous schedules (diffusion time: t = 0 data, t = 1 noise).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Bound:
  """``functools.partial`` with value equality: two schedules built from equal settings compare
  and hash equal, so ``jax.jit`` with a schedule as a static argument compiles once."""

  fn: Callable[..., Any]
  kwargs: tuple[tuple[str, Any], ...]

  def __call__(self, t):
    return self.fn(t, **dict(self.kwargs))


def _bind(fn: Callable[..., Any], **kwargs) -> _Bound:
  return _Bound(fn, tuple(sorted(kwargs.items())))


@dataclasses.dataclass(frozen=True)
class ContinuousSchedule:
  """A continuous-time schedule: ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``, t in [0, 1].

  Wraps one pure function ``log_alpha_sigma(t) -> (log alpha(t), log sigma(t))``; working in logs
  keeps ``log_snr = 2 (log alpha - log sigma)`` finite where ``alpha`` or ``sigma`` underflow.
  Frozen and hashable (schedules from the factories with equal settings are equal), so it can be
  a static argument of ``jax.jit``. All methods are elementwise in ``t`` (any shape), compute in
  at least float32, return ``t``'s floating dtype, and are safe under ``jit``, ``vmap`` and
  ``grad``. Where ``sigma(t) = 0`` (``t = 0`` for VP and Chen's sigmoid) ``d sigma / dt`` is
  infinite and comes back as nan: sample ``t`` in ``[t_min, 1]`` there.

  Attributes:
    name: a label for logs and plots.
    log_alpha_sigma: the pure function defining the schedule.
  """

  name: str
  log_alpha_sigma: Callable[[Array], tuple[Array, Array]]

  def _eval(self, fn, t):
    # In at least float32 (``expm1`` near zero), returned in the caller's floating dtype.
    t = as_floating(t)
    out = fn(in_compute_dtype(t))
    return jax.tree.map(lambda x: x.astype(t.dtype), out)

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    """``(alpha(t), sigma(t)) = (exp(log alpha(t)), exp(log sigma(t)))``."""
    return self._eval(lambda u: tuple(jnp.exp(v) for v in self.log_alpha_sigma(u)), t)

  def alpha(self, t) -> Array:
    """``alpha(t)``, the signal scale."""
    return self.alpha_sigma(t)[0]

  def sigma(self, t) -> Array:
    """``sigma(t)``, the noise scale."""
    return self.alpha_sigma(t)[1]

  def log_snr(self, t) -> Array:
    """``lambda(t) = log(alpha^2 / sigma^2) = 2 (log alpha - log sigma)``, decreasing in t."""

    def fn(u):
      log_alpha, log_sigma = self.log_alpha_sigma(u)
      return 2.0 * (log_alpha - log_sigma)

    return self._eval(fn, t)

  def alpha_sigma_and_derivatives(self, t) -> tuple[Array, Array, Array, Array]:
    """``(alpha, sigma, d alpha / dt, d sigma / dt)`` with derivatives by ``jax.jvp`` (forward
    mode, one pass, elementwise in ``t``)."""

    def fn(u):
      primal = lambda v: tuple(jnp.exp(w) for w in self.log_alpha_sigma(v))
      (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(primal, (u,), (jnp.ones_like(u),))
      return alpha, sigma, d_alpha, d_sigma

    return self._eval(fn, t)

  def d_log_snr(self, t) -> Array:
    """``d lambda / dt`` by ``jax.jvp`` (negative for every schedule here); the weight of VDM's
    continuous-time loss (Kingma et al. 2021, https://arxiv.org/abs/2107.00630)."""

    def fn(u):
      def log_snr(v):
        log_alpha, log_sigma = self.log_alpha_sigma(v)
        return 2.0 * (log_alpha - log_sigma)

      return jax.jvp(log_snr, (u,), (jnp.ones_like(u),))[1]

    return self._eval(fn, t)


def vp_log_alpha_sigma(
  t: Array, *, beta_min: float = 0.1, beta_max: float = 20.0
) -> tuple[Array, Array]:
  """VP SDE: ``log alpha(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min``,
  ``sigma(t) = sqrt(1 - alpha(t)^2)``.

  ``alpha(t) = exp(-1/2 int_0^t beta(s) ds)`` with ``beta(s) = beta_min + s (beta_max -
  beta_min)``; Song et al. (2021), "Score-Based Generative Modeling through SDEs", eq. 29 and
  App. B, https://arxiv.org/abs/2011.13456. ``log sigma = 1/2 log(-expm1(2 log alpha))`` stays
  accurate as ``t -> 0``.
  """
  log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
  return log_alpha, 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def ve_log_alpha_sigma(
  t: Array, *, sigma_min: float = 0.01, sigma_max: float = 50.0
) -> tuple[Array, Array]:
  """VE SDE: ``alpha(t) = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

  Song et al. (2021), eq. 31, https://arxiv.org/abs/2011.13456 (the marginal std; the SDE's
  perturbation kernel omits ``sigma_min`` at ``t = 0``, a difference of 1e-2 we do not model).
  """
  log_sigma = math.log(sigma_min) + t * math.log(sigma_max / sigma_min)
  return jnp.zeros_like(t), log_sigma


def cosine_log_snr(t: Array, *, log_snr_min: float = -15.0, log_snr_max: float = 15.0) -> Array:
  """Cosine schedule in log-SNR: ``lambda(t) = -2 log tan(t_min + t (t_max - t_min))``.

  With ``t_min = atan(exp(-lambda_max / 2))`` and ``t_max = atan(exp(-lambda_min / 2))`` the
  range is clipped to ``[lambda_min, lambda_max]``. For an unclipped range (``lambda_min = -inf``,
  ``lambda_max = inf``) this is exactly ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``
  (Nichol & Dhariwal 2021 with s = 0, https://arxiv.org/abs/2102.09672).
  Hoogeboom et al. (2023), "simple diffusion", Sec. 3, https://arxiv.org/abs/2301.11093.
  """
  t_min = math.atan(math.exp(-0.5 * log_snr_max))
  t_max = math.atan(math.exp(-0.5 * log_snr_min))
  return -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))


def shifted_cosine_log_snr(
  t: Array,
  *,
  resolution: int = 64,
  base_resolution: int = 64,
  log_snr_min: float = -15.0,
  log_snr_max: float = 15.0,
) -> Array:
  """Resolution-shifted cosine: ``lambda(t) = lambda_cosine(t) + 2 log(base / resolution)``.

  Larger images keep more signal at equal noise, so the SNR is divided by
  ``(resolution / base)^2``. Hoogeboom et al. (2023), "simple diffusion: End-to-end diffusion for
  high resolution images", the shifted schedule, https://arxiv.org/abs/2301.11093.
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


def edm_sigma(
  t: Array, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Array:
  """EDM's noise levels as a function of time: ``sigma(t) = (sigma_min^(1/rho) + t
  (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, ``alpha = 1``.

  Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models",
  eq. 5 (with t running from data to noise), https://arxiv.org/abs/2206.00364.
  """
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + t * (hi - lo)) ** rho


def sigmoid_log_alpha_sigma(
  t: Array, *, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-9
) -> tuple[Array, Array]:
  """Chen's sigmoid schedule: ``abar(t) = gamma(t)`` clipped to ``[clip_min, 1]``,
  ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)`` (variance preserving).

  ``gamma(t) = (sigmoid(e) - sigmoid(u)) / (sigmoid(e) - sigmoid(b))`` with ``u = (t (end -
  start) + start) / tau``, ``b = start / tau``, ``e = end / tau``; Chen (2023), "On the Importance
  of Noise Scheduling for Diffusion Models", Algorithm 1, https://arxiv.org/abs/2301.10972.

  Both ``abar`` and ``1 - abar`` are evaluated in logs as products, from
  ``sigmoid(y) - sigmoid(x) = sigmoid(y) sigmoid(-x) (-expm1(x - y))``, so neither loses digits
  at the ends of the range: ``log abar = log sigmoid(e) + log sigmoid(-u) + log(-expm1(u - e)) -
  log D`` and ``log(1 - abar) = log sigmoid(u) + log sigmoid(-b) + log(-expm1(b - u)) - log D``.
  """
  width = (end - start) / tau
  u = (t * (end - start) + start) / tau
  b, e = start / tau, end / tau
  log_norm = jax.nn.log_sigmoid(e) + jax.nn.log_sigmoid(-b) + math.log(-math.expm1(-width))
  # u - e = (t - 1) width and b - u = -t width, written so they are exactly 0 at t = 1 and t = 0.
  # The floor keeps d/dt finite at t = 1, where clip_min takes over (log(tiny) < log(clip_min)).
  tiny = jnp.finfo(t.dtype).tiny
  log_abar = (
    jax.nn.log_sigmoid(e)
    + jax.nn.log_sigmoid(-u)
    + jnp.log(jnp.maximum(-jnp.expm1((t - 1.0) * width), tiny))
    - log_norm
  )
  log_one_minus = (
    jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-b) + jnp.log(-jnp.expm1(-t * width)) - log_norm
  )
  log_abar = jnp.maximum(log_abar, math.log(clip_min))
  log_one_minus = jnp.minimum(log_one_minus, math.log1p(-clip_min))
  return 0.5 * log_abar, 0.5 * log_one_minus


def _log_alpha_sigma_of_log_snr_fn(t, *, log_snr_fn):
  return log_alpha_sigma_from_log_snr(log_snr_fn(t))


def _ve_from_sigma(t, *, sigma_fn):
  return jnp.zeros_like(t), jnp.log(sigma_fn(t))


def log_snr_schedule(
  log_snr_fn: Callable[[Array], Array], name: str = "log_snr"
) -> ContinuousSchedule:
  """The general variance-preserving family given by its log-SNR: ``alpha^2 = sigmoid(lambda(t))``,
  ``sigma^2 = sigmoid(-lambda(t))`` (Kingma et al. 2021, VDM, eq. 4,
  https://arxiv.org/abs/2107.00630; Kingma & Gao 2023, https://arxiv.org/abs/2303.00848).

  Args:
    log_snr_fn: a pure, decreasing function ``t -> lambda(t)``; use a module-level function or a
      ``functools.partial`` of one so the schedule stays hashable for ``jit``.
    name: a label for logs.
  """
  _require(
    callable(log_snr_fn), f"log_snr_fn must be a function t -> lambda(t), got {log_snr_fn!r}"
  )
  return ContinuousSchedule(name, _bind(_log_alpha_sigma_of_log_snr_fn, log_snr_fn=log_snr_fn))


def vp_schedule(*, beta_min: float = 0.1, beta_max: float = 20.0) -> ContinuousSchedule:
  """The VP SDE schedule, :func:`vp_log_alpha_sigma` (Song et al. 2021)."""
  _require(
    0.0 <= beta_min <= beta_max and beta_max > 0.0,
    f"vp schedule needs 0 <= beta_min <= beta_max and beta_max > 0, got "
    f"beta_min={beta_min}, beta_max={beta_max}",
  )
  return ContinuousSchedule("vp", _bind(vp_log_alpha_sigma, beta_min=beta_min, beta_max=beta_max))


def _check_sigma_range(kind: str, sigma_min: float, sigma_max: float) -> None:
  _require(
    0.0 < sigma_min < sigma_max,
    f"{kind} schedule needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
    f"sigma_max={sigma_max}",
  )


def ve_schedule(*, sigma_min: float = 0.01, sigma_max: float = 50.0) -> ContinuousSchedule:
  """The VE SDE schedule, :func:`ve_log_alpha_sigma` (Song et al. 2021)."""
  _check_sigma_range("ve", sigma_min, sigma_max)
  return ContinuousSchedule(
    "ve", _bind(ve_log_alpha_sigma, sigma_min=sigma_min, sigma_max=sigma_max)
  )


def _check_log_snr_range(log_snr_min: float, log_snr_max: float) -> None:
  _require(
    log_snr_min < log_snr_max,
    f"log-SNR range needs log_snr_min < log_snr_max, got log_snr_min={log_snr_min}, "
    f"log_snr_max={log_snr_max}",
  )


def cosine_schedule(*, log_snr_min: float = -15.0, log_snr_max: float = 15.0) -> ContinuousSchedule:
  """Variance-preserving cosine schedule, :func:`cosine_log_snr` (Hoogeboom et al. 2023)."""
  _check_log_snr_range(log_snr_min, log_snr_max)
  fn = _bind(cosine_log_snr, log_snr_min=log_snr_min, log_snr_max=log_snr_max)
  return log_snr_schedule(fn, name="cosine")


def shifted_cosine_schedule(
  *,
  resolution: int = 64,
  base_resolution: int = 64,
  log_snr_min: float = -15.0,
  log_snr_max: float = 15.0,
) -> ContinuousSchedule:
  """Variance-preserving shifted cosine schedule, :func:`shifted_cosine_log_snr` (Hoogeboom et
  al. 2023)."""
  _require(
    resolution > 0 and base_resolution > 0,
    f"shifted cosine needs positive resolutions, got resolution={resolution}, "
    f"base_resolution={base_resolution}",
  )
  _check_log_snr_range(log_snr_min, log_snr_max)
  fn = _bind(
    shifted_cosine_log_snr,
    resolution=resolution,
    base_resolution=base_resolution,
    log_snr_min=log_snr_min,
    log_snr_max=log_snr_max,
  )
  return log_snr_schedule(fn, name="shifted_cosine")


def linear_log_snr_schedule(
  *, log_snr_min: float = -10.0, log_snr_max: float = 10.0
) -> ContinuousSchedule:
  """Variance-preserving schedule linear in log-SNR, :func:`linear_log_snr` (Kingma et al.
  2021)."""
  _check_log_snr_range(log_snr_min, log_snr_max)
  fn = _bind(linear_log_snr, log_snr_min=log_snr_min, log_snr_max=log_snr_max)
  return log_snr_schedule(fn, name="linear_log_snr")


def edm_schedule(
  *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> ContinuousSchedule:
  """EDM's variance-exploding schedule, :func:`edm_sigma` (``alpha = 1``; Karras et al. 2022)."""
  _check_sigma_range("edm", sigma_min, sigma_max)
  _require(rho > 0.0, f"edm schedule needs rho > 0, got rho={rho}")
  fn = _bind(edm_sigma, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  return ContinuousSchedule("edm", _bind(_ve_from_sigma, sigma_fn=fn))


def sigmoid_schedule(
  *, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-9
) -> ContinuousSchedule:
  """Chen's (2023) sigmoid schedule, :func:`sigmoid_log_alpha_sigma`."""
  _check_sigmoid(start, end, tau)
  _require(0.0 < clip_min < 1.0, f"clip_min must be in (0, 1), got clip_min={clip_min}")
  return ContinuousSchedule(
    "sigmoid", _bind(sigmoid_log_alpha_sigma, start=start, end=end, tau=tau, clip_min=clip_min)
  )


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
  """Resolves a continuous schedule by name (at the edge, once); ``kwargs`` go to its factory.

  Args:
    name: one of ``CONTINUOUS_SCHEDULES`` ("vp", "ve", "cosine", "shifted_cosine",
      "linear_log_snr", "edm", "sigmoid" (Chen)). For any other log-SNR curve, call
      :func:`log_snr_schedule` with the function.
  """
  return lookup(CONTINUOUS_SCHEDULES, name, "continuous schedule")(**kwargs)
