"""Consistency model, the TorchCFM 2D protocol: 8gaussians -> moons, 3x64 SELU MLP, Adam 1e-3,
batch 256, 20k steps; continuous-time consistency training on the linear path, sampled in 1 or
more network evaluations (Lu & Song 2024, https://arxiv.org/abs/2410.11081; Song et al. 2023,
https://arxiv.org/abs/2303.01469)."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.source = "8gaussians"
  config.data.target = "moons"
  config.objective = objective_group("consistency")
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  config.sample.steps = 1
  if "small" in variant.split(","):
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
  return config
