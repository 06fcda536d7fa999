"""DDPM on CIFAR-10 (Ho et al. 2020, https://arxiv.org/abs/2006.11239): linear betas 1e-4 to
0.02 over 1000 steps, eps-prediction, the same 128-channel UNet as cifar10_otcfm.py, Adam 2e-4,
5k warm-up, clipping 1.0, EMA 0.9999, batch 128. A recipe for real hardware.

Data as in cifar10_otcfm.py: TFDS when installed, or ``--config.data.target=npz
--config.data.path=...``.
"""

import importlib.util
import pathlib

from diffjax.train.config import objective_group

_spec = importlib.util.spec_from_file_location(
  "cifar10_otcfm", pathlib.Path(__file__).with_name("cifar10_otcfm.py")
)
_otcfm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_otcfm)

VARIANTS = _otcfm.VARIANTS  # get_config passes its variant on


def get_config(variant: str = ""):
  config = _otcfm.get_config(variant)  # same data, model and optimizer
  config.objective = objective_group(
    "diffusion", schedule="linear", num_diffusion_steps=1000, prediction="eps", weighting="uniform"
  )
  config.sample.steps = 1000
  return config
