"""The ``tensor`` mesh axis: layout rules, validation, and a tensor-parallel step that equals the
one-device step (8 simulated devices from conftest).

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053) splits
the DiT's attention heads and MLP hidden units over ``tensor`` devices; XLA inserts the
collectives, so the arithmetic is the same up to float32 summation order.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from tiny import CONFIGS

from diffjax.models import create_model
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.state import init_train_state
from diffjax.train.trainer import make_trainer

DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=4.0, time_features_dim=32)


def _dit_config(*overrides: str):
  config = config_lib.load_config_file(str(CONFIGS / "digits_dit.py") + ":small")
  config_lib.apply_overrides(
    config,
    [
      "--config.train.batch_size=8",
      "--config.train.fused_steps=1",
      "--config.train.progress_bar=false",
      *overrides,
    ],
  )
  return config


def test_digits_dit_small_keys():
  """configs/digits_dit.py:small is a DiT with patch 2 whose heads and MLP split over tensor
  up to 4 (other tests and the multi-host test build on these keys)."""
  config = _dit_config()
  assert config.model.name == "dit" and config.model.patch_size == 2
  assert config.model.remat == "none" and config.mesh.tensor == 1
  assert tuple(config.data.shape) == (8, 8, 1)
  config_lib.validate(config, num_devices=8)


def test_with_tensor_one_the_layout_is_the_fsdp_rule():
  """tensor=1: every DiT leaf, named or not, gets exactly the shape-only FSDP layout."""
  model = create_model("dit", data_shape=(8, 8, 1), **DIT)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  logical_axes = dict(model.logical_axes)
  assert len(logical_axes) == 2 * 6
  for fsdp in (1, 2, 4, 8):
    for path, leaf in flat:
      keys = tuple(getattr(k, "key", k) for k in path)
      names = logical_axes.get(keys)
      spec = sharding_lib.param_spec(leaf.shape, names, fsdp=fsdp, tensor=1)
      assert spec == sharding_lib.fsdp_spec(leaf.shape, fsdp), (keys, fsdp)


def test_tensor_axis_is_taken_first_then_fsdp():
  spec = sharding_lib.param_spec
  assert spec((32, 96), ("embed", "heads"), fsdp=2, tensor=2) == P("fsdp", "tensor")
  assert spec((32, 32), ("heads", "embed"), fsdp=2, tensor=2) == P("tensor", "fsdp")
  assert spec((96,), ("heads",), fsdp=2, tensor=2) == P("tensor")
  assert spec((128, 32), ("mlp", "embed"), fsdp=1, tensor=4) == P("tensor", None)
  # Unnamed (the adaLN): split over fsdp x tensor, or fsdp alone when the product does not
  # divide an axis.
  assert spec((32, 192), None, fsdp=2, tensor=2) == P(None, ("fsdp", "tensor"))
  assert spec((32, 6), None, fsdp=2, tensor=2) == P(("fsdp", "tensor"), None)
  assert spec((6, 3), None, fsdp=2, tensor=2) == P("fsdp", None)
  with pytest.raises(ValueError, match="mesh.tensor=3 does not divide the 'heads' axis"):
    spec((32, 32), ("embed", "heads"), fsdp=1, tensor=3)


def test_moments_and_ema_follow_their_parameter():
  """Adam's mu and nu and the EMA copy of a parameter get its layout (matched by path); the
  batch is split over data x fsdp only."""
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  model = create_model("dit", data_shape=(8, 8, 1), **DIT)
  state = jax.eval_shape(
    lambda k: init_train_state(key=k, init_params=model.init, optimizer=optax.adam(1e-3)),
    jax.random.PRNGKey(0),
  )
  shard = lambda tree: sharding_lib.state_shardings(tree, mesh, model.logical_axes)
  params, ema, opt = shard(state.params), shard(state.ema_params), shard(state.opt_state)
  qkv = params["blocks"][0]["qkv"]["kernel"].spec
  assert qkv == P("fsdp", "tensor")
  assert ema["blocks"][0]["qkv"]["kernel"].spec == qkv
  assert opt[0].mu["blocks"][0]["qkv"]["kernel"].spec == qkv
  assert opt[0].nu["blocks"][1]["mlp_out"]["kernel"].spec == P("tensor", "fsdp")
  assert sharding_lib.num_batch_shards(mesh) == 4
  assert sharding_lib.batch_sharding(mesh).spec == P(("data", "fsdp"))


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["--config.mesh.tensor=3"], "mesh.tensor=3 does not divide model.num_heads=4"),
    (
      ["--config.mesh.tensor=2", "--config.model.mlp_ratio=1.5", "--config.model.num_heads=2"],
      None,  # 48 MLP units: divisible by 2, valid
    ),
    (
      ["--config.mesh.tensor=4", "--config.model.mlp_ratio=1.0625"],
      "mesh.tensor=4 does not divide the MLP width 34",
    ),
    (
      ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=4"],
      "mesh.data x mesh.fsdp x mesh.tensor = 2 x 2 x 4 does not use the 8 devices",
    ),
    (["--config.mesh.tensor=0"], "mesh.tensor=0: must be >= 1"),
  ],
  ids=["heads", "valid", "mlp_width", "product", "zero"],
)
def test_tensor_validation_is_one_line_before_compile(overrides, message):
  config = _dit_config(*overrides)
  if message is None:
    config_lib.validate(config, num_devices=8)
    return
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=8)


def test_a_model_without_tensor_layers_refuses_a_tensor_axis():
  config = config_lib.load_config_file(str(CONFIGS / "digits_fm.py") + ":small")
  config_lib.apply_overrides(config, ["--config.mesh.tensor=2"])
  with pytest.raises(config_lib.ConfigError, match="model 'unet' has no tensor-parallel layers"):
    config_lib.validate(config, num_devices=8)


def _run(config, mesh_kw: dict, devices: int):
  config_lib.validate(config, num_devices=devices)
  mesh = sharding_lib.make_mesh(devices=jax.devices()[:devices], **mesh_kw)
  trainer = make_trainer(config, mesh)
  state, metrics = trainer.advance(trainer.create_state(), 1)
  return state, metrics


@pytest.mark.slow
def test_tensor_parallel_step_equals_the_one_device_step():
  """One update of digits_dit:small on a (data=2, fsdp=2, tensor=2) mesh equals the update on
  one device: the same batch and keys, float32 differences from summation order only
  (tolerance: 1e-5 relative, ~100 ulps, on parameters of order 0.1)."""
  one = _dit_config()
  many = _dit_config("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
  state_1, metrics_1 = _run(one, dict(data=1, fsdp=1, tensor=1), 1)
  state_8, metrics_8 = _run(many, dict(data=2, fsdp=2, tensor=2), 8)
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_8.params), jax.tree.leaves(state_1.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state_8.params)}
  assert any("tensor" in s for s in specs)  # the step really was tensor-parallel
