"""Samplers against exact fields: Gaussian data (closed-form posterior means and flow map) and a
finite data set (exact marginal velocity). Tolerances come from standard errors; see
tests/gaussian_fields.py for the closed forms."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from gaussian_fields import (
  GaussianData,
  discrete_predictor,
  finite_data_velocity,
  moment_errors,
  trig_coefficients,
  trig_sigma_ve,
)

from diffjax import losses, paths, schedules
from diffjax import samplers as S
from diffjax.parameterization import Coefficients, get_prediction_target

DATA = GaussianData([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])
N = 4000
NOISE = jax.random.normal(jax.random.PRNGKey(1), (N, 2))
KEY = jax.random.PRNGKey(2)
FLOW = paths.get_path("linear").gaussian_coefficients  # flow time: t = 0 noise, t = 1 data
T_END = 1e-3  # diffusion samplers stop just short of t = 0
TRAIN_STEPS = 1000
TARGETS = {name: get_prediction_target(name) for name in ("eps", "x0", "v", "velocity", "score")}


def _trig_discrete_schedule(num_steps: int) -> schedules.DiscreteSchedule:
  """``abar_s = alpha(t_s)^2`` at ``t_s = (s + 1) / T`` of the trig process."""
  t = np.arange(1, num_steps + 1) / num_steps
  alpha_bars = np.cos(0.5 * np.pi * (0.002 + 0.996 * t)) ** 2
  betas = 1.0 - alpha_bars / np.concatenate([[1.0], alpha_bars[:-1]])
  return schedules.discrete_schedule(jnp.asarray(betas, jnp.float32))


DISCRETE = _trig_discrete_schedule(TRAIN_STEPS)


def _assert_moments(samples, *, slack, mean=DATA.mean, cov=DATA.cov):
  """Sample mean and covariance within 5 standard errors plus a discretisation ``slack``.

  For ``n`` draws of ``N(m, S)`` the mean has s.e. ``sqrt(S_ii / n)`` and the covariance entry
  ``(i, j)`` has s.e. ``sqrt((S_ii S_jj + S_ij^2) / n)``; 5 s.e. is exceeded by chance with
  probability ~6e-7 per entry.
  """
  samples = np.asarray(samples)
  assert np.all(np.isfinite(samples))
  mean_err, mean_se, cov_err, cov_se = moment_errors(samples, mean, cov)
  np.testing.assert_array_less(np.abs(mean_err), 5 * mean_se + slack)
  np.testing.assert_array_less(np.abs(cov_err), 5 * cov_se + slack)


def _flow_map_from_trig(x, t_from, *, alpha_to=1.0, sigma_to=0.0):
  c = trig_coefficients(np.float64(t_from))
  return DATA.flow_map(
    x, alpha_from=float(c.alpha), sigma_from=float(c.sigma), alpha_to=alpha_to, sigma_to=sigma_to
  )


def _run(sampler, predict, noise=NOISE, optimise=False, **kwargs):
  """``sampler`` on ``noise``, jitted. ``optimise`` compiles at XLA's backend level 1 instead of
  the suite's 0 (tests/conftest.py): worth it for programs that draw hundreds of thousands of
  normals, whose unoptimised code runs several times slower than it takes to optimise it. The
  level changes speed, not the values computed."""
  lowered = jax.jit(lambda key, z: sampler(key, predict, z, **kwargs)).lower(KEY, noise)
  options = {"xla_backend_optimization_level": 1} if optimise else None
  return lowered.compile(options)(KEY, noise)


# ---- grids ----------------------------------------------------------------------------------


def test_discrete_spacings_match_lin_et_al_table_2():
  # Lin et al. 2024, Table 2 (T = 1000, 10 steps, 1-indexed): linspace 1, 112, ..., 1000;
  # leading 1, 101, ..., 901; trailing 100, 200, ..., 1000. Ours are 0-indexed, noisiest first.
  kw = dict(num_steps=10, num_train_steps=1000)
  linspace = [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]
  leading = [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
  trailing = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
  for name, published in (("linspace", linspace), ("leading", leading), ("trailing", trailing)):
    np.testing.assert_array_equal(S.get_discrete_steps(name, **kw), np.array(published[::-1]) - 1)
  with pytest.raises(ValueError, match="trailing"):
    S.get_discrete_steps("nope", **kw)
  with pytest.raises(ValueError, match="exceeds"):
    S.trailing_steps(num_steps=11, num_train_steps=10)


def test_edm_sigmas_are_karras_eq5():
  sigmas = np.asarray(S.edm_sigmas(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0))
  assert sigmas.shape == (19,) and sigmas[-1] == 0.0
  np.testing.assert_allclose(sigmas[[0, 17]], [80.0, 0.002], rtol=1e-5)
  # Eq. 5: sigma^(1/rho) is linear in the step index.
  roots = sigmas[:-1] ** (1 / 7)
  np.testing.assert_allclose(np.diff(roots), np.full(17, (roots[-1] - roots[0]) / 17), rtol=1e-4)


def test_time_of_log_snr_inverts_both_directions_and_clamps():
  t = jnp.linspace(0.0, 1.0, 11)
  t_inner = jnp.linspace(0.05, 0.95, 7)  # the linear path is singular at 0 and 1
  extremes = jnp.array([jnp.inf, -jnp.inf])

  @jax.jit  # one program for every inversion: eager calls compile each small op on its own
  def compute(t, t_inner, extremes):
    return (
      S.time_of_log_snr(S.log_snr_of(trig_coefficients(t)), coefficients_fn=trig_coefficients),
      S.time_of_log_snr(S.log_snr_of(FLOW(t_inner)), coefficients_fn=FLOW),
      S.time_of_log_snr(extremes, coefficients_fn=trig_coefficients),
      S.time_of_log_snr(extremes, coefficients_fn=FLOW),
    )

  trig, flow, trig_ends, flow_ends = compute(t, t_inner, extremes)
  np.testing.assert_allclose(trig, t, atol=2e-6)
  np.testing.assert_allclose(flow, t_inner, atol=2e-6)
  # Beyond the range: +inf (sigma = 0) is the data end, -inf the noise end, in either clock.
  np.testing.assert_allclose(trig_ends, [0.0, 1.0])
  np.testing.assert_allclose(flow_ends, [1.0, 0.0])


def test_log_snr_and_edm_time_grids():
  times = S.get_time_grid(
    "log_snr", num_steps=8, t_start=1.0, t_end=0.0, coefficients_fn=trig_coefficients
  )
  lam = np.asarray(S.log_snr_of(trig_coefficients(times)))
  np.testing.assert_allclose(np.diff(lam), np.full(8, (lam[-1] - lam[0]) / 8), rtol=1e-3)
  times = S.get_time_grid(
    "edm", num_steps=8, t_start=1.0, t_end=0.0, rho=7.0, coefficients_fn=trig_coefficients
  )
  roots = trig_sigma_ve(np.asarray(times)) ** (1 / 7)
  np.testing.assert_allclose(np.diff(roots), np.full(8, (roots[-1] - roots[0]) / 8), rtol=1e-3)
  uniform = S.get_time_grid("uniform", num_steps=4, t_start=0.0, t_end=1.0)
  np.testing.assert_allclose(uniform, [0.0, 0.25, 0.5, 0.75, 1.0])
  with pytest.raises(ValueError, match="coefficients_fn"):
    S.get_time_grid("log_snr", num_steps=4)


# ---- fixed-step ODE solvers: order of convergence -------------------------------------------


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_order(name, order):
  # Probability-flow ODE of Gaussian data under the trig process, t: 0.9 -> 0.1, against the
  # closed-form flow map; float64 so round-off does not hide order 4. One compile per method:
  # the number of steps is a traced loop bound.
  method = S.get_fixed_step_method(name)
  t0, t1 = 0.9, 0.1
  with jax.enable_x64(True):
    eps = TARGETS["eps"]
    field = S.ode_field(
      S.velocity_field(
        DATA.predictor(eps, trig_coefficients), target=eps, coefficients_fn=trig_coefficients
      )
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2), jnp.float64)

    @jax.jit
    def solve(n):
      h = (t1 - t0) / n.astype(jnp.float64)

      def step(i, y):
        i = i.astype(jnp.float64)
        return method.step(field, y, t0 + i * h, t0 + (i + 1) * h)

      return jax.lax.fori_loop(0, n, step, x)

    c1 = trig_coefficients(np.float64(t1))
    reference = _flow_map_from_trig(x, t0, alpha_to=float(c1.alpha), sigma_to=float(c1.sigma))
    counts = np.array([8, 16, 32, 64])
    errors = [np.abs(np.asarray(solve(jnp.int32(n))) - reference).max() for n in counts]
    slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
    assert abs(-slope - order) < 0.25, (errors, slope)
    # The scanned integrator takes exactly these steps.
    scanned = S.integrate_fixed(field, x, times=jnp.linspace(t0, t1, 9), method=method)
    np.testing.assert_allclose(scanned.final, solve(jnp.int32(8)), rtol=1e-12, atol=1e-12)
    assert int(scanned.nfe) == 8 * method.evals_per_step


# ---- every sampler recovers N(mu, Sigma) ----------------------------------------------------

# (name, target, settings, slack). Different targets exercise every conversion.
_TIMES = S.uniform_grid(num_steps=100, t_start=1.0, t_end=T_END)
_SIGMAS = S.edm_sigmas(
  num_steps=100, sigma_min=float(trig_sigma_ve(T_END)), sigma_max=float(trig_sigma_ve(1.0))
)
CONTINUOUS_CASES = [
  ("euler", "eps", dict(times=S.uniform_grid(num_steps=400, t_start=1.0, t_end=T_END)), 0.03),
  ("heun", "v", dict(times=_TIMES), 0.02),
  ("midpoint", "x0", dict(times=_TIMES), 0.02),
  ("rk4", "score", dict(times=_TIMES), 0.02),
  ("dopri5", "velocity", dict(times=_TIMES[::10]), 0.02),
  ("tsit5", "eps", dict(times=_TIMES[::10], rtol=1e-4, atol=1e-4), 0.02),
  (
    "dpmpp_2m",
    "x0",
    dict(times=S.log_snr_grid(num_steps=25, coefficients_fn=trig_coefficients, t_end=T_END)),
    0.02,
  ),
  (
    "dpmpp_3m",
    "v",
    dict(times=S.log_snr_grid(num_steps=25, coefficients_fn=trig_coefficients, t_end=T_END)),
    0.02,
  ),
  ("edm", "eps", dict(sigmas=_SIGMAS, s_churn=20.0, s_tmin=0.05, s_tmax=50.0), 0.05),
  (
    "euler_ancestral",
    "v",
    dict(
      sigmas=S.edm_sigmas(
        num_steps=400, sigma_min=float(trig_sigma_ve(T_END)), sigma_max=float(trig_sigma_ve(1.0))
      )
    ),
    0.05,
  ),
]


# Samplers that draw fresh normals at every step (100-400 steps x N = 4000 samples).
_DRAW_HEAVY = {"edm", "euler_ancestral"}


@pytest.mark.parametrize(
  "name, target, settings, slack", CONTINUOUS_CASES, ids=[case[0] for case in CONTINUOUS_CASES]
)
def test_continuous_sampler_recovers_gaussian(name, target, settings, slack):
  target = TARGETS[target]
  sampler = S.get_sampler(name, target=target, coefficients_fn=trig_coefficients, **settings)
  out = _run(sampler, DATA.predictor(target, trig_coefficients), optimise=name in _DRAW_HEAVY)
  _assert_moments(out.samples, slack=slack)
  assert int(out.nfe) > 0


@pytest.mark.parametrize(
  "name, settings",
  [
    ("ddpm", dict(variance="small")),
    ("ddpm", dict(variance="large")),
    ("ddim", dict(eta=0.0)),
    ("ddim", dict(eta=1.0)),
  ],
)
def test_discrete_sampler_recovers_gaussian(name, settings):
  target = TARGETS["v"] if name == "ddim" else TARGETS["eps"]
  steps = S.trailing_steps(num_steps=100, num_train_steps=TRAIN_STEPS)
  sampler = S.get_sampler(name, target=target, schedule=DISCRETE, steps=steps, **settings)
  out = _run(sampler, discrete_predictor(DATA, target, DISCRETE, TRAIN_STEPS))
  _assert_moments(out.samples, slack=0.03)
  assert int(out.nfe) == 100


def test_flow_samplers_on_the_linear_path_match_w2_noise_floor():
  # Flow time, velocity target; 2-Wasserstein (POT, exact) to fresh target samples against the
  # noise floor: W2^2 between two independent target samples of the same size.
  n = 1000
  fresh = np.asarray(DATA.sample(jax.random.PRNGKey(10), 2 * n), np.float64)
  floor = ot.emd2([], [], ot.dist(fresh[:n], fresh[n:]))
  times = S.uniform_grid(num_steps=32, t_start=0.0, t_end=1.0)
  for name in ("heun", "dpmpp_2m"):
    sampler = S.get_sampler(name, target="velocity", times=times, coefficients_fn=FLOW)
    out = _run(sampler, DATA.predictor(TARGETS["velocity"], FLOW), noise=NOISE[:n])
    w2 = ot.emd2([], [], ot.dist(np.asarray(out.samples, np.float64), fresh[:n]))
    assert w2 < 1.5 * floor, (name, w2, floor)
  # The noise itself is far from the target: the check can fail.
  assert ot.emd2([], [], ot.dist(np.asarray(NOISE[:n], np.float64), fresh[:n])) > 5 * floor


# ---- pathwise agreement with the probability-flow ODE ---------------------------------------


def test_ddim_converges_to_probability_flow_ode_and_ddpm_equals_ddim_eta_1():
  target = TARGETS["eps"]
  predict = discrete_predictor(DATA, target, DISCRETE, TRAIN_STEPS)
  x = NOISE[:256]
  # DDIM (eta = 0) from step T-1 ends at abar = 1: the flow map to (alpha, sigma) = (1, 0).
  first = S.discrete_coefficients(DISCRETE.log_snr[-1:])
  reference = DATA.flow_map(
    x,
    alpha_from=float(first.alpha[0]),
    sigma_from=float(first.sigma[0]),
    alpha_to=1.0,
    sigma_to=0.0,
  )
  counts = np.array([25, 50, 100])
  # One jitted program per grid length: eager calls would compile every small op on its own.
  ddim = jax.jit(
    lambda steps: S.ddim_sample(KEY, predict, x, target=target, schedule=DISCRETE, steps=steps)
  )
  errors = []
  for k in counts:
    steps = S.trailing_steps(num_steps=int(k), num_train_steps=TRAIN_STEPS)
    out = ddim(steps)
    errors.append(np.abs(np.asarray(out.samples) - reference).max())
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(slope + 1.0) < 0.3, (errors, slope)  # DDIM is a first-order ODE solver
  assert errors[-1] < 0.1 * np.abs(reference).max()
  # DDPM with beta_tilde and DDIM with eta = 1 are one update in two forms (Song et al. 2021).
  steps = S.trailing_steps(num_steps=50, num_train_steps=TRAIN_STEPS)

  @jax.jit
  def both(steps):
    kw = dict(target=target, schedule=DISCRETE, steps=steps, return_trajectory=True)
    return S.ddpm_sample(KEY, predict, x, **kw), S.ddim_sample(KEY, predict, x, eta=1.0, **kw)

  ddpm, ddim = both(steps)
  np.testing.assert_allclose(ddpm.trajectory, ddim.trajectory, rtol=2e-4, atol=2e-4)
  assert ddpm.trajectory.shape == (51, 256, 2)


def test_dpm_solver_pp_orders():
  # Error of the final state against the closed-form flow map on log-SNR grids: 2M at order 2;
  # 3M no worse than 2M (its first-order start keeps the global order at 2 as well).
  t0, t1 = 1.0, T_END
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2), jnp.float64)
    denoise = S.denoiser(
      DATA.predictor(TARGETS["eps"], trig_coefficients),
      target=TARGETS["eps"],
      coefficients_fn=trig_coefficients,
    )
    c1 = trig_coefficients(np.float64(t1))
    reference = _flow_map_from_trig(x, t0, alpha_to=float(c1.alpha), sigma_to=float(c1.sigma))
    counts = np.array([40, 80, 160])
    errors = {2: [], 3: []}

    # One jitted program per (grid, order): eager calls would compile every small op on its own.
    @functools.partial(jax.jit, static_argnums=(0, 1))
    def sample(n, order):
      times = S.log_snr_grid(
        num_steps=n, t_start=t0, t_end=t1, coefficients_fn=trig_coefficients
      ).astype(jnp.float64)
      times = times.at[0].set(t0).at[-1].set(t1)
      return S.dpm_solver_pp_sample(
        denoise, x, times=times, coefficients_fn=trig_coefficients, order=order
      )

    for n in counts:
      for order in (2, 3) if n > 40 else (2,):
        out = sample(int(n), order)
        errors[order].append(np.abs(np.asarray(out.samples) - reference).max())
  slope = np.polyfit(np.log(counts), np.log(errors[2]), 1)[0]
  assert abs(slope + 2.0) < 0.25, (errors, slope)
  assert np.all(np.asarray(errors[3]) <= np.asarray(errors[2][1:]))


def test_edm_heun_is_second_order_and_sigma_denoiser_is_exact():
  # The VE denoiser built from the trig model equals the closed-form E[x0 | x0 + sigma n = x].
  sigma = jnp.asarray([300.0, 10.0, 1.0, 0.1, 0.01])
  x = NOISE[:5] * 2.0
  built_fn = S.sigma_denoiser(
    DATA.predictor(TARGETS["score"], trig_coefficients),
    target=TARGETS["score"],
    coefficients_fn=trig_coefficients,
  )
  # Jitted: eager calls would compile every small op on its own.
  built, exact = jax.jit(
    lambda x, sigma: (
      built_fn(x, sigma),
      DATA.posterior(x, Coefficients(jnp.ones_like(sigma), sigma, None, None))[0],
    )
  )(x, sigma)
  np.testing.assert_allclose(built, exact, rtol=1e-4, atol=1e-4)
  # Deterministic EDM (S_churn = 0) is Heun in sigma with a final Euler step: order 2 in N.
  with jax.enable_x64(True):

    def denoise(z, s):
      return DATA.posterior(z, Coefficients(jnp.ones_like(s), s, None, None))[0]

    z = jax.random.normal(jax.random.PRNGKey(0), (8, 2), jnp.float64) * 40.0
    counts = np.array([16, 32, 64])
    errors = []
    sample = jax.jit(lambda sigmas: S.edm_sample(KEY, denoise, z, sigmas=sigmas))
    for n in counts:
      sigmas = (
        40.0 ** (1 / 7) + np.linspace(0, 1, int(n)) * (0.02 ** (1 / 7) - 40.0 ** (1 / 7))
      ) ** 7
      out = sample(jnp.asarray(sigmas))  # ends at 0.02: all Heun steps
      errors.append(
        np.abs(
          np.asarray(out.samples)
          - DATA.flow_map(z, alpha_from=1.0, sigma_from=40.0, alpha_to=1.0, sigma_to=0.02)
        ).max()
      )
      assert int(out.nfe) == 2 * (n - 1)
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(slope + 2.0) < 0.25, (errors, slope)


def test_adaptive_nfe_counts_every_evaluation():
  calls = []
  target = TARGETS["velocity"]
  predict = DATA.predictor(target, FLOW)

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return predict(x, t)

  times = jnp.asarray([0.0, 0.5, 1.0])
  x = NOISE[:64]
  sampler = S.get_sampler(
    "dopri5", target=target, times=times, coefficients_fn=FLOW, rtol=1e-6, atol=1e-6
  )
  out = _run(sampler, counted, noise=x, return_trajectory=True)
  jax.block_until_ready(out.samples)
  # 6 evaluations per attempted step (7 stages, first same as last) plus the very first one.
  assert int(out.nfe) == len(calls) > 7
  assert out.trajectory.shape == (3, 64, 2)
  reference = DATA.flow_map(x, alpha_from=0.0, sigma_from=1.0, alpha_to=1.0, sigma_to=0.0)
  np.testing.assert_allclose(out.samples, reference, atol=1e-4)


# ---- guidance ---------------------------------------------------------------------------------


def test_guidance_is_target_independent_and_shifts_the_gaussian_mean():
  # Two Gaussians with one covariance: eps is affine in the mean, so guiding with weight w gives
  # exactly the field of N(mu_u + w (mu_c - mu_u), Sigma).
  cond = GaussianData([1.5, 0.0], DATA.cov)
  uncond = GaussianData([0.5, -0.5], DATA.cov)
  w = 2.0
  guided_data = GaussianData(uncond.mean + w * (cond.mean - uncond.mean), DATA.cov)
  x, t = NOISE[:16], jnp.linspace(0.1, 0.9, 16)

  @jax.jit  # one program for every target: eager calls compile each small op on its own
  def compute(x, t):
    coefficients = trig_coefficients(t)
    mixed = {}
    for name in ("eps", "x0", "v", "velocity", "score"):
      target = TARGETS[name]
      predict = S.classifier_free_guidance(
        cond.predictor(target, trig_coefficients),
        uncond.predictor(target, trig_coefficients),
        scale=w,
      )
      mixed[name] = target.to_x0_eps(predict(x, t), x_t=x, coefficients=coefficients)
    return mixed, guided_data.posterior(x, coefficients)

  mixed, exact = compute(x, t)
  for name, (x0, eps) in mixed.items():
    np.testing.assert_allclose(x0, exact[0], rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(eps, exact[1], rtol=1e-4, atol=1e-4, err_msg=name)
  # Through a sampler: guided samples have the guided mean.
  sampler = S.get_sampler("heun", target="eps", times=_TIMES, coefficients_fn=trig_coefficients)
  out = _run(
    sampler,
    cond.predictor(TARGETS["eps"], trig_coefficients),
    predict_uncond=uncond.predictor(TARGETS["eps"], trig_coefficients),
    guidance_scale=w,
  )
  _assert_moments(out.samples, slack=0.02, mean=guided_data.mean)


def test_batched_guidance_matches_two_calls():
  fields = [GaussianData([1.5, 0.0], DATA.cov), GaussianData([0.5, -0.5], DATA.cov)]

  def apply(params, x, t, labels):
    del params
    outs = [f.predictor(TARGETS["eps"], trig_coefficients)(x, t) for f in fields]
    return jnp.where((labels == 0)[:, None], outs[0], outs[1])

  x, t = NOISE[:8], jnp.full((8,), 0.3)
  labels, null = jnp.zeros(8, jnp.int32), jnp.ones(8, jnp.int32)
  scale = jnp.linspace(0.0, 3.0, 8)  # one weight per example

  @jax.jit  # one program for all three: eager calls compile each small op on its own
  def compute(x, t):
    batched = S.batched_classifier_free_guidance(
      apply, None, cond=labels, null_cond=null, scale=scale
    )(x, t)
    two = S.classifier_free_guidance(
      lambda x, t: apply(None, x, t, labels), lambda x, t: apply(None, x, t, null), scale=scale
    )(x, t)
    return batched, two, apply(None, x, t, null)

  batched, two, unguided = compute(x, t)
  np.testing.assert_allclose(batched, two, rtol=1e-6)
  np.testing.assert_allclose(batched[0], unguided[0], rtol=1e-6)  # w = 0


# ---- a finite data set ------------------------------------------------------------------------


def test_euler_on_finite_data_marginal_field_lands_on_the_data():
  data = jnp.asarray([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
  x, t = NOISE[:32], jnp.linspace(0.0, 0.99, 32)
  path = paths.get_path("linear")
  # Jitted: eager calls would compile every small op on its own.
  reference, velocities = jax.jit(
    lambda x, t: (
      jax.vmap(lambda xi, ti: losses.marginal_velocity(xi, ti, data=data, path=path))(x, t),
      finite_data_velocity(x, t, data=data),
    )
  )(x, t)
  np.testing.assert_allclose(velocities, reference, rtol=1e-4, atol=1e-4)
  velocity = functools.partial(finite_data_velocity, data=data)
  sampler = S.get_sampler(
    "euler", target="velocity", times=S.uniform_grid(num_steps=200, t_start=0.0, t_end=0.999)
  )
  out = _run(sampler, velocity)
  distances = np.linalg.norm(np.asarray(out.samples)[:, None] - np.asarray(data)[None], axis=-1)
  # At t = 0.999 the kernel std is 1e-3; Euler's error is O(1/200).
  assert distances.min(axis=1).max() < 0.05
  # Each point receives 1/3 of the samples: multinomial s.e. sqrt(p (1 - p) / n); 5 s.e.
  shares = np.bincount(distances.argmin(axis=1), minlength=3) / N
  np.testing.assert_array_less(np.abs(shares - 1 / 3), 5 * np.sqrt(2 / 9 / N))


# ---- interface --------------------------------------------------------------------------------


def test_registry_errors_and_trajectories():
  with pytest.raises(ValueError, match="dpmpp_2m"):
    S.get_sampler("dpm++")
  with pytest.raises(ValueError, match="eta"):
    S.get_sampler("heun", target="eps", times=_TIMES, coefficients_fn=trig_coefficients, eta=1.0)
  with pytest.raises(ValueError, match="velocity"):
    S.get_sampler("ddim", target="velocity", schedule=DISCRETE)
  with pytest.raises(ValueError, match="coefficients_fn"):
    S.get_sampler("heun", target="eps", times=_TIMES)
  with pytest.raises(ValueError, match="decreasing"):
    S.get_sampler("ddim", target="eps", schedule=DISCRETE, steps=jnp.arange(10))
  with pytest.raises(ValueError, match="needs"):
    S.get_sampler("edm", target="eps", coefficients_fn=trig_coefficients)
  with pytest.raises(ValueError, match="at least 2"):
    S.get_sampler("rk4", target="eps", times=jnp.ones(1), coefficients_fn=trig_coefficients)
  assert set(S.SAMPLERS) == {
    "ddpm",
    "ddim",
    "euler",
    "heun",
    "midpoint",
    "rk4",
    "edm",
    "dpmpp_2m",
    "dpmpp_3m",
    "euler_ancestral",
    "dopri5",
    "tsit5",
    "unipc",
    "deis",
    "dpmpp_2m_sde",
    "euler_maruyama",
    "sde_heun",
    "pc",
  }
  # Trajectories are [num_steps + 1, batch, ...] and start at the scaled noise.
  x = NOISE[:8]
  sampler = S.get_sampler(
    "euler_ancestral",
    target="eps",
    coefficients_fn=trig_coefficients,
    sigmas=S.edm_sigmas(num_steps=6, sigma_max=10.0),
  )
  out = _run(sampler, DATA.predictor(TARGETS["eps"], trig_coefficients), x, return_trajectory=True)
  assert out.trajectory.shape == (7, 8, 2)
  np.testing.assert_allclose(out.trajectory[0], 10.0 * x, rtol=1e-6)
  np.testing.assert_allclose(out.trajectory[-1], out.samples)


def test_time_of_step_sets_the_network_clock():
  # A network fed integer steps (time_of_step = identity) sees the same states as the default
  # clock (s + 1) / T when its field is read accordingly.
  target = TARGETS["eps"]
  default = discrete_predictor(DATA, target, DISCRETE, TRAIN_STEPS)
  integer_clock = lambda x, s: default(x, (s + 1.0) / TRAIN_STEPS)
  steps = S.trailing_steps(num_steps=5, num_train_steps=TRAIN_STEPS)
  x = NOISE[:8]
  sampler = S.get_sampler("ddpm", target=target, schedule=DISCRETE, steps=steps)
  keys = jax.random.split(KEY, 3)

  @jax.jit  # one program for every sample below: eager calls compile each small op on its own
  def run():
    a = S.ddim_sample(KEY, default, x, target=target, schedule=DISCRETE, steps=steps)
    b = S.ddim_sample(
      KEY,
      integer_clock,
      x,
      target=target,
      schedule=DISCRETE,
      steps=steps,
      time_of_step=lambda s: s.astype(jnp.float32),
    )
    # vmap over keys: independent chains, one per key.
    outs = jax.vmap(lambda k: sampler(k, default, x).samples)(keys)
    return a.samples, b.samples, outs, sampler(keys[1], default, x).samples

  a, b, outs, single = run()
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[1], single, rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs[0], outs[1])


def test_samplers_trace_once_under_jit():
  sampler = S.get_sampler("dpmpp_2m", target="eps", times=_TIMES, coefficients_fn=trig_coefficients)
  predict = DATA.predictor(TARGETS["eps"], trig_coefficients)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key, noise):
    return sampler(key, predict, noise).samples

  first = run(KEY, NOISE[:16])
  second = run(jax.random.PRNGKey(5), NOISE[16:32])
  assert first.shape == second.shape == (16, 2)


def test_generators_sample_trained_style_models():
  # diffusion_generator: a discrete-schedule eps model; its continuous samplers run on the
  # interpolated schedule, which reproduces the discrete coefficients at every training step.
  coefficients = S.interpolated_coefficients_fn(DISCRETE)
  t = (jnp.arange(TRAIN_STEPS) + 1.0) / TRAIN_STEPS
  expected = S.discrete_coefficients(DISCRETE.log_snr)
  np.testing.assert_allclose(coefficients(t).alpha, expected.alpha, rtol=1e-5, atol=1e-6)
  predict = discrete_predictor(DATA, TARGETS["eps"], DISCRETE, TRAIN_STEPS)

  def apply(params, x, t, cond):
    del params, cond
    step_time = jnp.clip(jnp.round(t * TRAIN_STEPS), 1, TRAIN_STEPS) / TRAIN_STEPS
    return predict(x, step_time)

  generate = S.diffusion_generator(
    apply=apply, schedule=DISCRETE, prediction="eps", data_shape=(2,)
  )
  out = generate(None, KEY, 2000, steps=50)
  _assert_moments(out["samples"], slack=0.05)
  assert out["trajectories"] is None and int(out["nfe"]) == 50
  # flow_generator: a velocity model from a standard normal source.
  flow_apply = lambda params, x, t, cond: DATA.predictor(TARGETS["velocity"], FLOW)(x, t)
  source = lambda key, num: jax.random.normal(key, (num, 2))
  generate = S.flow_generator(apply=flow_apply, source=source, data_shape=(2,))
  out = generate(None, KEY, 2000, steps=20, sampler="heun", return_trajectories=True)
  _assert_moments(out["samples"], slack=0.02)
  assert out["trajectories"].shape == (21, 2000, 2)
  with pytest.raises(ValueError, match="arbitrary source"):
    generate(None, KEY, 10, steps=5, sampler="ddim")
