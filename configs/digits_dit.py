"""Flow matching (I-CFM, sigma 0) on scikit-learn's 8x8 digits with a Diffusion Transformer
(Peebles & Xie 2023, https://arxiv.org/abs/2212.09748): patch 2 (16 tokens), hidden 128, depth
6, 4 heads; digits_fm.py's data, objective and schedule of steps otherwise.

The model group carries ``remat`` (none | dots_saveable | full) and the mesh ``tensor`` axis
shards the heads and the MLP (``--config.mesh.tensor=2``); see README's multi-device paragraph.

Variants: ``:cond`` (class-conditional, label dropout 0.1), ``:small`` (smoke test: hidden 32,
depth 2, 4 heads, 20 steps; ``tensor`` up to 4 divides its heads and widths).
"""

import importlib.util
import pathlib

import ml_collections

_spec = importlib.util.spec_from_file_location(
  "digits_fm", pathlib.Path(__file__).with_name("digits_fm.py")
)
_digits_fm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_digits_fm)

VARIANTS = _digits_fm.VARIANTS  # get_config passes its variant on


def get_config(variant: str = ""):
  config = _digits_fm.get_config(variant)
  small = "small" in variant.split(",")
  config.model = ml_collections.ConfigDict(
    dict(
      name="dit",
      patch_size=2,
      hidden_size=32 if small else 128,
      depth=2 if small else 6,
      num_heads=4,
      mlp_ratio=4.0,
      learn_pos_embed=False,
      dropout=0.0,
      time_features_dim=32 if small else 128,
      remat="none",
    )
  )
  # Transformers want a smaller step than digits_fm's UNet (DiT trains at 1e-4 on ImageNet).
  config.optimizer.learning_rate = 3e-4
  return config
