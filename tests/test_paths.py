"""Probability paths: endpoints, targets as time derivatives, the bridge formula, schedule maps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import paths
from diffjax.parameterization import flow_coefficients
from diffjax.schedules import cosine_schedule, vp_schedule

# name -> kwargs of every path factory exercised here.
PATH_CASES = {
  "linear": dict(sigma_min=0.0),
  "cond_ot": dict(sigma_min=0.1),
  "icfm": dict(sigma=0.2),
  "brownian_bridge": dict(sigma=0.5),
  "vp": dict(beta_min=0.1, beta_max=20.0),
  "cosine": dict(),
}


def _draws(batch, dim=3, seed=0, dtype=jnp.float32):
  k0, k1, kz = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.normal(k0, (batch, dim), dtype)
  x1 = 2.0 + jax.random.normal(k1, (batch, dim), dtype)
  z = jax.random.normal(kz, (batch, dim), dtype)
  return x0, x1, z


def test_endpoints_follow_each_papers_definition():
  x0, x1, z = _draws(4)
  zeros, ones = jnp.zeros(4), jnp.ones(4)

  def ends(name, **kw):
    path = paths.get_path(name, **kw)
    return (path.sample_xt(x0=x0, x1=x1, t=zeros, z=z), path.sample_xt(x0=x0, x1=x1, t=ones, z=z))

  start, end = ends("linear", sigma_min=0.0)
  np.testing.assert_allclose(start, x0, atol=1e-6)
  np.testing.assert_allclose(end, x1, atol=1e-6)
  # Lipman et al.: p_1(x | x1) = N(x1, sigma_min^2 I), i.e. x1 + sigma_min x0.
  start, end = ends("cond_ot", sigma_min=0.1)
  np.testing.assert_allclose(start, x0, atol=1e-6)
  np.testing.assert_allclose(end, x1 + 0.1 * x0, atol=1e-6)
  # I-CFM keeps its constant noise at both ends.
  start, end = ends("icfm", sigma=0.2)
  np.testing.assert_allclose(start, x0 + 0.2 * z, atol=1e-6)
  np.testing.assert_allclose(end, x1 + 0.2 * z, atol=1e-6)
  # The bridge is pinned at both ends.
  start, end = ends("schrodinger_bridge", sigma=0.5)
  np.testing.assert_allclose(start, x0, atol=1e-6)
  np.testing.assert_allclose(end, x1, atol=1e-6)
  # VP: flow t = 1 is diffusion t = 0 (data); flow t = 0 keeps alpha = exp(-(b_min + b_max) / 4).
  start, end = ends("vp", beta_min=0.1, beta_max=20.0)
  alpha0 = math.exp(-(0.1 + 20.0) / 4)
  np.testing.assert_allclose(start, alpha0 * x1 + math.sqrt(1 - alpha0**2) * x0, atol=1e-5)
  np.testing.assert_allclose(end, x1, atol=1e-5)
  # Cosine, clipped at log-SNR +-15: alpha, sigma within sqrt(sigmoid(-15)) = 5.5e-4 of the ends.
  start, end = ends("cosine")
  np.testing.assert_allclose(start, x0, atol=5e-3)
  np.testing.assert_allclose(end, x1, atol=5e-3)


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_target_is_the_time_derivative_of_the_sample_path(name):
  # Central differences in float64 with h = 1e-5: truncation ~ h^2 |x'''| ~ 1e-9, rounding
  # ~ 1e-16 |x| / h ~ 1e-11, so 1e-6 leaves room and still catches any wrong coefficient.
  with jax.enable_x64(True):
    path = paths.get_path(name, **PATH_CASES[name])
    x0, x1, z = _draws(5, dtype=jnp.float64)
    t = jnp.array([0.1, 0.3, 0.5, 0.7, 0.9], dtype=jnp.float64)
    h = 1e-5
    xt = lambda s: path.sample_xt(x0=x0, x1=x1, t=s, z=z)
    finite_difference = (xt(t + h) - xt(t - h)) / (2 * h)
    target = path.conditional_target(x0=x0, x1=x1, t=t, z=z)
    np.testing.assert_allclose(target, finite_difference, rtol=1e-6, atol=1e-6)
    pair = path.interpolate(x0=x0, x1=x1, t=t, z=z)
    np.testing.assert_allclose(pair["x_t"], xt(t), rtol=1e-12)
    np.testing.assert_allclose(pair["target"], target, rtol=1e-12)
    assert pair["t"] is t


def test_brownian_bridge_target_matches_torchcfm_formula():
  # TorchCFM (SchrodingerBridgeConditionalFlowMatcher): u = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t)
  # + x1 - x0 with mu_t = t x1 + (1 - t) x0.
  path = paths.get_path("brownian_bridge", sigma=0.7)
  x0, x1, z = _draws(6)
  t = jnp.array([0.02, 0.2, 0.45, 0.5, 0.8, 0.97])
  pair = path.interpolate(x0=x0, x1=x1, t=t, z=z)
  tt = t[:, None]
  mu = tt * x1 + (1 - tt) * x0
  expected = (1 - 2 * tt) / (2 * tt * (1 - tt)) * (pair["x_t"] - mu) + x1 - x0
  np.testing.assert_allclose(pair["target"], expected, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(pair["x_t"] - mu, 0.7 * jnp.sqrt(tt * (1 - tt)) * z, atol=1e-5)


def test_brownian_bridge_target_is_finite_at_the_ends():
  path = paths.brownian_bridge_path(sigma=1.0, derivative_eps=1e-4)
  x0, x1, z = _draws(2)
  target = path.conditional_target(x0=x0, x1=x1, t=jnp.array([0.0, 1.0]), z=z)
  assert bool(jnp.all(jnp.isfinite(target)))
  # The clipped derivative is the exact one at t = eps: sigma (1 - 2 eps) / (2 sqrt(eps (1-eps))).
  d_gamma = (1 - 2e-4) / (2 * math.sqrt(1e-4 * (1 - 1e-4)))
  np.testing.assert_allclose(target[0], x1[0] - x0[0] + d_gamma * z[0], rtol=1e-4)


def test_vp_and_cosine_paths_match_their_diffusion_schedules_at_one_minus_t():
  t = jnp.linspace(0.0, 0.98, 8)
  s = 1.0 - t
  vp = paths.get_path("vp", beta_min=0.1, beta_max=20.0)
  cosine_path = paths.get_path("cosine")

  @jax.jit  # one program for every quantity: eager calls compile each small op on its own
  def compute(t):
    return (
      vp.gaussian_coefficients(t),
      flow_coefficients(vp_schedule(), t),
      vp_schedule().alpha_sigma(1.0 - t),
      cosine_path.gaussian_coefficients(t),
      flow_coefficients(cosine_schedule(), t),
    )

  coefficients, expected_vp, (a, sg), cosine, expected_cosine = compute(t)
  # Closed form of the VP SDE marginal (Song et al. 2021, eq. 29) at diffusion time s = 1 - t.
  alpha = np.exp(-0.25 * s**2 * (20.0 - 0.1) - 0.5 * s * 0.1)
  np.testing.assert_allclose(coefficients.alpha, alpha, rtol=1e-5)
  np.testing.assert_allclose(coefficients.sigma, np.sqrt(1 - alpha**2), rtol=1e-5)
  for got, want in zip(coefficients, expected_vp):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(coefficients.alpha, a, rtol=1e-6)
  np.testing.assert_allclose(coefficients.sigma, sg, rtol=1e-6)

  # Within the clipped range, alpha ~ sin(pi t / 2), sigma ~ cos(pi t / 2).
  np.testing.assert_allclose(cosine.alpha, np.sin(np.pi * t / 2), atol=2e-3)
  np.testing.assert_allclose(cosine.sigma, np.cos(np.pi * t / 2), atol=2e-3)
  for got, want in zip(cosine, expected_cosine):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gaussian_coefficients_combine_both_noises():
  t = jnp.linspace(0.05, 0.95, 7)
  with jax.enable_x64(True):
    t64 = jnp.asarray(t, jnp.float64)
    h = 1e-6
    cases = {
      "icfm": (lambda u: np.sqrt((1 - u) ** 2 + 0.3**2), dict(sigma=0.3)),
      "brownian_bridge": (lambda u: np.sqrt((1 - u) ** 2 + 0.5**2 * u * (1 - u)), dict(sigma=0.5)),
      "linear": (lambda u: 1 - 0.9 * u, dict(sigma_min=0.1)),
    }
    # One jitted program for the three paths: eager calls compile each small op on its own.
    path_list = [paths.get_path(name, **kw) for name, (_, kw) in cases.items()]
    computed = jax.jit(lambda u: [path.gaussian_coefficients(u) for path in path_list])(t64)
    for c, (s_fn, _) in zip(computed, cases.values()):
      np.testing.assert_allclose(c.alpha, t64, rtol=1e-12)
      np.testing.assert_allclose(c.sigma, s_fn(np.asarray(t64)), rtol=1e-10)
      d_s = (s_fn(np.asarray(t64) + h) - s_fn(np.asarray(t64) - h)) / (2 * h)
      np.testing.assert_allclose(c.d_sigma, d_s, rtol=1e-6)
  # At s = 0 (linear, sigma_min = 0, t = 1) ds/dt is the one-sided derivative, not 0/0.
  c = paths.linear_path().gaussian_coefficients(jnp.array([1.0]))
  np.testing.assert_allclose(c.d_sigma, [-1.0])


def test_path_is_a_hashable_static_argument_and_traces_once():
  path = paths.get_path("icfm", sigma=0.1)
  assert hash(path) == hash(path) and path == path
  traces = []

  @jax.jit
  def pair(x0, x1, t, z):
    traces.append(None)
    return path.interpolate(x0=x0, x1=x1, t=t, z=z)

  step = jax.jit(lambda p, *a: p.interpolate(x0=a[0], x1=a[1], t=a[2], z=a[3]), static_argnums=0)
  x0, x1, z = _draws(3)
  t = jnp.array([0.1, 0.5, 0.9])
  for _ in range(2):
    np.testing.assert_allclose(step(path, x0, x1, t, z)["target"], x1 - x0, atol=1e-6)
    pair(x0, x1, t + 0.01, z)
  assert len(traces) == 1
  # vmap over examples agrees with the batched call (t is per example, broadcast inside).
  single = jax.vmap(lambda a, b, s, c: path.sample_xt(x0=a, x1=b, t=s, z=c))(x0, x1, t, z)
  np.testing.assert_allclose(single, path.sample_xt(x0=x0, x1=x1, t=t, z=z), atol=1e-6)


def test_user_errors_are_caught_before_tracing():
  with pytest.raises(ValueError, match="unknown path 'ot'.*brownian_bridge"):
    paths.get_path("ot")
  x0, x1, _ = _draws(2)
  with pytest.raises(ValueError, match="icfm.*pass z"):
    paths.get_path("icfm").sample_xt(x0=x0, x1=x1, t=jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="one shape"):
    paths.get_path("linear").sample_xt(x0=x0, x1=x1[0], t=jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="one time per example"):
    paths.get_path("linear").sample_xt(x0=x0, x1=x1, t=jnp.array([0.1, 0.2, 0.3]))
  # Deterministic paths need no noise.
  out = paths.get_path("linear").conditional_target(x0=x0, x1=x1, t=jnp.array([0.1, 0.2]))
  np.testing.assert_allclose(out, x1 - x0, atol=1e-6)
