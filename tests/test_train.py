"""The train system: sharded step equivalence, resume, checkpoints, retracing, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny  # pylint: disable=wrong-import-order

from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train import sharding as sharding_lib
from diffjax.train import trainer as trainer_lib
from diffjax.train.metrics_log import read_metrics
from diffjax.train.optim import make_optimizer
from diffjax.train.state import TrainState
from diffjax.train.step import step_keys, train_step


def tiny_config(recipe="otcfm", **overrides):
  """tests/tiny.py's config on the OT-CFM protocol, with the fused chunks, batch and sample
  size these tests compare across meshes and resumes."""
  return tiny.tiny_config(
    f"--config.objective.name={recipe}",
    "--config.train.steps=20",
    "--config.train.fused_steps=5",
    "--config.train.log_every=5",
    "--config.train.checkpoint_every=10",
    "--config.train.batch_size=64",
    "--config.model.width=32",
    "--config.model.depth=3",
    "--config.train.keep_checkpoints=3",
    "--config.sample.num=64",
    "--config.sample.steps=4",
    "--config.train.ema_decay=0.9",
    *[f"--config.{k}={v}" for k, v in overrides.items()],
    base="toy2d_otcfm",
  )


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def run(config, workdir, devices):
  config_lib.validate(config, num_devices=len(devices))
  return loop.train(config, workdir, devices=devices)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  config = tiny_config()
  workdir = tmp_path_factory.mktemp("single")
  result = run(config, workdir, jax.devices()[:1])
  result["workdir"] = workdir
  return result


@pytest.mark.parametrize(
  "mesh",
  [pytest.param((8, 1), marks=pytest.mark.slow), (4, 2)],
  ids=["data8", "data4_fsdp2"],
)
def test_sharded_training_matches_one_device(single_device_run, tmp_path, mesh):
  """Same config on 8 simulated devices (pure data parallel, and data x FSDP) follows the
  single-device run: the OT coupling is solved on the global batch and the random draws do not
  depend on the layout, so only float32 reduction order differs."""
  data, fsdp = mesh
  config = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp})
  result = run(config, tmp_path, jax.devices()[:8])
  losses_one = np.array([l for _, l in single_device_run["losses"]])
  losses_many = np.array([l for _, l in result["losses"]])
  np.testing.assert_allclose(losses_many, losses_one, rtol=2e-4, atol=1e-5)
  for a, b in zip(leaves(result["state"].params), leaves(single_device_run["state"].params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  if fsdp > 1:  # the FSDP rule really sharded something
    specs = [x.sharding.spec for x in jax.tree.leaves(result["state"].params)]
    assert any("fsdp" in str(spec) for spec in specs)


@pytest.mark.slow
def test_per_device_coupling_pairs_within_shards_and_trains(single_device_run, tmp_path):
  """objective.coupling_scope=per_device (TorchCFM's behaviour under DDP): each of 8 devices
  solves OT on its own 2 points, which equals exact OT shard by shard (a float64 brute-force
  reference) and never pairs across shards; a fused 8-device run with it compiles once, trains
  (finite losses) and follows another trajectory than the global coupling's run."""
  import itertools

  from diffjax import couplings

  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:8])
  coupling = sharding_lib.per_device_coupling(couplings.get_coupling("exact_ot"), mesh)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((16, 2)).astype(np.float32)
  x1 = rng.standard_normal((16, 2)).astype(np.float32) + 0.5
  on_mesh = functools.partial(jax.device_put, device=sharding_lib.batch_sharding(mesh))
  _, _, labels = jax.jit(coupling)(
    jax.random.PRNGKey(0), on_mesh(x0), on_mesh(x1), on_mesh(np.arange(16, dtype=np.int32))
  )
  perm = np.asarray(labels)  # labels were arange: they read back the permutation
  for shard in range(8):
    rows = np.arange(2 * shard, 2 * shard + 2)
    cost = ((x0[rows, None].astype(np.float64) - x1[None, rows]) ** 2).sum(-1)
    best = min(itertools.permutations(range(2)), key=lambda p: cost[[0, 1], list(p)].sum())
    np.testing.assert_array_equal(perm[rows], rows[list(best)])

  config = tiny_config(**{"objective.coupling_scope": "per_device"})
  result = run(config, tmp_path, jax.devices()[:8])
  losses = np.array([l for _, l in result["losses"]])
  assert np.isfinite(losses).all() and result["trace_count"] == 1
  global_losses = np.array([l for _, l in single_device_run["losses"]])
  assert np.abs(losses - global_losses).max() > 1e-3  # the scope changed the pairs


def test_step_compiles_once(single_device_run):
  # 20 steps in chunks of 5: one trace for the chunk length, none per step.
  assert single_device_run["trace_count"] == 1


@pytest.mark.slow  # fast: test_reliability.py::test_resume_after_corruption_matches_uninterrupted
def test_resume_matches_uninterrupted(single_device_run, tmp_path):
  """Stop after 10 steps, start again from the workdir: the final state equals the
  uninterrupted run's bit for bit (one base key, step folded in, data drawn from the step)."""
  config = tiny_config()
  with config.unlocked():
    config.train.steps = 10
  first = run(config, tmp_path, jax.devices()[:1])
  assert int(first["state"].step) == 10
  config = tiny_config()
  resumed = run(config, tmp_path, jax.devices()[:1])
  assert resumed["start_step"] == 10
  assert int(resumed["state"].step) == 20
  for a, b in zip(leaves(resumed["state"]), leaves(single_device_run["state"])):
    np.testing.assert_array_equal(a, b)
  steps = [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")]
  assert steps == [5, 10, 15, 20]  # nothing logged twice, nothing lost


def test_workdir_outputs(single_device_run):
  workdir = single_device_run["workdir"]
  saved = config_lib.config_from_json((workdir / "config.json").read_text())
  assert saved.to_dict() == tiny_config().to_dict()
  assert [row["step"] for row in read_metrics(workdir / "metrics.jsonl")] == [5, 10, 15, 20]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
  png = (workdir / "samples.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  assert list((workdir / "tensorboard").iterdir())


def test_checkpoint_round_trip(tmp_path):
  from diffjax.train import checkpoint as ckpt

  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  state = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.array(3, jnp.int32)}}
  manager = ckpt.make_checkpoint_manager(tmp_path, keep=2, async_save=False)
  ckpt.save(manager, 7, state, {"step": 7}, force=True)
  manager.wait_until_finished()
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), state)
  step, restored, data_state = ckpt.restore_latest(
    manager, ckpt.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
  )
  manager.close()
  assert step == 7 and data_state == {"step": 7}
  for a, b in zip(leaves(restored), leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_full_batch():
  """Averaging 4 micro-batch gradients equals the full-batch gradient when the loss is a
  per-example mean (here a quadratic with no randomness)."""
  params = {"w": jnp.array([0.5, -1.0])}
  batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (16, 2))}

  def loss_fn(p, key, b):
    del key
    return jnp.mean((b["x"] @ p["w"] - 1.0) ** 2)

  optimizer = optax.sgd(0.1)
  state = TrainState(
    params=params,
    opt_state=optimizer.init(params),
    ema_params=params,
    step=jnp.zeros((), jnp.int32),
    key=jax.random.PRNGKey(1),
    nonfinite_streak=jnp.zeros((), jnp.int32),
  )
  step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, ema_decay=0.9)
  # Both in one jitted program: one compile instead of one per operation run eagerly.
  (full, m_full), (acc, m_acc) = jax.jit(lambda s, b: (step(s, b), step(s, b, accumulate_steps=4)))(
    state, batch
  )
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc.params["w"], full.params["w"], rtol=1e-6)


def test_nonfinite_step_leaves_state_unchanged():
  params = {"w": jnp.array([0.5, -1.0])}
  optimizer = optax.adam(0.1)
  state = TrainState(
    params=params,
    opt_state=optimizer.init(params),
    ema_params=params,
    step=jnp.zeros((), jnp.int32),
    key=jax.random.PRNGKey(1),
    nonfinite_streak=jnp.zeros((), jnp.int32),
  )
  loss_fn = lambda p, key, b: jnp.sum(p["w"]) * b["x"]
  new, _ = train_step(
    state, {"x": jnp.array(jnp.nan)}, loss_fn=loss_fn, optimizer=optimizer, ema_decay=0.9
  )
  for a, b in zip(
    leaves((new.params, new.opt_state, new.ema_params)),
    leaves((state.params, state.opt_state, state.ema_params)),
  ):
    np.testing.assert_array_equal(a, b)
  assert int(new.nonfinite_streak) == 1 and int(new.step) == 1


# slow: one OT-CFM chunk against six steps (18 s); the fast suite keeps the chunk's host-callback-
# free structure (test_ot_mesh) and the stacked solve
# (test_stacked_assignments_on_threads_match_one_by_one)
@pytest.mark.slow
def test_fused_chunk_pairs_ahead_and_equals_step_by_step(monkeypatch):
  """OT-CFM's couplings of a fused chunk are solved before its scan, in ONE host callback with
  the stack of all K cost matrices, and the chunk still equals K single train_steps (each
  pairing inside its step) with the same keys: same permutations, losses and parameters up to
  float32 rounding of the vmapped cost matmul (rtol 1e-5)."""
  from diffjax import couplings
  from diffjax.train.experiment import build_experiment
  from diffjax.train.step import fused_train_steps

  config = tiny_config(recipe="otcfm")
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  experiment = build_experiment(config, mesh=mesh)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  _, _, create = trainer_lib.make_initial_state(experiment, optimizer, seed=config.seed, mesh=mesh)
  kwargs = dict(
    pair_fn=experiment.pair_fn, loss_fn=experiment.loss_fn, optimizer=optimizer, ema_decay=0.9
  )
  stacks = []
  solve = couplings._assignment_host
  monkeypatch.setattr(
    couplings,
    "_assignment_host",
    lambda cost, **kw: stacks.append(np.shape(cost)) or solve(cost, **kw),
  )

  fused, fused_metrics = jax.jit(
    lambda s: fused_train_steps(s, num_steps=6, sample_batch=experiment.sample_batch, **kwargs)
  )(create())
  assert stacks == [(6, 64, 64)]  # one callback for the chunk's six OT problems

  stepped, losses = create(), []
  one_step = jax.jit(
    lambda s: train_step(s, experiment.sample_batch(step_keys(s.key, s.step)[0]), **kwargs)
  )
  for _ in range(6):
    stepped, metrics = one_step(stepped)
    losses.append(float(metrics["loss"]))
  assert stacks[1:] == [(64, 64)] * 6
  np.testing.assert_allclose(np.asarray(fused_metrics["loss"]), losses, rtol=1e-5)
  for a, b in zip(leaves(fused), leaves(stepped)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_stacked_assignments_on_threads_match_one_by_one():
  """The thread-pooled solve of a stack equals solving each matrix alone (exact permutations),
  and each is optimal: no random permutation has a lower cost."""
  from diffjax import couplings

  rng = np.random.default_rng(0)
  stack = rng.random((5, 32, 32))
  perms = couplings._assignment_host(stack)
  for matrix, perm in zip(stack, perms):
    np.testing.assert_array_equal(perm, couplings._assignment_host(matrix))
    best = matrix[np.arange(32), perm].sum()
    assert all(matrix[np.arange(32), rng.permutation(32)].sum() >= best for _ in range(200))


def test_fsdp_rule_shards_largest_divisible_axis():
  assert sharding_lib.fsdp_spec((64, 2), 2) == jax.sharding.PartitionSpec("fsdp", None)
  assert sharding_lib.fsdp_spec((3, 5), 2) == jax.sharding.PartitionSpec()
  assert sharding_lib.fsdp_spec((6, 8), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding_lib.fsdp_spec((64,), 1) == jax.sharding.PartitionSpec()


def test_warmup_cosine_schedule():
  optimizer_lr = []
  from diffjax.train.optim import learning_rate_schedule

  schedule = learning_rate_schedule(
    learning_rate=1.0, warmup_steps=10, decay="cosine", total_steps=110
  )
  optimizer_lr = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
  np.testing.assert_allclose(optimizer_lr, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  constant = learning_rate_schedule(
    learning_rate=2.0, warmup_steps=4, decay="constant", total_steps=10
  )
  np.testing.assert_allclose([float(constant(s)) for s in (0, 2, 4, 9)], [0, 1, 2, 2])


def test_adamw_and_clipping_built_from_config():
  optimizer = make_optimizer(
    name="adamw",
    learning_rate=0.1,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.5,
    warmup_steps=0,
    decay="constant",
    grad_clip_norm=1.0,
    total_steps=10,
  )
  params = {"w": jnp.array([3.0, 4.0])}
  updates, _ = optimizer.update({"w": jnp.array([300.0, 400.0])}, optimizer.init(params), params)
  # Adam's first update is -lr * sign(g) (clipping does not change the sign), plus decoupled
  # weight decay -lr * wd * w.
  np.testing.assert_allclose(updates["w"], -0.1 * (1.0 + 0.5 * params["w"]), rtol=1e-4)


def test_bfloat16_compute_keeps_float32_parameters(single_device_run, tmp_path):
  """compute_dtype=bfloat16: the master weights, EMA and Adam moments stay float32, the loss
  is finite and follows the float32 run's loss within bf16 rounding over a short run."""
  config = tiny_config(**{"train.compute_dtype": "bfloat16"})
  result = run(config, tmp_path, jax.devices()[:1])
  state = result["state"]
  for leaf in jax.tree.leaves((state.params, state.ema_params)):
    assert leaf.dtype == jnp.float32
  assert all(
    x.dtype == jnp.float32
    for x in jax.tree.leaves(state.opt_state)
    if jnp.issubdtype(x.dtype, jnp.floating)
  )
  losses = np.array([l for _, l in result["losses"]])
  reference = np.array([l for _, l in single_device_run["losses"]])
  assert np.isfinite(losses).all()
  # bf16 has 8 mantissa bits (relative rounding 2^-8 ~ 0.4% per op); over 20 steps the two runs
  # drift apart a little but must stay close: 10% relative.
  np.testing.assert_allclose(losses, reference, rtol=0.1)


def test_data_and_loss_randomness_are_independent(tmp_path):
  """Regression test: data and loss keys once shared bits (``split(k, n)[i] == fold_in(k, i)``
  with threefry), which tied the moon of each training point to its time ``t``. The optimal
  velocity at t = 0 of the I-CFM path is E[x1] - x0, so the mean predicted velocity over
  x0 ~ N(0, I) must approach E[x1] = (0.5, -0.25) for moons; with the bug it was (2.1, -1.4).
  Tolerance 0.35 per coordinate: a 600-step model, far looser than the 1.6 error it guards."""
  from diffjax.train.step import step_keys

  keys = step_keys(jax.random.PRNGKey(0), jnp.int32(7))
  descendants = lambda k: {
    tuple(np.asarray(x))
    for x in [*jax.random.split(k, 8)] + [jax.random.fold_in(k, i) for i in range(8)]
  }
  for i, j in [(0, 1), (0, 2), (1, 2)]:  # data, pair and loss streams share no key
    assert not descendants(keys[i]) & descendants(keys[j])

  config = tiny_config(
    recipe="icfm",
    **{
      "data.source": "normal",
      "data.target": "moons",
      "train.steps": 600,
      "train.fused_steps": 100,
      "train.log_every": 100,
      "train.checkpoint_every": 600,
      "model.width": 64,
      "train.batch_size": 256,
    },
  )
  result = run(config, tmp_path, jax.devices()[:1])
  apply = jax.jit(result["experiment"].model.apply)  # one program, not one per operation
  x0 = jax.random.normal(jax.random.PRNGKey(3), (4096, 2))
  mean_velocity = np.asarray(apply(result["state"].params, x0, jnp.zeros((4096,)), None)).mean(0)
  np.testing.assert_allclose(mean_velocity, [0.5, -0.25], atol=0.35)
