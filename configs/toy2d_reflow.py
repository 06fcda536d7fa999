"""Reflow on the TorchCFM 2D protocol: 8gaussians -> moons, TorchCFM's 3x64 SELU MLP, Adam 1e-3,
batch 256, 20k steps (Liu, Gong & Liu 2022, "Flow Straight and Fast",
https://arxiv.org/abs/2209.03003).

The teacher is a trained run on the same data, named on the command line:

  diffjax train --config configs/toy2d_reflow.py:rf1 --workdir runs/rf1   # 1-RF (I-CFM, sigma 0)
  diffjax train --config configs/toy2d_reflow.py --workdir runs/rf2 \\
    --config.objective.teacher_workdir=runs/rf1                          # 2-RF
  # 3-RF: the same with --config.objective.teacher_workdir=runs/rf2 --workdir runs/rf3

Pairs are pregenerated (``mode="pregenerated"``), as Liu et al. do: online, every step solves
the teacher's 100-step Euler ODE for its whole batch, 100 forward passes of the teacher per
forward-backward of the student, and scripts/bench_reflow.py measures such a step at tens of
times the cost of one on pregenerated pairs, while the fixed set of 50k pairs (each seen about a
hundred times in 20k steps of 256) is solved once at the start, in the time of a few hundred online
steps at most (docs/reflow_bench.json). Samples take one Euler step by default (``sample.steps =
1``): a straightened flow is meant for few steps.
"""

from diffjax.train.config import base_config, objective_group

# The ``:variant`` names get_config accepts (checked by load_config_file): a smoke test, and the
# 1-rectified-flow teacher (I-CFM with sigma 0, independent pairs) on the same data and model.
VARIANTS = ("small", "rf1")


def get_config(variant: str = ""):
  variants = variant.split(",")
  config = base_config()
  config.seed = 42
  config.data.source = "8gaussians"
  config.data.target = "moons"
  # teacher_workdir stays empty here: it is given on the command line (the error says which).
  config.objective = objective_group(
    "reflow", mode="pregenerated", num_pairs=50_000, teacher_steps=100, teacher_sampler="euler"
  )
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 256
  config.train.steps = 20_000
  config.train.checkpoint_every = 5_000
  config.sample.steps = 1
  if "rf1" in variants:
    config.objective = objective_group("icfm", sigma=0.0)
    config.sample.steps = 100
  if "small" in variants:  # a smoke test: seconds on a laptop
    config.train.steps = 200
    config.train.checkpoint_every = 100
    config.sample.num = 500
  return config
