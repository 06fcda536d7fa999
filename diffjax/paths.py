"""Probability paths for flow matching, all in one representation.

Flow-matching time runs from the source (``t = 0``, usually noise) to the data (``t = 1``), the
reverse of diffusion time (:mod:`diffjax.schedules`). Every path here is

    x_t = alpha_t x1 + sigma_t x0 + gamma_t z,        z ~ N(0, I) independent of (x0, x1),

with ``x0`` the source sample, ``x1`` the data sample and ``gamma_t z`` optional extra noise. The
conditional target, the velocity of this sample path for fixed ``(x0, x1, z)``, is

    u_t(x0, x1, z) = d_alpha_t x1 + d_sigma_t x0 + d_gamma_t z,

with the time derivatives taken by ``jax.jvp`` of the coefficient function, never by hand. A
:class:`Path` holds one pure function ``t -> (alpha_t, sigma_t, gamma_t)``; it is a frozen,
hashable dataclass, so it can be a static argument of ``jax.jit``. Names are resolved to paths
once, at the edge, by :func:`get_path`.

References: Lipman et al. (2023), "Flow Matching for Generative Modeling",
https://arxiv.org/abs/2210.02747; Tong et al. (2024), "Improving and generalizing flow-based
generative models with minibatch optimal transport", https://arxiv.org/abs/2302.00482.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.parameterization import Coefficients, flow_coefficients
from diffjax.schedules import ContinuousSchedule, cosine_schedule, vp_schedule
from diffjax.shapes import broadcast_to_data, in_compute_dtype

__all__ = [
  "PathCoefficients",
  "Path",
  "linear_coefficients",
  "icfm_coefficients",
  "brownian_bridge_coefficients",
  "schedule_coefficients",
  "linear_path",
  "icfm_path",
  "brownian_bridge_path",
  "schedule_path",
  "vp_path",
  "cosine_path",
  "PATHS",
  "get_path",
]


class PathCoefficients(NamedTuple):
  """``alpha, sigma, gamma`` of ``x_t = alpha x1 + sigma x0 + gamma z`` and their ``d/dt``."""

  alpha: Array
  sigma: Array
  gamma: Array
  d_alpha: Array
  d_sigma: Array
  d_gamma: Array


@dataclasses.dataclass(frozen=True)
class Path:
  """A probability path ``x_t = alpha_t x1 + sigma_t x0 + gamma_t z`` (``t = 0`` source, 1 data).

  Attributes:
    name: a label for logs and plots.
    coefficient_fn: pure, elementwise ``t -> (alpha_t, sigma_t, gamma_t)``. Use a module-level
      function or a ``functools.partial`` of one, so the path stays hashable.
    stochastic: whether ``gamma`` is not identically zero; then every method needs ``z``.
    derivative_range: derivatives are evaluated at ``clip(t, *derivative_range)``. Paths whose
      coefficients have a square-root singularity at an end (the Brownian bridge at both, a VP
      schedule at the data end) narrow it so targets stay finite; values are always taken at
      ``t``.
  """

  name: str
  coefficient_fn: Callable[[Array], tuple[Array, Array, Array]]
  stochastic: bool = False
  derivative_range: tuple[float, float] = (0.0, 1.0)

  def coefficients(self, t) -> tuple[Array, Array, Array]:
    """``(alpha_t, sigma_t, gamma_t)``, each of the shape of ``t``."""
    # In at least float32, and returned so: bfloat16 times would round t (1 - t) badly.
    return tuple(self.coefficient_fn(in_compute_dtype(t)))

  def coefficients_and_derivatives(self, t) -> PathCoefficients:
    """Coefficients and their time derivatives (``jax.jvp`` of ``coefficient_fn``).

    The derivatives are taken at ``clip(t, *derivative_range)``.
    """
    t = in_compute_dtype(t)
    values = self.coefficient_fn(t)
    t_safe = jnp.clip(t, *self.derivative_range)
    _, derivatives = jax.jvp(self.coefficient_fn, (t_safe,), (jnp.ones_like(t_safe),))
    return PathCoefficients(*values, *derivatives)

  def _check_inputs(self, x0, x1, t, z):
    """Static shape checks, before any broadcasting could hide a mistake."""
    if self.stochastic and z is None:
      raise ValueError(
        f"path {self.name!r} adds noise gamma_t z: pass z (a standard normal "
        f"array of the shape of x0), e.g. z=jax.random.normal(key, x0.shape)"
      )
    shapes = {"x0": jnp.shape(x0), "x1": jnp.shape(x1)}
    if z is not None:
      shapes["z"] = jnp.shape(z)
    if len(set(shapes.values())) > 1:
      raise ValueError(f"x0, x1 (and z) must have one shape [batch, ...]; got {shapes}")
    t_shape = jnp.shape(t)
    if t_shape and t_shape != shapes["x0"][:1]:
      raise ValueError(
        f"t of shape {t_shape} must be a scalar or have shape [batch] = "
        f"{shapes['x0'][:1]}, one time per example"
      )

  def _combine(self, a: Array, b: Array, c: Array, *, x0: Array, x1: Array, z) -> Array:
    out = broadcast_to_data(a, x1) * x1 + broadcast_to_data(b, x0) * x0
    if z is not None:
      out = out + broadcast_to_data(c, z) * z
    return out

  def sample_xt(self, *, x0: Array, x1: Array, t: Array, z: Array | None = None) -> Array:
    """``x_t = alpha_t x1 + sigma_t x0 + gamma_t z``.

    Args:
      x0: ``[batch, ...]`` source samples (noise for Gaussian-source paths).
      x1: ``[batch, ...]`` data samples.
      t: ``[batch]`` flow times in ``[0, 1]``.
      z: ``[batch, ...]`` standard normal noise; required when ``stochastic``.
    """
    self._check_inputs(x0, x1, t, z)
    alpha, sigma, gamma = self.coefficients(t)
    return self._combine(alpha, sigma, gamma, x0=x0, x1=x1, z=z)

  def conditional_target(self, *, x0: Array, x1: Array, t: Array, z: Array | None = None) -> Array:
    """``u_t = d_alpha_t x1 + d_sigma_t x0 + d_gamma_t z``, the velocity ``d x_t / dt`` at fixed
    ``(x0, x1, z)`` (Lipman et al. 2023, eq. 21; Tong et al. 2024, eq. 14). Same arguments as
    :meth:`sample_xt`."""
    self._check_inputs(x0, x1, t, z)
    c = self.coefficients_and_derivatives(t)
    return self._combine(c.d_alpha, c.d_sigma, c.d_gamma, x0=x0, x1=x1, z=z)

  def interpolate(
    self, *, x0: Array, x1: Array, t: Array, z: Array | None = None
  ) -> dict[str, Array]:
    """``{"t": t, "x_t": x_t, "target": u_t}`` from one evaluation of the coefficients (the
    dictionary of ott-jax's ``flow_matching.interpolate_samples``). Same arguments as
    :meth:`sample_xt`."""
    self._check_inputs(x0, x1, t, z)
    c = self.coefficients_and_derivatives(t)
    return {
      "t": t,
      "x_t": self._combine(c.alpha, c.sigma, c.gamma, x0=x0, x1=x1, z=z),
      "target": self._combine(c.d_alpha, c.d_sigma, c.d_gamma, x0=x0, x1=x1, z=z),
    }

  def gaussian_coefficients(self, t) -> Coefficients:
    """The Gaussian kernel ``p_t(x | x1) = N(alpha_t x1, s_t^2 I)`` of this path when
    ``x0 ~ N(0, I)`` is drawn independently of ``x1``, as :class:`Coefficients`.

    ``s_t = sqrt(sigma_t^2 + gamma_t^2)`` and ``d s_t / dt = (sigma d_sigma + gamma d_gamma) /
    s_t``: ``sigma_t x0 + gamma_t z`` is one Gaussian of variance ``s_t^2``. With ``gamma = 0``
    this is exactly ``Coefficients(alpha, sigma, d_alpha, d_sigma)``. Because
    ``E[d_sigma x0 + d_gamma z | x_t, x1] = (d_s / s)(x_t - alpha x1)``, the marginal velocity
    of the path is the velocity of this Gaussian path, so samplers convert a learned velocity
    into data / noise predictions with these coefficients and
    :mod:`diffjax.parameterization` ("x0" there is the data ``x1``, "eps" the unit noise).
    Not valid under a non-independent (e.g. OT) coupling.
    """
    c = self.coefficients_and_derivatives(t)
    s = jnp.sqrt(c.sigma**2 + c.gamma**2)
    positive = s > 0
    safe_s = jnp.where(positive, s, 1.0)
    # At s = 0 (only where gamma = 0 and sigma hits 0) ds/dt is the one-sided d_sigma.
    d_s = jnp.where(positive, (c.sigma * c.d_sigma + c.gamma * c.d_gamma) / safe_s, c.d_sigma)
    return Coefficients(alpha=c.alpha, sigma=s, d_alpha=c.d_alpha, d_sigma=d_s)


# ---- coefficient functions -----------------------------------------------------------------


def linear_coefficients(t: Array, *, sigma_min: float = 0.0) -> tuple[Array, Array, Array]:
  """Conditional-OT (linear) path: ``alpha_t = t``, ``sigma_t = 1 - (1 - sigma_min) t``,
  ``gamma_t = 0``.

  With ``x0 ~ N(0, I)``: ``p_t(x | x1) = N(t x1, (1 - (1 - sigma_min) t)^2 I)`` and
  ``u_t = x1 - (1 - sigma_min) x0``. Lipman et al. (2023), eq. 20-23,
  https://arxiv.org/abs/2210.02747; ``sigma_min = 0`` is rectified flow (Liu et al. 2023,
  https://arxiv.org/abs/2209.03003).
  """
  return t, 1.0 - (1.0 - sigma_min) * t, jnp.zeros_like(t)


def icfm_coefficients(t: Array, *, sigma: float = 0.1) -> tuple[Array, Array, Array]:
  """I-CFM's path: ``alpha_t = t``, ``sigma_t = 1 - t``, constant extra noise ``gamma_t = sigma``.

  ``x_t ~ N(t x1 + (1 - t) x0, sigma^2 I)`` and ``u_t = x1 - x0``. Tong et al. (2024), Sec. 3.2,
  eq. 14-15 (I-CFM; with an OT coupling, OT-CFM), https://arxiv.org/abs/2302.00482.
  """
  return t, 1.0 - t, jnp.full_like(t, sigma)


def brownian_bridge_coefficients(t: Array, *, sigma: float = 1.0) -> tuple[Array, Array, Array]:
  """Brownian bridge (Schrodinger bridge) path: ``alpha_t = t``, ``sigma_t = 1 - t``,
  ``gamma_t = sigma sqrt(t (1 - t))``.

  The conditional target is ``u_t = x1 - x0 + d_gamma_t z`` and, since
  ``d_gamma_t = sigma (1 - 2t) / (2 sqrt(t (1 - t)))`` and ``gamma_t z = x_t - mu_t`` with
  ``mu_t = t x1 + (1 - t) x0``,

      d_gamma_t z = (1 - 2t) / (2 t (1 - t)) * gamma_t z
                  = (1 - 2t) / (2 t (1 - t)) * (x_t - mu_t),

  Tong et al. (2024), Sec. 3.4, eq. 19-20 (SB-CFM), https://arxiv.org/abs/2302.00482. The
  derivative blows up like ``t^(-1/2)`` at both ends, so :func:`brownian_bridge_path` evaluates it
  at a clipped time (see :class:`Path`).
  """
  return t, 1.0 - t, sigma * jnp.sqrt(t * (1.0 - t))


def schedule_coefficients(t: Array, *, schedule: ContinuousSchedule) -> tuple[Array, Array, Array]:
  """A diffusion schedule run in flow time: ``alpha_t = alpha(1 - t)``, ``sigma_t = sigma(1 - t)``,
  ``gamma_t = 0``, through :func:`diffjax.parameterization.flow_coefficients` (the one map
  between the two time conventions; Lipman et al. 2023, Sec. 4.1,
  https://arxiv.org/abs/2210.02747)."""
  coefficients = flow_coefficients(schedule, t)
  return coefficients.alpha, coefficients.sigma, jnp.zeros_like(t)


# ---- path factories ------------------------------------------------------------------------


def linear_path(*, sigma_min: float = 0.0) -> Path:
  """The conditional-OT path of :func:`linear_coefficients` (Lipman et al. 2023)."""
  return Path("linear", functools.partial(linear_coefficients, sigma_min=sigma_min))


def icfm_path(*, sigma: float = 0.1) -> Path:
  """I-CFM's constant-noise path of :func:`icfm_coefficients` (Tong et al. 2024)."""
  return Path("icfm", functools.partial(icfm_coefficients, sigma=sigma), stochastic=sigma != 0)


def brownian_bridge_path(*, sigma: float = 1.0, derivative_eps: float = 1e-4) -> Path:
  """The Brownian-bridge path of :func:`brownian_bridge_coefficients` (Tong et al. 2024).

  ``derivative_eps`` clips ``t`` to ``[eps, 1 - eps]`` inside the derivatives only (those of
  ``alpha`` and ``sigma`` are constant, so only ``d_gamma`` changes): the target's
  variance ``E[d_gamma_t^2] ~ sigma^2 / (4t)`` is not integrable over ``t ~ U(0, 1)``, and at
  ``t in {0, 1}`` the derivative is infinite; ``gamma_t z`` itself vanishes there, so the clip
  changes nothing but the target on a set of times of probability ``2 eps``.
  """
  return Path(
    "brownian_bridge",
    functools.partial(brownian_bridge_coefficients, sigma=sigma),
    stochastic=sigma != 0,
    derivative_range=(derivative_eps, 1.0 - derivative_eps),
  )


def schedule_path(schedule: ContinuousSchedule, *, derivative_eps: float = 0.0) -> Path:
  """The flow path of any continuous diffusion schedule, :func:`schedule_coefficients`.

  ``derivative_eps`` evaluates the derivatives at ``min(t, 1 - eps)``, for schedules whose
  ``sigma`` has an infinite slope at the data end (diffusion time 0).
  """
  return Path(
    schedule.name,
    functools.partial(schedule_coefficients, schedule=schedule),
    derivative_range=(0.0, 1.0 - derivative_eps),
  )


def vp_path(*, beta_min: float = 0.1, beta_max: float = 20.0, derivative_eps: float = 1e-5) -> Path:
  """Lipman et al.'s VP diffusion path: the VP SDE schedule (Song et al. 2021) in flow time.

  ``sigma_t ~ sqrt(beta_min (1 - t))`` near the data end, whose derivative is infinite at
  ``t = 1``; ``derivative_eps`` evaluates it at ``min(t, 1 - eps)`` instead. At ``t = 0``,
  ``alpha_0 = exp(-(beta_max + beta_min) / 4)`` (0.0066 for the defaults): nearly, not
  exactly, pure noise.
  """
  return schedule_path(
    vp_schedule(beta_min=beta_min, beta_max=beta_max), derivative_eps=derivative_eps
  )


def cosine_path(*, log_snr_min: float = -15.0, log_snr_max: float = 15.0) -> Path:
  """The variance-preserving cosine schedule (:func:`diffjax.schedules.cosine_schedule`) in flow
  time: ``alpha_t ~ sin(pi t / 2)``, ``sigma_t ~ cos(pi t / 2)`` within the clipped log-SNR
  range (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672)."""
  return schedule_path(cosine_schedule(log_snr_min=log_snr_min, log_snr_max=log_snr_max))


PATHS: dict[str, Callable[..., Path]] = {
  "linear": linear_path,
  "cond_ot": linear_path,
  "icfm": icfm_path,
  "brownian_bridge": brownian_bridge_path,
  "schrodinger_bridge": brownian_bridge_path,
  "vp": vp_path,
  "cosine": cosine_path,
}


def get_path(name: str, **kwargs) -> Path:
  """Resolves a path by name (at the edge, once); ``kwargs`` go to its factory.

  Args:
    name: one of ``PATHS``: "linear" / "cond_ot" (``sigma_min``), "icfm" (``sigma``),
      "brownian_bridge" / "schrodinger_bridge" (``sigma``, ``derivative_eps``), "vp"
      (``beta_min``, ``beta_max``, ``derivative_eps``), "cosine" (``log_snr_min``,
      ``log_snr_max``). For any other schedule call :func:`schedule_path`.
  """
  return lookup(PATHS, name, "path")(**kwargs)
