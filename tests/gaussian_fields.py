"""Exact fields for sampler tests: Gaussian data and finite data sets, in closed form.

Gaussian data ``x0 ~ N(mu, Sigma)`` under any affine process ``x_t = alpha x0 + sigma eps`` has
the Gaussian marginal ``N(alpha mu, C)``, ``C = alpha^2 Sigma + sigma^2 I``, and, by Gaussian
conditioning (``Cov(x0, x_t) = alpha Sigma``, ``Cov(eps, x_t) = sigma I``):

    E[x0 | x_t]  = mu + alpha Sigma C^{-1} (x_t - alpha mu),
    E[eps | x_t] = sigma C^{-1} (x_t - alpha mu).

Every ``C(t)`` shares Sigma's eigenvectors, so the probability-flow ODE (linear in ``x``,
``dx/dt = alpha' mu + 1/2 C' C^{-1} (x - alpha mu)``) has the closed-form flow map

    x_t - alpha_t mu = C_t^{1/2} C_s^{-1/2} (x_s - alpha_s mu)

(differentiate: ``d/dt C_t^{1/2} z = 1/2 C_t' C_t^{-1} (C_t^{1/2} z)`` for commuting matrices),
and the log-density change along it is ``1/2 log det C_t - 1/2 log det C_s`` in total, i.e.
``int div v dt = 1/2 tr(log C_t - log C_s)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from diffjax.parameterization import Coefficients


class GaussianData:
  """``N(mean, cov)`` data with exact posterior means, flow map and marginal densities."""

  def __init__(self, mean, cov):
    self.mean = np.asarray(mean, np.float64)
    self.cov = np.asarray(cov, np.float64)
    self.eigvals, self.eigvecs = np.linalg.eigh(self.cov)
    self.dim = self.mean.shape[0]

  def _consts(self, dtype):
    return (
      jnp.asarray(self.mean, dtype),
      jnp.asarray(self.eigvals, dtype),
      jnp.asarray(self.eigvecs, dtype),
    )

  def posterior(self, x, coefficients: Coefficients):
    """``(E[x0 | x_t], E[eps | x_t])`` for ``x`` ``[batch, d]`` and ``[batch]`` coefficients."""
    mean, lam, vecs = self._consts(x.dtype)
    a = jnp.asarray(coefficients.alpha, x.dtype)[..., None]
    s = jnp.asarray(coefficients.sigma, x.dtype)[..., None]
    z = ((x - a * mean) @ vecs) / (a**2 * lam + s**2)  # C^{-1} r in the eigenbasis
    x0 = mean + a * ((z * lam) @ vecs.T)
    eps = s * (z @ vecs.T)
    return x0, eps

  def predictor(self, target, coefficients_fn):
    """The exact network ``predict(x, t)`` of a given target."""

    def predict(x, t):
      coefficients = coefficients_fn(t)
      x0, eps = self.posterior(x, coefficients)
      return target.from_x0_eps(x0, eps, coefficients=coefficients)

    return predict

  def marginal_cov(self, alpha, sigma):
    return alpha**2 * self.cov + sigma**2 * np.eye(self.dim)

  def flow_map(self, x, *, alpha_from, sigma_from, alpha_to, sigma_to):
    """The probability-flow ODE's exact map between two (scalar) coefficient pairs (numpy)."""
    lam = self.eigvals
    scale = np.sqrt((alpha_to**2 * lam + sigma_to**2) / (alpha_from**2 * lam + sigma_from**2))
    matrix = (self.eigvecs * scale) @ self.eigvecs.T
    return alpha_to * self.mean + (np.asarray(x, np.float64) - alpha_from * self.mean) @ matrix

  def log_prob(self, x, *, alpha=1.0, sigma=0.0):
    """``log N(x; alpha mu, alpha^2 Sigma + sigma^2 I)`` (scipy)."""
    return stats.multivariate_normal(alpha * self.mean, self.marginal_cov(alpha, sigma)).logpdf(
      np.asarray(x)
    )

  def sample(self, key, num, dtype=jnp.float32):
    chol = np.linalg.cholesky(self.cov)
    z = jax.random.normal(key, (num, self.dim), dtype)
    return jnp.asarray(self.mean, dtype) + z @ jnp.asarray(chol.T, dtype)


def finite_data_velocity(x, t, *, data):
  """Exact marginal velocity of the linear path ``x_t = t x1 + (1 - t) x0`` over a finite data
  set (``x0 ~ N(0, I)``): ``u(x, t) = sum_i w_i (x1_i - x) / (1 - t)`` with posterior weights
  ``w = softmax_i(-||x - t x1_i||^2 / (2 (1 - t)^2))`` (Lipman et al. 2023, eq. 8).

  ``x`` ``[batch, d]``, ``t`` ``[batch]``, ``data`` ``[n, d]``.
  """
  t = t[:, None, None]
  residual = x[:, None, :] - t * data[None]  # [batch, n, d]
  logits = -0.5 * jnp.sum(residual**2, axis=-1) / (1.0 - t[..., 0]) ** 2
  weights = jax.nn.softmax(logits, axis=-1)
  conditional = (data[None] - x[:, None, :]) / (1.0 - t)
  return jnp.einsum("bn,bnd->bd", weights, conditional)


def moment_errors(samples, mean, cov):
  """Sample mean and covariance errors with their standard errors.

  For ``n`` draws of ``N(m, S)``: the sample mean has s.e. ``sqrt(S_ii / n)``; the sample
  covariance entry ``S_ij`` has s.e. ``sqrt((S_ii S_jj + S_ij^2) / n)`` (Wishart variance).

  Returns:
    ``(mean_error / mean_se, cov_error / cov_se)`` as arrays of z-scores, and the raw errors.
  """
  samples = np.asarray(samples, np.float64)
  n = samples.shape[0]
  mean, cov = np.asarray(mean), np.asarray(cov)
  diag = np.diag(cov)
  mean_se = np.sqrt(diag / n)
  cov_se = np.sqrt((np.outer(diag, diag) + cov**2) / n)
  mean_err = samples.mean(0) - mean
  cov_err = np.cov(samples.T) - cov
  return mean_err, mean_se, cov_err, cov_se


# A variance-preserving "trigonometric" process in diffusion time, cheap to compile:
# alpha = cos(phi), sigma = sin(phi), phi = pi/2 (MARGIN + (1 - 2 MARGIN) t), so both ends keep a
# finite log-SNR (|lambda| <= 2 log cot(pi/2 MARGIN) ~ 11.5).
MARGIN = 0.002
_RATE = 0.5 * np.pi * (1.0 - 2.0 * MARGIN)


def trig_coefficients(t):
  """``alpha = cos(phi(t))``, ``sigma = sin(phi(t))`` and their exact derivatives."""
  t = jnp.asarray(t)
  phi = 0.5 * np.pi * MARGIN + _RATE * t
  return Coefficients(
    alpha=jnp.cos(phi),
    sigma=jnp.sin(phi),
    d_alpha=-_RATE * jnp.sin(phi),
    d_sigma=_RATE * jnp.cos(phi),
  )


def trig_sigma_ve(t):
  """``sigma / alpha = tan(phi(t))`` (numpy)."""
  return np.tan(0.5 * np.pi * MARGIN + _RATE * np.asarray(t))


def discrete_predictor(data: GaussianData, target, schedule, num_train_steps):
  """The exact network of a discrete schedule at model time ``(s + 1) / T``."""
  from diffjax.samplers import discrete_coefficients  # pylint: disable=import-outside-toplevel

  def predict(x, t):
    step = jnp.round(t * num_train_steps).astype(jnp.int32) - 1
    coefficients = discrete_coefficients(schedule.log_snr[step])
    x0, eps = data.posterior(x, coefficients)
    return target.from_x0_eps(x0, eps, coefficients=coefficients)

  return predict
