"""Shortcut models (diffjax.objectives.shortcut): d = 0 is I-CFM with sigma = 0 on the same draws,
the self-consistency target by hand on a linear model and exact for the exact mean velocity,
its clipping by hand, and sampling with an exact field."""

from __future__ import annotations

import few_step_cli
import jax
import jax.numpy as jnp
import mean_velocity_fields as exact
import numpy as np
import pytest

from diffjax import losses, models, objectives
from diffjax.objectives import flow_matching, mean_velocity, shortcut


def _context(apply, *, num_classes=0):
  return objectives.ObjectiveContext(
    apply=apply,
    source=lambda key, num: jax.random.normal(key, (num, 2)),
    data_shape=(2,),
    num_classes=num_classes,
  )


def test_step_level():
  """lambda(d) = log2(1 / max(d, 1/M)) / log2(M): 0 at one step, 1 at the finest and at 0."""
  d = jnp.asarray([1.0, 0.5, 0.25, 0.125, 1 / 16, 0.0])
  np.testing.assert_allclose(
    shortcut.step_level(d, max_steps=8), [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0], atol=1e-6
  )


def test_zero_step_is_flow_matching_on_the_same_draws():
  """bootstrap_fraction = 0: pairs, loss and gradient equal I-CFM's with sigma = 0 for the
  same keys (a model that reads only t; dropout on, so the dropout keys must agree too); the
  example's target is x1 - x0 at d = 0."""
  mlp = models.create_model("mlp", data_shape=(2,), width=16, depth=2, dropout=0.3)

  def apply(params, x, t, cond=None, dropout_key=None):
    return mlp.apply(params, x, t if t.ndim == 1 else t[:, 0], cond, dropout_key=dropout_key)

  context = _context(apply)
  ours = shortcut.shortcut(context, bootstrap_fraction=0.0)
  icfm = flow_matching.icfm(context, sigma=0.0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: 0.5 * rng.standard_normal(a.shape).astype(a.dtype),
    jax.eval_shape(mlp.init, jax.random.key(0)),
  )
  data = {"x": jnp.asarray(2.0 + rng.standard_normal((32, 2)), jnp.float32)}

  @jax.jit
  def probe(params, key):
    k_pair, k_loss = jax.random.split(key)
    out = {}
    for name, objective in (("ours", ours), ("icfm", icfm)):
      batch = objective.pair_fn(k_pair, data)
      loss, grad = jax.value_and_grad(objective.loss_fn)(params, k_loss, batch)
      out[name] = dict(x0=batch["x0"], loss=loss, grad=grad)
    example = shortcut.shortcut_example(
      k_loss,
      x0=out["ours"]["x0"],
      x1=data["x"],
      field=None,
      num_bootstrap=0,
      max_steps=128,
      time_sampler=losses.uniform_time,
    )
    fm = losses.flow_matching_example(
      k_loss, x0=out["ours"]["x0"], x1=data["x"], path=mean_velocity.LINEAR_PATH
    )
    return out, example, fm

  out, example, fm = jax.tree.map(np.asarray, probe(params, jax.random.key(1)))
  np.testing.assert_array_equal(out["ours"]["x0"], out["icfm"]["x0"])
  np.testing.assert_allclose(out["ours"]["loss"], out["icfm"]["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out["ours"]["grad"]), jax.tree.leaves(out["icfm"]["grad"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(example.target, data["x"] - out["ours"]["x0"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(example.target, fm.target)
  np.testing.assert_array_equal(example.model_input, fm.model_input)
  np.testing.assert_array_equal(example.model_time[:, 0], fm.model_time)
  np.testing.assert_array_equal(example.model_time[:, 1], fm.model_time)  # d = 0


def test_self_consistency_target_by_hand():
  """On a linear field s(x, t, d) = x A + b t + c d, the targets of the bootstrap rows are
  (s(x_t, t, d) + s(x_t + d s(x_t, t, d), t + d, d)) / 2, computed here in NumPy; the steps are
  2d = 2^-k, k < log2(M), from starts on the grid of 2d; the other rows are flow matching."""
  a = np.array([[0.3, -0.2], [0.1, 0.4]], np.float32)
  b, c = np.array([0.5, -1.0], np.float32), np.array([2.0, 0.7], np.float32)

  def field(x, ts):
    t, s = ts[:, :1], ts[:, 1:]
    return x @ a + t * b + (s - t) * c

  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((256, 2)).astype(np.float32)
  x1 = rng.standard_normal((256, 2)).astype(np.float32)
  make = jax.jit(
    lambda key: shortcut.shortcut_example(
      key,
      x0=x0,
      x1=x1,
      field=field,
      num_bootstrap=192,
      max_steps=8,
      time_sampler=losses.uniform_time,
    )
  )
  example = jax.tree.map(np.asarray, make(jax.random.key(0)))
  t, full = example.model_time[:192, 0], example.model_time[:192, 1] - example.model_time[:192, 0]
  np.testing.assert_allclose(np.sort(np.unique(full)), [0.25, 0.5, 1.0])  # 2d, M = 8
  assert min(np.sum(full == step) for step in (0.25, 0.5, 1.0)) > 40  # each level drawn
  starts = t / full
  np.testing.assert_array_equal(starts, np.round(starts))
  assert np.all((t >= 0) & (t + full <= 1))
  x_t = (1 - t[:, None]) * x0[:192] + t[:, None] * x1[:192]
  np.testing.assert_allclose(example.model_input[:192], x_t, rtol=1e-6, atol=1e-6)
  d = full[:, None] / 2
  first = x_t @ a + t[:, None] * b + d * c
  second = (x_t + d * first) @ a + (t[:, None] + d) * b + d * c
  np.testing.assert_allclose(example.target[:192], (first + second) / 2, rtol=1e-5, atol=1e-6)
  # The remaining rows: flow matching at d = 0.
  rest = example.model_time[192:]
  np.testing.assert_array_equal(rest[:, 0], rest[:, 1])
  np.testing.assert_allclose(example.target[192:], x1[192:] - x0[192:], rtol=1e-6, atol=1e-6)


def _clipped_target_numpy(a: np.ndarray, x_t: np.ndarray, d: np.ndarray, clip: float):
  """The reference's two half steps on the field s(x) = x A, clipped, in NumPy."""
  first = x_t @ a
  x_mid = np.clip(x_t + d[:, None] * first, -clip, clip)
  return np.clip((first + x_mid @ a) / 2, -clip, clip)


def test_bootstrap_clip_by_hand():
  """Midpoint and target clipped to [-c, c] (c = 2), field s(x) = x A with A = diag(-0.5, 4):
  a row inside the box is unchanged; row 1's midpoint 2.25 is clipped to 2 (target -1.25, not
  the unclipped -1.3125); row 2's target (7 after its midpoint's clip, 9 without) is clipped
  to 2; c = inf is the plain formula."""
  a = np.diag([-0.5, 4.0]).astype(np.float32)
  x_t = np.array([[0.1, 0.1], [3.0, 0.0], [0.0, 1.5]], np.float32)
  d = np.array([0.25, 0.5, 0.25], np.float32)
  t = np.zeros(3, np.float32)
  field = lambda x, ts: x @ a

  def target(clip):
    return np.asarray(shortcut.self_consistency_target(field, x_t=x_t, t=t, d=d, clip=clip))

  plain, clipped = target(np.inf), target(2.0)
  np.testing.assert_allclose(plain, _clipped_target_numpy(a, x_t, d, np.inf), rtol=1e-6)
  np.testing.assert_allclose(clipped, _clipped_target_numpy(a, x_t, d, 2.0), rtol=1e-6)
  np.testing.assert_allclose(plain[1], [-1.3125, 0.0], rtol=1e-6)
  np.testing.assert_allclose(plain[2], [0.0, 9.0], rtol=1e-6)
  np.testing.assert_array_equal(clipped[0], plain[0])  # inside the box: unchanged
  np.testing.assert_allclose(clipped[1], [-1.25, 0.0], rtol=1e-6)  # midpoint clipped
  np.testing.assert_allclose(clipped[2], [0.0, 2.0], rtol=1e-6)  # target clipped


def test_bootstrap_clip_leaves_flow_matching_rows_and_reaches_the_loss():
  """Only the self-consistency rows are clipped (the reference's); the flow-matching rows keep
  x1 - x0 beyond the box; the objective's loss is the regression loss on the clipped example
  (same keys), and differs from the unclipped one."""
  a = np.array([[3.0, 1.0], [-2.0, 3.0]], np.float32)

  def apply(params, x, times, cond=None, dropout_key=None):
    return x @ (params * a) + times[:, :1]

  rng = np.random.default_rng(3)
  x0 = jnp.asarray(3.0 * rng.standard_normal((64, 2)), jnp.float32)
  x1 = jnp.asarray(3.0 * rng.standard_normal((64, 2)), jnp.float32)
  batch, key, params = {"x0": x0, "x": x1}, jax.random.key(4), jnp.float32(1.0)

  def example_and_loss(clip):
    objective = shortcut.shortcut(_context(apply), bootstrap_fraction=0.5, bootstrap_clip=clip)
    k_example = jax.random.split(key, 3)[0]  # the loss's own split
    pair_apply = lambda x, ts: apply(params, x, shortcut.network_times(ts, max_steps=128))
    example = shortcut.shortcut_example(
      k_example,
      x0=x0,
      x1=x1,
      field=pair_apply,
      num_bootstrap=32,
      max_steps=128,
      time_sampler=losses.uniform_time,
      bootstrap_clip=clip,
    )
    expected = losses.regression_loss(pair_apply(example.model_input, example.model_time), example)
    return example, objective.loss_fn(params, key, batch), expected

  # Jitted (clip static): one compiled program per clip instead of op-by-op dispatch.
  example_and_loss = jax.jit(example_and_loss, static_argnums=0)
  example, loss, expected = example_and_loss(1.0)
  target = np.asarray(example.target)
  assert np.abs(target[:32]).max() <= 1.0 and np.sum(np.abs(target[:32]) == 1.0) > 8
  np.testing.assert_allclose(target[32:], np.asarray(x1 - x0)[32:], rtol=1e-6, atol=1e-6)
  assert np.abs(target[32:]).max() > 3.0  # beyond the box, left alone
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  _, loss_plain, expected_plain = example_and_loss(np.inf)
  np.testing.assert_allclose(loss_plain, expected_plain, rtol=1e-5)
  assert abs(float(loss_plain) - float(loss)) > 1e-2 * float(loss)


def _exact_apply(params, x, times, cond=None, dropout_key=None):
  """The exact mean velocity of tests/mean_velocity_fields.py as a network of (t, lambda(d)),
  M = 128: d = 2^(-7 lambda), read as 0 at the finest level."""
  t, level = times[:, 0], times[:, 1]
  d = jnp.where(level < 1.0, jnp.exp2(-7.0 * level), 0.0)
  return exact.mean_velocity(x, t, t + d)


def test_exact_mean_velocity_is_self_consistent_and_samples_exactly():
  """The exact mean velocity is its own self-consistency target (two half steps of the exact
  flow are one full step); sampling with it in 1 and 2 steps lands on m + c x0."""
  objective = shortcut.shortcut(_context(_exact_apply))
  rng = np.random.default_rng(2)
  x0 = rng.standard_normal((64, 2)).astype(np.float32)
  x1 = exact.data_of_source(jnp.asarray(rng.standard_normal((64, 2)), jnp.float32))

  def field(x, ts):
    return exact.mean_velocity(x, ts[:, 0], ts[:, 1])

  example = jax.jit(
    lambda key: shortcut.shortcut_example(
      key,
      x0=x0,
      x1=x1,
      field=field,
      num_bootstrap=64,
      max_steps=128,
      time_sampler=losses.uniform_time,
    )
  )(jax.random.key(0))
  expected = field(example.model_input, example.model_time)
  np.testing.assert_allclose(example.target, expected, rtol=1e-4, atol=1e-4)
  for steps in (1, 2):
    out = objective.generate(None, jax.random.key(0), 64, steps=steps, return_trajectories=True)
    assert int(out["nfe"]) == steps
    start = out["trajectories"][0]
    np.testing.assert_allclose(out["samples"], exact.data_of_source(start), rtol=1e-5, atol=1e-5)


def test_spec_and_checks():
  spec = objectives.OBJECTIVES["shortcut"]
  assert spec.time_inputs == 2 and spec.default_sampler == "shortcut" and spec.any_source
  assert "shortcut" in spec.samplers and "euler" in spec.samplers
  assert spec.check() == [] and spec.check(bootstrap_clip=float("inf")) == []
  for keywords, fragment in [
    (dict(bootstrap_fraction=-0.5), "objective.bootstrap_fraction=-0.5"),
    (dict(max_steps=96), "objective.max_steps=96: must be a power of two"),
    (dict(max_steps=1), "objective.max_steps=1"),
    (dict(time_sampler="nonesuch"), "objective.time_sampler='nonesuch'"),
    (dict(label_dropout=1.0), "objective.label_dropout=1.0"),
    (dict(bootstrap_clip=0.0), "objective.bootstrap_clip=0.0: the half width"),
    (dict(bootstrap_clip=float("nan")), "objective.bootstrap_clip=nan"),
  ]:
    assert spec.check(**keywords)[0].startswith(fragment), keywords


@pytest.mark.slow
def test_config_trains_and_samples_with_1_2_4_8_steps(tmp_path, capsys):
  few_step_cli.train_and_sample("toy2d_shortcut", tmp_path, capsys, steps=(1, 2, 4, 8))


@pytest.mark.slow
def test_config_trains_two_seeds(tmp_path, capsys):
  few_step_cli.train_and_sample(
    "toy2d_shortcut", tmp_path, capsys, steps=(1,), extra=("--config.train.num_seeds=2",)
  )
