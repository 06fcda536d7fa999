"""Objectives: time samplers, the Dirac decoupling of flow matching, diffusion loss minimisers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import integrate, special

from diffjax import losses, paths
from diffjax.parameterization import get_prediction_target
from diffjax.schedules import get_continuous_schedule, get_discrete_schedule

# The finite data set of the flow-matching checks: 16 points in 2D, two loose clusters.
DATA = np.concatenate(
  [
    np.random.default_rng(0).normal(size=(8, 2)) * 0.3 + [2.0, 0.0],
    np.random.default_rng(1).normal(size=(8, 2)) * 0.3 - [1.0, 1.5],
  ]
)


# --------------------------------------------------------------------------------------------
# regression_loss
# --------------------------------------------------------------------------------------------


def test_regression_loss_is_weighted_mean_of_per_dim_mse():
  rng = np.random.default_rng(3)
  prediction, target = rng.normal(size=(2, 5, 3, 4))
  weight = rng.uniform(size=5)
  example = losses.TrainingExample(
    model_input=target,
    model_time=np.zeros(5),
    cond=None,
    target=jnp.asarray(target),
    weight=jnp.asarray(weight),
  )
  expected = sum(weight[i] * np.mean((prediction[i] - target[i]) ** 2) for i in range(5)) / 5
  got = losses.regression_loss(jnp.asarray(prediction, jnp.bfloat16), example)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=2e-2)  # bfloat16 input: 3 significant digits
  np.testing.assert_allclose(
    losses.regression_loss(jnp.asarray(prediction), example), expected, rtol=1e-5
  )


# --------------------------------------------------------------------------------------------
# Time samplers
# --------------------------------------------------------------------------------------------

N_TIMES = 200_000


def _moment_check(samples, density, power):
  """Sample mean of t^power against int t^power p(t) dt; s.e. = std / sqrt(n), allow 5 s.e."""
  values = np.asarray(samples, np.float64) ** power
  expected = integrate.quad(lambda t: t**power * density(t), 0.0, 1.0, limit=200)[0]
  standard_error = values.std() / math.sqrt(values.size)
  assert abs(values.mean() - expected) < 5 * standard_error, (power, values.mean(), expected)


def test_time_samplers_match_their_densities():
  key = jax.random.PRNGKey(0)
  cases = {
    "uniform": ({}, lambda t: 1.0),
    "logit_normal": (
      dict(loc=0.5, scale=0.8),
      lambda t: (
        math.exp(-((math.log(t / (1 - t)) - 0.5) ** 2) / (2 * 0.8**2))
        / (0.8 * math.sqrt(2 * math.pi) * t * (1 - t))
      ),
    ),
    "u_shaped": (dict(a=4.0), lambda t: 4.0 * math.cosh(4.0 * (t - 0.5)) / (2 * math.sinh(2.0))),
  }
  for name, (kwargs, density) in cases.items():
    assert integrate.quad(density, 0, 1)[0] == pytest.approx(1.0, abs=1e-8)
    samples = losses.get_time_sampler(name, **kwargs)(key, N_TIMES)
    assert samples.shape == (N_TIMES,)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    for power in (1, 2):
      _moment_check(samples, density, power)
    # Kolmogorov-Smirnov style: the empirical CDF at a few points against the CDF integrated
    # from the density; each has s.e. sqrt(F (1 - F) / n); allow 5 s.e.
    for x in (0.05, 0.2, 0.5, 0.8, 0.95):
      cdf = integrate.quad(density, 0, x)[0]
      empirical = float(jnp.mean(samples <= x))
      assert abs(empirical - cdf) < 5 * math.sqrt(cdf * (1 - cdf) / N_TIMES), (name, x)


def test_u_shaped_sampler_is_u_shaped_and_logit_normal_shifts():
  key = jax.random.PRNGKey(1)
  t = losses.u_shaped_time(key, N_TIMES, a=4.0)
  ends = float(jnp.mean((t < 0.1) | (t > 0.9)))
  middle = float(jnp.mean((t > 0.4) & (t < 0.6)))
  assert ends > 2 * middle
  # loc > 0 moves mass toward t = 1 (a larger median: sigmoid(loc)).
  t = losses.logit_normal_time(key, N_TIMES, loc=1.0, scale=1.0)
  assert float(jnp.median(t)) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=5e-3)


def test_stratified_times_cover_the_interval_evenly():
  batch = 64
  t = losses.stratified_time(jax.random.PRNGKey(2), batch)
  spacings = np.diff(np.sort(np.asarray(t, np.float64)))
  np.testing.assert_allclose(spacings, 1.0 / batch, atol=1e-6)
  # Marginally uniform: t_0 over many keys has mean 1/2 and s.e. sqrt(1/12 / n); allow 5 s.e.
  firsts = jax.jit(jax.vmap(lambda k: losses.stratified_time(k, batch)[0]))(
    jax.random.split(jax.random.PRNGKey(3), 20_000)
  )
  assert abs(float(firsts.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 20_000)


# --------------------------------------------------------------------------------------------
# The exact marginal field on a finite data set.
# --------------------------------------------------------------------------------------------

# Independent numpy coefficient functions t -> (alpha, sigma, gamma) for the brute force.
NUMPY_PATHS = {
  ("linear", (("sigma_min", 0.05),)): lambda t: (t, 1 - 0.95 * t, 0.0 * t),
  ("icfm", (("sigma", 0.3),)): lambda t: (t, 1 - t, 0.3 + 0.0 * t),
  ("brownian_bridge", (("sigma", 0.5),)): lambda t: (t, 1 - t, 0.5 * np.sqrt(t * (1 - t))),
  ("vp", ()): lambda t: (
    np.exp(-0.25 * (1 - t) ** 2 * 19.9 - 0.05 * (1 - t)),
    np.sqrt(-np.expm1(-0.5 * (1 - t) ** 2 * 19.9 - 0.1 * (1 - t))),
    0.0 * t,
  ),
}


def _brute_force_marginal(x, t, data, coefficient_fn):
  """Direct Bayes in float64: w_i ~ N(x; alpha x1_i, s^2 I); E[u | x, x1_i] by conditioning the
  Gaussian (sigma x0 + gamma z) on its value r = x - alpha x1_i; derivatives by central
  differences of the numpy coefficients."""
  h = 1e-6
  alpha, sigma, gamma = coefficient_fn(t)
  d_alpha, d_sigma, d_gamma = [
    (p - m) / (2 * h) for p, m in zip(coefficient_fn(t + h), coefficient_fn(t - h))
  ]
  variance = sigma**2 + gamma**2
  residual = x[None] - alpha * data
  log_density = -0.5 * np.sum(residual**2, axis=-1) / variance - np.log(2 * np.pi * variance)
  weights = special.softmax(log_density)
  expected_x0 = sigma / variance * residual
  expected_z = gamma / variance * residual
  conditional = d_alpha * data + d_sigma * expected_x0 + d_gamma * expected_z
  return weights @ conditional


@functools.partial(jax.jit, static_argnames="path")
def _marginal_velocities(x, t, *, path):
  """The library's marginal field of DATA at ``x`` ``[n, 2]``, ``t`` ``[n]`` (one program)."""
  field = lambda xi, ti: losses.marginal_velocity(xi, ti, data=jnp.asarray(DATA), path=path)
  return jax.vmap(field)(x, t)


@pytest.mark.parametrize("case", list(NUMPY_PATHS), ids=lambda c: c[0])
def test_marginal_velocity_matches_brute_force_bayes(case):
  name, kwargs = case
  path = paths.get_path(name, **dict(kwargs))
  rng = np.random.default_rng(4)
  x = rng.normal(size=(12, 2)) * 1.5
  t = np.linspace(0.05, 0.95, 12)
  got = _marginal_velocities(jnp.asarray(x), jnp.asarray(t, jnp.float32), path=path)
  expected = np.stack(
    [_brute_force_marginal(x[i], t[i], DATA, NUMPY_PATHS[case]) for i in range(12)]
  )
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)


def test_marginal_velocity_is_stable_far_away():
  path = paths.get_path("linear", sigma_min=0.01)
  x = jnp.array([[1e4, -1e4], [-3e3, 5e2], [50.0, 50.0]])
  t = jnp.array([0.5, 0.95, 0.99])
  got = _marginal_velocities(x, t, path=path)
  assert bool(jnp.all(jnp.isfinite(got)))
  # Float64 brute force in the log domain; far away the posterior sits on one data point.
  expected = np.stack(
    [
      _brute_force_marginal(
        np.asarray(x[i], np.float64), float(t[i]), DATA, lambda s: (s, 1 - 0.99 * s, 0.0 * s)
      )
      for i in range(3)
    ]
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# The Dirac decoupling: conditional FM and marginal FM have the same gradient in expectation.
# --------------------------------------------------------------------------------------------


def _init_mlp(key, hidden=32):
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (3, hidden)) / math.sqrt(3),
    "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(k2, (hidden, 2)) / math.sqrt(hidden),
    "b2": jnp.zeros(2),
  }


def _mlp(params, x, t):
  """A 2 -> 32 -> 2 tanh MLP with time as a third input, written out in pure jax."""
  hidden = jnp.tanh(jnp.concatenate([x, t[:, None]], axis=-1) @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def _per_example_loss(params, x, t, target, weight):
  example = losses.TrainingExample(x[None], t[None], None, target[None], weight[None])
  return losses.regression_loss(_mlp(params, x[None], t[None]), example)


def _per_example_losses_and_grads(params, example):
  fn = jax.value_and_grad(_per_example_loss)
  value, grads = jax.vmap(fn, in_axes=(None, 0, 0, 0, 0))(
    params, example.model_input, example.model_time, example.target, example.weight
  )
  return value, jax.vmap(lambda g: ravel_pytree(g)[0])(grads)


def _z_scores(differences):
  """Mean of per-example differences over its standard error std / sqrt(n)."""
  n = differences.shape[0]
  return differences.mean(0) / (differences.std(0) / math.sqrt(n))


@functools.partial(jax.jit, static_argnames=("path", "n"))
def _decoupling_draws(key, data, *, path, n):
  """Per-example losses (at two parameter vectors) and gradients (at the first) for the
  conditional, the exact marginal and a wrong marginal target, on one set of draws."""
  k_pick, k_noise, k_pair, k_theta1, k_theta2 = jax.random.split(key, 5)
  x1 = data[jax.random.randint(k_pick, (n,), 0, data.shape[0])]
  x0 = jax.random.normal(k_noise, x1.shape)
  conditional = losses.flow_matching_example(k_pair, x0=x0, x1=x1, path=path)
  marginal = losses.with_marginal_target(conditional, data=data, path=path)
  # The textbook mistake as a negative control: the prior average of the conditional fields
  # instead of their posterior average (w_i = 1/N). The test must reject it.
  alpha, s, d_alpha, d_s = path.gaussian_coefficients(conditional.model_time)
  x_t = conditional.model_input
  wrong_target = jnp.mean(
    d_alpha[:, None, None] * data[None]
    + (d_s / s)[:, None, None] * (x_t[:, None] - alpha[:, None, None] * data[None]),
    axis=1,
  )
  examples = {
    "conditional": conditional,
    "marginal": marginal,
    "wrong": conditional._replace(target=wrong_target),
  }
  params1, params2 = _init_mlp(k_theta1), _init_mlp(k_theta2)
  out = {}
  for name, example in examples.items():
    out[f"{name}.loss1"], out[f"{name}.grad1"] = _per_example_losses_and_grads(params1, example)
    out[f"{name}.loss2"] = jax.vmap(_per_example_loss, in_axes=(None, 0, 0, 0, 0))(
      params2, example.model_input, example.model_time, example.target, example.weight
    )
  prediction = _mlp(params1, x_t, conditional.model_time)
  out["batch_loss"] = losses.regression_loss(prediction, conditional)
  out["marginal_fm_loss"] = losses.marginal_fm_loss(prediction, conditional, data=data, path=path)
  return out


DECOUPLING_PATHS = {
  "fm": ("linear", dict(sigma_min=0.05)),
  "icfm": ("icfm", dict(sigma=0.3)),
  "sbcfm": ("brownian_bridge", dict(sigma=0.5)),
}


@pytest.mark.parametrize("recipe", sorted(DECOUPLING_PATHS))
def test_conditional_and_marginal_fm_share_gradient_and_differ_by_a_constant(recipe):
  name, kwargs = DECOUPLING_PATHS[recipe]
  n = 8192
  out = _decoupling_draws(
    jax.random.PRNGKey(7), jnp.asarray(DATA, jnp.float32), path=paths.get_path(name, **kwargs), n=n
  )
  out = {k: np.asarray(v, np.float64) for k, v in out.items()}

  # Same samples, so the per-example difference cancels the shared noise (common random
  # numbers). Its mean over n = 8192 examples has s.e. std / sqrt(n); 194 coordinates at 5 s.e.
  # give a false alarm with probability < 194 * 6e-7.
  z = _z_scores(out["conditional.grad1"] - out["marginal.grad1"])
  assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
  # The comparison has power: the gradient itself is far from zero, and the wrong field fails.
  assert np.max(np.abs(_z_scores(out["marginal.grad1"]))) > 10.0
  assert np.max(np.abs(_z_scores(out["conditional.grad1"] - out["wrong.grad1"]))) > 10.0
  # The full-batch losses the train step uses are the means of the per-example losses.
  np.testing.assert_allclose(out["batch_loss"], out["conditional.loss1"].mean(), rtol=1e-5)
  np.testing.assert_allclose(out["marginal_fm_loss"], out["marginal.loss1"].mean(), rtol=1e-5)

  # L_cfm(theta) - L_mfm(theta) does not depend on theta: the difference of the differences at
  # two parameter vectors, on the same samples, is 0 within 5 s.e.
  def difference_of_differences(other):
    return (out["conditional.loss1"] - out[f"{other}.loss1"]) - (
      out["conditional.loss2"] - out[f"{other}.loss2"]
    )

  dd = difference_of_differences("marginal")
  assert abs(dd.mean()) < 5 * dd.std() / math.sqrt(n), (dd.mean(), dd.std() / math.sqrt(n))
  dd_wrong = difference_of_differences("wrong")
  assert abs(dd_wrong.mean()) > 10 * dd_wrong.std() / math.sqrt(n)
  # The constant itself is not zero: the conditional target is noisier than the marginal one.
  assert out["conditional.loss1"].mean() > out["marginal.loss1"].mean()


# --------------------------------------------------------------------------------------------
# Flow-matching pairs, couplings and recipes.
# --------------------------------------------------------------------------------------------


def test_flow_matching_example_applies_coupling_then_path():
  path = paths.get_path("icfm", sigma=0.2)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
  x1 = jnp.asarray(DATA[:6], jnp.float32)
  labels = jnp.arange(6)
  reverse = lambda key, a, b, c: (a, b[::-1], c[::-1])
  example = jax.jit(  # one compiled program instead of op-by-op dispatch
    lambda key: losses.flow_matching_example(
      key,
      x0=x0,
      x1=x1,
      path=path,
      cond=labels,
      coupling=reverse,
      time_sampler=losses.get_time_sampler("u_shaped"),
    )
  )(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(example.cond, labels[::-1])
  t = example.model_time
  # x_t - t x1 - (1 - t) x0 is the extra noise gamma z: the same z makes the target x1 - x0.
  noise = example.model_input - t[:, None] * x1[::-1] - (1 - t[:, None]) * x0
  np.testing.assert_allclose(example.target, x1[::-1] - x0, atol=1e-5)
  assert abs(float(noise.std()) - 0.2) < 0.12  # 12 draws of N(0, 0.2^2): a loose scale check
  np.testing.assert_array_equal(example.weight, jnp.ones(6))


def test_recipes_resolve_to_paths_and_couplings():
  for name in losses.FLOW_MATCHING_RECIPES:
    recipe = losses.get_flow_matching_recipe(name)
    path, coupling = losses.build_flow_matching_recipe(recipe)
    assert isinstance(path, paths.Path) and callable(coupling)
  sb = losses.get_flow_matching_recipe("sbcfm", sigma=0.3)
  assert sb.path == "brownian_bridge" and sb.coupling == "sinkhorn"
  assert sb.coupling_kwargs["epsilon"] == pytest.approx(2 * 0.3**2)
  assert sb.coupling_kwargs["relative_epsilon"] is None
  assert losses.get_flow_matching_recipe("otcfm").coupling == "exact_ot"
  with pytest.raises(ValueError, match="unknown flow-matching recipe 'cfm'.*otcfm"):
    losses.get_flow_matching_recipe("cfm")


def test_flow_matching_step_traces_once():
  path = paths.get_path("linear", sigma_min=1e-4)
  traces = []

  @jax.jit
  def loss(params, key, x1):
    traces.append(None)
    key_noise, key_pair = jax.random.split(key)
    x0 = jax.random.normal(key_noise, x1.shape)
    example = losses.flow_matching_example(key_pair, x0=x0, x1=x1, path=path)
    return losses.regression_loss(_mlp(params, example.model_input, example.model_time), example)

  params = _init_mlp(jax.random.PRNGKey(0))
  values = [loss(params, jax.random.PRNGKey(i), jnp.asarray(DATA, jnp.float32)) for i in range(3)]
  assert len(traces) == 1 and all(np.isfinite(values)) and len(set(map(float, values))) == 3


# --------------------------------------------------------------------------------------------
# Diffusion objectives: minimised at the true conditional expectation (Gaussian toy data).
# --------------------------------------------------------------------------------------------

MU = np.array([1.0, -0.5])
S = 0.7  # data ~ N(MU, S^2 I)
N_DIFFUSION = 16384
# Schedules with a moderate log-SNR range (about [-5, 7] and [-6, 6]): the ELBO and EDM weights
# grow like exp(|lambda|), and with uniform times a few extreme weights would dominate the Monte
# Carlo mean and leave the biased-predictor check below without power. The identities tested
# hold for any range.
T_STEPS = 200


WEIGHTING_KWARGS = {
  "uniform": {},
  "min_snr": dict(gamma=5.0),
  "elbo": {},
  "edm": dict(sigma_data=0.5),
}


def _schedule(kind):
  if kind == "discrete":
    return get_discrete_schedule("linear", num_steps=T_STEPS, beta_start=1e-3, beta_end=0.05)
  return get_continuous_schedule("cosine", log_snr_min=-6.0, log_snr_max=6.0)


@functools.cache
def _diffusion_examples(kind):
  """Data ~ N(MU, S^2 I) and its examples for every (target, weighting), from one key so all
  share t and eps; built in one jit per schedule kind (eager op-by-op dispatch is slower)."""
  schedule = _schedule(kind)
  key_data, key_pair = jax.random.split(jax.random.PRNGKey(11))

  @jax.jit
  def build(key_data, key_pair):
    data = MU + S * jax.random.normal(key_data, (N_DIFFUSION, 2))
    return data, {
      f"{target}.{weighting}": losses.diffusion_example(
        key_pair,
        data=data,
        schedule=schedule,
        target=get_prediction_target(target),
        weighting=losses.get_weighting(weighting, **WEIGHTING_KWARGS[weighting]),
      )
      for target in ("eps", "x0", "v")
      for weighting in losses.WEIGHTINGS
    }

  return build(key_data, key_pair)


def _alpha_sigma(kind, model_time):
  """alpha, sigma of the examples, recovered from the documented model_time convention:
  (step + 1) / T for discrete schedules, diffusion time for continuous ones."""
  schedule = _schedule(kind)
  if kind == "discrete":
    step = np.round(np.asarray(model_time, np.float64) * T_STEPS).astype(int) - 1
    alpha_bar = np.asarray(schedule.alpha_bars, np.float64)[step]
    return np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
  alpha, sigma = schedule.alpha_sigma(model_time)
  return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


def _optimal_prediction(target_name, x_t, alpha, sigma):
  """E[target | x_t] for data N(MU, S^2): E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 + sigma^2)
  (x_t - alpha MU), E[eps | x_t] = (x_t - alpha E[x0 | x_t]) / sigma, v = alpha eps - sigma x0
  (targets are linear in (x0, eps) given x_t, so their conditional means follow)."""
  a, s = alpha[:, None], sigma[:, None]
  x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x_t - a * MU)
  eps = (x_t - a * x0) / s
  return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[target_name]


@jax.jit
def _loss_slope(prediction, direction, example):
  return jax.grad(lambda d: losses.regression_loss(prediction + d * direction, example))(0.0)


def _slope_z(prediction, example, direction):
  """d/d delta of regression_loss(prediction + delta * direction) at 0, over its s.e.

  The slope is the mean over examples of q_i = w_i * mean_d 2 (pred - target) h; its s.e. is
  std(q) / sqrt(n). Also checks that autodiff through regression_loss gives the same mean.
  """
  residual = np.asarray(prediction, np.float64) - np.asarray(example.target, np.float64)
  q = np.asarray(example.weight, np.float64) * np.mean(2 * residual * direction, axis=-1)
  slope = _loss_slope(
    jnp.asarray(prediction, jnp.float32), jnp.asarray(direction, jnp.float32), example
  )
  np.testing.assert_allclose(slope, q.mean(), rtol=1e-3, atol=1e-3 * q.std() / math.sqrt(q.size))
  return q.mean() / (q.std() / math.sqrt(q.size))


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_diffusion_losses_are_minimised_by_the_conditional_expectation(kind):
  _, examples = _diffusion_examples(kind)
  for name, example in examples.items():
    target_name = name.split(".")[0]
    x_t = np.asarray(example.model_input, np.float64)
    alpha, sigma = _alpha_sigma(kind, example.model_time)
    # A perturbation direction that depends on x_t and t, as a network's error would.
    direction = np.tanh(x_t) + np.asarray(example.model_time)[:, None]
    exact = _optimal_prediction(target_name, x_t, alpha, sigma)
    # Slope at the optimum within 5 s.e. of 0; a predictor off by 0.3 is more than 5 s.e. off
    # (at least 6 s.e. for every case here: the ELBO weights are the most spread out).
    assert abs(_slope_z(exact, example, direction)) < 5.0, name
    assert abs(_slope_z(exact + 0.3, example, direction)) > 5.0, name


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_weightings_follow_their_papers(kind):
  _, examples = _diffusion_examples(kind)
  weights = {
    tuple(name.split(".")): np.asarray(example.weight, np.float64)
    for name, example in examples.items()
  }
  example = examples["eps.uniform"]
  schedule = _schedule(kind)
  model_time = np.asarray(example.model_time, np.float64)
  alpha, sigma = _alpha_sigma(kind, example.model_time)
  snr = alpha**2 / sigma**2
  # Hang et al. 2023: eps min(SNR, g)/SNR, x0 min(SNR, g), v min(SNR, g)/(SNR + 1).
  np.testing.assert_allclose(weights["eps", "min_snr"], np.minimum(snr, 5) / snr, rtol=1e-3)
  np.testing.assert_allclose(weights["x0", "min_snr"], np.minimum(snr, 5), rtol=1e-3)
  np.testing.assert_allclose(weights["v", "min_snr"], np.minimum(snr, 5) / (snr + 1), rtol=1e-3)
  for target_name in ("eps", "x0", "v"):
    np.testing.assert_allclose(weights[target_name, "uniform"], 1.0)
  # EDM: x0-MSE weight (s^2 + sd^2) / (s sd)^2 at the VE-equivalent s = sigma / alpha.
  s_ve = sigma / alpha
  np.testing.assert_allclose(weights["x0", "edm"], (s_ve**2 + 0.25) / (s_ve * 0.5) ** 2, rtol=1e-3)
  # ELBO (Kingma et al. 2021): eps weight -1/2 d lambda / dt, lambda = log SNR, by differences
  # (in step units T * (lambda_s - lambda_{s-1}) for the discrete schedule).
  if kind == "discrete":
    log_snr = np.log(snr)
    step = np.round(model_time * T_STEPS).astype(int) - 1
    all_log_snr = np.asarray(schedule.log_snr, np.float64)
    previous = np.where(
      step > 0, all_log_snr[np.maximum(step - 1, 0)], 2 * all_log_snr[0] - all_log_snr[1]
    )
    d_log_snr = T_STEPS * (log_snr - previous)
    rtol = 2e-3
  else:
    # Differences in float64 with h = 1e-6 (one-sided within h of the ends of [0, 1]).
    upper, lower = np.minimum(model_time + 1e-6, 1.0), np.maximum(model_time - 1e-6, 0.0)
    with jax.enable_x64(True):
      d_log_snr = np.asarray(schedule.log_snr(upper) - schedule.log_snr(lower)) / (upper - lower)
    rtol = 2e-3
  np.testing.assert_allclose(weights["eps", "elbo"], -0.5 * d_log_snr, rtol=rtol)
  # One weighting, three targets: the same loss in eps units (x0 err = -(sigma/alpha) eps err).
  np.testing.assert_allclose(weights["x0", "elbo"], weights["eps", "elbo"] * snr, rtol=rtol)
  np.testing.assert_allclose(
    weights["v", "edm"] * (1 + snr), weights["eps", "edm"] * snr, rtol=1e-3
  )


def test_discrete_model_time_convention_and_marginals():
  data, examples = _diffusion_examples("discrete")
  example = examples["eps.uniform"]
  step = np.asarray(example.model_time, np.float64) * T_STEPS - 1
  np.testing.assert_allclose(step, np.round(step), atol=1e-3)  # (s + 1) / T exactly
  assert step.min() > -0.5 and step.max() < T_STEPS - 0.5
  # Steps are uniform on {0, ..., T-1}: mean (T-1)/2 with s.e. sqrt((T^2-1)/12/n); 5 s.e.
  n = step.size
  assert abs(step.mean() - (T_STEPS - 1) / 2) < 5 * math.sqrt((T_STEPS**2 - 1) / 12 / n)
  # x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, with eps the target (Ho et al. 2020, eq. 4).
  alpha, sigma = _alpha_sigma("discrete", example.model_time)
  np.testing.assert_allclose(
    example.model_input,
    alpha[:, None] * np.asarray(data) + sigma[:, None] * np.asarray(example.target),
    atol=1e-4,
  )
  # eps ~ N(0, 1): mean of the 2n values has s.e. 1/sqrt(2n), variance s.e. sqrt(2/(2n)).
  eps = np.asarray(example.target, np.float64)
  assert abs(eps.mean()) < 5 / math.sqrt(eps.size)
  assert abs(eps.var() - 1) < 5 * math.sqrt(2 / eps.size)


# --------------------------------------------------------------------------------------------
# EDM
# --------------------------------------------------------------------------------------------


def test_edm_effective_target_equals_weighted_denoiser_loss_and_is_minimised_at_the_mean():
  sigma_data = 0.5
  key_data, key_pair, key_raw = jax.random.split(jax.random.PRNGKey(13), 3)
  data = MU + S * jax.random.normal(key_data, (N_DIFFUSION, 2))
  example = jax.jit(losses.edm_example, static_argnames="sigma_data")(
    key_pair, data=data, sigma_data=sigma_data
  )
  # Recover sigma and x from Karras et al. Table 1: c_noise = ln(sigma)/4, c_in = 1/sqrt(s^2+sd^2).
  sigma = np.exp(4.0 * np.asarray(example.model_time, np.float64))
  x = np.asarray(example.model_input, np.float64) * np.sqrt(sigma**2 + sigma_data**2)[:, None]
  # ln sigma ~ N(-1.2, 1.2^2): mean s.e. 1.2 / sqrt(n); allow 5 s.e.
  assert abs(np.log(sigma).mean() + 1.2) < 5 * 1.2 / math.sqrt(N_DIFFUSION)
  noise = (x - np.asarray(data, np.float64)) / sigma[:, None]
  assert abs(noise.mean()) < 5 / math.sqrt(noise.size)
  assert abs(noise.var() - 1.0) < 5 * math.sqrt(2 / noise.size)

  # Any raw output F: regression_loss(F) == mean lambda(sigma) mean_d (D(x) - x0)^2.
  raw = jax.random.normal(key_raw, data.shape)
  denoised = losses.edm_denoiser(
    raw, x=jnp.asarray(x, jnp.float32), sigma=jnp.asarray(sigma, jnp.float32), sigma_data=sigma_data
  )
  lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
  direct = np.mean(lam * np.mean((np.asarray(denoised, np.float64) - np.asarray(data)) ** 2, -1))
  np.testing.assert_allclose(losses.regression_loss(raw, example), direct, rtol=1e-4)

  # Optimal denoiser for VE noise: D*(x) = MU + S^2 / (S^2 + sigma^2) (x - MU); F* from D*.
  s2 = sigma[:, None] ** 2
  c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
  c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
  direction = np.tanh(x) + np.log(sigma)[:, None]
  for bias, bound in ((0.0, None), (0.1, 8.0)):
    best = MU + S**2 / (S**2 + s2) * (x - MU) + bias
    raw_best = (best - c_skip[:, None] * x) / c_out[:, None]
    z = _slope_z(raw_best, example, direction)
    assert (abs(z) < 5.0) if bound is None else (abs(z) > bound), (bias, z)


# --------------------------------------------------------------------------------------------
# User errors
# --------------------------------------------------------------------------------------------


def test_user_errors_name_the_value_and_the_choices():
  with pytest.raises(ValueError, match="unknown time sampler 'beta'.*logit_normal"):
    losses.get_time_sampler("beta")
  with pytest.raises(ValueError, match="one point of the data set"):
    losses.marginal_velocity(
      jnp.zeros(3), 0.5, data=jnp.asarray(DATA), path=paths.get_path("linear", sigma_min=0.01)
    )
  with pytest.raises(ValueError, match="unknown weighting 'snr'.*min_snr"):
    losses.get_weighting("snr")
  data = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match="velocity"):
    losses.diffusion_example(
      jax.random.PRNGKey(0),
      data=data,
      schedule=get_discrete_schedule("linear", num_steps=10),
      target=get_prediction_target("velocity"),
      weighting=losses.get_weighting("uniform"),
    )
  with pytest.raises(ValueError, match="DiscreteSchedule or a ContinuousSchedule.*str"):
    losses.diffusion_example(
      jax.random.PRNGKey(0),
      data=data,
      schedule="cosine",
      target=get_prediction_target("eps"),
      weighting=losses.get_weighting("uniform"),
    )
  with pytest.raises(ValueError, match="drop \\['t_min'\\]"):
    losses.diffusion_example(
      jax.random.PRNGKey(0),
      data=data,
      schedule=get_discrete_schedule("linear", num_steps=10),
      target=get_prediction_target("eps"),
      weighting=losses.get_weighting("uniform"),
      t_min=0.1,
    )
