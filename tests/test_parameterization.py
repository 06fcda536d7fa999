"""Tests of diffjax.parameterization against independent references: the defining formulas in
NumPy float64, jax.jvp of the interpolation, finite differences, SciPy quadrature for the VP
marginal, and the autodiff gradient of a Gaussian log density."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from scipy import integrate

from diffjax import parameterization as param
from diffjax import schedules

TARGETS = sorted(param.PREDICTION_TARGETS)
BATCH, EVENT = 6, (3, 2)


def _random_case(key, *, batched: bool = True):
  """Random ``(coefficients, x0, eps)`` in float64 (call inside ``jax.enable_x64``).

  ``alpha, sigma`` in [0.2, 1.5] and derivatives of opposite signs, with a random overall sign,
  keep ``det = alpha d_sigma - sigma d_alpha`` away from zero (|det| >= 0.08) in both time
  directions, so every conversion is well conditioned.
  """
  keys = jax.random.split(key, 7)
  shape = (BATCH,) if batched else ()
  uniform = lambda k: jax.random.uniform(k, shape, jnp.float64, 0.2, 1.5)
  sign = jnp.where(jax.random.bernoulli(keys[6], 0.5, shape), 1.0, -1.0)
  coefficients = param.Coefficients(
    alpha=uniform(keys[0]),
    sigma=uniform(keys[1]),
    d_alpha=-sign * uniform(keys[2]),
    d_sigma=sign * uniform(keys[3]),
  )
  data_shape = (BATCH, *EVENT) if batched else EVENT
  x0 = jax.random.normal(keys[4], data_shape, jnp.float64)
  eps = jax.random.normal(keys[5], data_shape, jnp.float64)
  return coefficients, x0, eps


def _reference_targets(coefficients, x0, eps):
  """The five targets from their definitions, in NumPy float64 (no diffjax code)."""
  alpha, sigma, d_alpha, d_sigma = (
    np.asarray(c).reshape(np.shape(c) + (1,) * len(EVENT)) for c in coefficients
  )
  x0, eps = np.asarray(x0), np.asarray(eps)
  return {
    "eps": eps,
    "x0": x0,
    "v": alpha * eps - sigma * x0,  # Salimans & Ho (2022), Sec. 4
    "velocity": d_alpha * x0 + d_sigma * eps,  # d/dt (alpha x0 + sigma eps)
    "score": -eps / sigma,  # gradient of log N(x_t; alpha x0, sigma^2 I)
  }


@pytest.mark.parametrize("batched", [True, False])
def test_round_trips_between_every_pair_of_targets(batched):
  with jax.enable_x64(True):
    coefficients, x0, eps = _random_case(jax.random.key(0), batched=batched)
    alpha, sigma = (c.reshape(c.shape + (1,) * len(EVENT)) for c in coefficients[:2])
    x_t = alpha * x0 + sigma * eps
    reference = _reference_targets(coefficients, x0, eps)

    @jax.jit  # one program for every conversion: eager calls compile each small op on its own
    def compute(coefficients, x0, eps, x_t, reference):
      forward, backward, converted = {}, {}, {}
      for name in TARGETS:
        target = param.get_prediction_target(name)
        forward[name] = target.from_x0_eps(x0, eps, coefficients=coefficients)
        backward[name] = target.to_x0_eps(reference[name], x_t=x_t, coefficients=coefficients)
      for source, destination in itertools.product(TARGETS, TARGETS):
        converted[source, destination] = param.convert(
          reference[source],
          source=param.get_prediction_target(source),
          destination=param.get_prediction_target(destination),
          x_t=x_t,
          coefficients=coefficients,
        )
      return forward, backward, converted

    forward, backward, converted = compute(coefficients, x0, eps, x_t, reference)
    for name in TARGETS:
      assert param.get_prediction_target(name).name == name
      np.testing.assert_allclose(forward[name], reference[name], rtol=1e-12)
      got_x0, got_eps = backward[name]
      # Condition numbers are <= ~1e2 here (|det| >= 0.08), so float64 keeps ~1e-13.
      np.testing.assert_allclose(got_x0, x0, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(got_eps, eps, rtol=1e-10, atol=1e-12)
    for (source, destination), value in converted.items():
      np.testing.assert_allclose(
        value,
        reference[destination],
        rtol=1e-10,
        atol=1e-12,
        err_msg=f"{source} -> {destination}",
      )


def test_convert_under_jit_in_float32():
  with jax.enable_x64(True):
    coefficients, x0, eps = _random_case(jax.random.key(1))
    alpha, sigma = (c.reshape(c.shape + (1,) * len(EVENT)) for c in coefficients[:2])
    reference = _reference_targets(coefficients, x0, eps)
    x_t = np.asarray(alpha * x0 + sigma * eps)
  to32 = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
  coefficients32 = param.Coefficients(*(to32(c) for c in coefficients))
  convert = jax.jit(param.convert, static_argnames=("source", "destination"))
  got = convert(
    to32(reference["v"]),
    source=param.get_prediction_target("v"),
    destination=param.get_prediction_target("velocity"),
    x_t=to32(x_t),
    coefficients=coefficients32,
  )
  assert got.dtype == jnp.float32
  # Values are O(1) and pass through ~10 float32 operations with no division by anything below
  # 0.2 (alpha^2 + sigma^2 >= 0.08): error ~ 10 * 6e-8 * 25 ~ 2e-5 at most.
  np.testing.assert_allclose(got, reference["velocity"], atol=1e-4)


def test_v_matches_salimans_ho_in_the_variance_preserving_case():
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(2), 3)
    phi = jax.random.uniform(keys[0], (BATCH,), jnp.float64, 0.05, 1.5)
    x0 = jax.random.normal(keys[1], (BATCH, *EVENT), jnp.float64)
    eps = jax.random.normal(keys[2], (BATCH, *EVENT), jnp.float64)
    col = lambda a: a.reshape(BATCH, 1, 1)

    def z(angle):  # z_phi = cos(phi) x + sin(phi) eps
      return col(jnp.cos(angle)) * x0 + col(jnp.sin(angle)) * eps

    # Salimans & Ho (2022), Sec. 4: v = d z_phi / d phi, x = cos(phi) z - sin(phi) v.
    z_phi, dz_dphi = jax.jvp(z, (phi,), (jnp.ones_like(phi),))
    coefficients = param.Coefficients(jnp.cos(phi), jnp.sin(phi), -jnp.sin(phi), jnp.cos(phi))
    v = param.v_from_x0_eps(x0, eps, coefficients=coefficients)
    got_x0, got_eps = param.x0_eps_from_v(v, x_t=z_phi, coefficients=coefficients)
  phi, z_phi, v = np.asarray(phi), np.asarray(z_phi), np.asarray(v)
  np.testing.assert_allclose(v, dz_dphi, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got_x0, col(np.cos(phi)) * z_phi - col(np.sin(phi)) * v, atol=1e-12)
  np.testing.assert_allclose(got_eps, col(np.sin(phi)) * z_phi + col(np.cos(phi)) * v, atol=1e-12)
  np.testing.assert_allclose(got_x0, x0, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "cosine", "edm", "sigmoid"])
def test_velocity_is_the_jvp_of_the_interpolation(name):
  schedule = schedules.get_continuous_schedule(name)
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(3), 3)
    t = jax.random.uniform(keys[0], (BATCH,), jnp.float64, 0.05, 0.95)
    x0 = jax.random.normal(keys[1], (BATCH, *EVENT), jnp.float64)
    eps = jax.random.normal(keys[2], (BATCH, *EVENT), jnp.float64)

    def interpolate(u):  # x_u = alpha(u) x0 + sigma(u) eps, one time per example
      alpha, sigma = schedule.alpha_sigma(u)
      return alpha.reshape(BATCH, 1, 1) * x0 + sigma.reshape(BATCH, 1, 1) * eps

    _, dx_dt = jax.jvp(interpolate, (t,), (jnp.ones_like(t),))
    velocity = param.velocity_from_x0_eps(
      x0, eps, coefficients=param.diffusion_coefficients(schedule, t)
    )
  np.testing.assert_allclose(velocity, dx_dt, rtol=1e-12, atol=1e-12)


def _vp_moments(s, data_mean, data_std):
  """Mean and variance of the VP diffusion marginal at time ``s`` for data N(m, d^2), from
  alpha = exp(-1/2 int_0^s beta) by quadrature (Song et al. 2021, App. B)."""
  integral = integrate.quad(lambda u: 0.1 + u * (20.0 - 0.1), 0.0, s)[0]
  alpha = np.exp(-0.5 * integral)
  return alpha * data_mean, alpha**2 * data_std**2 + 1.0 - alpha**2


def test_flow_map_reproduces_the_diffusion_marginals():
  schedule = schedules.vp_schedule()
  t_flow = np.array([0.1, 0.5, 0.9])
  n, data_mean, data_std = 20000, 2.0, 0.5

  @jax.jit  # one program: eager calls would compile every small op on its own
  def compute(key, t):
    data_key, noise_key = jax.random.split(key)
    data = data_mean + data_std * jax.random.normal(data_key, (3, n))
    noise = jax.random.normal(noise_key, (3, n))
    coefficients = param.flow_coefficients(schedule, t)
    # The flow path x = alpha_fm x1 + sigma_fm x0 with x1 data and x0 noise.
    samples = coefficients.alpha[:, None] * data + coefficients.sigma[:, None] * noise
    return samples, param.flow_coefficients(schedule, jnp.array([0.0, 1.0]))

  samples, ends = compute(jax.random.key(4), jnp.asarray(t_flow, jnp.float32))
  samples = np.asarray(samples, np.float64)
  for row, t in enumerate(t_flow):
    mean, var = _vp_moments(1.0 - t, data_mean, data_std)
    # Gaussian samples: the mean has s.e. sqrt(var / n) and the sample variance
    # s.e. var sqrt(2 / (n - 1)); allow 5 s.e. each (fixed keys, so not flaky).
    assert abs(samples[row].mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(samples[row].var(ddof=1) - var) < 5 * var * np.sqrt(2.0 / (n - 1))
    # The wrong time direction would be far off (this is what the test can catch).
    wrong_mean, _ = _vp_moments(t, data_mean, data_std)
    if abs(t - 0.5) > 0.1:
      assert abs(wrong_mean - mean) > 50 * np.sqrt(var / n)
  np.testing.assert_allclose(ends.alpha, [np.exp(-20.1 / 4), 1.0], rtol=2e-6)
  np.testing.assert_allclose(ends.sigma, [np.sqrt(1.0 - np.exp(-20.1 / 2)), 0.0], atol=1e-6)


@pytest.mark.parametrize("name", ["vp", "cosine", "sigmoid"])
def test_flow_velocity_is_the_finite_difference_of_the_path(name):
  schedule = schedules.get_continuous_schedule(name)
  h = 1e-6
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(5), 3)
    t = jax.random.uniform(keys[0], (BATCH,), jnp.float64, 0.05, 0.95)
    data = np.asarray(jax.random.normal(keys[1], (BATCH, *EVENT), jnp.float64))
    noise = np.asarray(jax.random.normal(keys[2], (BATCH, *EVENT), jnp.float64))

    def path(u):  # the flow path at flow time u, assembled in NumPy
      alpha, sigma = (
        np.asarray(c).reshape(BATCH, 1, 1)
        for c in param.flow_coefficients(schedule, jnp.asarray(u))[:2]
      )
      return alpha * data + sigma * noise

    finite = (path(np.asarray(t) + h) - path(np.asarray(t) - h)) / (2 * h)
    coefficients = param.flow_coefficients(schedule, t)
    velocity = param.velocity_from_x0_eps(data, noise, coefficients=coefficients)
  # Central differences in float64: error ~ h^2 |x'''| + eps |x| / h ~ 1e-9 relative.
  np.testing.assert_allclose(velocity, finite, rtol=1e-6, atol=1e-7)
  if name in ("vp", "cosine", "sigmoid"):  # variance preserving: alpha_fm^2 + sigma_fm^2 = 1
    np.testing.assert_allclose(coefficients.alpha**2 + coefficients.sigma**2, 1.0, rtol=1e-12)


def test_score_is_the_gradient_of_the_gaussian_log_density():
  with jax.enable_x64(True):
    coefficients, x0, _ = _random_case(jax.random.key(6))
    x_t = jax.random.normal(jax.random.key(7), x0.shape, jnp.float64) * 2.0
    alpha, sigma = (c.reshape(BATCH, 1, 1) for c in coefficients[:2])

    def log_density(x):  # point-mass data: q(x_t) = N(x_t; alpha x0, sigma^2 I), exactly
      return jnp.sum(norm.logpdf(x, loc=alpha * x0, scale=sigma))

    exact = jax.grad(log_density)(x_t)  # examples are independent: the sum's gradient splits
    _, eps = param.x0_eps_from_x0(x0, x_t=x_t, coefficients=coefficients)
    score = param.score_from_x0_eps(x0, eps, coefficients=coefficients)
    back_x0, back_eps = param.x0_eps_from_score(exact, x_t=x_t, coefficients=coefficients)
  np.testing.assert_allclose(score, exact, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(back_x0, x0, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(back_eps, eps, rtol=1e-10, atol=1e-12)


def test_conversions_are_differentiable_in_time():
  # eps -> velocity under VP: u = d_alpha (x_t - sigma eps) / alpha + d_sigma eps, which moves with
  # t through alpha, sigma and both derivatives (so second derivatives of the schedule).
  schedule = schedules.vp_schedule()
  eps_target = param.get_prediction_target("eps")
  velocity_target = param.get_prediction_target("velocity")

  def converted_sum(t, x_t, eps):
    coefficients = param.diffusion_coefficients(schedule, t)
    return jnp.sum(
      param.convert(
        eps, source=eps_target, destination=velocity_target, x_t=x_t, coefficients=coefficients
      )
    )

  h = 1e-6
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(8), 3)
    t = jax.random.uniform(keys[0], (BATCH,), jnp.float64, 0.1, 0.9)
    x_t = jax.random.normal(keys[1], (BATCH, *EVENT), jnp.float64)
    v = jax.random.normal(keys[2], (BATCH, *EVENT), jnp.float64)

    @jax.jit  # one program for all three: eager calls compile each small op on its own
    def compute(t, x_t, v):
      grad = jax.grad(converted_sum)(t, x_t, v)
      # Per-example derivatives by central differences (each example depends on its own t only):
      # row i of the vmapped value moves t_i alone by +-h.
      shifts = h * jnp.eye(BATCH, dtype=t.dtype)
      value = jax.vmap(converted_sum, in_axes=(0, None, None))
      finite = (value(t + shifts, x_t, v) - value(t - shifts, x_t, v)) / (2 * h)
      per_example = jax.vmap(
        jax.grad(lambda ti, xi, vi: converted_sum(ti[None], xi[None], vi[None]))
      )(t, x_t, v)
      return grad, finite, per_example

    grad, finite, per_example = compute(t, x_t, v)
  assert np.min(np.abs(finite)) > 1e-3  # a derivative worth checking
  np.testing.assert_allclose(grad, finite, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(per_example, grad, rtol=1e-12)


def test_unknown_target_is_named():
  with pytest.raises(ValueError, match=r"'epsilon'.*'eps'"):
    param.get_prediction_target("epsilon")
