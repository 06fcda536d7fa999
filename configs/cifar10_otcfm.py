"""TorchCFM's CIFAR-10 recipe (Tong et al. 2024, https://arxiv.org/abs/2302.00482): OT-CFM with
sigma 0, UNet with 128 channels, channel multipliers (1, 2, 2, 2), 2 residual blocks, attention
at 16x16, dropout 0.1; Adam 2e-4, 5k warm-up steps, gradient clipping 1.0, EMA 0.9999, batch 128,
400k steps. A reproduction recipe for real hardware (hours on a GPU, not a CPU job).

Data: CIFAR-10 from TFDS when tensorflow-datasets is installed (``data.target=tfds``, the
default here), or from a user-given file: ``--config.data.target=npz
--config.data.path=/path/cifar10_train.npz`` with arrays ``image`` (uint8, N x 32 x 32 x 3) and
``label``. Nothing is downloaded by diffjax.
"""

import ml_collections

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts: bfloat16 compute.
VARIANTS = ("bf16",)


def get_config(variant: str = ""):
  config = base_config()
  config.seed = 0
  config.data.kind = "images"
  config.data.target = "tfds"
  config.data.tfds_name = "cifar10"
  config.data.shape = (32, 32, 3)
  config.data.augment_flip = True
  config.model = ml_collections.ConfigDict(
    dict(
      name="unet",
      ch=128,
      ch_mult=(1, 2, 2, 2),
      num_res_blocks=2,
      attn_resolutions=(16,),
      dropout=0.1,
      num_heads=4,
    )
  )
  # scipy's assignment solver is ~1.5x faster than POT's simplex on 3072-D clouds (couplings.py).
  config.objective = objective_group("otcfm", sigma=0.0, ot_solver="lsa")
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5_000
  config.optimizer.grad_clip_norm = 1.0
  config.train.batch_size = 128
  config.train.steps = 400_000
  config.train.ema_decay = 0.9999
  config.train.compute_dtype = "bfloat16" if "bf16" in variant.split(",") else "float32"
  config.train.log_every = 100
  config.train.checkpoint_every = 20_000
  config.sample.num = 64
  config.sample.steps = 100
  return config
