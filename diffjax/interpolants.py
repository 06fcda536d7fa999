"""Stochastic interpolants: the interpolant, its drift and denoiser targets, and the SDE family.

Albergo, Boffi & Vanden-Eijnden (2023), "Stochastic Interpolants: A Unifying Framework for Flows
and Diffusions", https://arxiv.org/abs/2303.08797. Time runs from the base (``t = 0``, ``x0``) to
the data (``t = 1``, ``x1``), as in :mod:`diffjax.paths`. The interpolant (Def. 2.1, spatially
linear as in Sec. 3.2) is

    x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z,    z ~ N(0, I) independent of (x0, x1),

with ``alpha(0) = beta(1) = 1``, ``alpha(1) = beta(0) = 0`` and ``gamma(0) = gamma(1) = 0 <
gamma(t)`` inside. Its density ``rho(t, x)`` satisfies the transport equation with the drift
``b`` and, for every ``eps >= 0``, the forward and backward Fokker-Planck equations with the
drifts ``b_F = b + eps s`` and ``b_B = b - eps s`` (Sec. 2.2, Thm. 2.6 and Cor. 2.10), where

    b(t, x)   = E[d_alpha x0 + d_beta x1 + d_gamma z | x_t = x]   (the drift),
    eta_z(t, x) = E[z | x_t = x]                                  (the denoiser),
    s(t, x)   = grad log rho(t, x) = -eta_z(t, x) / gamma(t)      (the score).

So the generative SDE ``dX = b_F(t, X) dt + sqrt(2 eps) dW`` run forward from ``X_0 ~ rho_0``
has the marginals ``rho(t)`` at every ``eps`` (``eps = 0``: the probability-flow ODE of ``b``).
``b`` and ``eta_z`` are the unique minimisers of the quadratic objectives (Sec. 2.3)

    L_b   = int_0^1 E[1/2 |b_hat(t, x_t)|^2 - (d_alpha x0 + d_beta x1 + d_gamma z) . b_hat] dt,
    L_eta = int_0^1 E[1/2 |eta_hat(t, x_t)|^2 - z . eta_hat] dt,

each a mean-squared regression on its target minus a constant that does not depend on the model.

An interpolant here is a :class:`diffjax.paths.Path`, whose ``x_t = alpha_p x1 + sigma_p x0 +
gamma z`` is this one with ``alpha_p = beta`` and ``sigma_p = alpha`` (the path module names the
data coefficient ``alpha``), so ``Path.sample_xt`` is ``x_t`` and ``Path.conditional_target`` the
drift target, with derivatives by ``jax.jvp``. Names are resolved once, by
:func:`stochastic_interpolant`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.paths import Path
from diffjax.shapes import broadcast_to_data

__all__ = [
  "linear_interpolant",
  "trig_interpolant",
  "sqrt_gamma",
  "quadratic_gamma",
  "INTERPOLANTS",
  "GAMMAS",
  "interpolant_coefficients",
  "stochastic_interpolant",
  "score_from_denoiser",
  "forward_drift",
  "backward_drift",
  "sde_diffusion",
  "generative_sde",
]


# ---- alpha, beta and gamma ------------------------------------------------------------------


def linear_interpolant(t: Array) -> tuple[Array, Array]:
  """``(alpha, beta) = (1 - t, t)``: ``I(t, x0, x1) = (1 - t) x0 + t x1`` (Albergo et al.
  2023, Sec. 3.2, https://arxiv.org/abs/2303.08797)."""
  return 1.0 - t, t


def trig_interpolant(t: Array) -> tuple[Array, Array]:
  """``(alpha, beta) = (cos(pi t / 2), sin(pi t / 2))``, which keeps ``alpha^2 + beta^2 = 1``
  (the trigonometric interpolant of Albergo & Vanden-Eijnden 2023, https://arxiv.org/abs/
  2209.15571; Albergo et al. 2023, Sec. 3.2, https://arxiv.org/abs/2303.08797)."""
  angle = 0.5 * jnp.pi * t
  return jnp.cos(angle), jnp.sin(angle)


def sqrt_gamma(t: Array, *, a: float = 1.0) -> Array:
  """``gamma(t) = sqrt(a t (1 - t))``, the Brownian-bridge choice (Albergo et al. 2023,
  Sec. 3.2, https://arxiv.org/abs/2303.08797). ``gamma^2`` is smooth but ``d_gamma`` is infinite
  at both ends (``gamma d_gamma = a (1 - 2t) / 2`` stays finite)."""
  # max(., 0): t (1 - t) rounds below zero just outside [0, 1].
  return jnp.sqrt(a * jnp.maximum(t * (1.0 - t), 0.0))


def quadratic_gamma(t: Array, *, a: float = 1.0) -> Array:
  """``gamma(t) = sqrt(a) t (1 - t)``, smooth at both ends (Albergo et al. 2023, Sec. 3.2 and
  Sec. 6, https://arxiv.org/abs/2303.08797)."""
  return jnp.sqrt(a) * t * (1.0 - t)


INTERPOLANTS: dict[str, Callable[[Array], tuple[Array, Array]]] = {
  "linear": linear_interpolant,
  "trig": trig_interpolant,
}

GAMMAS: dict[str, Callable[..., Array]] = {"sqrt": sqrt_gamma, "quadratic": quadratic_gamma}


def interpolant_coefficients(
  t: Array, *, interpolant_fn: Callable, gamma_fn: Callable
) -> tuple[Array, Array, Array]:
  """``(beta, alpha, gamma)`` at ``t``: the :class:`~diffjax.paths.Path` order (data, base,
  noise) of ``x_t = alpha x0 + beta x1 + gamma z``."""
  alpha, beta = interpolant_fn(t)
  return beta, alpha, gamma_fn(t)


def stochastic_interpolant(
  *, interpolant: str = "linear", gamma: str = "sqrt", a: float = 1.0, derivative_eps: float = 0.0
) -> Path:
  """The interpolant ``x_t = alpha x0 + beta x1 + gamma z`` as a :class:`~diffjax.paths.Path`
  (names resolved here, once).

  ``Path.sample_xt(x0=, x1=, t=, z=)`` is ``x_t``; ``Path.conditional_target`` is the drift target
  ``d_alpha x0 + d_beta x1 + d_gamma z`` (``jax.jvp`` of the coefficients); the denoiser target
  is ``z`` itself (Albergo et al. 2023, Sec. 2.3, https://arxiv.org/abs/2303.08797).

  Args:
    interpolant: "linear" (``1 - t, t``) or "trig" (``cos, sin`` of ``pi t / 2``).
    gamma: "sqrt" (``sqrt(a t (1 - t))``) or "quadratic" (``sqrt(a) t (1 - t)``).
    a: the scale of ``gamma^2``.
    derivative_eps: derivatives are taken at ``clip(t, eps, 1 - eps)``, where "sqrt"'s
      ``d_gamma`` is infinite at the ends (as :func:`diffjax.paths.brownian_bridge_path`).
  """
  if not a > 0:
    raise ValueError(f"a={a!r}: the scale of gamma^2 must be > 0 (gamma = 0 has no score)")
  if not 0.0 <= derivative_eps < 0.5:
    raise ValueError(f"derivative_eps={derivative_eps!r}: must lie in [0, 0.5)")
  coefficient_fn = functools.partial(
    interpolant_coefficients,
    interpolant_fn=lookup(INTERPOLANTS, interpolant, "interpolant"),
    gamma_fn=functools.partial(lookup(GAMMAS, gamma, "gamma"), a=a),
  )
  return Path(
    f"si_{interpolant}_{gamma}",
    coefficient_fn,
    stochastic=True,
    derivative_range=(derivative_eps, 1.0 - derivative_eps),
  )


# ---- score and the generative SDEs ----------------------------------------------------------


def score_from_denoiser(*, eta_z: Array, gamma: Array) -> Array:
  """``s = -eta_z / gamma``: ``grad log rho(t, x) = -E[z | x_t = x] / gamma(t)`` (Albergo et al.
  2023, Thm. 2.6, https://arxiv.org/abs/2303.08797). ``gamma`` scalar or ``[batch]``; infinite
  where ``gamma = 0``, so callers evaluate it only inside ``(0, 1)``."""
  return -eta_z / broadcast_to_data(gamma, eta_z)


def forward_drift(*, drift: Array, score: Array, epsilon) -> Array:
  """``b_F = b + eps s``, the drift of the forward generative SDE ``dX = b_F dt + sqrt(2 eps)
  dW`` run from ``t = 0`` to 1 (Albergo et al. 2023, Sec. 2.2, Cor. 2.10,
  https://arxiv.org/abs/2303.08797)."""
  return drift + epsilon * score


def backward_drift(*, drift: Array, score: Array, epsilon) -> Array:
  """``b_B = b - eps s``, the drift of the backward SDE ``dY = b_B dt + sqrt(2 eps) dW``
  solved from ``t = 1`` to 0 (Albergo et al. 2023, Sec. 2.2, Cor. 2.10,
  https://arxiv.org/abs/2303.08797)."""
  return drift - epsilon * score


def sde_diffusion(epsilon) -> Array:
  """``sqrt(2 eps)``, the diffusion coefficient of both generative SDEs (Albergo et al. 2023,
  Cor. 2.10, https://arxiv.org/abs/2303.08797)."""
  return jnp.sqrt(2.0 * jnp.asarray(epsilon))


def generative_sde(fields_fn: Callable, *, epsilon) -> Callable:
  """``(x, t) -> (b_F(t, x), sqrt(2 eps))`` of the forward SDE ``dX = (b + eps s) dt +
  sqrt(2 eps) dW`` (:func:`forward_drift`, :func:`sde_diffusion`), the ``terms`` of
  :func:`diffjax.samplers.sde.euler_maruyama_integrate`.

  Args:
    fields_fn: ``(x, t) -> (b, s)``, the drift and the score (e.g. :func:`score_from_denoiser`
      of a denoiser) for ``x`` ``[batch, ...]`` and ``t`` ``[batch]``: one call per step, so a
      network with a drift head and a denoiser head runs once.
    epsilon: ``eps >= 0``, a float or a traced scalar (0: the probability-flow ODE of ``b``).
  """

  def terms(x: Array, t: Array) -> tuple[Array, Array]:
    drift, score = fields_fn(x, t)
    bf = forward_drift(drift=drift, score=score, epsilon=epsilon)
    diffusion = jnp.broadcast_to(sde_diffusion(epsilon), t.shape).astype(drift.dtype)
    return bf, diffusion

  return terms
