"""Exact drift, denoiser and score of a stochastic interpolant from N(0, I) to a Gaussian mixture.

With ``x0 ~ N(0, I)``, ``z ~ N(0, I)`` and ``x1 ~ sum_k w_k N(m_k, S_k)`` drawn independently,
``x_t = alpha x0 + beta x1 + gamma z`` given the component ``k`` is Gaussian,
``N(beta m_k, C_k)`` with ``C_k = beta^2 S_k + (alpha^2 + gamma^2) I``, and by Gaussian
conditioning (``Cov(x1, x_t | k) = beta S_k``, ``Cov(x0, x_t | k) = alpha I``, ``Cov(z, x_t | k)
= gamma I``), with ``u_k = C_k^{-1} (x - beta m_k)``:

    E[x1 | x_t = x, k] = m_k + beta S_k u_k,   E[x0 | x, k] = alpha u_k,   E[z | x, k] = gamma u_k.

The fields are these conditional expectations weighted by the responsibilities
``r_k(x) = softmax_k(log w_k + log N(x; beta m_k, C_k))``:

    b(t, x)     = sum_k r_k (d_alpha alpha u_k + d_beta (m_k + beta S_k u_k) + gamma d_gamma u_k),
    s(t, x)     = -sum_k r_k u_k,        eta_z(t, x) = -gamma s(t, x)

(Albergo et al. 2023, Thm. 2.6, https://arxiv.org/abs/2303.08797). Only ``gamma^2`` and
``gamma d_gamma = d(gamma^2) / 2`` enter ``b`` and ``s``, both smooth at the ends for
``gamma^2 = a t (1 - t)``, so these fields are finite on all of ``[0, 1]`` (the base is Gaussian)
even where ``d_gamma`` is not. Written for one point ``x`` ``[d]`` and a scalar ``t``; vmapped
for a batch. This lives with the tests (as ``gaussian_fields.py`` does): it is a reference, not
something a trained model uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import interpolants


class MixtureInterpolant:
  """``x1 ~ sum_k w_k N(m_k, S_k)`` with the linear interpolant and ``gamma^2 = a t (1 - t)``."""

  def __init__(self, weights, means, covs, *, a: float = 1.0):
    self.weights = np.asarray(weights, np.float64)
    self.means = np.asarray(means, np.float64)
    self.covs = np.asarray(covs, np.float64)
    self.a = a
    self.dim = self.means.shape[1]

  # alpha, beta from the library's linear interpolant; gamma^2 in closed form.
  def _coefficients(self, t):
    def values(t):
      alpha, beta = interpolants.linear_interpolant(t)
      return alpha, beta, 0.5 * self.a * t * (1.0 - t)  # gamma^2 / 2

    (alpha, beta, half_g2), (d_alpha, d_beta, g_dg) = jax.jvp(values, (t,), (jnp.ones_like(t),))
    return alpha, beta, 2.0 * half_g2, d_alpha, d_beta, g_dg

  def _components(self, x, t):
    """``(log r_k + const, b_k, u_k)`` for one point."""
    dtype = x.dtype
    w, m, cov = (jnp.asarray(v, dtype) for v in (self.weights, self.means, self.covs))
    alpha, beta, g2, d_alpha, d_beta, g_dg = self._coefficients(jnp.asarray(t, dtype))
    eye = jnp.eye(self.dim, dtype=dtype)
    c = beta**2 * cov + (alpha**2 + g2) * eye  # [K, d, d]
    r = x[None] - beta * m  # [K, d]
    u = jnp.linalg.solve(c, r[..., None])[..., 0]
    _, logdet = jnp.linalg.slogdet(c)
    log_n = -0.5 * jnp.sum(r * u, -1) - 0.5 * logdet - 0.5 * self.dim * jnp.log(2 * jnp.pi)
    s_u = jnp.einsum("kij,kj->ki", cov, u)
    b = d_alpha * alpha * u + d_beta * (m + beta * s_u) + g_dg * u
    return jnp.log(w) + log_n, b, u

  def log_density(self, x, t):
    """``log rho(t, x)`` for one point."""
    logits, _, _ = self._components(x, t)
    return jax.nn.logsumexp(logits)

  def drift(self, x, t):
    logits, b, _ = self._components(x, t)
    return jax.nn.softmax(logits) @ b

  def score(self, x, t):
    logits, _, u = self._components(x, t)
    return -(jax.nn.softmax(logits) @ u)

  def fields(self, x, t):
    """``(b, s)`` from one evaluation of the components."""
    logits, b, u = self._components(x, t)
    weights = jax.nn.softmax(logits)
    return weights @ b, -(weights @ u)

  def denoiser(self, x, t):
    """``eta_z = E[z | x_t = x] = -gamma s``."""
    return -jnp.sqrt(self.a * t * (1.0 - t)) * self.score(x, t)

  def batched(self, name):
    """``(x [batch, d], t [batch]) -> [batch, d]`` of the field ``name``."""
    return jax.vmap(getattr(self, name))

  def sample(self, key, num, dtype=jnp.float32):
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, len(self.weights), (num,), p=jnp.asarray(self.weights))
    chol = jnp.asarray(np.linalg.cholesky(self.covs), dtype)
    z = jax.random.normal(k_noise, (num, self.dim), dtype)
    return jnp.asarray(self.means, dtype)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

  def moments(self):
    """Mean and covariance of the mixture (numpy)."""
    mean = self.weights @ self.means
    outer = self.means[:, :, None] * self.means[:, None, :]
    second = np.einsum("k,kij->ij", self.weights, self.covs + outer)
    return mean, second - np.outer(mean, mean)


def four_blobs(a: float = 1.0) -> MixtureInterpolant:
  """Four anisotropic, unequally weighted components in 2D (well separated at ``t = 1``)."""
  return MixtureInterpolant(
    [0.4, 0.3, 0.2, 0.1],
    [[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5], [0.5, 2.5]],
    [
      [[0.3, 0.1], [0.1, 0.2]],
      [[0.2, -0.05], [-0.05, 0.4]],
      [[0.5, 0.0], [0.0, 0.1]],
      [[0.1, 0.0], [0.0, 0.1]],
    ],
    a=a,
  )
