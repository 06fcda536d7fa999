"""Multi-host training: two processes of two CPU devices each, jax.distributed over 127.0.0.1
with gloo collectives, must follow the single-process run on four devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from diffjax import run as run_lib
from diffjax.train import config as config_lib
from diffjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = [
  "--config.train.steps=10",
  "--config.train.fused_steps=5",
  "--config.train.log_every=5",
  "--config.train.checkpoint_every=10",
  "--config.train.batch_size=64",
  "--config.model.width=32",
  "--config.train.progress_bar=false",
  "--config.train.async_checkpoint=false",
  "--config.sample.num=64",
  "--config.sample.steps=4",
]


def _two_processes_match_single_process(tmp_path, overrides):
  port = portpicker.pick_unused_port()
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
  )
  workdir = tmp_path / "multi"
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "diffjax.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "toy2d_otcfm.py"),
        "--workdir",
        str(workdir),
        *overrides,
        "--config.distributed.enabled=true",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}",
      ],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]

  config = config_lib.load_config_file(str(ROOT / "configs" / "toy2d_otcfm.py"))
  config_lib.apply_overrides(config, overrides)
  single = loop.train(config, tmp_path / "single", devices=jax.devices()[:4])
  _, _, multi_ema, step = run_lib.restore_for_inference(workdir)
  assert step == config.train.steps
  for a, b in zip(jax.tree.leaves(multi_ema), jax.tree.leaves(single["state"].ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  _two_processes_match_single_process(tmp_path, OVERRIDES)


@pytest.mark.slow
def test_two_processes_protocol_sized_ot_cfm(tmp_path):
  """OT-CFM at the protocol's batch (256) and fused chunk (100 steps) over 2 processes x 2
  devices: each process gathers the chunk's cost matrices, solves them on its host and feeds
  the same pairs back; the result follows the single-process run on 4 devices."""
  _two_processes_match_single_process(
    tmp_path,
    [
      "--config.train.steps=200",
      "--config.train.checkpoint_every=100",
      "--config.train.log_every=100",
      "--config.train.progress_bar=false",
      "--config.train.async_checkpoint=false",
      "--config.sample.num=64",
      "--config.sample.steps=4",
    ],
  )
