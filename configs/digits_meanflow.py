"""MeanFlow on scikit-learn's 8x8 digits: digits_ddpm.py's data, UNet (two time embeddings,
summed) and optimizer with the MeanFlow objective at the paper's defaults, sampled in 1 step
by default (Geng et al. 2025, https://arxiv.org/abs/2505.13447).

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
  config.objective = objective_group("meanflow", label_dropout=config.objective.label_dropout)
  config.sample.steps = 1
  return config
