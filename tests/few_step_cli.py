"""Train a few-step config's ``:small`` variant through the CLI, then sample it with several
step counts: what tests/test_meanflow.py and tests/test_shortcut.py run end to end."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from diffjax import cli

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# A run of seconds: a few steps of a small batch, synchronous checkpoints, no progress bar.
TINY = [
  "--config.train.steps=4",
  "--config.train.fused_steps=2",
  "--config.train.log_every=2",
  "--config.train.checkpoint_every=4",
  "--config.train.batch_size=32",
  "--config.train.progress_bar=false",
  "--config.train.async_checkpoint=false",
  "--config.sample.num=16",
]


def train_and_sample(
  config: str, workdir: pathlib.Path, capsys, *, steps: tuple[int, ...], extra: tuple = ()
) -> None:
  """``diffjax train --config configs/{config}.py:small`` with :data:`TINY` and ``extra``, then
  ``diffjax sample --steps N`` for each ``N`` (of seed 0 when several seeds train): finite
  samples of the data's shape, drawn by the objective's own sampler with ``N`` evaluations."""
  path = f"{CONFIGS / config}.py:small"
  assert cli.main(["train", "--config", path, "--workdir", str(workdir), *TINY, *extra]) == 0
  seeds = ["--seed-index", "0"] if any("num_seeds" in e for e in extra) else []
  for n in steps:
    out = workdir / f"steps_{n}.npz"
    capsys.readouterr()
    argv = ["sample", "--workdir", str(workdir), "--num", "8", "--out", str(out), "--steps", str(n)]
    assert cli.main([*argv, *seeds]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nfe"] == n and report["sampler"] == config.split("_")[1], report
    with np.load(out) as f:
      samples = f["samples"]
    lead = (1, 8) if seeds else (8,)  # a run of several seeds keeps a seed axis
    assert samples.shape[: len(lead)] == lead and np.isfinite(samples).all(), samples.shape
