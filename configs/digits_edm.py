"""EDM on scikit-learn's 8x8 digits: digits_ddpm.py's data, UNet and optimizer with EDM's
objective (preconditioning, log-normal noise levels, sigma_data 0.5 for pixels in [-1, 1]) and
its Heun sampler (Karras et al. 2022, https://arxiv.org/abs/2206.00364).

Variants: ``:cond`` (class-conditional, label dropout 0.1), ``:small`` (smoke test).
"""

import importlib.util
import pathlib

from diffjax.train.config import objective_group

_spec = importlib.util.spec_from_file_location(
  "digits_ddpm", pathlib.Path(__file__).with_name("digits_ddpm.py")
)
_digits_ddpm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_digits_ddpm)

VARIANTS = _digits_ddpm.VARIANTS  # get_config passes its variant on


def get_config(variant: str = ""):
  config = _digits_ddpm.get_config(variant)
  config.objective = objective_group("edm", label_dropout=config.objective.label_dropout)
  config.sample.steps = 10 if "small" in variant.split(",") else 32
  return config
