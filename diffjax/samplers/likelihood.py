"""Exact log-likelihood through the probability-flow ODE, and bits per dimension.

Along the flow ``dx/dt = v(x, t)`` the density obeys ``d log p_t(x_t) / dt = -div v(x_t, t)`` (the
instantaneous change of variables; Chen et al. 2018, Theorem 1, https://arxiv.org/abs/1806.07366;
Song et al. 2021, App. D.2, https://arxiv.org/abs/2011.13456). Integrating the augmented state
``[x, delta]`` with ``d delta / dt = div v`` from the data time to the noise time gives

    log p_data(x) = log p_prior(x_noise) + delta(t_noise),   delta(t_data) = 0.

The grid decides the direction: flow time runs 1 -> 0 (``times = uniform_grid(t_start=1,
t_end=0)``), diffusion time 0 -> 1. The divergence is exact (``jax.linearize`` and one JVP per
dimension, :func:`exact_divergence`) for small dimensions, or Hutchinson's unbiased estimate
``E[z^T (dv/dx) z]`` (:func:`hutchinson_divergence`) with Rademacher or Gaussian probes drawn
once per trajectory and kept for the whole integration (FFJORD; Grathwohl et al. 2019,
https://arxiv.org/abs/1810.01367), which keeps the ODE deterministic so adaptive solvers work.

Bits per dimension of 8-bit data (:func:`bits_per_dim`). Convention: pixel values
``k in {0, ..., 255}`` map to ``x = k / 127.5 - 1`` in ``[-1, 1]``; uniform dequantization adds
``u ~ U[0, w)^D`` with the bin width ``w = 1 / 127.5`` (:func:`dequantize`), so bin ``k`` is
``[x_k, x_k + w)``. The discrete probability is ``P(k) = int_bin p(x) dx = w^D E_u[p(x_k + u)] >=
w^D exp(E_u log p(x_k + u))`` (Jensen), hence

    bits/dim = -log2 P(k) / D <= (-E_u log p(x) - D log w) / (D log 2)
             = (-E_u log p(x) + D log 127.5) / (D log 2)

(Theis et al. 2016, https://arxiv.org/abs/1511.01844; Ho et al. 2020, Sec. 4.2, whose data also
sits in ``[-1, 1]``). Data scaled differently needs its own ``bin_width``: the [0, 1] convention
``x = (k + u) / 256`` has ``w = 1/256`` and adds 8 bits per dimension for ``-log p / (D log 2)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.samplers.fields import VelocityField
from diffjax.samplers.ode import FIXED_STEP_METHODS, ODESolution, integrate_fixed
from diffjax.shapes import compute_dtype

__all__ = [
  "DivergenceFn",
  "exact_divergence",
  "hutchinson_divergence",
  "DIVERGENCES",
  "get_divergence",
  "rademacher_probes",
  "gaussian_probes",
  "PROBES",
  "get_probes",
  "standard_normal_log_prob",
  "LikelihoodOutput",
  "log_likelihood",
  "PIXEL_BIN_WIDTH",
  "dequantize",
  "bits_per_dim",
]

DivergenceFn = Callable[[Array, Array, Array | None], tuple[Array, Array]]
"""``(x, t, probes) -> (v(x, t), div v(x, t))``: ``x`` ``[batch, *event]``, ``t`` ``[batch]``,
``probes`` ``[num_probes, batch, *event]`` or None (ignored by the exact divergence), outputs
``[batch, *event]`` and ``[batch]``."""

PIXEL_BIN_WIDTH = 1.0 / 127.5
"""Width of one 8-bit level after ``x = k / 127.5 - 1``."""


def _sum_event(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def exact_divergence(velocity: VelocityField) -> DivergenceFn:
  """``div v = tr(dv/dx) = sum_i (J e_i)_i`` with one JVP per dimension (``D`` network calls on
  the batch, through one ``jax.linearize``). Assumes examples do not interact inside ``v`` (true
  of any per-example network), so one JVP with ``e_i`` in every example serves the whole batch."""

  def divergence(x: Array, t: Array, probes: Array | None) -> tuple[Array, Array]:
    del probes
    batch, dim = x.shape[0], math.prod(x.shape[1:])
    v, jvp = jax.linearize(lambda z: velocity(z, t), x)
    basis = jnp.broadcast_to(jnp.eye(dim, dtype=x.dtype)[:, None], (dim, batch, dim))
    columns = jax.vmap(jvp)(basis.reshape((dim,) + x.shape))
    return v, jnp.einsum("ibi->b", columns.reshape(dim, batch, dim))

  return divergence


def hutchinson_divergence(velocity: VelocityField) -> DivergenceFn:
  """Hutchinson's estimator ``div v ~ (1/P) sum_p z_p^T (dv/dx) z_p`` with ``E[z z^T] = I``
  (Hutchinson 1989; Grathwohl et al. 2019, eq. 8): one JVP per probe, unbiased, with variance
  ``2 sum_{i != j} A_ij^2`` per Rademacher probe and ``2 ||A||_F^2`` per Gaussian probe for the
  symmetric part ``A`` of the Jacobian."""

  def divergence(x: Array, t: Array, probes: Array | None) -> tuple[Array, Array]:
    if probes is None:
      raise ValueError(
        "the Hutchinson divergence needs random probes: pass a PRNG key to log_likelihood"
      )
    v, jvp = jax.linearize(lambda z: velocity(z, t), x)
    products = jax.vmap(jvp)(probes)
    estimates = jax.vmap(_sum_event)(probes * products)
    return v, jnp.mean(estimates, axis=0)

  return divergence


DIVERGENCES: dict[str, Callable[[VelocityField], DivergenceFn]] = {
  "exact": exact_divergence,
  "hutchinson": hutchinson_divergence,
}


def get_divergence(name: str) -> Callable[[VelocityField], DivergenceFn]:
  """Resolves a divergence by name: "exact" or "hutchinson"."""
  return lookup(DIVERGENCES, name, "divergence")


def rademacher_probes(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Independent signs ``+-1`` with probability 1/2 each (``E[z z^T] = I``)."""
  return jax.random.rademacher(key, shape, dtype)


def gaussian_probes(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Independent standard normals (``E[z z^T] = I``)."""
  return jax.random.normal(key, shape, dtype)


PROBES: dict[str, Callable[..., Array]] = {
  "rademacher": rademacher_probes,
  "gaussian": gaussian_probes,
}


def get_probes(name: str) -> Callable[..., Array]:
  """Resolves a probe distribution by name: "rademacher" or "gaussian"."""
  return lookup(PROBES, name, "probe distribution")


def standard_normal_log_prob(x: Array, *, scale: float = 1.0) -> Array:
  """``log N(x; 0, scale^2 I) = -||x||^2 / (2 scale^2) - D/2 log(2 pi scale^2)`` per example."""
  dim = math.prod(x.shape[1:])
  return -0.5 * _sum_event(x**2) / scale**2 - 0.5 * dim * (
    math.log(2.0 * math.pi) + 2.0 * math.log(scale)
  )


class LikelihoodOutput(NamedTuple):
  """Per-example results of :func:`log_likelihood` (each ``[batch]`` unless noted).

  Attributes:
    log_prob: ``log p_data(x)`` in nats.
    prior_log_prob: ``log p_prior(x_noise)``.
    delta_log_prob: ``int div v dt`` from the data time to the noise time.
    latent: ``[batch, *event]`` the image of ``x`` at the noise time.
    nfe: number of evaluations of the augmented field (each costs ``1 + D`` network calls for the
      exact divergence, ``1 + P`` for Hutchinson's).
  """

  log_prob: Array
  prior_log_prob: Array
  delta_log_prob: Array
  latent: Array
  nfe: Array


ODESolver = Callable[..., ODESolution]

_RK4 = functools.partial(integrate_fixed, method=FIXED_STEP_METHODS["rk4"])


def log_likelihood(
  key: Array | None,
  velocity: VelocityField,
  data: Array,
  *,
  times: Array,
  divergence: Callable[[VelocityField], DivergenceFn] = exact_divergence,
  probes: Callable[..., Array] = rademacher_probes,
  num_probes: int = 1,
  ode_solver: ODESolver = _RK4,
  prior_log_prob: Callable[[Array], Array] = standard_normal_log_prob,
) -> LikelihoodOutput:
  """``log p(x) = log p_prior(x(t_noise)) + int_{t_data}^{t_noise} div v(x(t), t) dt``.

  Integrates ``d/dt [x, delta] = [v(x, t), div v(x, t)]`` over ``times`` (data time first) in
  one ODE solve (see the module docstring for the derivation and sources).

  Args:
    key: PRNG key for the Hutchinson probes (None: no probes, for the exact divergence).
    velocity: ``(x, t) -> dx/dt`` (:func:`~diffjax.samplers.fields.velocity_field`).
    data: ``[batch, *event]`` points (dequantized, for discrete data).
    times: ``[N + 1]`` grid from the data time to the noise time.
    divergence: :func:`exact_divergence` or :func:`hutchinson_divergence`.
    probes: :func:`rademacher_probes` or :func:`gaussian_probes` (Hutchinson only).
    num_probes: probes per example, averaged at every evaluation.
    ode_solver: ``(field, y0, *, times) -> ODESolution``: fixed-step RK4 by default, or e.g.
      ``functools.partial(integrate_adaptive, solver=diffrax.Dopri5(), rtol=1e-5, atol=1e-5)``.
    prior_log_prob: ``[batch, *event] -> [batch]``, the density at the noise time; the default
      ``N(0, I)`` is exact for flow paths and close for VP schedules (``alpha(1) ~ 0``).
  """
  if data.ndim < 2:
    raise ValueError(f"data must be [batch, *event], got shape {data.shape}; add a batch axis")
  if num_probes < 1:
    raise ValueError(f"num_probes={num_probes}: must be >= 1")
  div_fn = divergence(velocity)
  probe_draws = None if key is None else probes(key, (num_probes,) + data.shape, data.dtype)

  def field(state, t):
    x, _ = state
    t_batch = jnp.full(x.shape[:1], t, dtype=compute_dtype(t))
    return div_fn(x, t_batch, probe_draws)

  delta0 = jnp.zeros(data.shape[:1], data.dtype)
  solution = ode_solver(field, (data, delta0), times=times)
  latent, delta = solution.final
  prior = prior_log_prob(latent)
  return LikelihoodOutput(
    log_prob=prior + delta,
    prior_log_prob=prior,
    delta_log_prob=delta,
    latent=latent,
    nfe=solution.nfe,
  )


def dequantize(key: Array, x: Array, *, bin_width: float = PIXEL_BIN_WIDTH) -> Array:
  """Uniform dequantization ``x + u``, ``u ~ U[0, bin_width)`` per coordinate (Theis et al. 2016;
  the bins of :func:`bits_per_dim` are ``[x_k, x_k + bin_width)``)."""
  return x + bin_width * jax.random.uniform(key, x.shape, x.dtype)


def bits_per_dim(log_prob: Array, *, num_dims: int, bin_width: float = PIXEL_BIN_WIDTH) -> Array:
  """``bpd = (-log p(x) - D log w) / (D log 2)``: an upper bound on the discrete data's bits per
  dimension when ``x`` is dequantized over bins of width ``w`` (module docstring). For data
  ``k / 127.5 - 1`` (default ``w = 1/127.5``) this is ``(-log p + D log 127.5) / (D log 2)``.

  Args:
    log_prob: ``[batch]`` continuous log-density in nats at the dequantized points.
    num_dims: ``D``, the number of dimensions of one example (e.g. ``H W C``).
    bin_width: width of one quantization bin in the data's units.
  """
  return (-log_prob - num_dims * math.log(bin_width)) / (num_dims * math.log(2.0))
