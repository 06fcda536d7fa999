"""Class-conditional I-CFM on 2D toys: N(0, I) -> 8gaussians with its 8 components as labels,
label dropout 0.15 so the null label trains the unconditional model of classifier-free guidance
(Ho & Salimans 2022, https://arxiv.org/abs/2207.12598); the model of scripts/guidance_table.py.

``:guide`` is the weaker guide of autoguidance (Karras et al. 2024,
https://arxiv.org/abs/2406.02507): the same data and objective, a smaller MLP trained for fewer
steps; sample the main model with ``--guide-workdir`` pointing at its workdir.
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
  "toy2d_icfm", pathlib.Path(__file__).with_name("toy2d_icfm.py")
)
_icfm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_icfm)

# The ``:variant`` names get_config accepts (checked by load_config_file).
VARIANTS = ("small", "guide")


def get_config(variant: str = ""):
  config = _icfm.get_config("")  # same data, model and optimizer
  config.data.num_classes = 8
  config.objective.label_dropout = 0.15
  config.train.steps = 4_000
  config.train.checkpoint_every = 1_000
  variants = variant.split(",")
  if "guide" in variants:
    config.model.width = 32
    config.model.depth = 2
    config.train.steps = 400
    config.train.checkpoint_every = 400
  if "small" in variants:  # a smoke test: seconds on a laptop
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
  return config
