"""Every experiment file loads, validates (names, types, shapes against the model) and has the
protocol its docstring promises."""

from __future__ import annotations

import pathlib

import pytest

from diffjax.train import config as config_lib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


# The CIFAR-10 configs build 35M-parameter UNets to validate: the slow suite.
@pytest.mark.parametrize(
  "path",
  # An image config's validation traces its UNet (seconds each): one stays in the fast suite.
  [
    pytest.param(p, marks=pytest.mark.slow)
    if "cifar" in p.stem or (p.stem.startswith("digits") and p.stem != "digits_ddpm")
    else p
    for p in CONFIGS
  ],
  ids=lambda p: p.stem,
)
def test_config_validates(path):
  config = config_lib.load_config_file(str(path))
  config_lib.validate(config, num_devices=8)
  # Round trip through the workdir JSON keeps every field.
  again = config_lib.config_from_json(config_lib.config_to_json(config))
  assert again.to_dict() == config.to_dict()


def test_torchcfm_2d_protocol():
  config = config_lib.load_config_file(str(CONFIGS[0].with_name("toy2d_otcfm.py")))
  assert (config.data.source, config.data.target) == ("8gaussians", "moons")
  assert (config.objective.name, config.objective.sigma) == ("otcfm", 0.1)
  assert (config.model.name, config.model.width, config.model.depth, config.model.activation) == (
    "mlp",
    64,
    3,
    "selu",
  )
  assert (config.optimizer.name, config.optimizer.learning_rate) == ("adam", 1e-3)
  assert (config.train.batch_size, config.train.steps) == (256, 20_000)


def test_torchcfm_cifar10_recipe():
  config = config_lib.load_config_file(str(CONFIGS[0].with_name("cifar10_otcfm.py")))
  assert config.model.ch == 128 and config.model.ch_mult == (1, 2, 2, 2)
  assert config.optimizer.learning_rate == 2e-4 and config.optimizer.warmup_steps == 5_000
  assert config.optimizer.grad_clip_norm == 1.0 and config.train.ema_decay == 0.9999
  assert config.train.batch_size == 128 and config.train.steps == 400_000


def test_readme_lists_every_objective():
  """README's table of objectives names each entry of diffjax.objectives.OBJECTIVES."""
  from diffjax import objectives

  readme = (CONFIGS[0].parents[1] / "README.md").read_text()
  missing = [name for name in objectives.OBJECTIVES if f"| `{name}` |" not in readme]
  assert not missing, missing
