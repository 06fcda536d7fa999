"""Every objective of the table is trainable from a config: each config file trains through the
CLI, then samples and evaluates with its objective's default sampler; the flow-matching recipes
train with every path, coupling and time sampler."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from diffjax import cli, losses, objectives, paths
from diffjax.train import config as config_lib
from diffjax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
  "--config.train.steps=10",
  "--config.train.fused_steps=5",
  "--config.train.log_every=5",
  "--config.train.checkpoint_every=10",
  "--config.train.progress_bar=false",
  "--config.train.async_checkpoint=false",
  "--config.sample.num=64",
  "--config.sample.steps=4",
]
# Every config trains, samples and evaluates through the CLI in the slow suite; the fast suite's
# CLI run is test_cli's, and each objective has its own fast tests.
TOY = [
  pytest.param(name, marks=pytest.mark.slow)
  for name in (
    "toy2d_edm",
    "toy2d_icfm",
    "toy2d_otcfm",
    "toy2d_ddpm",
    "toy2d_vp",
    "toy2d_marginal_fm",
  )
]
DIGITS = ["digits_fm", "digits_ddpm", "digits_edm"]


def _train_sample_evaluate(name: str, workdir: pathlib.Path, extra: list[str], capsys) -> dict:
  config = str(ROOT / "configs" / f"{name}.py") + ":small"
  assert cli.main(["train", "--config", config, "--workdir", str(workdir), *TINY, *extra]) == 0
  saved = config_lib.config_from_json((workdir / "config.json").read_text())
  spec = objectives.OBJECTIVES[saved.objective.name]
  out = workdir / "s.npz"
  assert cli.main(["sample", "--workdir", str(workdir), "--num", "16", "--out", str(out)]) == 0
  with np.load(out) as samples:
    assert samples["samples"].shape[0] == 16 and np.isfinite(samples["samples"]).all()
  capsys.readouterr()
  assert cli.main(["evaluate", "--workdir", str(workdir), "--num", "32", "--steps", "4"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["step"] == 10 and report["nfe"] > 0
  return dict(report=report, spec=spec, saved=saved)


@pytest.mark.parametrize("name", TOY)
def test_toy_config_trains_samples_and_evaluates(name, tmp_path, capsys):
  out = _train_sample_evaluate(name, tmp_path, ["--config.train.batch_size=64"], capsys)
  assert np.isfinite(out["report"]["w2"])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [5, 10] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", DIGITS)
def test_digits_config_trains_samples_and_evaluates(name, tmp_path, capsys):
  out = _train_sample_evaluate(name, tmp_path, ["--config.train.batch_size=32"], capsys)
  assert np.isfinite(out["report"]["digits_frechet_distance"])


def test_every_objective_has_a_config():
  names = {
    config_lib.load_config_file(str(path)).objective.name
    for path in (ROOT / "configs").glob("*.py")
  }
  assert set(objectives.OBJECTIVES) - {"sbcfm", "fm"} <= names, names


# Each path, coupling and time sampler once, on the four recipes (a covering set of the product:
# compiling every combination would take minutes and test the same code).
_PATHS = sorted(set(paths.PATHS) - {"cond_ot", "schrodinger_bridge"})  # aliases
# Label-conditional OT needs labelled data: tests/test_ot_mesh.py trains it on digits.
_COUPLINGS = ["independent", "exact_ot", "sinkhorn"]
_TIMES = sorted(losses.TIME_SAMPLERS)
_RECIPES = ["icfm", "otcfm", "sbcfm", "fm"]
COMBINATIONS = [
  pytest.param(
    _RECIPES[i % 4],
    _PATHS[i % len(_PATHS)],
    _COUPLINGS[i % len(_COUPLINGS)],
    _TIMES[i % len(_TIMES)],
    marks=() if i == 0 else pytest.mark.slow,  # one combination in the fast suite
  )
  for i in range(max(len(_PATHS), len(_COUPLINGS), len(_TIMES), 4))
]


@pytest.mark.parametrize("recipe,path,coupling,time_sampler", COMBINATIONS)
def test_flow_matching_recipe_with_any_path_coupling_and_time(
  recipe, path, coupling, time_sampler, tmp_path
):
  """One fused chunk of each combination trains to a finite loss."""
  config = config_lib.load_config_file(str(ROOT / "configs" / "toy2d_icfm.py"))
  config_lib.apply_overrides(
    config,
    [
      *TINY,
      "--config.train.steps=5",
      "--config.train.batch_size=32",
      # A small network: what is checked is that the combination trains, not the model.
      "--config.model.width=16",
      "--config.model.depth=2",
      "--config.data.source=normal",
      f"--config.objective.name={recipe}",
      f"--config.objective.path={path}",
      f"--config.objective.coupling={coupling}",
      f"--config.objective.time_sampler={time_sampler}",
    ],
  )
  config_lib.validate(config, num_devices=1)
  result = loop.train(config, tmp_path, devices=jax.devices()[:1])
  assert np.isfinite([loss for _, loss in result["losses"]]).all()
