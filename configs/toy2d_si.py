"""Stochastic interpolant on 2D toys: N(0, I) -> 8gaussians, linear interpolant with gamma =
sqrt(t (1 - t)), drift and denoiser heads of TorchCFM's 3x64 SELU MLP, sampled by the SDE with
epsilon = 1 (Albergo, Boffi & Vanden-Eijnden 2023, https://arxiv.org/abs/2303.08797)."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.source = "normal"
  config.data.target = "8gaussians"
  config.objective = objective_group(
    "stochastic_interpolant", interpolant="linear", gamma="sqrt", a=1.0, epsilon=1.0
  )
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  config.sample.steps = 200
  if "small" in variant.split(","):  # a smoke test: seconds on a laptop
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
  return config
