"""Stochastic interpolants against closed forms: the interpolant and its drift target by finite
differences, the exact Gaussian-mixture fields by the transport equation, autodiff of the log
density and Monte Carlo conditional expectations, the Euler-Maruyama scheme's weak order on an
exact moment recursion, the sampler's moments and W2 against the two-sample floor, and the
trainable objective (tests/interpolant_fields.py has the exact fields)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interpolant_fields import MixtureInterpolant, four_blobs
from tiny import CONFIGS, tiny_config

from diffjax import evaluate, objectives
from diffjax import interpolants as I
from diffjax.objectives import stochastic_interpolant as si
from diffjax.samplers.sde import euler_maruyama_integrate
from diffjax.train import config as config_lib
from diffjax.train import loop

MIXTURE = four_blobs()
GAUSSIAN = MixtureInterpolant([1.0], [[1.0, -0.5]], [[[1.0, 0.6], [0.6, 0.5]]])


# ---- the interpolant ---------------------------------------------------------------------------


def test_interpolant_values_and_drift_target_by_finite_differences():
  with jax.enable_x64(True):
    k0, k1, kz = jax.random.split(jax.random.PRNGKey(0), 3)
    x0, x1, z = (jax.random.normal(k, (5, 3), jnp.float64) for k in (k0, k1, kz))
    t = jnp.asarray([0.05, 0.2, 0.5, 0.8, 0.97], jnp.float64)
    h = 1e-6  # central-difference step
    ends = jnp.asarray([0.0, 1.0], jnp.float64)
    for name, gamma, alpha, beta, g in [
      ("linear", "sqrt", 1 - t, t, np.sqrt(2.0 * t * (1 - t))),
      (
        "trig",
        "quadratic",
        np.cos(np.pi * t / 2),
        np.sin(np.pi * t / 2),
        np.sqrt(2.0) * t * (1 - t),
      ),
    ]:
      path = I.stochastic_interpolant(interpolant=name, gamma=gamma, a=2.0)

      @jax.jit
      def values(t, path=path):
        # x_t, its central differences in t at fixed (x0, x1, z), the drift target and the
        # coefficients at t and at the ends, in one compiled program per path.
        xt = lambda t: path.sample_xt(x0=x0, x1=x1, t=t, z=z)
        fd = (xt(t + h) - xt(t - h)) / (2 * h)
        target = path.conditional_target(x0=x0, x1=x1, t=t, z=z)
        return xt(t), fd, target, path.coefficients(ends), path.coefficients(t)

      xt, fd, target, (beta_e, alpha_e, gamma_e), coefficients = values(t)
      assert xt.dtype == jnp.float64
      expected = alpha[:, None] * x0 + beta[:, None] * x1 + g[:, None] * z
      np.testing.assert_allclose(xt, expected, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(target, fd, rtol=1e-6)
      # gamma vanishes at both ends only; alpha and beta swap.
      np.testing.assert_allclose(
        np.stack([alpha_e, beta_e, gamma_e]), [[1, 0], [0, 1], [0, 0]], atol=1e-15
      )
      assert np.all(np.asarray(coefficients[2]) > 0)


def test_bad_names_and_values_raise_one_clear_error():
  with pytest.raises(ValueError, match="unknown interpolant 'cubic'; choose one of"):
    I.stochastic_interpolant(interpolant="cubic")
  with pytest.raises(ValueError, match="unknown gamma 'sqr'"):
    I.stochastic_interpolant(gamma="sqr")
  with pytest.raises(ValueError, match="a=0.0"):
    I.stochastic_interpolant(a=0.0)
  problems = si.check(interpolant="cubic", gamma="sqrt", a=-1.0, epsilon=-0.1, t_min=0.0)
  assert len(problems) == 4, problems
  assert si.check() == []


# ---- the exact fields ---------------------------------------------------------------------------


def _transport_residual(drift, log_rho):
  """``d_t log rho + div b + b . grad log rho`` at one point, by autodiff."""

  def residual(x, t):
    b = drift(x, t)
    divergence = jnp.trace(jax.jacfwd(drift)(x, t))
    return jax.grad(log_rho, argnums=1)(x, t) + divergence + b @ jax.grad(log_rho)(x, t)

  return residual


@jax.jit
def _transport_quantities(x, t):
  """Everything the transport-equation test compares, in one compiled program: the residual of
  the exact drift and of a wrong one (b + s / 2), the scale ``1 + |b . s|``, the library's score
  and ``grad log rho``."""
  log_rho = MIXTURE.log_density
  wrong = lambda x, t: MIXTURE.drift(x, t) + 0.5 * MIXTURE.score(x, t)

  def one(x, t):
    drift, score = MIXTURE.drift(x, t), MIXTURE.score(x, t)
    return dict(
      residual=_transport_residual(MIXTURE.drift, log_rho)(x, t),
      wrong_residual=_transport_residual(wrong, log_rho)(x, t),
      scale=1.0 + jnp.abs(drift @ score),
      score=score,
      grad_log=jax.grad(log_rho)(x, t),
    )

  return jax.vmap(one)(x, t)


def test_exact_fields_solve_the_transport_equation_and_score_is_grad_log_density():
  # d_t log rho + div b + b . grad log rho = 0 (Albergo et al. 2023, Thm. 2.6), by autodiff of the
  # mixture's log density, which is computed apart from b; the score is jax.grad of log rho.
  with jax.enable_x64(True):
    xs = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (6, 2), jnp.float64)
    times = jnp.asarray([0.0, 0.1, 0.5, 0.9, 1.0], jnp.float64)
    x, t = jnp.repeat(xs, 5, axis=0), jnp.tile(times, 6)
    out = _transport_quantities(x, t)
    assert out["residual"].dtype == jnp.float64
    np.testing.assert_array_less(np.abs(out["residual"]), 1e-9 * out["scale"])
    np.testing.assert_allclose(out["score"], out["grad_log"], rtol=1e-10, atol=1e-12)
    # A wrong drift (b + s / 2) fails the same equation.
    assert np.abs(out["wrong_residual"]).max() > 1e-2


@functools.partial(jax.jit, static_argnames="n")
def _conditional_draws(key, t, *, n):
  """``n`` draws of the library's interpolant at time ``t`` (traced: one program for every
  ``t``), its noise ``z`` and the exact drift and denoiser at ``x_t``."""
  path = I.stochastic_interpolant(a=MIXTURE.a)
  k0, k1, kz = jax.random.split(key, 3)
  x0 = jax.random.normal(k0, (n, 2))
  x1 = MIXTURE.sample(k1, n)
  z = jax.random.normal(kz, (n, 2))
  ts = jnp.full((n,), t)
  example = path.interpolate(x0=x0, x1=x1, t=ts, z=z)
  xt = example["x_t"]
  return example, z, MIXTURE.batched("drift")(xt, ts), MIXTURE.batched("denoiser")(xt, ts)


@pytest.mark.parametrize("t", [0.25, 0.75])
def test_exact_fields_are_the_conditional_expectations_of_the_targets(t):
  # Tower property: E[(target - field(x_t)) phi(x_t)] = 0 for every phi, with the library's
  # x_t and drift target (Path.interpolate) and the denoiser target z; phi in {1, x, sin(x)}.
  # Each mean within 5 standard errors (s.e. = sample std / sqrt(n)); a perturbed field fails.
  n = 200_000
  example, z, drift, denoiser = _conditional_draws(jax.random.PRNGKey(int(100 * t)), t, n=n)
  xt = example["x_t"]
  phis = np.concatenate([np.ones((n, 1)), np.asarray(xt), np.sin(np.asarray(xt))], axis=1)

  def z_scores(residual):
    products = (np.asarray(residual, np.float64)[:, :, None] * phis[:, None, :]).reshape(n, -1)
    return products.mean(0) / (products.std(0) / np.sqrt(n))

  assert np.abs(z_scores(example["target"] - drift)).max() < 5
  assert np.abs(z_scores(z - denoiser)).max() < 5
  assert np.abs(z_scores(example["target"] - 1.1 * drift)).max() > 5
  assert np.abs(z_scores(z - 0.9 * denoiser)).max() > 5


def test_score_from_denoiser_and_the_sde_terms():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 2), jnp.float64)
    t = jnp.asarray([0.1, 0.3, 0.6, 0.9], jnp.float64)
    gamma = np.sqrt(t * (1 - t))
    fields = lambda x, t: (MIXTURE.batched("drift")(x, t), MIXTURE.batched("score")(x, t))
    epsilons = jnp.asarray([0.0, 0.1, 1.0], jnp.float64)

    @jax.jit
    def terms(x, t, epsilons):
      # Everything in one compiled program (epsilon traced, vmapped over the three values).
      drift, score = fields(x, t)
      sde = jax.vmap(lambda eps: I.generative_sde(fields, epsilon=eps)(x, t))(epsilons)
      return drift, score, MIXTURE.batched("denoiser")(x, t), sde

    drift, score, eta, (bf, diffusion) = terms(x, t, epsilons)
    np.testing.assert_allclose(I.score_from_denoiser(eta_z=eta, gamma=gamma), score, rtol=1e-12)
    for k, eps in enumerate(np.asarray(epsilons)):
      np.testing.assert_allclose(bf[k], drift + eps * score, rtol=1e-12)
      np.testing.assert_allclose(diffusion[k], np.full(4, np.sqrt(2 * eps)), rtol=1e-12)
    np.testing.assert_allclose(
      I.backward_drift(drift=drift, score=score, epsilon=0.5), drift - 0.5 * score, rtol=1e-12
    )


# ---- Euler-Maruyama: the exact moment recursion, the sampler's moments -------------------------

# Gaussian data N(m, S): b_F(t, x) = beta' m + (C'/2 - eps I) C^{-1} (x - beta m) with C(t) =
# beta^2 S + (alpha^2 + gamma^2) I (tests/interpolant_fields.py with one component), so
# Euler-Maruyama maps Gaussians to Gaussians: mean' = mean + dt b_F(mean), cov' = P cov P^T +
# 2 eps dt I with P = I + dt (C'/2 - eps I) C^{-1}. Written here from the formula, not the code.


def _linear_terms(t, eps, data=GAUSSIAN):
  s, m, a = data.covs[0], data.means[0], data.a
  alpha, beta, g2 = 1 - t, t, a * t * (1 - t)
  c = beta**2 * s + (alpha**2 + g2) * np.eye(2)
  dc = 2 * beta * s + (-2 * alpha + a * (1 - 2 * t)) * np.eye(2)
  return (0.5 * dc - eps * np.eye(2)) @ np.linalg.inv(c), beta, m


def _scheme_moments(num_steps, eps):
  """Exact mean and covariance of Euler-Maruyama from ``x_0 ~ N(0, I)`` to ``t = 1``."""
  mean, cov = np.zeros(2), np.eye(2)
  times = np.linspace(0.0, 1.0, num_steps + 1)
  for t, t_next in zip(times[:-1], times[1:], strict=True):
    dt = t_next - t
    a, beta, m = _linear_terms(t, eps)
    mean = mean + dt * (m + a @ (mean - beta * m))
    p = np.eye(2) + dt * a
    cov = p @ cov @ p.T + 2 * eps * dt * np.eye(2)
  return mean, cov


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_euler_maruyama_scheme_has_weak_order_one(eps):
  # Exact marginal at t = 1 is N(m, S); the error of the scheme's exact moments falls as 1/N.
  counts = np.array([16, 32, 64, 128])
  errors = []
  for n in counts:
    mean, cov = _scheme_moments(int(n), eps)
    errors.append(max(np.abs(mean - GAUSSIAN.means[0]).max(), np.abs(cov - GAUSSIAN.covs[0]).max()))
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(-slope - 1.0) < 0.25, (errors, slope)


@functools.cache
def _em_program(data, steps, t_start):
  """One jitted Euler-Maruyama run on the exact fields of ``data`` (eps traced: one compile)."""
  fields = jax.vmap(data.fields)
  times = jnp.linspace(t_start, 1.0, steps + 1)

  @jax.jit
  def run(key, x, eps):
    return euler_maruyama_integrate(key, I.generative_sde(fields, epsilon=eps), x, times=times)

  return run


def _em_samples(data, key, num, steps, eps, t_start=0.0):
  k_init, k_run = jax.random.split(key)
  x = jax.random.normal(k_init, (num, 2))
  return _em_program(data, steps, t_start)(k_run, x, jnp.float32(eps)).samples


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_sampler_moments_equal_the_scheme_moments(eps):
  # The library's Euler-Maruyama on the exact fields (one-component mixture) at 8 steps against
  # the recursion above: mean and covariance within 5 standard errors (s.e. of a mean sqrt(S_ii /
  # n), of a covariance entry sqrt((S_ii S_jj + S_ij^2) / n)). With the recursion's weak order 1,
  # this is the sampler's weak order; the scheme's bias is resolved (the marginal is > 5 s.e.
  # away), so the check can fail.
  num, steps = 100_000, 8
  samples = np.asarray(_em_samples(GAUSSIAN, jax.random.PRNGKey(7), num, steps, eps), np.float64)
  mean, cov = _scheme_moments(steps, eps)

  def z_scores(mean, cov):
    diag = np.diag(cov)
    mean_se, cov_se = np.sqrt(diag / num), np.sqrt((np.outer(diag, diag) + cov**2) / num)
    return (samples.mean(0) - mean) / mean_se, (np.cov(samples.T) - cov) / cov_se

  mean_z, cov_z = z_scores(mean, cov)
  assert np.abs(mean_z).max() < 5 and np.abs(cov_z).max() < 5, (mean_z, cov_z)
  bias_mean_z, bias_cov_z = z_scores(GAUSSIAN.means[0], GAUSSIAN.covs[0])
  assert max(np.abs(bias_mean_z).max(), np.abs(bias_cov_z).max()) > 5


@pytest.mark.slow
def test_euler_maruyama_weak_order_one_from_samples_on_the_mixture():
  # The mixture's covariance error at t = 1 after 4 .. 32 steps (eps = 1), 1e6 samples: the s.e.
  # of a covariance entry (sqrt((S_ii S_jj + S_ij^2) / n)) is about 4e-3, a sixth of the smallest
  # error (about 2.6e-2 at 32 steps), so the slope is resolved to about +-0.1.
  counts = [4, 8, 16, 32]
  num = 1_000_000
  mean1, cov1 = MIXTURE.moments()
  errors, ses = [], []
  for n in counts:
    samples = np.asarray(_em_samples(MIXTURE, jax.random.PRNGKey(n), num, n, 1.0), np.float64)
    diag = np.diag(cov1)
    errors.append(np.abs(np.cov(samples.T) - cov1).max())
    ses.append(np.sqrt((np.outer(diag, diag) + cov1**2) / num).max())
  assert errors[-1] > 4 * ses[-1], (errors, ses)
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(-slope - 1.0) < 0.25, (errors, slope)


# ---- W2 after 1000 steps against the two-sample floor -----------------------------------------


# slow at both sizes (5 s and 12 s): the exact fields are checked fast above (transport equation,
# conditional expectations), this is the end-to-end W2 check
@pytest.mark.slow
@pytest.mark.parametrize("n", [500, 1000])
def test_w2_after_1000_steps_is_within_the_two_sample_floor(n):
  # The two-sample floor is evaluate.wasserstein2 (exact W2) between two independent target
  # samples of size n, as run.py's toy scoring reports it beside every W2. A sampler without bias
  # gives a W2 distributed as the floor, so the bound is the floor's mean + 3 standard deviations
  # over floor_pairs independent pairs (its spread measured, not assumed); Euler-Maruyama's bias
  # at 1000 steps (order 1e-3 in the moments, by the recursion above) is far below that spread.
  # A wrong field (the backward drift b - eps s run forward) must land far above.
  floor_pairs = 5
  keys = jax.random.split(jax.random.PRNGKey(11), 2 * floor_pairs + 1)
  reference = np.asarray(MIXTURE.sample(keys[0], n))
  floors = [
    evaluate.wasserstein2(MIXTURE.sample(keys[i], n), MIXTURE.sample(keys[i + 1], n))
    for i in range(1, 2 * floor_pairs, 2)
  ]
  bound = np.mean(floors) + 3 * np.std(floors, ddof=1)
  for eps in (0.1, 1.0):
    samples = _em_samples(MIXTURE, jax.random.PRNGKey(int(10 * eps)), n, 1000, eps)
    w2 = evaluate.wasserstein2(samples, reference)
    assert w2 < bound, (eps, w2, floors)
  wrong = MixtureInterpolant(MIXTURE.weights, MIXTURE.means, MIXTURE.covs)

  def backward_fields(x, t):
    drift, score = MIXTURE.fields(x, t)
    return drift, -score

  wrong.fields = backward_fields
  samples = _em_samples(wrong, jax.random.PRNGKey(5), n, 1000, 1.0)
  assert evaluate.wasserstein2(samples, reference) > 3 * bound


# ---- the objective -------------------------------------------------------------------------------


def test_objective_spec_samplers_and_config():
  spec = objectives.OBJECTIVES["stochastic_interpolant"]
  assert spec.output_heads == 2 and spec.default_sampler == "euler_maruyama"
  assert set(spec.samplers) == {
    "euler_maruyama",
    "euler",
    "heun",
    "midpoint",
    "rk4",
    "dopri5",
    "tsit5",
  }
  config = config_lib.load_config_file(str(CONFIGS / "toy2d_si.py") + ":small")
  config_lib.validate(config, num_devices=1)
  assert objectives.objective_problems({"name": "stochastic_interpolant", "t_min": 0.7}) != []


def _exact_context(data: MixtureInterpolant):
  """A context whose 'model' is the exact pair (b, eta_z) on the last axis."""

  def apply(params, x, t, cond, dropout_key=None):
    del params, cond, dropout_key
    return jnp.concatenate([data.batched("drift")(x, t), data.batched("denoiser")(x, t)], -1)

  source = lambda key, num: jax.random.normal(key, (num, 2))
  return objectives.ObjectiveContext(apply=apply, source=source, data_shape=(2,))


def test_loss_is_the_two_regressions_and_exact_fields_beat_perturbed_ones():
  data, n = MIXTURE, 1024
  context = _exact_context(data)
  objective = si.stochastic_interpolant(context, t_min=0.01)
  # The exact fields minimise it: scaled fields do worse on the same draws.
  scaled = context._replace(apply=lambda *args, **kw: 1.2 * context.apply(*args, **kw))
  worse = si.stochastic_interpolant(scaled, t_min=0.01).loss_fn

  def by_hand(key, x0, x1):
    # The same draws (split(key, 4): time, noise, labels, dropout), the formulas written out.
    k_time, k_noise, _, _ = jax.random.split(key, 4)
    t = jax.random.uniform(k_time, (n,), minval=0.01, maxval=0.99)
    z = jax.random.normal(k_noise, (n, 2))
    g = jnp.sqrt(t * (1 - t))[:, None]
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1 + g * z
    target = x1 - x0 + ((1 - 2 * t)[:, None] / (2 * g)) * z
    b, eta = jnp.split(context.apply(None, xt, t, None), 2, axis=-1)
    return jnp.mean((b - target) ** 2) + jnp.mean((eta - z) ** 2)

  @jax.jit
  def losses(key):
    # One program for the three losses on one batch (one compile instead of three).
    batch = objective.pair_fn(jax.random.PRNGKey(0), {"x": data.sample(jax.random.PRNGKey(1), n)})
    return (
      objective.loss_fn(None, key, batch),
      by_hand(key, batch["x0"], batch["x"]),
      worse(None, key, batch),
    )

  loss, hand, worse_loss = map(float, losses(jax.random.PRNGKey(2)))
  np.testing.assert_allclose(loss, hand, rtol=1e-4)
  assert worse_loss > loss


def test_generator_samples_with_the_sde_and_the_ode_and_rejects_other_samplers():
  objective = si.stochastic_interpolant(_exact_context(GAUSSIAN), epsilon=0.5)
  key = jax.random.PRNGKey(4)
  for sampler, nfe in (("euler_maruyama", 50), ("heun", 100)):
    out = objective.generate(None, key, 2000, steps=50, sampler=sampler)
    samples = np.asarray(out["samples"])
    assert int(out["nfe"]) == nfe and np.isfinite(samples).all()
    # Within 0.1 of N(m, S) in mean and covariance (s.e. about 0.02 at n = 2000).
    np.testing.assert_allclose(samples.mean(0), GAUSSIAN.means[0], atol=0.1)
    np.testing.assert_allclose(np.cov(samples.T), GAUSSIAN.covs[0], atol=0.1)
  with pytest.raises(ValueError, match="cannot sample a stochastic interpolant; choose one of"):
    objective.generate(None, key, 8, steps=4, sampler="dpmpp_2m")


@pytest.mark.slow  # a training run (4 s); the loss is checked against a hand computation fast
def test_short_training_on_small_reduces_the_loss(tmp_path):
  config = tiny_config(
    "--config.train.steps=60",
    "--config.train.fused_steps=10",
    "--config.train.log_every=10",
    "--config.train.checkpoint_every=60",
    "--config.train.batch_size=128",
    "--config.model.width=32",
    base="toy2d_si",
  )
  config_lib.validate(config, num_devices=1)
  result = loop.train(config, tmp_path, devices=jax.devices()[:1])
  losses = [loss for _, loss in result["losses"]]
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
