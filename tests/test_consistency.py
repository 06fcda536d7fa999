"""The consistency objective: its boundary condition is exact, its tangent is the derivative
along the path, its loss and gradient vanish at the exact consistency function of closed-form
flows (and not at a wrong one), multistep sampling with the exact function reproduces the
target, training reduces the loss, and the config trains and samples through the CLI."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax import cli, models, objectives
from diffjax import samplers as samplers_lib
from diffjax.data import toy2d
from diffjax.objectives import consistency as consistency_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "toy2d_consistency.py")
MEAN = jnp.array([1.5, -0.5])  # the Gaussian target N(MEAN, STD^2 I) ...
STD = 0.5  # ... of the source N(0, I)


def _normal(key, num):
  return jax.random.normal(key, (num, 2), jnp.float32)


def _context(apply, **kwargs) -> objectives.ObjectiveContext:
  return objectives.ObjectiveContext(
    **{**dict(apply=apply, source=_normal, data_shape=(2,)), **kwargs}
  )


def _mlp(**kwargs):
  return models.create_model("mlp", data_shape=(2,), width=32, depth=2, activation="selu", **kwargs)


# --------------------------------------------------------------------------------------------
# Closed-form consistency functions.
# --------------------------------------------------------------------------------------------


def _gaussian_endpoint(x, t, *, mean, std):
  """The data end of the ODE of the linear path from N(0, I) to N(mean, std^2 I) (independent
  pairs) through ``x`` at ``t``: the marginal is N(t mean, s_t^2 I) with ``s_t^2 = (1 - t)^2 +
  t^2 std^2``, the flow is ``x_t = t mean + s_t z`` (its velocity ``mean + (s_t'/s_t)(x - t
  mean)`` is ``E[x1 - x0 | x_t]``, the Gaussian regression), so ``f(x, t) = mean + std (x - t
  mean) / s_t``; ``f(x, 1) = x``."""
  t = t[:, None]
  s_t = jnp.sqrt((1 - t) ** 2 + (t * std) ** 2)
  return mean + std * (x - t * mean) / s_t


def _gaussian_network(params, x, t, cond=None, dropout_key=None):
  """``F = (f - x) / (1 - t)`` of :func:`_gaussian_endpoint` with the mean and std in
  ``params`` (exact when they are the target's); only for ``t < 1``."""
  del cond, dropout_key
  f = _gaussian_endpoint(x, t, mean=params["mean"], std=params["std"])
  return (f - x) / (1 - t[:, None])


def _gaussian_params(mean=MEAN, std=STD):
  return {"mean": jnp.asarray(mean, jnp.float32), "std": jnp.asarray(std, jnp.float32)}


POINT = jnp.array([0.7, -1.2])  # a point-mass target


def _point_network(params, x, t, cond=None, dropout_key=None):
  """``F = a (POINT - x) / (1 - t)``: ``f = (1 - a) x + a POINT``, exact for the point mass at
  ``a = 1`` (every trajectory ends at POINT), wrong otherwise."""
  del cond, dropout_key
  return params["a"] * (POINT - x) / (1 - t[:, None])


# --------------------------------------------------------------------------------------------
# The parameterisation.
# --------------------------------------------------------------------------------------------


def test_boundary_condition_is_exact_for_a_random_network():
  model = _mlp()
  params = model.init(jax.random.PRNGKey(0))
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  f_of = jax.jit(consistency_lib.consistency_model(model.apply))  # one program for both times
  f = f_of(params, x, jnp.ones((64,)), None)
  np.testing.assert_array_equal(np.asarray(f), np.asarray(x))
  # ... and away from t = 1 the network changes it.
  f_half = f_of(params, x, jnp.full((64,), 0.5), None)
  assert np.abs(np.asarray(f_half - x)).max() > 1e-3


def _smooth_network(x, t):
  """A fixed smooth ``(x, t) -> F`` (a tanh layer), for derivatives in float64."""
  w = jnp.array([[0.8, -0.3, 0.5], [0.2, 0.9, -0.7]], x.dtype)
  v = jnp.array([[1.1, -0.4], [0.3, 0.8], [-0.6, 0.5]], x.dtype)
  u = jnp.array([0.7, -1.3, 0.4], x.dtype)
  return jnp.tanh(x @ w + t[:, None] * u) @ v


def test_tangent_is_the_derivative_along_the_path():
  """``df/dt`` by jvp equals central differences of ``f(x_t, t)`` along each pair's straight
  path (float64, step 1e-5: error ~1e-10)."""
  with jax.enable_x64(True):
    k0, k1, kt = jax.random.split(jax.random.PRNGKey(1), 3)
    x0 = jax.random.normal(k0, (16, 2), jnp.float64)
    x1 = 2.0 + jax.random.normal(k1, (16, 2), jnp.float64)
    t = jax.random.uniform(kt, (16,), jnp.float64, 0.05, 0.95)
    x_t = lambda s: (1 - s[:, None]) * x0 + s[:, None] * x1
    f = lambda s: consistency_lib.consistency_function(_smooth_network(x_t(s), s), x_t=x_t(s), t=s)
    h = 1e-5

    @jax.jit
    def tangent_and_differences(t):
      # The jvp, the central differences and the network at t in one compiled program.
      raw, tangent = consistency_lib.consistency_tangent(
        _smooth_network, x_t=x_t(t), t=t, velocity=x1 - x0
      )
      return raw, tangent, (f(t + h) - f(t - h)) / (2 * h), _smooth_network(x_t(t), t)

    raw, tangent, numeric, network = tangent_and_differences(t)
    assert numeric.dtype == jnp.float64
    np.testing.assert_allclose(raw, network, rtol=1e-12)
    np.testing.assert_allclose(tangent, numeric, rtol=1e-7, atol=1e-8)
    # The velocity's own share, and the network's, both matter: dropping either fails.
    assert np.abs(np.asarray(tangent - (x1 - x0))).max() > 1e-2
    assert np.abs(np.asarray(tangent)).max() > 1e-2


# --------------------------------------------------------------------------------------------
# The loss at exact consistency functions.
# --------------------------------------------------------------------------------------------


def _point_batch(objective, key, num):
  """A paired batch of the point-mass target from an 8-gaussians source (any source works)."""
  return objective.pair_fn(key, {"x": jnp.broadcast_to(POINT, (num, 2))})


@pytest.mark.parametrize("distance,weighting", [("l2", "uniform"), ("pseudo_huber", "endpoint")])
def test_point_mass_loss_and_gradient_vanish_only_at_the_exact_function(distance, weighting):
  """For a point mass every conditional velocity is the marginal one, so the exact ``f`` has
  ``df/dt = 0`` on every pair: loss and gradient are zero (float64 round-off), while ``a = 0.9``
  gives a loss and gradient of order one."""
  with jax.enable_x64(True):
    source = lambda key, num: toy2d.get_toy2d("8gaussians")(key, num).astype(jnp.float64)
    context = _context(_point_network, source=source)
    objective = objectives.get_objective(
      "consistency", context, distance=distance, weighting=weighting
    )
    batch = _point_batch(objective, jax.random.PRNGKey(0), 256)
    value_and_grad = jax.jit(jax.value_and_grad(objective.loss_fn))
    exact = {"a": jnp.asarray(1.0, jnp.float64)}
    loss, grads = value_and_grad(exact, jax.random.PRNGKey(1), batch)
    assert abs(float(loss)) < 1e-20 and abs(float(grads["a"])) < 1e-9, (loss, grads)
    loss, grads = value_and_grad({"a": jnp.asarray(0.9)}, jax.random.PRNGKey(1), batch)
    assert float(loss) > 1e-3 and abs(float(grads["a"])) > 1e-2, (loss, grads)


def test_pseudo_huber_normalises_by_the_root_mean_square():
  """``g / sqrt(rms(g)^2 + c^2)`` per example: rms([3, 4]) = sqrt(12.5), rms([0, 0]) = 0."""
  g = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.3, -0.1]])
  out = consistency_lib.pseudo_huber_tangent(g, c=0.5)
  rms = np.sqrt(np.mean(np.square(np.asarray(g)), axis=1, keepdims=True))
  np.testing.assert_allclose(out, np.asarray(g) / np.sqrt(rms**2 + 0.25), rtol=1e-6)
  np.testing.assert_array_equal(consistency_lib.squared_l2_tangent(g), g)


def _gradients_of(objective, *, num_batches=32, batch_size=1024):
  """``params -> (mean, standard error)`` of the loss's gradient over ``num_batches``
  independent batches of the Gaussian target (the same batches for every ``params``)."""

  def grads(params, key):
    k_data, k_pairs, k_loss = jax.random.split(key, 3)
    data = MEAN + STD * jax.random.normal(k_data, (batch_size, 2))
    batch = objective.pair_fn(k_pairs, {"x": data})
    flat = jax.grad(objective.loss_fn)(params, k_loss, batch)
    return jnp.concatenate([jnp.ravel(flat["mean"]), jnp.ravel(flat["std"])])

  keys = jax.random.split(jax.random.PRNGKey(0), num_batches)
  stacked = jax.jit(lambda params: jax.lax.map(lambda k: grads(params, k), keys))

  def mean_and_error(params):
    g = np.asarray(stacked(params), np.float64)
    return g.mean(0), g.std(0, ddof=1) / np.sqrt(num_batches)

  return mean_and_error


def test_gaussian_expected_gradient_vanishes_at_the_exact_function():
  """N(0, I) -> N(MEAN, STD^2 I): the loss of one pair is not zero at the exact ``f`` (its
  velocity is the conditional one), but its gradient is, in expectation (the tangent is
  linear in the velocity): every component within 4 standard errors of zero. A wrong std or
  mean moves the expected gradient by more than 10 standard errors."""
  objective = objectives.get_objective(
    "consistency", _context(_gaussian_network), distance="l2", time_sampler="uniform"
  )
  mean_and_error = _gradients_of(objective)
  mean, error = mean_and_error(_gaussian_params())
  assert np.all(np.abs(mean) < 4 * error), (mean, error)
  for wrong in (_gaussian_params(std=0.6), _gaussian_params(mean=MEAN + 0.2)):
    mean, error = mean_and_error(wrong)
    assert np.max(np.abs(mean) / error) > 10, (mean, error)


# --------------------------------------------------------------------------------------------
# Sampling.
# --------------------------------------------------------------------------------------------


def test_multistep_sampling_recursion():
  """With a constant source ``a`` and ``F = b``: ``x = a + b``, then ``x = (1 - t) a + t x + (1
  - t) b`` at each later time, checked by hand for three evaluations."""
  a, b = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]])
  source = lambda key, num: jnp.broadcast_to(a, (num, 2))
  f = lambda x, t: consistency_lib.consistency_function(jnp.broadcast_to(b, x.shape), x_t=x, t=t)
  times = samplers_lib.multistep_times(num_steps=3)
  np.testing.assert_allclose(times, [0.0, 1 / 3, 2 / 3], rtol=1e-7)
  out = samplers_lib.multistep_consistency_sample(
    jax.random.PRNGKey(0), f, source(None, 1), times=times, source=source, return_trajectory=True
  )
  expected = [np.asarray(a)]
  x = np.asarray(a + b)
  expected.append(x)
  for t in (1 / 3, 2 / 3):
    x = (1 - t) * np.asarray(a) + t * x + (1 - t) * np.asarray(b)
    expected.append(x)
  np.testing.assert_allclose(out.samples, expected[-1], rtol=1e-6)
  np.testing.assert_allclose(out.trajectory, np.stack(expected), rtol=1e-6)
  assert int(out.nfe) == 3


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampling_with_the_exact_function_reproduces_the_target(steps):
  """Every round re-noises a target sample onto the path's marginal, which the exact ``f``
  maps back to the target: 8000 samples have the target's mean and variance within 4
  standard errors (mean: STD / sqrt(n); variance: STD^2 sqrt(2 / (n - 1))). Re-noising with the
  first source draw instead of a fresh one would give the wrong variance for steps > 1."""
  objective = objectives.get_objective("consistency", _context(_gaussian_network))
  num = 8000
  out = objective.generate(_gaussian_params(), jax.random.PRNGKey(3), num, steps=steps)
  samples = np.asarray(out["samples"], np.float64)
  assert int(out["nfe"]) == steps
  np.testing.assert_array_less(np.abs(samples.mean(0) - MEAN), 4 * STD / np.sqrt(num))
  var_error = STD**2 * np.sqrt(2 / (num - 1))
  np.testing.assert_array_less(np.abs(samples.var(0, ddof=1) - STD**2), 4 * var_error)
  # A wrong consistency function is caught by the same tolerance.
  wrong = objective.generate(_gaussian_params(std=0.55), jax.random.PRNGKey(3), num, steps=steps)
  assert np.max(np.abs(np.asarray(wrong["samples"]).var(0, ddof=1) - STD**2)) > 4 * var_error


def test_generator_chunks_guides_and_refuses_other_samplers():
  """Chunked draws do not depend on the chunk size (fresh source draws inside ``vmap``);
  guidance mixes the conditional and unconditional consistency functions; an ODE sampler is
  refused with the one this objective has."""

  def labelled(params, x, t, cond=None, dropout_key=None):
    del params, dropout_key
    shift = 0.0 if cond is None else cond[:, None].astype(x.dtype)
    return jnp.zeros_like(x) + shift

  objective = objectives.get_objective("consistency", _context(labelled, num_classes=3))
  key = jax.random.PRNGKey(0)
  a = objective.generate({}, key, 7, steps=3, chunk_size=3)["samples"]
  b = objective.generate({}, key, 7, steps=3, chunk_size=5)["samples"]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  labels = jnp.array([2, 2, 2, 2])
  cond = objective.generate({}, key, 4, steps=1, labels=labels)["samples"]
  guided = objective.generate({}, key, 4, steps=1, labels=labels, guidance=3.0)["samples"]
  # One evaluation at t = 0: f = x0 + F; guided F = 0 + 3 (2 - 0) = 6 instead of 2.
  np.testing.assert_allclose(guided - cond, 4.0, rtol=1e-6)
  with pytest.raises(ValueError, match="'euler' cannot sample a consistency model"):
    objective.generate({}, key, 4, steps=1, sampler="euler")


# --------------------------------------------------------------------------------------------
# Checks and training.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,fragment",
  [
    (dict(distance="huber"), "objective.distance='huber'"),
    (dict(weighting="snr"), "objective.weighting='snr'"),
    (dict(time_sampler="beta"), "objective.time_sampler='beta'"),
    (dict(huber_c=0.0), "objective.huber_c=0.0"),
    (dict(time_scale=-1.0), "objective.time_scale=-1.0"),
    (dict(label_dropout=1.0), "objective.label_dropout=1.0"),
    (dict(huber_c=0.2), "objective.huber_c=0.2: distance='l2'"),
    (dict(time_sampler="uniform", time_loc=0.5), "objective.time_loc=0.5: time_sampler"),
  ],
)
def test_bad_keywords_raise_one_line_before_tracing(kwargs, fragment):
  assert any(fragment in p for p in consistency_lib.check(**kwargs))
  with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
    objectives.get_objective("consistency", _context(_gaussian_network), **kwargs)


def test_training_a_network_reduces_the_loss_to_the_point_mass():
  """A small MLP trained 150 Adam steps on the point mass (8-gaussians source), where the exact
  ``f`` has zero loss: the loss falls more than 10x from its initial value and one-step samples
  land 5x closer to the point."""
  model = _mlp()
  context = _context(model.apply, source=toy2d.get_toy2d("8gaussians"))
  objective = objectives.get_objective("consistency", context)
  optimizer = optax.adam(1e-2)

  def step(carry, key):
    params, opt_state = carry
    k_pairs, k_loss = jax.random.split(key)
    batch = _point_batch(objective, k_pairs, 256)
    loss, grads = jax.value_and_grad(objective.loss_fn)(params, k_loss, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params = model.init(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), 150)
  (params, _), losses = jax.jit(lambda p, k: jax.lax.scan(step, (p, optimizer.init(p)), k))(
    params, keys
  )
  losses = np.asarray(losses)
  assert losses[-20:].mean() < 0.1 * losses[0], (losses[0], losses[-20:].mean())
  before = objective.generate(
    model.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(2), 256, steps=1
  )
  after = objective.generate(params, jax.random.PRNGKey(2), 256, steps=1)
  error = lambda out: float(np.mean(np.linalg.norm(np.asarray(out["samples"]) - POINT, axis=1)))
  assert error(after) < 0.2 * error(before), (error(before), error(after))


# --------------------------------------------------------------------------------------------
# The config through the CLI.
# --------------------------------------------------------------------------------------------

TINY = [
  "--config.train.steps=10",
  "--config.train.fused_steps=5",
  "--config.train.log_every=5",
  "--config.train.checkpoint_every=10",
  "--config.train.batch_size=64",
  "--config.model.width=16",
  "--config.model.depth=2",
  "--config.train.progress_bar=false",
  "--config.train.async_checkpoint=false",
  "--config.sample.num=64",
]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("consistency")
  assert cli.main(["train", "--config", CONFIG + ":small", "--workdir", str(workdir), *TINY]) == 0
  return workdir


def _sample(workdir, out, steps, capsys):
  args = ["sample", "--workdir", str(workdir), "--num", "32", "--out", str(out)]
  assert cli.main([*args, "--steps", str(steps)]) == 0
  capsys.readouterr()
  with np.load(out) as saved:
    assert saved["samples"].shape == (32, 2) and np.isfinite(saved["samples"]).all()


@pytest.mark.slow  # an end-to-end CLI run; the fast suite keeps the unit checks
def test_config_trains_and_samples_in_one_step(trained_workdir, tmp_path, capsys):
  _sample(trained_workdir, tmp_path / "s1.npz", 1, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_config_samples_in_several_steps(trained_workdir, tmp_path, steps, capsys):
  _sample(trained_workdir, tmp_path / f"s{steps}.npz", steps, capsys)


@pytest.mark.slow
def test_config_evaluates_with_its_default_steps(trained_workdir, capsys):
  assert cli.main(["evaluate", "--workdir", str(trained_workdir), "--num", "32"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["nfe"] == 1 and np.isfinite(report["w2"])


@pytest.mark.slow
def test_config_trains_two_seeds(tmp_path, capsys):
  args = ["train", "--config", CONFIG + ":small", "--workdir", str(tmp_path), *TINY]
  assert cli.main([*args, "--config.train.num_seeds=2"]) == 0
  capsys.readouterr()
  assert cli.main(["evaluate", "--workdir", str(tmp_path), "--num", "32", "--steps", "2"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(report["per_seed"]) == 2 and all(np.isfinite(r["w2"]) for r in report["per_seed"])
