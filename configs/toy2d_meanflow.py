"""MeanFlow on the TorchCFM 2D protocol: 8gaussians -> moons, TorchCFM's 3x64 SELU MLP on
``concat(x, t, s - t)``, Adam 1e-3, batch 256, 20k steps (the flow-matching baselines' budget),
sampled in one step by default (Geng et al. 2025, "Mean Flows for One-step Generative Modeling",
https://arxiv.org/abs/2505.13447; protocol of Tong et al. 2024, https://arxiv.org/abs/2302.00482).
The objective keeps the paper's defaults (25% of pairs with s != t, logit-normal times, adaptive
weight p = 1)."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  config.data.source = "8gaussians"
  config.data.target = "moons"
  config.objective = objective_group("meanflow")
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
