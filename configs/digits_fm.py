"""Flow matching (I-CFM, sigma 0) on scikit-learn's 8x8 digits with a small UNet.

Variants: ``:cond`` (class-conditional, label dropout 0.1, label-aware OT when
``objective.recipe=otcfm``), ``:small`` (smoke test).
"""

import ml_collections

from diffjax.train.config import base_config


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 0
  config.data.kind = "images"
  config.data.target = "digits"
  config.data.shape = (8, 8, 1)
  config.model = ml_collections.ConfigDict(dict(
      name="unet", ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
      dropout=0.1, num_heads=1))
  config.objective.kind = "flow_matching"
  config.objective.recipe = "icfm"
  config.objective.sigma = 0.0
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.grad_clip_norm = 1.0
  config.train.batch_size = 128
  config.train.steps = 5_000
  config.train.ema_decay = 0.999
  config.train.log_every = 100
  config.train.checkpoint_every = 1_000
  config.sample.steps = 100
  if "cond" in variant:
    config.data.num_classes = 10
    config.objective.label_dropout = 0.1
  if "small" in variant:
    config.train.steps = 20
    config.train.log_every = 10
    config.train.checkpoint_every = 10
    config.sample.steps = 10
  return config
