"""The continuous-time diffusion and EDM objectives: EDM's preconditioning against the paper, the
optimal denoiser of a finite data set as the loss's stationary point, sampling and likelihood of
exact models of Gaussian data against their closed forms, and every problem ``check`` reports."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import losses, objectives, parameterization
from diffjax.objectives import base
from diffjax.objectives import continuous_diffusion as cd_lib

MEAN = jnp.asarray([1.0, -0.5])
STD = 0.5  # data N(MEAN, STD^2 I) in 2D

SCHEDULES = {  # one prediction per schedule: every conversion is exact for an exact model
  "vp": dict(prediction="eps"),
  "ve": dict(prediction="x0"),
  "cosine": dict(prediction="v"),
  "shifted_cosine": dict(prediction="velocity", resolution=128),
  "linear_log_snr": dict(prediction="eps", weighting="elbo"),
}


def _normal_source(key, num):
  return jax.random.normal(key, (num, 2))


def _context(apply):
  return base.ObjectiveContext(apply=apply, source=_normal_source, data_shape=(2,))


def _process(schedule, **keywords):
  return cd_lib._schedule(
    schedule, **{**objectives.defaults(cd_lib.continuous_diffusion), **keywords}
  )


def _gaussian_model(process, prediction):
  """The exact prediction for data ``N(m, s^2 I)``: with ``v_t = alpha^2 s^2 + sigma^2``,
  ``E[x0 | x_t] = m + alpha s^2 / v_t (x_t - alpha m)`` and ``E[eps | x_t] = sigma / v_t (x_t -
  alpha m)`` (Gaussian conditioning), converted to the target."""
  target = parameterization.get_prediction_target(prediction)

  def apply(params, x, t, cond, dropout_key=None):
    del params, cond, dropout_key
    c = parameterization.diffusion_coefficients(process, t)
    alpha, sigma = c.alpha[:, None], c.sigma[:, None]
    var = alpha**2 * STD**2 + sigma**2
    x0 = MEAN + alpha * STD**2 / var * (x - alpha * MEAN)
    eps = sigma / var * (x - alpha * MEAN)
    return target.from_x0_eps(x0, eps, coefficients=c)

  return apply


def _raw_output_of(denoiser, sigma_data):
  """The network ``F`` whose preconditioned denoiser is ``denoiser(x, sigma)``: the inverse of
  ``D = c_skip x + c_out F(c_in x; c_noise)``, reading ``sigma = exp(4 c_noise)``."""

  def apply(params, x_in, c_noise, cond, dropout_key=None):
    del params, cond, dropout_key
    sigma = jnp.exp(4.0 * c_noise)[:, None]
    total = sigma**2 + sigma_data**2
    x = x_in * jnp.sqrt(total)
    c_skip, c_out = sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total)
    return (denoiser(x, sigma) - c_skip * x) / c_out

  return apply


def _gaussian_denoiser(x, sigma):
  """``D*(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m)``, the posterior mean for Gaussian data."""
  return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


def _gaussian_flow(x_start, *, a_from, s_from, a_to, s_to):
  """The exact probability-flow map of Gaussian data between two times: ``(x - alpha m) /
  sqrt(alpha^2 s^2 + sigma^2)`` is constant along the flow (the marginals are Gaussian and the
  flow is affine)."""
  scale = jnp.sqrt((a_to**2 * STD**2 + s_to**2) / (a_from**2 * STD**2 + s_from**2))
  return a_to * MEAN + scale * (x_start - a_from * MEAN)


# ---- EDM's preconditioning (Karras et al. 2022, Table 1) ------------------------------------


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_preconditioning_is_table_1(sigma_data):
  sigma = np.asarray([0.002, 0.05, 0.5, 1.0, 7.0, 80.0])
  pre = losses.edm_preconditioning(jnp.asarray(sigma, jnp.float32), sigma_data=sigma_data)
  sd = sigma_data
  np.testing.assert_allclose(pre.c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(pre.c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(pre.c_in, 1.0 / np.sqrt(sigma**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(pre.c_noise, np.log(sigma) / 4.0, rtol=1e-5, atol=1e-7)
  weight = losses.edm_loss_weight(jnp.asarray(sigma, jnp.float32), sigma_data=sigma_data)
  np.testing.assert_allclose(weight, (sigma**2 + sd**2) / (sigma * sd) ** 2, rtol=1e-5)
  # The paper's point (Sec. 5, eq. 8): the effective weight lambda c_out^2 on F's error is 1.
  np.testing.assert_allclose(weight * pre.c_out**2, 1.0, rtol=1e-5)


def test_edm_example_is_the_denoiser_loss():
  """``lambda ||D(x; sigma) - x0||^2 = w ||F - target||^2`` for any ``F`` (eq. 8 rewritten for
  the raw network), with ``D`` from :func:`edm_denoiser`."""

  @jax.jit  # one compiled program instead of op-by-op dispatch
  def both_sides(key):
    keys = jax.random.split(key, 3)
    data = jax.random.normal(keys[0], (64, 3))
    example = losses.edm_example(keys[1], data=data, sigma_data=0.7)
    raw = jax.random.normal(keys[2], data.shape)
    sigma = jnp.exp(4.0 * example.model_time)
    x = example.model_input / losses.edm_preconditioning(sigma, sigma_data=0.7).c_in[:, None]
    denoised = losses.edm_denoiser(raw, x=x, sigma=sigma, sigma_data=0.7)
    paper = losses.edm_loss_weight(sigma, sigma_data=0.7) * jnp.sum((denoised - data) ** 2, -1)
    ours = example.weight * jnp.sum((raw - example.target) ** 2, -1)
    return ours, paper, example.weight

  ours, paper, weight = both_sides(jax.random.PRNGKey(0))
  np.testing.assert_allclose(ours, paper, rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(weight, 1.0, rtol=1e-5)


# ---- the optimal denoiser of a finite data set is the loss's stationary point --------------


POINTS = jnp.asarray([[-1.0, 0.2], [0.5, 0.9], [1.2, -0.7], [0.1, -1.1], [-0.6, -0.4]])


def _finite_data_denoiser(noise_scale=1.0):
  """``D*(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i``, the posterior mean of
  ``y`` uniform over the points given ``x = y + sigma n`` (``noise_scale != 1``: the optimum of
  the wrong noise level, a control)."""

  def denoise(x, sigma):
    logits = -jnp.sum((x[:, None] - POINTS) ** 2, -1) / (2.0 * (noise_scale * sigma) ** 2)
    return jax.nn.softmax(logits, axis=-1) @ POINTS

  return denoise


@jax.jit
def _stationarity_grads(noise_scale, key):
  """``d loss / d delta`` at ``delta = 0`` on 32 independent batches of 8192, for the network
  ``F_delta = F + phi(c_in x, c_noise) delta`` around the optimal denoiser of the noise level
  ``noise_scale`` sigma (traced: one program for the optimum and the control), with features
  ``phi = [1, c_in x, c_noise, c_noise c_in x]``: zero in expectation iff ``E[(F - target)
  phi] = 0``, which holds at ``D*`` because ``E[target | x, sigma] = F*(x, sigma)`` and the
  weight is a function of ``sigma``."""
  raw = _raw_output_of(_finite_data_denoiser(noise_scale), 0.5)

  def apply(params, x_in, c_noise, cond, dropout_key=None):
    phi = jnp.concatenate(
      [jnp.ones_like(x_in[:, :1]), x_in, c_noise[:, None], c_noise[:, None] * x_in], axis=-1
    )
    return raw(None, x_in, c_noise, cond) + phi @ params

  objective = objectives.get_objective("edm", _context(apply))

  def grad_of_chunk(key):
    k_data, k_loss = jax.random.split(key)
    data = POINTS[jax.random.randint(k_data, (8192,), 0, POINTS.shape[0])]
    return jax.grad(objective.loss_fn)(jnp.zeros((6, 2)), k_loss, {"x": data})

  return jax.vmap(grad_of_chunk)(jax.random.split(key, 32))


def _stationarity(noise_scale):
  """Mean and standard error over the 32 batches of :func:`_stationarity_grads`."""
  grads = _stationarity_grads(jnp.float32(noise_scale), jax.random.PRNGKey(3))
  return grads.mean(0), grads.std(0, ddof=1) / math.sqrt(grads.shape[0])


def test_finite_data_optimal_denoiser_is_stationary():
  mean, stderr = _stationarity(1.0)
  # 12 components, each a mean of 32 chunk means: |z| < 4 fails by chance with p ~ 1e-3.
  assert np.all(np.abs(mean) < 4.0 * stderr), (mean, stderr)
  # Control: the optimum of the wrong noise level is not a stationary point.
  mean, stderr = _stationarity(1.5)
  assert np.max(np.abs(mean) / stderr) > 10.0, (mean, stderr)


def test_finite_data_optimal_denoiser_has_the_lowest_loss():
  """At fixed keys, moving the denoiser off ``D*`` raises the loss (the cross term is zero in
  expectation, the quadratic term is not)."""

  def loss_with(noise_scale, offset):
    denoiser = lambda x, sigma: _finite_data_denoiser(noise_scale)(x, sigma) + offset
    objective = objectives.get_objective("edm", _context(_raw_output_of(denoiser, 0.5)))
    data = POINTS[jax.random.randint(jax.random.PRNGKey(1), (65536,), 0, 5)]
    return objective.loss_fn(None, jax.random.PRNGKey(2), {"x": data})

  # D*, the optima of the noise levels 0.7 sigma and 1.4 sigma, and D* + 0.05: one program.
  noise_scales, offsets = jnp.asarray([1.0, 0.7, 1.4, 1.0]), jnp.asarray([0.0, 0.0, 0.0, 0.05])
  best, *wrong = np.asarray(jax.jit(jax.vmap(loss_with))(noise_scales, offsets))
  assert np.all(np.asarray(wrong) > best), (best, wrong)


# ---- continuous diffusion on Gaussian data ---------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "velocity"])
def test_continuous_diffusion_loss_is_lowest_at_the_exact_model(prediction):
  process = _process("vp")
  exact = _gaussian_model(process, prediction)
  data = MEAN + STD * jax.random.normal(jax.random.PRNGKey(0), (16384, 2))

  # The model's params are an offset added to the exact prediction.
  offset_model = lambda offset, *args, **kw: exact(None, *args, **kw) + offset
  objective = objectives.get_objective(
    "continuous_diffusion", _context(offset_model), prediction=prediction, weighting="min_snr"
  )
  loss_with = lambda offset, data: objective.loss_fn(offset, jax.random.PRNGKey(1), {"x": data})

  # The exact model and the model off by -0.05 and +0.05, on the same draws: one program.
  offsets = jnp.asarray([0.0, -0.05, 0.05])
  best, *wrong = np.asarray(jax.jit(jax.vmap(loss_with, (0, None)))(offsets, data))
  assert np.isfinite(best)
  assert np.all(np.asarray(wrong) > best), (best, wrong)


# Two compiled samplers per schedule: 've' and 'cosine' run in the slow suite; their schedules
# and predictions (x0, v) stay covered fast by test_continuous_diffusion_likelihood_of_gaussian_data
# (the same objective's probability-flow field against the exact flow), and the default sampler
# by the three schedules here.
@pytest.mark.parametrize(
  "schedule",
  [
    pytest.param(name, marks=pytest.mark.slow) if name in ("ve", "cosine") else name
    for name in sorted(SCHEDULES)
  ],
)
def test_continuous_diffusion_default_sampler_follows_the_exact_flow(schedule):
  """Each sample of the default sampler (Heun) against the exact flow of its own start
  ``x_1 = trajectories[0]`` to ``t_min``; halving the step quarters the error (second order)."""
  keywords = SCHEDULES[schedule]
  process = _process(schedule, **keywords)
  objective = objectives.get_objective(
    "continuous_diffusion",
    _context(_gaussian_model(process, keywords["prediction"])),
    schedule=schedule,
    **keywords,
  )
  assert objectives.OBJECTIVES["continuous_diffusion"].default_sampler == "heun"
  a0, s0 = process.alpha_sigma(1e-5)
  a1, s1 = process.alpha_sigma(1.0)
  errors = []
  for steps in (100, 200):  # in the asymptotic range of every schedule here
    out = objective.generate(
      None, jax.random.PRNGKey(1), 1000, steps=steps, return_trajectories=True
    )
    start = out["trajectories"][0]
    # The start is N(0, sigma(1)^2 I): the terminal marginal without alpha(1) x0.
    np.testing.assert_allclose(np.std(start), s1, rtol=0.05)
    exact = _gaussian_flow(start, a_from=a1, s_from=s1, a_to=a0, s_to=s0)
    errors.append(float(jnp.max(jnp.abs(out["samples"] - exact))))
  assert errors[1] < 2e-3, errors
  assert 3.0 < errors[0] / errors[1] < 5.0, errors


# Steps per sampler so that the discretisation error stays below ~0.01 on this problem.
_STEPS = {
  "euler": 400,
  "euler_ancestral": 800,
  "edm": 100,
  "heun": 100,
  "midpoint": 100,
  "rk4": 30,
  "dopri5": 10,
  "tsit5": 10,
  "dpmpp_2m": 100,
  "dpmpp_3m": 60,
  "unipc": 30,
  "deis": 60,
  "dpmpp_2m_sde": 100,
  "euler_maruyama": 800,
  "sde_heun": 100,
  "pc": 200,
}


def _assert_gaussian_samples(samples, *, mean_bias):
  """Sample mean and std of ``N(m, s^2 I)`` within 4 standard errors (``s / sqrt(n)``, ``s /
  sqrt(2 n)``), plus ``mean_bias`` (the known cost of the prior's missing ``alpha(1) m``) and
  0.01 of discretisation."""
  samples = np.asarray(samples)
  n = samples.shape[0]
  assert np.all(np.isfinite(samples))
  mean_err = np.abs(samples.mean(0) - np.asarray(MEAN))
  std_err = np.abs(samples.std(0) - STD)
  assert np.all(mean_err < 4.0 * STD / math.sqrt(n) + mean_bias + 0.01), mean_err
  assert np.all(std_err < 4.0 * STD / math.sqrt(2 * n) + 0.01), std_err


@pytest.mark.slow
def test_continuous_diffusion_every_listed_sampler_samples_gaussian_data():
  process = _process("vp")
  objective = objectives.get_objective(
    "continuous_diffusion", _context(_gaussian_model(process, "eps"))
  )
  spec = objectives.OBJECTIVES["continuous_diffusion"]
  assert set(spec.samplers) == set(_STEPS)
  a1, s1 = process.alpha_sigma(1.0)
  # Starting from N(0, sigma(1)^2) instead of N(alpha(1) m, .) moves the mean by about
  # alpha(1) m s / sqrt(alpha(1)^2 s^2 + sigma(1)^2) at t_min.
  bias = float(a1 * STD / jnp.sqrt(a1**2 * STD**2 + s1**2)) * np.abs(np.asarray(MEAN))
  for sampler in spec.samplers:
    out = objective.generate(
      None, jax.random.PRNGKey(2), 8000, steps=_STEPS[sampler], sampler=sampler
    )
    _assert_gaussian_samples(out["samples"], mean_bias=bias)


def test_continuous_diffusion_rejects_discrete_samplers():
  process = _process("vp")
  objective = objectives.get_objective(
    "continuous_diffusion", _context(_gaussian_model(process, "eps"))
  )
  for sampler in ("ddpm", "ddim"):
    assert sampler not in objectives.OBJECTIVES["continuous_diffusion"].samplers
    with pytest.raises(ValueError, match="cannot sample a continuous-time"):
      objective.generate(None, jax.random.PRNGKey(0), 4, steps=4, sampler=sampler)


def _likelihood_with_prior(x, *, a0, s0, a1, s1, prior_std):
  """What the exact probability-flow ODE with the prior ``N(0, prior_std^2 I)`` gives: ``log
  N(x_1; 0, c^2 I) + log |d x_1 / d x|`` with ``x_1`` the exact flow of ``x`` (affine, so the
  log-Jacobian is ``D log`` of its scale)."""
  x1 = _gaussian_flow(x, a_from=a0, s_from=s0, a_to=a1, s_to=s1)
  scale = jnp.sqrt((a1**2 * STD**2 + s1**2) / (a0**2 * STD**2 + s0**2))
  prior = jax.scipy.stats.norm.logpdf(x1, 0.0, prior_std).sum(-1)
  return prior + x.shape[-1] * jnp.log(scale)


@pytest.mark.parametrize("schedule", ["vp", "ve", "cosine"])
def test_continuous_diffusion_likelihood_of_gaussian_data(schedule):
  keywords = SCHEDULES[schedule]
  process = _process(schedule, **keywords)
  objective = objectives.get_objective(
    "continuous_diffusion",
    _context(_gaussian_model(process, keywords["prediction"])),
    schedule=schedule,
    **keywords,
  )
  data = MEAN + STD * jax.random.normal(jax.random.PRNGKey(4), (16, 2))
  log_prob = objective.log_likelihood(None, jax.random.PRNGKey(0), data, steps=100)
  a0, s0 = process.alpha_sigma(1e-5)
  a1, s1 = process.alpha_sigma(1.0)
  # The solver against the exact ODE with the objective's prior N(0, sigma(1)^2 I) ...
  expected = _likelihood_with_prior(data, a0=a0, s0=s0, a1=a1, s1=s1, prior_std=s1)
  np.testing.assert_allclose(log_prob, expected, atol=2e-3)
  # ... which is the data's density at t_min up to that prior's missing alpha(1) m (VE: 0.06).
  true = jax.scipy.stats.norm.logpdf(data, a0 * MEAN, jnp.sqrt(a0**2 * STD**2 + s0**2)).sum(-1)
  np.testing.assert_allclose(log_prob, true, atol=0.1)


# ---- EDM on Gaussian data -------------------------------------------------------------------


def _edm_objective(**keywords):
  return objectives.get_objective(
    "edm", _context(_raw_output_of(_gaussian_denoiser, 0.5)), **keywords
  )


def test_edm_default_sampler_follows_the_exact_flow():
  """EDM's deterministic sampler (Algorithm 1) against ``x_0 = m + s / sqrt(s^2 +
  sigma_max^2) (x_T - m)``, the exact flow of each start ``x_T = trajectories[0]`` to
  ``sigma = 0``; second order, so doubling the steps quarters the error."""
  objective = _edm_objective()
  assert objectives.OBJECTIVES["edm"].default_sampler == "edm"
  errors = []
  for steps in (32, 64):
    out = objective.generate(
      None, jax.random.PRNGKey(1), 1000, steps=steps, return_trajectories=True
    )
    start = out["trajectories"][0]
    np.testing.assert_allclose(np.std(start), 80.0, rtol=0.05)
    assert int(out["nfe"]) == 2 * steps - 1
    exact = _gaussian_flow(start, a_from=1.0, s_from=80.0, a_to=1.0, s_to=0.0)
    errors.append(float(jnp.max(jnp.abs(out["samples"] - exact))))
  assert errors[1] < 1e-2, errors
  assert 3.0 < errors[0] / errors[1] < 5.5, errors


@pytest.mark.slow
def test_edm_every_listed_sampler_samples_gaussian_data():
  spec = objectives.OBJECTIVES["edm"]
  assert set(spec.samplers) == set(_STEPS)
  bias = STD / math.sqrt(STD**2 + 80.0**2) * np.abs(np.asarray(MEAN))  # the prior's missing m
  objective = _edm_objective()
  for sampler in spec.samplers:
    out = objective.generate(
      None, jax.random.PRNGKey(2), 8000, steps=_STEPS[sampler], sampler=sampler
    )
    _assert_gaussian_samples(out["samples"], mean_bias=bias)
  # Algorithm 2 with churn (the paper's ImageNet settings) still samples the data.
  churned = _edm_objective(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  out = churned.generate(None, jax.random.PRNGKey(2), 8000, steps=100)
  _assert_gaussian_samples(out["samples"], mean_bias=bias)


def test_edm_likelihood_of_gaussian_data():
  objective = _edm_objective()
  data = MEAN + STD * jax.random.normal(jax.random.PRNGKey(4), (16, 2))
  log_prob = objective.log_likelihood(None, jax.random.PRNGKey(0), data, steps=100)
  expected = _likelihood_with_prior(data, a0=1.0, s0=0.002, a1=1.0, s1=80.0, prior_std=80.0)
  np.testing.assert_allclose(log_prob, expected, atol=2e-3)
  true = jax.scipy.stats.norm.logpdf(data, MEAN, math.sqrt(STD**2 + 0.002**2)).sum(-1)
  np.testing.assert_allclose(log_prob, true, atol=0.1)


def test_edm_guidance_and_labels_reach_the_network():
  """A class-conditional EDM model: labels reach the network and guidance mixes the two
  denoisers (the tolerances cover the prior's missing mean, (m + 4) s / 80)."""

  def apply(params, x_in, c_noise, cond, dropout_key=None):
    # Class c is N(m + c, s^2 I); the null label (cond None) is N(m, s^2 I).
    mean = MEAN if cond is None else MEAN + cond[:, None].astype(jnp.float32)
    denoiser = lambda x, sigma: mean + STD**2 / (STD**2 + sigma**2) * (x - mean)
    return _raw_output_of(denoiser, 0.5)(params, x_in, c_noise, None, dropout_key)

  context = base.ObjectiveContext(
    apply=apply, source=_normal_source, data_shape=(2,), num_classes=3
  )
  objective = objectives.get_objective("edm", context, label_dropout=0.1)
  labels = jnp.full((4000,), 2)
  out = objective.generate(None, jax.random.PRNGKey(0), 4000, steps=32, labels=labels)
  np.testing.assert_allclose(np.mean(out["samples"], 0), np.asarray(MEAN) + 2.0, atol=0.05)
  guided = objective.generate(
    None, jax.random.PRNGKey(0), 4000, steps=32, labels=labels, guidance=2.0
  )
  # D_w = D_u + w (D_c - D_u) = D_u + 2 w sigma^2 / (s^2 + sigma^2): the flow of N(m + 2 w, .).
  np.testing.assert_allclose(np.mean(guided["samples"], 0), np.asarray(MEAN) + 4.0, atol=0.1)
  loss = jax.jit(objective.loss_fn)(
    None, jax.random.PRNGKey(1), {"x": jnp.zeros((8, 2)), "label": jnp.arange(8) % 3}
  )
  assert np.isfinite(float(loss))


# ---- check(): every problem names its key ----------------------------------------------------


CD_PROBLEMS = [
  (dict(schedule="edm"), "objective.schedule"),
  (dict(schedule="nope"), "objective.schedule"),
  (dict(schedule="vp", beta_min=30.0), "objective.beta_min"),
  (dict(schedule="ve", sigma_min=60.0), "objective.sigma_min"),
  (dict(schedule="cosine", log_snr_min=20.0), "objective.log_snr_min"),
  (dict(schedule="linear_log_snr", log_snr_max=-20.0), "objective.log_snr_max"),
  (dict(schedule="shifted_cosine", resolution=0), "objective.resolution"),
  (dict(schedule="shifted_cosine", base_resolution=-1), "objective.base_resolution"),
  (dict(prediction="score"), "objective.prediction"),
  (dict(prediction="noise"), "objective.prediction"),
  (dict(weighting="edm"), "objective.weighting"),
  (dict(time_sampler="beta"), "objective.time_sampler"),
  (dict(min_snr_gamma=0.0), "objective.min_snr_gamma"),
  (dict(t_min=1.0), "objective.t_min"),
  (dict(t_min=-0.1), "objective.t_min"),
  (dict(label_dropout=1.0), "objective.label_dropout"),
  (dict(schedule="vp", t_min=0.0), "objective.t_min=0"),
  (dict(weighting="elbo", time_sampler="logit_normal"), "objective.weighting='elbo'"),
]

EDM_PROBLEMS = [
  (dict(sigma_data=0.0), "objective.sigma_data"),
  (dict(p_std=-1.0), "objective.p_std"),
  (dict(sigma_min=100.0), "objective.sigma_min"),
  (dict(sigma_min=0.0), "objective.sigma_min"),
  (dict(rho=0.0), "objective.rho"),
  (dict(s_churn=-1.0), "objective.s_churn"),
  (dict(s_noise=-0.5), "objective.s_noise"),
  (dict(s_tmin=-1.0), "objective.s_tmin"),
  (dict(s_tmin=10.0, s_tmax=1.0), "objective.s_tmax"),
  (dict(label_dropout=-0.1), "objective.label_dropout"),
]


def test_defaults_and_good_combinations_have_no_problems():
  assert cd_lib.check() == []
  assert objectives.OBJECTIVES["edm"].check() == []
  for schedule, keywords in SCHEDULES.items():
    assert cd_lib.check(schedule=schedule, **keywords) == []
  # t_min = 0 is fine where sigma(0) > 0; the ELBO is fine with stratified (uniform) times.
  assert cd_lib.check(schedule="ve", t_min=0.0) == []
  assert cd_lib.check(weighting="elbo", time_sampler="stratified") == []
  # A schedule's keywords are read only by that schedule: set for another, they are refused.
  (problem,) = cd_lib.check(schedule="vp", sigma_min=60.0)
  assert problem.startswith("objective.sigma_min=60.0: only schedules ['ve'] read it")


@pytest.mark.parametrize(
  "name, keywords, key",
  (
    [("continuous_diffusion", kw, key) for kw, key in CD_PROBLEMS]
    + [("edm", kw, key) for kw, key in EDM_PROBLEMS]
  ),
)
def test_each_problem_names_its_key_and_the_factory_refuses(name, keywords, key):
  problems = objectives.objective_problems({"name": name, **keywords})
  assert len(problems) == 1 and key in problems[0], problems
  process_apply = _gaussian_model(_process("vp"), "eps")
  with pytest.raises(ValueError, match=key.replace("(", r"\(")):
    objectives.get_objective(name, _context(process_apply), **keywords)


@pytest.mark.parametrize("name", ["continuous_diffusion", "edm"])
def test_a_non_normal_source_is_refused(name):
  context = base.ObjectiveContext(
    apply=lambda *a, **k: None, source=_normal_source, data_shape=(2,), source_is_normal=False
  )
  with pytest.raises(ValueError, match="data.source='normal'"):
    objectives.get_objective(name, context)


def test_unknown_keyword_is_reported_with_the_accepted_ones():
  problems = objectives.objective_problems({"name": "edm", "schedule": "vp"})
  assert problems and "objective.schedule" in problems[0] and "sigma_data" in problems[0]
