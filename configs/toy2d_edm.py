"""EDM on 2D toys: N(0, I) -> moons, the preconditioned denoiser with log-normal noise levels and
Heun sampling (Karras et al. 2022, https://arxiv.org/abs/2206.00364), TorchCFM's 3x64 SELU MLP,
Adam 1e-3, batch 256, 20k steps."""

import math

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)

# The moons' standard deviation (about 2.2 per coordinate, not EDM's 0.5 for images in [-1, 1]);
# the training noise levels move with it, ln(sigma) ~ N(-1.2 + ln(sigma_data / 0.5), 1.2^2).
SIGMA_DATA = 2.2


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.source = "normal"  # diffusion: the prior is N(0, sigma_max^2 I)
  config.data.target = "moons"
  config.objective = objective_group(
    "edm", sigma_data=SIGMA_DATA, p_mean=-1.2 + math.log(SIGMA_DATA / 0.5)
  )
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  config.sample.steps = 32
  if "small" in variant.split(","):  # a smoke test: seconds on a laptop
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
    config.sample.steps = 16
  return config
