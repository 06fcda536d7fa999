"""Log-likelihood through the probability-flow ODE against closed forms (Gaussian data), and the
bits-per-dimension convention against a hand computation."""

from __future__ import annotations

import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_fields import GaussianData, trig_coefficients
from scipy import stats

from diffjax import paths
from diffjax import samplers as S
from diffjax.parameterization import get_prediction_target

DATA = GaussianData([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])
FLOW = paths.get_path("linear").gaussian_coefficients
VELOCITY = get_prediction_target("velocity")
FLOW_FIELD = DATA.predictor(VELOCITY, FLOW)  # exact velocity of the linear path, t: 0 noise
# Points in the bulk and in the tails of N(mu, Sigma).
POINTS = jnp.asarray([[1.0, -0.5], [0.0, 0.0], [2.5, 0.5], [-1.0, -2.0], [1.5, -1.5]])


def test_exact_divergence_is_the_jacobian_trace_and_hutchinson_is_unbiased():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3))

  def velocity(x, t):  # nonlinear and non-symmetric
    return jnp.tanh(x @ w + 0.3) * (1.0 + t)[:, None] + x**2 @ w.T

  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  t = jnp.linspace(0.0, 1.0, 4)
  num = 20000

  @jax.jit  # one program for every quantity: eager calls compile each small op on its own
  def compute(x, t):
    v, div = S.exact_divergence(velocity)(x, t, None)
    brute = jax.vmap(
      lambda xi, ti: jnp.trace(jax.jacfwd(lambda z: velocity(z[None], ti[None])[0])(xi))
    )(x, t)
    per_probe = {}
    for probes in (S.rademacher_probes, S.gaussian_probes):
      draws = probes(jax.random.PRNGKey(2), (num,) + x.shape)
      per_probe[probes.__name__] = jax.vmap(
        lambda z: S.hutchinson_divergence(velocity)(x, t, z[None])[1]
      )(draws)
    return v, div, brute, velocity(x, t), per_probe

  v, div, brute, direct, per_probe = compute(x, t)
  np.testing.assert_allclose(div, brute, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, direct, rtol=1e-6)
  # Hutchinson per probe: z^T J z. Its mean over P probes has s.e. std / sqrt(P); allow 5 s.e.
  for name, estimates in per_probe.items():
    estimates = np.asarray(estimates)
    se = np.std(estimates, axis=0) / math.sqrt(num)
    np.testing.assert_array_less(
      np.abs(np.mean(estimates, axis=0) - np.asarray(brute)), 5 * se, err_msg=name
    )


def test_flow_path_log_likelihood_is_the_gaussian_log_density():
  # The exact flow maps N(mu, Sigma) (t = 1) onto N(0, I) (t = 0): the ODE log-likelihood is
  # scipy's logpdf up to the RK4 error (O(h^4), h = 1/32) and float32 round-off.
  times = S.uniform_grid(num_steps=32, t_start=1.0, t_end=0.0)
  # Adaptive Dopri5 inside the same augmented solve; both in one jitted program.
  solver = functools.partial(S.integrate_adaptive, solver=diffrax.Dopri5(), rtol=1e-6, atol=1e-6)
  out, adaptive = jax.jit(
    lambda x: (
      S.log_likelihood(None, FLOW_FIELD, x, times=times),
      S.log_likelihood(None, FLOW_FIELD, x, times=times, ode_solver=solver),
    )
  )(POINTS)
  np.testing.assert_allclose(out.log_prob, DATA.log_prob(POINTS), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.log_prob, out.prior_log_prob + out.delta_log_prob, rtol=1e-6)
  # The latent is the closed-form flow map of the data to t = 0.
  np.testing.assert_allclose(
    out.latent,
    DATA.flow_map(POINTS, alpha_from=1.0, sigma_from=0.0, alpha_to=0.0, sigma_to=1.0),
    atol=1e-4,
  )
  assert int(out.nfe) == 32 * 4
  np.testing.assert_allclose(adaptive.log_prob, DATA.log_prob(POINTS), rtol=1e-4, atol=1e-4)


def test_diffusion_time_log_likelihood_with_an_eps_model():
  # Diffusion time runs data (t = 1e-3) -> noise (t = 1); the density at the data time is the
  # marginal N(alpha mu, alpha^2 Sigma + sigma^2 I) there. The prior is the exact marginal at t = 1.
  eps = get_prediction_target("eps")
  velocity = S.velocity_field(
    DATA.predictor(eps, trig_coefficients), target=eps, coefficients_fn=trig_coefficients
  )
  t_data, t_noise = 1e-3, 1.0
  c_data, c_noise = trig_coefficients(np.float64(t_data)), trig_coefficients(np.float64(t_noise))
  prior_mean = jnp.asarray(c_noise.alpha * DATA.mean, jnp.float32)
  prior_cov = DATA.marginal_cov(float(c_noise.alpha), float(c_noise.sigma))
  prior_chol_inv = jnp.asarray(np.linalg.inv(np.linalg.cholesky(prior_cov)), jnp.float32)
  log_det = float(np.linalg.slogdet(prior_cov)[1])

  def prior_log_prob(x):
    z = (x - prior_mean) @ prior_chol_inv.T
    return -0.5 * jnp.sum(z**2, -1) - 0.5 * log_det - math.log(2 * math.pi)

  @jax.jit  # one program: eager calls would compile every small op on its own
  def run(x):
    times = S.log_snr_grid(
      num_steps=48, t_start=t_data, t_end=t_noise, coefficients_fn=trig_coefficients
    )
    return S.log_likelihood(None, velocity, x, times=times, prior_log_prob=prior_log_prob)

  out = run(POINTS)
  exact = DATA.log_prob(POINTS, alpha=float(c_data.alpha), sigma=float(c_data.sigma))
  np.testing.assert_allclose(out.log_prob, exact, rtol=1e-3, atol=1e-3)


def test_hutchinson_log_likelihood_mean_and_variance():
  # With fixed probes z along the path, the linear field gives the estimate
  # log p(x) + z^T M z - tr M, M = int A dt = 1/2 (log C_noise - log C_data) = -1/2 log Sigma
  # (the eigenbasis of Sigma, C_noise = I). Its variance is 2 sum_{i != j} M_ij^2 = 4 M_12^2 for
  # Rademacher probes and 2 tr(M^2) for Gaussian probes.
  num = 4000
  x = jnp.broadcast_to(POINTS[2], (num, 2))
  times = S.uniform_grid(num_steps=16, t_start=1.0, t_end=0.0)
  exact = float(DATA.log_prob(POINTS[2]))
  m = -0.5 * (DATA.eigvecs * np.log(DATA.eigvals)) @ DATA.eigvecs.T
  theory = {S.rademacher_probes: 4 * m[0, 1] ** 2, S.gaussian_probes: 2 * np.trace(m @ m)}
  run = jax.jit(
    lambda x, probes: S.log_likelihood(
      jax.random.PRNGKey(3),
      FLOW_FIELD,
      x,
      times=times,
      divergence=S.hutchinson_divergence,
      probes=probes,
    ),
    static_argnums=1,
  )
  for probes, variance in theory.items():
    out = run(x, probes)
    estimates = np.asarray(out.log_prob, np.float64)
    # Mean of n independent estimates: s.e. sqrt(var / n); 5 s.e. plus RK4 error (1e-3).
    assert abs(estimates.mean() - exact) < 5 * math.sqrt(variance / num) + 1e-3
    # Sample variance: relative s.e. sqrt((kurtosis - 1) / n) <= sqrt(14 / 4000) = 0.06 for a
    # Gaussian quadratic form (chi-square kurtosis 15), ~0 for the two-point Rademacher case.
    np.testing.assert_allclose(estimates.var(), variance, rtol=0.3)


def test_bits_per_dim_convention():
  # Hand computation: the uniform density on [-1, 1 + w)^D, w = 1/127.5, gives every 8-bit value
  # the probability w / (2 + w) = 1/256 per dimension, i.e. exactly 8 bits per dimension.
  w = S.PIXEL_BIN_WIDTH
  for dims in (1, 3072):
    log_prob = -dims * math.log(2.0 + w)
    np.testing.assert_allclose(
      S.bits_per_dim(jnp.asarray([log_prob]), num_dims=dims), 8.0, rtol=1e-6
    )
  # Dequantization adds U[0, w): range, and mean w/2 within 5 s.e. (s.e. w / sqrt(12 n)).
  pixels = jnp.arange(256.0) / 127.5 - 1.0
  x = jnp.broadcast_to(pixels, (64, 256))
  noise = np.asarray(S.dequantize(jax.random.PRNGKey(0), x) - x)
  assert noise.min() >= 0.0 and noise.max() < w
  assert abs(noise.mean() - w / 2) < 5 * w / math.sqrt(12 * noise.size)
  # Jensen: for a 1-D N(0, 0.3^2) density the dequantized bound is >= the exact discrete bits,
  # and close to them (the density is nearly linear across one bin).
  density = stats.norm(0.0, 0.3)
  exact_bits = -np.log2(density.cdf(pixels + w) - density.cdf(pixels))
  u = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (4000, 1)))
  bound = np.asarray(S.bits_per_dim(jnp.asarray(density.logpdf(pixels + w * u)), num_dims=1))
  bound = bound.mean(axis=0)
  central = np.abs(np.asarray(pixels)) < 0.9
  assert np.all(bound[central] >= exact_bits[central] - 1e-3)
  np.testing.assert_allclose(bound[central], exact_bits[central], atol=0.02)


def test_likelihood_errors():
  times = S.uniform_grid(num_steps=2, t_start=1.0, t_end=0.0)
  with pytest.raises(ValueError, match="PRNG key"):
    S.log_likelihood(None, FLOW_FIELD, POINTS, times=times, divergence=S.hutchinson_divergence)
  with pytest.raises(ValueError, match="batch"):
    S.log_likelihood(None, FLOW_FIELD, POINTS[0], times=times)
  with pytest.raises(ValueError, match="rademacher"):
    S.get_probes("uniform")
  with pytest.raises(ValueError, match="hutchinson"):
    S.get_divergence("skilling")
