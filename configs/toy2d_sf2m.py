"""SF2M on the TorchCFM 2D protocol: 8gaussians -> moons, sigma 1.0 (TorchCFM's 2D SF2M
example), one 3x64 SELU MLP on ``concat(x, t)`` with two output heads (velocity and score),
Adam 1e-3, batch 256, 20k steps, sampled by the SDE (Euler-Maruyama, 100 steps) by default
(Tong et al. 2023, "Simulation-free Schrodinger bridges via score and flow matching",
https://arxiv.org/abs/2307.03672; protocol of Tong et al. 2024,
https://arxiv.org/abs/2302.00482)."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.source = "8gaussians"
  config.data.target = "moons"
  config.objective = objective_group("sf2m", sigma=1.0)
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  if "small" in variant.split(","):
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
  return config
