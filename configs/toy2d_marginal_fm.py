"""Marginal FM on 2D toys: N(0, I) -> 1024 fixed moons points, the exact O(N) marginal field as
target (no Dirac decoupling), I-CFM's path with sigma 0.1, TorchCFM's 3x64 SELU MLP, batch 256
(Lipman et al. 2023, eq. 8, https://arxiv.org/abs/2210.02747; the conditional counterpart is
configs/toy2d_icfm.py)."""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test.
VARIANTS = ("small",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 42
  # The marginal field's Gaussian kernel p_t(x | x1) = N(alpha_t x1, s_t^2 I) needs x0 ~ N(0, I).
  config.data.source = "normal"
  config.data.target = "moons"
  config.objective = objective_group("marginal_fm", num_points=1024, path="icfm", sigma=0.1)
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  if "small" in variant.split(","):  # a smoke test: seconds on a laptop
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
  return config
