"""Continuous-time VP diffusion on 2D toys: N(0, I) -> moons, eps-prediction on the VP SDE's
schedule (beta 0.1 -> 20, t in [1e-5, 1]; Song et al. 2021, https://arxiv.org/abs/2011.13456),
Heun sampling on EDM's time steps, TorchCFM's 3x64 SELU MLP, Adam 1e-3, batch 256, 20k steps."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.source = "normal"  # diffusion: the prior is N(0, sigma(1)^2 I)
  config.data.target = "moons"
  # prediction: "eps" | "x0" | "v" (v-prediction alpha eps - sigma x0, Salimans & Ho 2022) |
  # "velocity" (the flow velocity dx_t/dt = d_alpha x0 + d_sigma eps, as flow matching predicts).
  config.objective = objective_group(
    "continuous_diffusion", schedule="vp", prediction="eps", weighting="uniform"
  )
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  config.sample.steps = 50
  if "small" in variant.split(","):  # a smoke test: seconds on a laptop
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
    config.sample.steps = 16
  return config
