"""A chunk of a convolutional step on CPU runs no convolution inside a loop body.

XLA CPU rewrites convolutions to its Eigen kernels' dimension order only in a program's entry
computation; a gradient convolution inside a ``lax.scan`` body falls back to the naive emitter
(ten times slower for the UNet, issue 17). These checks are structural (jaxprs, trace counts),
not timings.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tiny  # pylint: disable=wrong-import-order

from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train import trainer as trainer_lib
from diffjax.train.experiment import build_experiment
from diffjax.train.optim import make_optimizer
from diffjax.train.step import fused_train_steps, step_keys, train_step

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _mesh():
  return sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])


def _primitives(jaxpr) -> set[str]:
  return {eqn.primitive.name for eqn in jaxpr.eqns}


def test_one_step_chunk_has_no_loop_and_equals_train_step():
  """``num_steps=1``: no ``scan`` in the chunk's jaxpr (``num_steps=2`` has one), and the same
  state and loss as :func:`train_step` on the step's batch (same program, compared exactly)."""
  config = tiny.tiny_config()
  experiment = build_experiment(config, mesh=_mesh())
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  _, _, create = trainer_lib.make_initial_state(experiment, optimizer, seed=0, mesh=_mesh())
  kwargs = dict(
    pair_fn=experiment.pair_fn, loss_fn=experiment.loss_fn, optimizer=optimizer, ema_decay=0.9
  )
  chunk = lambda n: (
    lambda s: fused_train_steps(s, num_steps=n, sample_batch=experiment.sample_batch, **kwargs)
  )
  state = create()
  assert "scan" not in _primitives(jax.make_jaxpr(chunk(1))(state).jaxpr)
  assert "scan" in _primitives(jax.make_jaxpr(chunk(2))(state).jaxpr)
  one_step = lambda s: train_step(s, experiment.sample_batch(step_keys(s.key, s.step)[0]), **kwargs)
  # One program for both (one compile): XLA may share work between the two only where they
  # compute the same thing, so a chunk that differs from the step still gives other values.
  (fused, metrics), (one, one_metrics) = jax.jit(lambda s: (chunk(1)(s), one_step(s)))(state)
  assert metrics["loss"].shape == (1,)
  np.testing.assert_allclose(np.asarray(metrics["loss"])[0], one_metrics["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_count_convolutions_looks_inside_nested_jaxprs():
  """Two convolution layers inside a scan inside a jit count 2; their gradient adds an input
  and a weight gradient for each (2 + 2 + 2 = 6: the scan's carry is differentiated)."""
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
  two = lambda x, w: jax.lax.scan(lambda c, _: (conv(conv(c, w), w), None), x, None, length=1)[0]
  x, w = jnp.ones((1, 1, 4, 4)), jnp.ones((1, 1, 3, 3))
  count = lambda f, *a: trainer_lib._count_convolutions(jax.make_jaxpr(f)(*a).jaxpr)
  assert count(jax.jit(two), x, w) == 2
  assert count(jax.jit(jax.grad(lambda w: jnp.sum(two(x, w)))), w) == 6
  assert count(jax.jit(lambda w: jnp.tanh(x.reshape(4, 4)[:, :3] @ w[0, 0])), w) == 0


def test_cpu_chunk_of_a_unet_runs_one_step_programs():
  """A tiny digits UNet, data on the device, chunks of 3 then 1 steps: one trace (the one-step
  program, no loop), metrics of 3 then 1 steps, and the state of 4 single steps exactly."""
  config = config_lib.load_config_file(str(CONFIGS / "digits_fm.py") + ":small")
  config_lib.apply_overrides(
    config,
    [
      "--config.model.ch=8",
      "--config.model.num_res_blocks=1",
      "--config.model.ch_mult=(1,)",
      "--config.model.attn_resolutions=()",
      "--config.train.batch_size=4",
      "--config.train.fused_steps=3",
      "--config.data.device_resident=on",
      "--config.train.progress_bar=False",
    ],
  )
  config_lib.validate(config, num_devices=1)
  trainer = trainer_lib.make_trainer(config, _mesh())
  state, metrics = trainer.advance(trainer.create_state(), 3)
  assert metrics["loss"].shape == (3,)
  state, metrics = trainer.advance(state, 1)
  assert metrics["loss"].shape == (1,) and int(state.step) == 4
  assert trainer.trace_count == [1]
  single = trainer.create_state()
  for _ in range(4):
    single, _ = trainer.advance(single, 1)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
