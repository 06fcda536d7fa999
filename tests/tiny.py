"""The small configs the tests train, in one place.

``tiny_config(*overrides, base=...)`` is a config file of configs/ shrunk to a run of seconds on
one CPU device: a small MLP and batch, a few steps, synchronous checkpoints, no progress bar, few
samples. ``TINY`` is that shrinking as command-line overrides, for tests that go through the
CLI. A test that needs other values passes them as overrides after these.
"""

from __future__ import annotations

import pathlib

import ml_collections

from diffjax.train import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG = str(CONFIGS / "toy2d_icfm.py")
TINY = [
  "--config.train.steps=12",
  "--config.train.fused_steps=2",
  "--config.train.log_every=2",
  "--config.train.checkpoint_every=4",
  "--config.train.batch_size=32",
  "--config.model.width=16",
  "--config.model.depth=2",
  "--config.train.progress_bar=false",
  "--config.train.async_checkpoint=false",
  "--config.sample.num=16",
  "--config.sample.steps=2",
  "--config.train.keep_checkpoints=5",
]


def tiny_config(*overrides: str, base: str = "toy2d_icfm") -> ml_collections.ConfigDict:
  """``configs/{base}.py`` with :data:`TINY`, then ``overrides`` (``--config.key=value``)."""
  config = config_lib.load_config_file(str(CONFIGS / f"{base}.py"))
  config_lib.apply_overrides(config, [*TINY, *overrides])
  return config
