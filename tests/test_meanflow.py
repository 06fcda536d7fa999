"""MeanFlow (diffjax.objectives.meanflow): the jvp target against finite differences, the reduction
to flow matching at s = t, the identity and a zero loss gradient at an exactly known average
velocity, and few-step sampling that lands where the exact flow does."""

from __future__ import annotations

import few_step_cli
import jax
import jax.numpy as jnp
import mean_velocity_fields as exact
import numpy as np
import pytest

from diffjax import losses, models, objectives
from diffjax.objectives import mean_velocity, meanflow

# ---- (a) the jvp target --------------------------------------------------------------------


def _random_mlp(key, dim=2, width=16):
  """A small tanh MLP ``u(z, t, s)`` in float64 (independent of diffjax's models)."""
  k1, k2, k3 = jax.random.split(key, 3)
  w1 = jax.random.normal(k1, (dim + 2, width), jnp.float64) / jnp.sqrt(dim + 2.0)
  w2 = jax.random.normal(k2, (width, width), jnp.float64) / jnp.sqrt(width)
  w3 = jax.random.normal(k3, (width, dim), jnp.float64) / jnp.sqrt(width)

  def u(z, t, s):
    h = jnp.tanh(jnp.concatenate([z, t[:, None], s[:, None]], axis=-1) @ w1)
    return jnp.tanh(h @ w2) @ w3

  return u


def test_target_matches_central_finite_differences():
  """u_tgt = v + (s - t) d/dt u(z_t, t, s) along (dz, dt, ds) = (v, 1, 0): the jvp against
  central differences, whose error O(h^2) ~ 1e-12 is far below the 1e-4 asked."""
  with jax.enable_x64(True):

    @jax.jit
    def probe(key):
      keys = jax.random.split(key, 5)
      u_fn = _random_mlp(keys[0])
      z = jax.random.normal(keys[1], (6, 2), jnp.float64)
      v = jax.random.normal(keys[2], (6, 2), jnp.float64)
      t = jax.random.uniform(keys[3], (6,), jnp.float64, 0.0, 0.6)
      s = t + jax.random.uniform(keys[4], (6,), jnp.float64, 0.0, 0.4)
      u, target = meanflow.meanflow_target(u_fn, z=z, t=t, s=s, velocity=v)
      h = 1e-5
      du_dt = (u_fn(z + h * v, t + h, s) - u_fn(z - h * v, t - h, s)) / (2 * h)
      # A wrong tangent for s (1 instead of 0) must change the target.
      wrong = jax.jvp(u_fn, (z, t, s), (v, jnp.ones_like(t), jnp.ones_like(s)))[1]
      # No gradient flows through the target.
      grad = jax.grad(lambda z: meanflow.meanflow_target(u_fn, z=z, t=t, s=s, velocity=v)[1].sum())(
        z
      )
      ds = (s - t)[:, None]
      return dict(
        u=u, direct=u_fn(z, t, s), target=target, fd=v + ds * du_dt, wrong=v + ds * wrong, grad=grad
      )

    r = jax.tree.map(np.asarray, probe(jax.random.key(0)))
  assert r["u"].dtype == r["target"].dtype == np.float64
  np.testing.assert_allclose(r["u"], r["direct"], rtol=1e-12)
  np.testing.assert_allclose(r["target"], r["fd"], rtol=1e-4, atol=1e-10)
  assert np.abs(r["wrong"] - r["fd"]).max() > 1e-3
  np.testing.assert_array_equal(r["grad"], 0.0)


# ---- (b) s = t is flow matching --------------------------------------------------------------


def test_at_equal_times_target_and_loss_are_flow_matching():
  """With s = t the target is x1 - x0 exactly and, without the adaptive weight, the loss is
  diffjax's flow-matching regression loss on the same draws (I-CFM with sigma = 0)."""
  fns = models.create_model("mlp", data_shape=(2,), time_inputs=2, width=16, depth=2)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: 0.5 * rng.standard_normal(a.shape).astype(a.dtype),
    jax.eval_shape(fns.init, jax.random.key(0)),
  )

  # The draws are the program's inputs: drawn inside it, XLA may recompute one in two fusions,
  # which can round differently by an ulp, and "exactly" would then test the compiler.
  x0 = rng.standard_normal((32, 2)).astype(np.float32)
  x1 = (2.0 + rng.standard_normal((32, 2))).astype(np.float32)
  t = rng.uniform(size=32).astype(np.float32)

  @jax.jit
  def probe(params, key, x0, x1, t):
    fm = losses.flow_matching_example(
      key, x0=x0, x1=x1, path=mean_velocity.LINEAR_PATH, time_sampler=lambda key, n: t
    )

    def u_fn(z, t, s):
      times = meanflow.network_times(jnp.stack([t, s], -1), time_input="interval")
      return fns.apply(params, z, times)

    u, target = meanflow.meanflow_target(u_fn, z=fm.model_input, t=t, s=t, velocity=fm.target)
    prediction = fns.apply(params, fm.model_input, jnp.stack([t, jnp.zeros_like(t)], -1))
    return dict(
      v=x1 - x0,
      fm_target=fm.target,
      u=u,
      target=target,
      prediction=prediction,
      loss=meanflow.meanflow_loss(u, target, weight_power=0.0, weight_eps=1e-3),
      fm_loss=losses.regression_loss(prediction, fm),
      weighted=meanflow.meanflow_loss(u, target, weight_power=1.0, weight_eps=1e-3),
    )

  r = jax.tree.map(np.asarray, probe(params, jax.random.key(1), x0, x1, t))
  np.testing.assert_array_equal(r["fm_target"], r["v"])
  np.testing.assert_array_equal(r["target"], r["v"])
  np.testing.assert_array_equal(r["u"], r["prediction"])
  np.testing.assert_allclose(r["loss"], r["fm_loss"], rtol=1e-6)
  # The adaptive weight w = 1 / (||Delta||^2 + c) on the summed squared error, by hand.
  squared = np.square((r["u"] - r["target"]).astype(np.float64))
  w = 1.0 / (squared.sum(axis=1) + 1e-3)
  np.testing.assert_allclose(r["weighted"], np.mean(w * squared.mean(axis=1)), rtol=1e-5)


def test_time_pairs():
  pairs = jax.jit(
    lambda key: meanflow.sample_time_pairs(
      key, 400, time_sampler=losses.uniform_time, interval_fraction=0.25
    )
  )
  t, s = map(np.asarray, pairs(jax.random.key(0)))
  assert np.all((0 <= t) & (t <= s) & (s <= 1))
  assert np.sum(s != t) == 100  # exactly round(0.25 * 400), at random places
  assert 0 < np.flatnonzero(s != t).min() and np.flatnonzero(s != t).max() > 300


# ---- (c) an exactly known average velocity ---------------------------------------------------


def test_exact_average_velocity_satisfies_the_identity():
  """For the Gaussian linear flow (tests/mean_velocity_fields.py) the MeanFlow target built
  from the exact u and the marginal v is u itself: u = v + (s - t) du/dt."""
  with jax.enable_x64(True):

    @jax.jit
    def probe(key):
      k0, k1, k2 = jax.random.split(key, 3)
      z = 3.0 * jax.random.normal(k0, (64, 2), jnp.float64)
      t = jax.random.uniform(k1, (64,), jnp.float64, 0.0, 0.9)
      s = t + jax.random.uniform(k2, (64,), jnp.float64, 0.01, 1.0) * (1.0 - t)
      v = exact.velocity(z, t)
      u, target = meanflow.meanflow_target(exact.average_velocity, z=z, t=t, s=s, velocity=v)
      return u, target, v

    u, target, v = map(np.asarray, probe(jax.random.key(3)))
  np.testing.assert_allclose(target, u, rtol=1e-9, atol=1e-9)
  # The identity needs the velocity along the flow: the flow-matching field alone is wrong.
  assert np.abs(v - u).max() > 0.1


def _gaussian_context(apply, *, num_classes=0, source=None):
  source = source or (lambda key, num: jax.random.normal(key, (num, 2)))
  return objectives.ObjectiveContext(
    apply=apply, source=source, data_shape=(2,), num_classes=num_classes
  )


def _exact_network(time_input):
  """The exact u as a "network" of the objective's time inputs, plus theta . g(z, t, s) in four
  directions g: 1, z, (s - t), (s - t) z."""

  def apply(theta, x, times, cond=None, dropout_key=None):
    del cond, dropout_key
    t = times[:, 0]
    s = t + times[:, 1] if time_input == "interval" else times[:, 1]
    h = (s - t)[:, None]
    return exact.mean_velocity(x, t, s) + theta[0] + theta[1] * x + theta[2] * h + theta[3] * h * x

  return apply


@pytest.mark.parametrize(
  "time_input", ["interval", pytest.param("endpoints", marks=pytest.mark.slow)]
)
def test_exact_average_velocity_is_a_stationary_point_of_the_loss(time_input):
  """With the conditional velocity x1 - x0 (the loss actually trained), the exact u is a
  stationary point in expectation: the gradient along four directions is zero within 4.5
  standard errors, over 16 batches of 2048. The flow-matching velocity v(z, t) in place of u
  (right at s = t, wrong for s > t) is many standard errors away."""
  objective = meanflow.meanflow(
    _gaussian_context(_exact_network(time_input)),
    interval_fraction=0.5,
    time_sampler="uniform",
    weight_power=0.0,
    time_input=time_input,
  )

  # Wrong field: the flow-matching velocity v(z, t) as u (exact at s = t only).
  def flow_only(theta, x, times, cond=None, dropout_key=None):
    return exact.velocity(x, times[:, 0]) + theta[0] + theta[1] * x

  wrong = meanflow.meanflow(
    _gaussian_context(flow_only),
    interval_fraction=0.5,
    time_sampler="uniform",
    weight_power=0.0,
    time_input=time_input,
  )
  mean, scale = jnp.asarray(exact.MEAN), exact.SCALE

  def gradients(objective, theta, key):
    k_data, k_pair, k_loss = jax.random.split(key, 3)
    data = mean + scale * jax.random.normal(k_data, (2048, 2))
    batch = objective.pair_fn(k_pair, {"x": data})
    return jax.grad(objective.loss_fn)(theta, k_loss, batch)

  @jax.jit
  def probe(keys):
    right = jax.vmap(lambda k: gradients(objective, jnp.zeros(4), k))(keys)
    off = jax.vmap(lambda k: gradients(wrong, jnp.zeros(2), k))(keys)
    return right, off

  right, off = map(np.asarray, probe(jax.random.split(jax.random.key(5), 16)))
  # Standard errors of the means over 16 independent batches.
  se = right.std(axis=0, ddof=1) / np.sqrt(16)
  assert np.all(np.abs(right.mean(axis=0)) < 4.5 * se + 1e-6), (right.mean(0), se)
  off_se = off.std(axis=0, ddof=1) / np.sqrt(16)
  assert np.any(np.abs(off.mean(axis=0)) > 20 * off_se), (off.mean(0), off_se)


# ---- (d) sampling ----------------------------------------------------------------------------


def _offset_objective():
  """MeanFlow around the exact u, plus a per-label offset (0 for the null label)."""
  offsets = jnp.asarray([[0.5, 0.0], [0.0, -0.5], [0.0, 0.0]])  # labels 0, 1, null

  def apply(params, x, times, cond=None, dropout_key=None):
    u = exact.mean_velocity(x, times[:, 0], times[:, 0] + times[:, 1])
    return u + (0.0 if cond is None else offsets[cond])

  return meanflow.meanflow(_gaussian_context(apply, num_classes=2)), offsets


def test_sampling_with_the_exact_average_velocity_lands_on_the_flow():
  """One jump from x0 lands on m + c x0 (4 jumps, each on the exact flow: the slow test)."""
  objective, _ = _offset_objective()
  for steps in (1,):
    out = objective.generate(None, jax.random.key(0), 64, steps=steps, return_trajectories=True)
    x0 = out["trajectories"][0]
    assert int(out["nfe"]) == steps and out["trajectories"].shape == (steps + 1, 64, 2)
    np.testing.assert_allclose(out["samples"], exact.data_of_source(x0), rtol=1e-5, atol=1e-5)
    for k, tk in enumerate(np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)):
      on_flow = exact.flow_map(x0, jnp.zeros(64), jnp.full(64, tk))
      np.testing.assert_allclose(out["trajectories"][k], on_flow, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sampling_chunks_euler_and_guidance():
  """Four jumps follow the exact flow; chunking gives the same samples; Euler on the
  instantaneous u(z, t, t) approaches the exact flow at first order; guidance mixes the
  conditional and null predictions."""
  objective, offsets = _offset_objective()
  key = jax.random.key(0)
  out = objective.generate(None, key, 64, steps=4, return_trajectories=True)
  x0 = out["trajectories"][0]
  for k, tk in enumerate(np.linspace(0.0, 1.0, 5, dtype=np.float32)):
    on_flow = exact.flow_map(x0, jnp.zeros(64), jnp.full(64, tk))
    np.testing.assert_allclose(out["trajectories"][k], on_flow, rtol=1e-5, atol=1e-5)
  chunks = [
    objective.generate(None, key, 40, steps=2, chunk_size=size, return_trajectories=True)
    for size in (16, 40)
  ]
  np.testing.assert_array_equal(chunks[0]["samples"], chunks[1]["samples"])
  x0 = chunks[0]["trajectories"][0]
  np.testing.assert_allclose(chunks[0]["samples"], exact.data_of_source(x0), atol=1e-5)
  # Euler on v(z, t) = u(z, t, t): error O(1/N), halving when N doubles.
  errors = []
  for n in (25, 50):
    out = objective.generate(None, key, 64, steps=n, sampler="euler", return_trajectories=True)
    errors.append(np.abs(out["samples"] - exact.data_of_source(out["trajectories"][0])).max())
  assert errors[1] < 0.1 and 1.6 < errors[0] / errors[1] < 2.4, errors
  # Guidance w on label 0: uncond + w (cond - uncond) = u + w offset[0], one jump of length 1.
  labels = jnp.zeros(64, jnp.int32)
  out = objective.generate(
    None, key, 64, steps=1, labels=labels, guidance=3.0, return_trajectories=True
  )
  expected = exact.data_of_source(out["trajectories"][0]) + 3.0 * offsets[0]
  np.testing.assert_allclose(out["samples"], expected, rtol=1e-5, atol=1e-5)


def test_likelihood_through_the_instantaneous_velocity():
  """With an N(0, I) source, log p(x) integrates the ODE of u(z, t, t): for the exact field it
  is the data's density N(m, c^2 I) in closed form (RK4, 16 steps: error far below 1e-3)."""
  objective, _ = _offset_objective()
  assert objective.log_likelihood is not None
  x = jnp.asarray(exact.MEAN) + exact.SCALE * jax.random.normal(jax.random.key(4), (32, 2))
  log_p = np.asarray(objective.log_likelihood(None, jax.random.key(0), x, steps=16))
  z = (np.asarray(x) - np.asarray(exact.MEAN)) / exact.SCALE
  expected = -0.5 * (z**2).sum(axis=1) - np.log(2 * np.pi) - 2 * np.log(exact.SCALE)
  np.testing.assert_allclose(log_p, expected, atol=1e-3)


def test_spec_and_checks():
  spec = objectives.OBJECTIVES["meanflow"]
  assert spec.time_inputs == 2 and spec.default_sampler == "meanflow" and spec.any_source
  assert "meanflow" in spec.samplers and "euler" in spec.samplers
  assert spec.check() == []
  problems = spec.check(
    interval_fraction=1.5,
    time_sampler="uniform",
    time_loc=0.0,
    weight_power=-1.0,
    weight_eps=0.0,
    time_input="both",
    label_dropout=1.0,
  )
  for fragment in (
    "objective.interval_fraction=1.5",
    "objective.time_loc=0.0",
    "objective.weight_power=-1.0",
    "objective.weight_eps=0.0",
    "objective.time_input='both'",
    "objective.label_dropout=1.0",
  ):
    assert any(p.startswith(fragment) for p in problems), (fragment, problems)
  assert spec.check(time_scale=0.0)[0].startswith("objective.time_scale=0.0")
  assert spec.check(time_sampler="nonesuch")[0].startswith("objective.time_sampler='nonesuch'")


# ---- end to end ------------------------------------------------------------------------------


@pytest.mark.slow  # an end-to-end CLI run; the fast suite keeps the unit checks
def test_config_trains_two_seeds_and_samples_in_one_step(tmp_path, capsys):
  """configs/toy2d_meanflow.py:small trains through the CLI with two seeds at once (the jvp
  under the seeds' vmap) and `diffjax sample --steps 1` draws from it."""
  few_step_cli.train_and_sample(
    "toy2d_meanflow", tmp_path, capsys, steps=(1,), extra=("--config.train.num_seeds=2",)
  )


@pytest.mark.slow
def test_config_samples_with_2_4_8_steps(tmp_path, capsys):
  few_step_cli.train_and_sample("toy2d_meanflow", tmp_path, capsys, steps=(1, 2, 4, 8))


@pytest.mark.slow
def test_digits_config_trains_and_samples(tmp_path, capsys):
  """configs/digits_meanflow.py:small: the UNet with two time embeddings, jvp through it."""
  few_step_cli.train_and_sample(
    "digits_meanflow", tmp_path, capsys, steps=(1, 2), extra=("--config.train.batch_size=16",)
  )
