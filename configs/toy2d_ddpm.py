"""DDPM on 2D toys: eps-prediction, linear betas over 1000 steps, the 3x64 SELU MLP
(Ho et al. 2020, https://arxiv.org/abs/2006.11239)."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.target = "moons"
  # prediction: "eps" | "x0" | "v" (v-prediction alpha eps - sigma x0, Salimans & Ho 2022);
  # the flow velocity dx_t/dt needs a continuous schedule (objective continuous_diffusion).
  config.objective = objective_group(
    "diffusion", schedule="linear", num_diffusion_steps=1000, prediction="eps", weighting="uniform"
  )
  config.model.width = 128
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  config.sample.steps = 1000
  if "small" in variant.split(","):
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
    config.sample.steps = 100
  return config
