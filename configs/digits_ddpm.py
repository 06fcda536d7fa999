"""DDPM on scikit-learn's 8x8 digits (shipped with scikit-learn: no download) with a small UNet.

Variants: ``:cond`` trains a class-conditional model with 10% label dropout for classifier-free
guidance; ``:small`` is a smoke test.
"""

import ml_collections

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts, alone or joined by commas (``:cond,small``).
VARIANTS = ("cond", "small")


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 0
  config.data.kind = "images"
  config.data.target = "digits"
  config.data.shape = (8, 8, 1)
  config.model = ml_collections.ConfigDict(
    dict(
      name="unet",
      ch=32,
      ch_mult=(1, 2),
      num_res_blocks=2,
      attn_resolutions=(4,),
      dropout=0.1,
      num_heads=1,
    )
  )
  config.objective = objective_group(
    "diffusion", schedule="cosine", num_diffusion_steps=1000, prediction="eps"
  )
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.grad_clip_norm = 1.0
  config.train.batch_size = 128
  config.train.steps = 5_000
  config.train.ema_decay = 0.999
  config.train.log_every = 100
  config.train.checkpoint_every = 1_000
  config.sample.steps = 1000
  if "cond" in variant.split(","):
    config.data.num_classes = 10
    config.objective.label_dropout = 0.1
  if "small" in variant.split(","):
    config.train.steps = 20
    config.train.log_every = 10
    config.train.checkpoint_every = 10
    config.sample.steps = 20
  return config
