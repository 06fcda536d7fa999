"""Workdirs as `diffjax train` leaves them, built without training, for tests of the commands
that read a workdir (sample, evaluate, their errors).

conftest.py builds the common kinds once per test process (``toy_init_workdir``,
``digits_init_workdir``) and shares them read-only; a test that writes into one copies it first.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
from tiny import CONFIGS  # pylint: disable=wrong-import-order

from diffjax.train import checkpoint as ckpt
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.trainer import make_trainer


def workdir_at_init(config, workdir: pathlib.Path) -> pathlib.Path:
  """``workdir`` as `diffjax train` leaves it (config.json, one committed step), holding the
  initial state: no train step is compiled."""
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  state = make_trainer(config, mesh).create_state()
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config_lib.config_to_json(config))
  manager = ckpt.make_checkpoint_manager(workdir / "checkpoints", keep=5, async_save=False)
  try:
    pending = ckpt.save_step(manager, 1, state, {"step": 1})
    ckpt.commit_step(manager, pending, config=config_lib.resume_fingerprint(config), is_lead=True)
  finally:
    manager.close()
  return workdir


def digits_config(variant: str = "cond,small") -> ml_collections.ConfigDict:
  """``configs/digits_fm.py:cond,small`` with a tiny MLP in place of the UNet."""
  config = config_lib.load_config_file(f"{CONFIGS / 'digits_fm.py'}:{variant}")
  config.model = ml_collections.ConfigDict(dict(name="mlp", width=16, depth=2, activation="selu"))
  config_lib.apply_overrides(
    config,
    ["--config.train.batch_size=32", "--config.train.steps=10", "--config.sample.steps=2"],
  )
  return config
