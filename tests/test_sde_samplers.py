"""Reverse-SDE samplers against closed forms: the score of a velocity model on a Gaussian path,
the drift and diffusion of the reverse SDE, the exact moments of Euler-Maruyama and stochastic
Heun on a linear SDE, diffrax's Heun on the same Brownian increments, Langevin correction toward
the marginal, and the choice of samplers per objective. Data are Gaussian (tests/
gaussian_fields.py), so every marginal and every score is known."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import pytest
from gaussian_fields import GaussianData, moment_errors, trig_coefficients

from diffjax import objectives, paths
from diffjax import samplers as S
from diffjax.parameterization import get_prediction_target

DATA = GaussianData([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])
FLOW = paths.get_path("linear").gaussian_coefficients  # flow time: t = 0 noise, t = 1 data
TARGETS = {name: get_prediction_target(name) for name in ("eps", "x0", "v", "velocity", "score")}
KEY = jax.random.PRNGKey(2)


def _denoiser(target, coefficients_fn):
  return S.denoiser(
    DATA.predictor(TARGETS[target], coefficients_fn),
    target=TARGETS[target],
    coefficients_fn=coefficients_fn,
  )


def _exact_score(x, alpha, sigma):
  """``grad log N(x; alpha mu, alpha^2 Sigma + sigma^2 I) = -C^{-1} (x - alpha mu)``."""
  cov = DATA.marginal_cov(alpha, sigma)
  return -np.linalg.solve(cov, (np.asarray(x, np.float64) - alpha * DATA.mean).T).T


# ---- the score and the reverse SDE ------------------------------------------------------------


def test_score_of_a_velocity_model_on_the_linear_path_is_closed_form():
  # A velocity model on x_t = t x1 + (1 - t) x0, x0 ~ N(0, I): score = (t v - x) / (1 - t), and
  # for Gaussian data both equal -C_t^{-1} (x - t mu), C_t = t^2 Sigma + (1 - t)^2 I.
  with jax.enable_x64(True):
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (5, 2), jnp.float64)
    t = jnp.asarray([0.0, 0.1, 0.4, 0.7, 0.95], jnp.float64)
    predict = DATA.predictor(TARGETS["velocity"], FLOW)
    score = jax.jit(S.score_field(predict, target=TARGETS["velocity"], coefficients_fn=FLOW))(x, t)
    v = jax.jit(predict)(x, t)
    np.testing.assert_allclose(score, (t[:, None] * v - x) / (1.0 - t[:, None]), rtol=1e-12)
    for i in range(5):
      exact = _exact_score(x[i : i + 1], float(t[i]), 1.0 - float(t[i]))
      np.testing.assert_allclose(score[i : i + 1], exact, rtol=1e-10, atol=1e-12)
    # A diffusion's target gives the same score (each target's conversion is tested in
    # test_parameterization.py).
    for name in ("v",):
      s = jax.jit(
        S.score_field(
          DATA.predictor(TARGETS[name], trig_coefficients),
          target=TARGETS[name],
          coefficients_fn=trig_coefficients,
        )
      )(x, t)
      c = jax.jit(trig_coefficients)(t)
      for i in range(5):
        exact = _exact_score(x[i : i + 1], float(c.alpha[i]), float(c.sigma[i]))
        np.testing.assert_allclose(s[i : i + 1], exact, rtol=1e-9, atol=1e-12)


def _song_terms(x, t, eta, coefficients_fn):
  """``f x - (1 + eta^2) / 2 g^2 score`` and ``eta |g|`` with ``f = d log alpha / dt`` and ``g^2
  = d sigma^2 / dt - 2 f sigma^2`` by central differences, the score in closed form."""
  step = 1e-6
  lo, hi = coefficients_fn(np.float64(t - step)), coefficients_fn(np.float64(t + step))
  c = coefficients_fn(np.float64(t))
  f = (np.log(float(hi.alpha)) - np.log(float(lo.alpha))) / (2 * step)
  d_var = (float(hi.sigma) ** 2 - float(lo.sigma) ** 2) / (2 * step)
  g2 = d_var - 2.0 * f * float(c.sigma) ** 2
  score = _exact_score(x, float(c.alpha), float(c.sigma))
  return f * np.asarray(x) - 0.5 * (1 + eta**2) * g2 * score, eta * np.sqrt(abs(g2))


def test_reverse_sde_terms_are_song_et_al_in_both_clocks():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2), jnp.float64)
    for eta, coefficients_fn, target, t in [
      (1.0, trig_coefficients, "v", 0.2),
      (0.5, FLOW, "velocity", 0.3),
    ]:
      terms = S.reverse_sde(
        _denoiser(target, coefficients_fn), coefficients_fn=coefficients_fn, eta=eta
      )
      drift, diffusion = jax.jit(terms)(x, jnp.full((4,), t, jnp.float64))
      expected_drift, expected_diffusion = _song_terms(x, t, eta, coefficients_fn)
      np.testing.assert_allclose(drift, expected_drift, rtol=1e-6, atol=1e-8)
      np.testing.assert_allclose(diffusion, np.full(4, expected_diffusion), rtol=1e-6, atol=1e-8)
    # eta = 0: the probability-flow ODE.
    field = S.velocity_field(
      DATA.predictor(TARGETS["eps"], trig_coefficients),
      target=TARGETS["eps"],
      coefficients_fn=trig_coefficients,
    )
    t = jnp.full((4,), 0.6, jnp.float64)
    terms = S.reverse_sde(
      _denoiser("eps", trig_coefficients), coefficients_fn=trig_coefficients, eta=0.0
    )
    np.testing.assert_allclose(jax.jit(terms)(x, t)[0], jax.jit(field)(x, t), rtol=1e-12)


# ---- exact moments of the schemes on a linear SDE ---------------------------------------------

# The reverse SDE of Gaussian data is linear, dx = (A x + c) dt + b dW with A = f + k C^{-1},
# c = -k C^{-1} alpha mu, k = (1 + eta^2) g^2 / 2 (Song et al. 2021, eq. 6), so each scheme maps
# Gaussians to Gaussians and its mean and covariance follow a recursion, independent of the code.


def _linear_terms(t, eta):
  c = trig_coefficients(np.float64(t))
  alpha, sigma = float(c.alpha), float(c.sigma)
  f = float(c.d_alpha) / alpha
  g2 = 2.0 * sigma * float(c.d_sigma) - 2.0 * f * sigma**2
  k = 0.5 * (1.0 + eta**2) * g2
  c_inv = np.linalg.inv(DATA.marginal_cov(alpha, sigma))
  return f * np.eye(2) + k * c_inv, -k * c_inv @ (alpha * DATA.mean), eta * np.sqrt(abs(g2))


def _scheme_moments(times, eta, mean, cov, *, heun):
  """Mean and covariance after Euler-Maruyama (``heun=False``) or stochastic Heun steps."""
  for t, t_next in zip(times[:-1], times[1:], strict=True):
    dt = t_next - t
    a, c, b = _linear_terms(t, eta)
    if heun:
      a1, c1, b1 = _linear_terms(t_next, eta)
      # x' = P x + q + r dW: the Euler predictor x~ = x + (a x + c) dt + b dW, then the average.
      p = np.eye(2) + 0.5 * dt * (a + a1 + dt * a1 @ a)
      q = 0.5 * dt * (c + c1 + dt * a1 @ c)
      r = 0.5 * (b + b1) * np.eye(2) + 0.5 * dt * b * a1
    else:
      p, q, r = np.eye(2) + dt * a, dt * c, b * np.eye(2)
    mean, cov = p @ mean + q, p @ cov @ p.T + abs(dt) * r @ r.T
  return mean, cov


T0, T1 = 0.7, 0.3  # diffusion time of the trig process


def _marginal(t):
  c = trig_coefficients(np.float64(t))
  return float(c.alpha) * DATA.mean, DATA.marginal_cov(float(c.alpha), float(c.sigma))


def _weak_errors(heun, counts, eta=1.0):
  """Largest error of the exact mean and covariance of the scheme at ``T1``."""
  mean0, cov0 = _marginal(T0)
  mean1, cov1 = _marginal(T1)
  errors = []
  for n in counts:
    mean, cov = _scheme_moments(np.linspace(T0, T1, n + 1), eta, mean0, cov0, heun=heun)
    errors.append(max(np.abs(mean - mean1).max(), np.abs(cov - cov1).max()))
  return np.asarray(errors)


def test_scheme_moments_have_weak_orders_one_and_two():
  # Noise-free: the schemes' exact moments against the marginal N(alpha mu, C) at T1 (the exact
  # reverse SDE keeps every marginal). Euler-Maruyama is weak order 1, Heun 2 (additive noise).
  counts = np.array([16, 32, 64, 128])
  for heun, order in ((False, 1.0), (True, 2.0)):
    slope = np.polyfit(np.log(counts), np.log(_weak_errors(heun, counts)), 1)[0]
    assert abs(-slope - order) < 0.25, (heun, slope)


def _sampled_moments(sampler, num, steps, key):
  mean0, cov0 = _marginal(T0)
  times = jnp.linspace(T0, T1, steps + 1)
  chol = np.linalg.cholesky(cov0)
  k_init, k_run = jax.random.split(key)
  z = jax.random.normal(k_init, (num, 2))
  x = jnp.asarray(mean0, jnp.float32) + z @ jnp.asarray(chol.T, jnp.float32)
  out = jax.jit(
    lambda k, x: sampler(
      k, _denoiser("eps", trig_coefficients), x, times=times, coefficients_fn=trig_coefficients
    )
  )(k_run, x)
  return out.samples


@pytest.mark.parametrize(
  "name, heun",
  [("euler_maruyama", False), pytest.param("sde_heun", True, marks=pytest.mark.slow)],
)
def test_sampler_moments_equal_the_scheme_moments(name, heun):
  # The samplers' sample moments against the scheme's exact moments (previous test) at 8 steps,
  # where the schemes' own error is far above the sampling noise: mean and covariance within 5
  # standard errors (s.e. of a mean sqrt(S_ii / n), of a covariance entry sqrt((S_ii S_jj +
  # S_ij^2) / n)). With the weak orders above this is the samplers' weak order.
  sampler = {"euler_maruyama": S.euler_maruyama_sample, "sde_heun": S.sde_heun_sample}[name]
  num, steps = 100_000, 8
  samples = _sampled_moments(sampler, num, steps, jax.random.PRNGKey(3))
  mean0, cov0 = _marginal(T0)
  mean, cov = _scheme_moments(np.linspace(T0, T1, steps + 1), 1.0, mean0, cov0, heun=heun)
  mean_err, mean_se, cov_err, cov_se = moment_errors(samples, mean, cov)
  np.testing.assert_array_less(np.abs(mean_err), 5 * mean_se)
  np.testing.assert_array_less(np.abs(cov_err), 5 * cov_se)
  # ... and the scheme's bias is what the test resolves: the marginal itself is many s.e. away.
  if not heun:
    _, _, cov_bias, bias_se = moment_errors(samples, *_marginal(T1))
    assert np.any(np.abs(cov_bias) > 5 * bias_se)


@pytest.mark.slow
def test_euler_maruyama_weak_order_one_from_samples():
  # The slope of the sampled covariance error at 8 .. 64 steps, 4e6 samples (s.e. of a
  # covariance entry about 7e-4, below a quarter of the smallest error, about 4e-3).
  counts = [8, 16, 32, 64]
  num = 4_000_000
  errors, ses = [], []
  for n in counts:
    samples = _sampled_moments(S.euler_maruyama_sample, num, n, jax.random.PRNGKey(n))
    mean_err, mean_se, cov_err, cov_se = moment_errors(samples, *_marginal(T1))
    errors.append(np.abs(cov_err).max())
    ses.append(cov_se.max())
  assert errors[-1] > 4 * ses[-1], (errors, ses)
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(-slope - 1.0) < 0.25, (errors, slope)


# ---- against diffrax and the ODE samplers ------------------------------------------------------


@pytest.mark.slow
def test_sde_heun_and_euler_maruyama_match_diffrax_on_the_same_increments():
  # Flow time, linear path, Gaussian data: diffrax's Heun and Euler on MultiTerm(ODETerm,
  # ControlTerm) with the Brownian path given as a linear interpolation of the same increments,
  # the drift and diffusion written from the closed-form score (f x - (1 + eta^2)/2 g^2 s).
  eta = 1.0
  with jax.enable_x64(True):
    times = jnp.linspace(0.05, 0.95, 13, dtype=jnp.float64)
    x0 = jax.random.normal(jax.random.PRNGKey(4), (6, 2), jnp.float64)
    z = jax.random.normal(jax.random.PRNGKey(5), (12, 6, 2), jnp.float64)
    dw = jnp.sqrt(jnp.diff(times))[:, None, None] * z
    brownian = diffrax.LinearInterpolation(
      ts=times, ys=jnp.concatenate([jnp.zeros((1, 6, 2)), jnp.cumsum(dw, axis=0)])
    )
    mean = jnp.asarray(DATA.mean)
    cov = jnp.asarray(DATA.cov)

    def drift(t, x, args):
      # alpha = t, sigma = 1 - t: f = 1 / t, g^2 = -2 (1 - t) / t.
      c = t**2 * cov + (1 - t) ** 2 * jnp.eye(2)
      score = -jnp.linalg.solve(c, (x - t * mean).T).T
      return x / t + 0.5 * (1 + eta**2) * 2 * (1 - t) / t * score

    def diffusion(t, x, args):
      return lineax.DiagonalLinearOperator(eta * jnp.sqrt(2 * (1 - t) / t) * jnp.ones_like(x))

    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian))
    for solver, ours in (
      (diffrax.Heun(), S.sde_heun_sample),
      (diffrax.Euler(), S.euler_maruyama_sample),
    ):
      reference = diffrax.diffeqsolve(
        terms,
        solver,
        t0=times[0],
        t1=times[-1],
        dt0=None,
        y0=x0,
        stepsize_controller=diffrax.StepTo(ts=times),
        max_steps=16,
      ).ys[-1]
      out = ours(
        KEY, _denoiser("velocity", FLOW), x0, times=times, coefficients_fn=FLOW, eta=eta, noises=z
      )
      np.testing.assert_allclose(out.samples, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_eta_zero_is_the_probability_flow_ode():
  # eta = 0: Euler-Maruyama is Euler's method, stochastic Heun is Heun's, on the same grid.
  times = S.uniform_grid(num_steps=10, t_start=0.9, t_end=0.1)
  x = jax.random.normal(jax.random.PRNGKey(6), (16, 2))
  for name, ode in (("euler_maruyama", "euler"), ("sde_heun", "heun")):
    kw = dict(target="eps", times=times, coefficients_fn=trig_coefficients)
    predict = DATA.predictor(TARGETS["eps"], trig_coefficients)
    sde_out = S.get_sampler(name, eta=0.0, **kw)(KEY, predict, x)
    ode_out = S.get_sampler(ode, **kw)(KEY, predict, x)
    np.testing.assert_allclose(sde_out.samples, ode_out.samples, rtol=1e-5, atol=1e-5)
    assert int(sde_out.nfe) == int(ode_out.nfe)


# ---- sampling Gaussian data end to end ---------------------------------------------------------


def _assert_moments(samples, *, slack):
  """Mean and covariance within 5 standard errors plus a discretisation ``slack``."""
  samples = np.asarray(samples)
  assert np.all(np.isfinite(samples))
  mean_err, mean_se, cov_err, cov_se = moment_errors(samples, DATA.mean, DATA.cov)
  np.testing.assert_array_less(np.abs(mean_err), 5 * mean_se + slack)
  np.testing.assert_array_less(np.abs(cov_err), 5 * cov_se + slack)


def _flow_sde_times(num_steps):
  """EDM time steps of the linear path from sigma / alpha = 80 (t = 1/81) to the data."""
  return S.edm_grid(num_steps=num_steps, t_start=1.0 / 81.0, t_end=1.0, coefficients_fn=FLOW)


SAMPLING_CASES = [
  # (sampler, target, process, times, options, slack)
  ("euler_maruyama", "v", "trig", 200, {}, 0.04),
  ("sde_heun", "x0", "trig", 50, {}, 0.03),
  ("pc", "eps", "trig", 50, dict(snr=0.1), 0.04),
  ("euler_maruyama", "velocity", "flow", 200, {}, 0.04),
  ("sde_heun", "velocity", "flow", 50, dict(eta=0.5), 0.03),
  ("pc", "velocity", "flow", 50, {}, 0.04),
]


@pytest.mark.parametrize(
  "name, target, process, steps, options, slack",
  [pytest.param(*c, marks=pytest.mark.slow) for c in SAMPLING_CASES],
  ids=[f"{c[0]}-{c[2]}" for c in SAMPLING_CASES],
)
def test_sde_samplers_recover_gaussian_data(name, target, process, steps, options, slack):
  if process == "trig":
    coefficients_fn = trig_coefficients
    times = S.edm_grid(num_steps=steps, t_start=1.0, t_end=1e-3, coefficients_fn=coefficients_fn)
  else:
    coefficients_fn, times = FLOW, _flow_sde_times(steps)
  sampler = S.get_sampler(
    name, target=target, times=times, coefficients_fn=coefficients_fn, **options
  )
  noise = jax.random.normal(jax.random.PRNGKey(1), (4000, 2))
  predict = DATA.predictor(TARGETS[target], coefficients_fn)
  out = jax.jit(lambda k, z: sampler(k, predict, z))(KEY, noise)
  _assert_moments(out.samples, slack=slack)


@pytest.mark.slow
def test_langevin_corrector_restores_the_marginal():
  # One tiny predictor step and 200 Langevin steps at t = 0.5 from N(0, 4 I), far from the
  # marginal N(alpha mu, C): the corrector alone brings the samples to it.
  t = 0.5
  times = jnp.asarray([t + 1e-4, t])
  c = trig_coefficients(np.float64(t))
  alpha, sigma = float(c.alpha), float(c.sigma)
  sampler = S.get_sampler(
    "pc",
    target="eps",
    times=times,
    coefficients_fn=trig_coefficients,
    snr=0.16,
    corrector_steps=200,
  )
  start = 2.0 / float(trig_coefficients(t + 1e-4).sigma) * jax.random.normal(KEY, (4000, 2))
  out = jax.jit(lambda k, z: sampler(k, DATA.predictor(TARGETS["eps"], trig_coefficients), z))(
    jax.random.PRNGKey(7), start
  )
  assert int(out.nfe) == 201
  mean_err, mean_se, cov_err, cov_se = moment_errors(
    out.samples, alpha * DATA.mean, DATA.marginal_cov(alpha, sigma)
  )
  # Langevin with step e leaves an O(e) bias (e ~ 2 (0.16 sigma)^2 ~ 0.03 here).
  np.testing.assert_array_less(np.abs(mean_err), 5 * mean_se + 0.03)
  np.testing.assert_array_less(np.abs(cov_err), 5 * cov_se + 0.03)


# ---- settings, errors, selection by name --------------------------------------------------------


def test_sde_settings_and_errors():
  times = S.uniform_grid(num_steps=8, t_start=0.05, t_end=1.0)
  kw = dict(target="velocity", coefficients_fn=FLOW)
  x = jax.random.normal(KEY, (3, 2))
  predict = DATA.predictor(TARGETS["velocity"], FLOW)
  # The corrector runs where sigma > 0: not at the data end of the linear path.
  sampler = S.get_sampler("pc", times=times, corrector_steps=2, **kw)
  out = jax.jit(lambda z: sampler(KEY, predict, z, return_trajectory=True))(x)
  assert int(out.nfe) == 8 + 2 * 7
  assert out.trajectory.shape == (9, 3, 2)
  np.testing.assert_allclose(out.trajectory[-1], out.samples)
  with pytest.raises(ValueError, match="alpha = 0"):
    S.get_sampler("euler_maruyama", times=S.uniform_grid(num_steps=4, t_start=0.0, t_end=1.0), **kw)
  with pytest.raises(ValueError, match="eta"):
    S.get_sampler("sde_heun", times=times, eta=-1.0, **kw)
  with pytest.raises(ValueError, match="snr"):
    S.get_sampler("pc", times=times, snr=0.0, **kw)
  with pytest.raises(ValueError, match="corrector_steps"):
    S.get_sampler("pc", times=times, corrector_steps=1.5, **kw)
  with pytest.raises(ValueError, match="does not take"):
    S.get_sampler("euler_maruyama", times=times, snr=0.1, **kw)
  with pytest.raises(ValueError, match="coefficients_fn"):
    S.get_sampler("sde_heun", target="velocity", times=times)
  with pytest.raises(ValueError, match="noises of shape"):
    S.euler_maruyama_sample(
      KEY,
      _denoiser("velocity", FLOW),
      x,
      times=times,
      coefficients_fn=FLOW,
      noises=jnp.zeros((2, 3, 2)),
    )


def test_every_sampler_is_selectable_where_the_model_has_a_score():
  new = {"unipc", "deis", "dpmpp_2m_sde", "euler_maruyama", "sde_heun", "pc"}
  assert new <= set(S.SAMPLERS) and new <= set(S.CONTINUOUS_SAMPLERS)
  for name in ("continuous_diffusion", "edm", "diffusion"):
    assert new <= set(objectives.OBJECTIVES[name].samplers)

  def accepted(name, source_is_normal, **keywords):
    spec = objectives.OBJECTIVES[name]
    return set(
      objectives.accepted_samplers(
        spec, dict(name=name, **keywords), source_is_normal=source_is_normal
      )
    )

  # Flow matching: a score only with an N(0, I) source and independent pairs.
  assert accepted("icfm", True) == set(S.GAUSSIAN_FLOW_SAMPLERS)
  assert accepted("fm", True) == set(S.GAUSSIAN_FLOW_SAMPLERS)
  assert accepted("marginal_fm", True) == set(S.GAUSSIAN_FLOW_SAMPLERS)
  assert accepted("icfm", False) == set(S.FLOW_SAMPLERS)
  assert accepted("otcfm", True) == set(S.FLOW_SAMPLERS)
  assert accepted("icfm", True, coupling="exact_ot") == set(S.FLOW_SAMPLERS)
  assert accepted("otcfm", True, coupling="independent") == set(S.GAUSSIAN_FLOW_SAMPLERS)


def _flow_generator(coefficients_fn):
  return S.flow_generator(
    apply=lambda params, x, t, cond: DATA.predictor(TARGETS["velocity"], FLOW)(x, t),
    source=lambda key, num: jax.random.normal(key, (num, 2)),
    data_shape=(2,),
    coefficients_fn=coefficients_fn,
  )


def test_flow_generator_offers_score_samplers_on_a_gaussian_path_only():
  with pytest.raises(ValueError, match=r"needs the model's score.*choose one of \['euler'"):
    _flow_generator(None)(None, KEY, 4, steps=4, sampler="euler_maruyama")
  with pytest.raises(ValueError, match=r"cannot sample .* choose one of \['euler'.*'pc'\]"):
    _flow_generator(FLOW)(None, KEY, 4, steps=4, sampler="ddpm")
  generate = _flow_generator(FLOW)
  out = generate(None, KEY, 8, steps=6, sampler="sde_heun", return_trajectories=True)
  # The SDE samplers start where sigma / alpha = 80 on EDM's steps, not at alpha = 0.
  start = out["trajectories"][0]
  assert out["samples"].shape == (8, 2) and np.all(np.isfinite(out["samples"]))
  assert int(out["nfe"]) == 12
  np.testing.assert_allclose(np.std(start), 80.0 / 81.0, rtol=0.5)
  with pytest.raises(ValueError, match="time_shift"):
    S.flow_generator(apply=None, source=None, data_shape=(2,), time_shift=0.0)


@pytest.mark.slow
def test_flow_generator_samples_gaussian_data_with_every_gaussian_sampler():
  steps = {"euler_maruyama": 200, "pc": 100, "sde_heun": 50, "dpmpp_2m_sde": 100}
  generate = _flow_generator(FLOW)
  for name in S.GAUSSIAN_FLOW_SAMPLERS:
    out = generate(None, jax.random.PRNGKey(8), 4000, steps=steps.get(name, 50), sampler=name)
    _assert_moments(out["samples"], slack=0.04)


# ---- the CLI ----------------------------------------------------------------------------------


def _config_only_workdir(tmp_path, base, *overrides):
  """A workdir holding only config.json: enough for the CLI's checks, which run before any
  restore."""
  from tiny import tiny_config  # pylint: disable=import-outside-toplevel

  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / base
  workdir.mkdir()
  config = tiny_config(*overrides, base=base)
  (workdir / "config.json").write_text(config_lib.config_to_json(config))
  return workdir


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_cli_sampler_names_follow_the_model(tmp_path, capsys, monkeypatch, command):
  from diffjax import cli  # pylint: disable=import-outside-toplevel
  from diffjax import run as run_lib  # pylint: disable=import-outside-toplevel

  class Restored(Exception):
    pass

  def restore(*args, **kwargs):
    raise Restored  # the sampler was accepted: the command went on to the checkpoint

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)
  out = ["--out", str(tmp_path / "samples.npz")] if command == "sample" else []
  icfm = _config_only_workdir(tmp_path, "toy2d_icfm")
  for name in ("euler_maruyama", "sde_heun", "pc", "unipc", "deis", "dpmpp_2m_sde"):
    with pytest.raises(Restored):
      cli.main([command, "--workdir", str(icfm), "--sampler", name, *out])
  # OT pairs leave the velocity without a score, and the CLI says which samplers remain.
  otcfm = _config_only_workdir(tmp_path, "toy2d_otcfm")
  capsys.readouterr()
  for name in ("euler_maruyama", "nonesuch"):
    assert cli.main([command, "--workdir", str(otcfm), "--sampler", name, *out]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--sampler {name!r}: cannot sample a 'otcfm' model" in lines[0]
    assert str(sorted(S.FLOW_SAMPLERS)) in lines[0], lines[0]
