"""Conversions between what a network can predict, and the diffusion <-> flow-matching time map.

Everything here is about one affine Gaussian marginal ``x_t = alpha x_0 + sigma eps`` with
``eps ~ N(0, I)`` and its time derivatives ``d_alpha``, ``d_sigma`` (in whichever time the caller
integrates). A prediction target is a linear function of the pair ``(x_0, eps)`` given ``x_t``:

* ``eps``: the noise (Ho et al. 2020);
* ``x0``: the data ("data prediction");
* ``v = alpha eps - sigma x_0``, v-prediction (Salimans & Ho 2022,
  https://arxiv.org/abs/2202.00512, Sec. 4): a fixed mix of noise and data, the same at every
  clock and schedule speed, defined on discrete schedules too;
* ``velocity = dx_t/dt = d_alpha x_0 + d_sigma eps``, the flow velocity (the flow-matching
  target; Lipman et al. 2023, https://arxiv.org/abs/2210.02747): it depends on the clock's
  direction and speed through ``d_alpha``, ``d_sigma``, and needs a continuous schedule.

"v" and "velocity" are different targets. For a variance-preserving schedule with
``alpha = cos phi``, ``sigma = sin phi``, ``v = d x / d phi``, so ``velocity = (d phi / dt) v``;
on the linear flow path ``x_t = t x_1 + (1 - t) x_0`` (data ``x_1``, noise ``x_0``) the velocity
is ``x_1 - x_0``. A flow-matching model predicts "velocity"; a diffusion model trained with
v-prediction predicts "v".
* ``score = grad log q(x_t) = -E[eps | x_t] / sigma`` (Tweedie; Song et al. 2021).

Each :class:`PredictionTarget` converts a prediction to ``(x0, eps)`` and back. Names are resolved
to targets once, at the edge, by :func:`get_prediction_target`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.schedules import ContinuousSchedule, alpha_sigma_from_log_snr
from diffjax.shapes import broadcast_to_data

__all__ = [
  "Coefficients",
  "diffusion_coefficients",
  "discrete_coefficients",
  "flow_coefficients",
  "flow_time_from_diffusion_time",
  "x0_eps_from_eps",
  "x0_eps_from_x0",
  "x0_eps_from_v",
  "x0_eps_from_velocity",
  "x0_eps_from_score",
  "eps_from_x0_eps",
  "x0_from_x0_eps",
  "v_from_x0_eps",
  "velocity_from_x0_eps",
  "score_from_x0_eps",
  "PredictionTarget",
  "PREDICTION_TARGETS",
  "get_prediction_target",
  "check_discrete_target",
  "convert",
]


class Coefficients(NamedTuple):
  """``alpha``, ``sigma`` and their time derivatives at per-example times (each ``[batch]`` or
  scalar) for ``x_t = alpha x0 + sigma eps``: ``alpha`` always multiplies the data and ``sigma``
  the noise, in diffusion time (:func:`diffusion_coefficients`) or flow time
  (:func:`flow_coefficients`)."""

  alpha: Array
  sigma: Array
  d_alpha: Array
  d_sigma: Array


def diffusion_coefficients(schedule: ContinuousSchedule, t: Array) -> Coefficients:
  """Coefficients of ``x_t = alpha(t) x_0 + sigma(t) eps`` in diffusion time (t = 0 data), with
  ``d_alpha = d alpha / dt`` and ``d_sigma = d sigma / dt`` by ``jax.jvp`` (Kingma et al. 2021,
  VDM, eq. 1, https://arxiv.org/abs/2107.00630)."""
  return Coefficients(*schedule.alpha_sigma_and_derivatives(t))


def discrete_coefficients(log_snr: Array) -> Coefficients:
  """Coefficients of a discrete (DDPM) step from its log-SNR: ``alpha = sqrt(abar) =
  sqrt(sigmoid(lambda))``, ``sigma = sqrt(1 - abar) = sqrt(sigmoid(-lambda))``
  (:func:`~diffjax.schedules.alpha_sigma_from_log_snr`; Ho et al. 2020, eq. 4,
  https://arxiv.org/abs/2006.11239).

  A discrete schedule has no time derivative, so ``d_alpha = d_sigma = 0``: the "velocity"
  target is rejected on it, in training and sampling alike (:func:`check_discrete_target`).
  """
  alpha, sigma = alpha_sigma_from_log_snr(log_snr)
  zeros = jnp.zeros_like(alpha)
  return Coefficients(alpha=alpha, sigma=sigma, d_alpha=zeros, d_sigma=zeros)


def flow_time_from_diffusion_time(t: Array) -> Array:
  """Flow-matching time ``1 - t``: flow paths run noise (0) -> data (1), diffusion the reverse
  (Lipman et al. 2023, Sec. 4.1, https://arxiv.org/abs/2210.02747). The map is its own inverse."""
  return 1.0 - t


def flow_coefficients(schedule: ContinuousSchedule, t_flow: Array) -> Coefficients:
  """The flow-matching affine path equivalent to a diffusion schedule.

  With ``s = 1 - t_flow``: ``alpha_fm(t) = alpha(s)``, ``sigma_fm(t) = sigma(s)``,
  ``d alpha_fm / dt = -alpha'(s)``, ``d sigma_fm / dt = -sigma'(s)``, so the flow path
  ``x_t = alpha_fm(t) x_1 + sigma_fm(t) x_0`` (``x_1`` data, ``x_0`` noise) has at every ``t`` the
  same marginal as the diffusion at ``s``, and ``velocity_from_x0_eps(x_1, x_0, coefficients=
  flow_coefficients(...))`` is its conditional vector field ``d x_t / dt`` (Lipman et al. 2023,
  Sec. 4.1 "diffusion conditional VFs", https://arxiv.org/abs/2210.02747; Kingma & Gao 2023,
  App. D, https://arxiv.org/abs/2303.00848). For a VP schedule ``alpha_fm^2 + sigma_fm^2 = 1``.
  This is the one documented map between the two time conventions; everything else calls it.

  Args:
    schedule: a diffusion schedule (``t = 0`` data, ``t = 1`` noise).
    t_flow: ``[batch]`` flow times (``t = 0`` noise, ``t = 1`` data).
  """
  alpha, sigma, d_alpha, d_sigma = schedule.alpha_sigma_and_derivatives(
    flow_time_from_diffusion_time(t_flow)
  )
  return Coefficients(alpha, sigma, -d_alpha, -d_sigma)


# ---- prediction -> (x0, eps) ----------------------------------------------------------------


def x0_eps_from_eps(eps: Array, *, x_t: Array, coefficients: Coefficients) -> tuple[Array, Array]:
  """``x0 = (x_t - sigma eps) / alpha`` (Ho et al. 2020,
  https://arxiv.org/abs/2006.11239)."""
  alpha = broadcast_to_data(coefficients.alpha, x_t)
  sigma = broadcast_to_data(coefficients.sigma, x_t)
  return (x_t - sigma * eps) / alpha, eps


def x0_eps_from_x0(x0: Array, *, x_t: Array, coefficients: Coefficients) -> tuple[Array, Array]:
  """``eps = (x_t - alpha x0) / sigma``, the inverse of ``x_t = alpha x0 + sigma eps`` (Kingma et
  al. 2021, eq. 1, https://arxiv.org/abs/2107.00630)."""
  alpha = broadcast_to_data(coefficients.alpha, x_t)
  sigma = broadcast_to_data(coefficients.sigma, x_t)
  return x0, (x_t - alpha * x0) / sigma


def x0_eps_from_v(v: Array, *, x_t: Array, coefficients: Coefficients) -> tuple[Array, Array]:
  """``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``, ``eps = (sigma x_t + alpha v) /
  (alpha^2 + sigma^2)``; for variance-preserving schedules the denominator is 1 (Salimans & Ho
  2022, Sec. 4, https://arxiv.org/abs/2202.00512). The general form also serves VE/EDM
  schedules."""
  alpha = broadcast_to_data(coefficients.alpha, x_t)
  sigma = broadcast_to_data(coefficients.sigma, x_t)
  norm = alpha**2 + sigma**2
  return (alpha * x_t - sigma * v) / norm, (sigma * x_t + alpha * v) / norm


def x0_eps_from_velocity(
  velocity: Array, *, x_t: Array, coefficients: Coefficients
) -> tuple[Array, Array]:
  """Solves ``[alpha sigma; d_alpha d_sigma] [x0; eps] = [x_t; velocity]``:
  ``x0 = (d_sigma x_t - sigma u) / det``, ``eps = (alpha u - d_alpha x_t) / det`` with
  ``det = alpha d_sigma - sigma d_alpha = -alpha sigma d_lambda / 2`` (nonzero whenever the
  log-SNR ``lambda`` moves). Lipman et al. (2023), https://arxiv.org/abs/2210.02747 (the
  conditional velocity of an affine Gaussian path)."""
  alpha = broadcast_to_data(coefficients.alpha, x_t)
  sigma = broadcast_to_data(coefficients.sigma, x_t)
  d_alpha = broadcast_to_data(coefficients.d_alpha, x_t)
  d_sigma = broadcast_to_data(coefficients.d_sigma, x_t)
  det = alpha * d_sigma - sigma * d_alpha
  return (d_sigma * x_t - sigma * velocity) / det, (alpha * velocity - d_alpha * x_t) / det


def x0_eps_from_score(
  score: Array, *, x_t: Array, coefficients: Coefficients
) -> tuple[Array, Array]:
  """``eps = -sigma score`` (Tweedie's formula; Song et al. 2021,
  https://arxiv.org/abs/2011.13456), then ``x0 = (x_t - sigma eps) / alpha``."""
  sigma = broadcast_to_data(coefficients.sigma, x_t)
  return x0_eps_from_eps(-sigma * score, x_t=x_t, coefficients=coefficients)


# ---- (x0, eps) -> prediction ----------------------------------------------------------------


def eps_from_x0_eps(x0: Array, eps: Array, *, coefficients: Coefficients) -> Array:
  """``eps``, the noise itself (Ho et al. 2020, https://arxiv.org/abs/2006.11239)."""
  del x0, coefficients
  return eps


def x0_from_x0_eps(x0: Array, eps: Array, *, coefficients: Coefficients) -> Array:
  """``x0``, the data itself (Ho et al. 2020, https://arxiv.org/abs/2006.11239)."""
  del eps, coefficients
  return x0


def v_from_x0_eps(x0: Array, eps: Array, *, coefficients: Coefficients) -> Array:
  """``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Sec. 4, https://arxiv.org/abs/2202.00512;
  for ``alpha = cos phi``, ``sigma = sin phi`` it is ``d x_phi / d phi``)."""
  alpha = broadcast_to_data(coefficients.alpha, x0)
  sigma = broadcast_to_data(coefficients.sigma, x0)
  return alpha * eps - sigma * x0


def velocity_from_x0_eps(x0: Array, eps: Array, *, coefficients: Coefficients) -> Array:
  """``u = d_alpha x0 + d_sigma eps``, the time derivative of ``x_t = alpha x0 + sigma eps``
  (the conditional flow-matching target; Lipman et al. 2023,
  https://arxiv.org/abs/2210.02747)."""
  d_alpha = broadcast_to_data(coefficients.d_alpha, x0)
  d_sigma = broadcast_to_data(coefficients.d_sigma, x0)
  return d_alpha * x0 + d_sigma * eps


def score_from_x0_eps(x0: Array, eps: Array, *, coefficients: Coefficients) -> Array:
  """``score = grad_x log N(x_t; alpha x0, sigma^2 I) = -eps / sigma`` (Song et al. 2021,
  https://arxiv.org/abs/2011.13456; exact for the Gaussian kernel, Tweedie for the marginal)."""
  del x0
  return -eps / broadcast_to_data(coefficients.sigma, eps)


@dataclasses.dataclass(frozen=True)
class PredictionTarget:
  """A network output type: how to read ``(x0, eps)`` from it and how to write it from them.

  Attributes:
    name: the target's name in ``PREDICTION_TARGETS``.
    to_x0_eps: ``(prediction, *, x_t, coefficients) -> (x0, eps)``.
    from_x0_eps: ``(x0, eps, *, coefficients) -> prediction``.
  """

  name: str
  to_x0_eps: Callable[..., tuple[Array, Array]]
  from_x0_eps: Callable[..., Array]


PREDICTION_TARGETS: dict[str, PredictionTarget] = {
  "eps": PredictionTarget("eps", x0_eps_from_eps, eps_from_x0_eps),
  "x0": PredictionTarget("x0", x0_eps_from_x0, x0_from_x0_eps),
  "v": PredictionTarget("v", x0_eps_from_v, v_from_x0_eps),
  "velocity": PredictionTarget("velocity", x0_eps_from_velocity, velocity_from_x0_eps),
  "score": PredictionTarget("score", x0_eps_from_score, score_from_x0_eps),
}


_TARGET_HINT = (
  " ('v' is v-prediction alpha eps - sigma x0, Salimans & Ho 2022; 'velocity' is the flow "
  "velocity dx_t/dt = d_alpha x0 + d_sigma eps, what a flow-matching model predicts)"
)


def get_prediction_target(name: str) -> PredictionTarget:
  """Resolves a prediction target by name, once, at the edge.

  Names: "eps" (the noise), "x0" (the data), "v" (v-prediction ``alpha eps - sigma x0``,
  Salimans & Ho 2022, https://arxiv.org/abs/2202.00512), "velocity" (the flow velocity
  ``dx_t/dt = d_alpha x0 + d_sigma eps``, Lipman et al. 2023,
  https://arxiv.org/abs/2210.02747: what a flow-matching model predicts), "score"
  (``-eps / sigma``). "v" and "velocity" differ: see the module docstring.
  """
  return lookup(PREDICTION_TARGETS, name, "prediction target", hint=_TARGET_HINT)


def check_discrete_target(
  target: PredictionTarget,
  *,
  fix: str = "use 'eps', 'x0', 'v' or 'score', or a continuous schedule",
) -> None:
  """Rejects the "velocity" target on a discrete schedule: ``velocity = d_alpha x0 + d_sigma
  eps`` needs ``d alpha / dt``, which discrete steps do not define (:func:`discrete_coefficients`).

  Args:
    target: the prediction target.
    fix: the way out the caller offers, ending the message.
  """
  if target.name == "velocity":
    raise ValueError(
      f"target 'velocity' needs d alpha / dt, which a discrete schedule does not define; {fix}"
    )


def convert(
  prediction: Array,
  *,
  source: PredictionTarget,
  destination: PredictionTarget,
  x_t: Array,
  coefficients: Coefficients,
) -> Array:
  """Converts a prediction of one target into another through ``(x0, eps)``:
  ``destination.from_x0_eps(*source.to_x0_eps(prediction, x_t, coefficients))``. Every map is
  linear in ``(x_t, prediction)``, so it applies unchanged to a network's estimate (then
  ``x0`` and ``eps`` mean ``E[x0 | x_t]`` and ``E[eps | x_t]``)."""
  x0, eps = source.to_x0_eps(prediction, x_t=x_t, coefficients=coefficients)
  return destination.from_x0_eps(x0, eps, coefficients=coefficients)
