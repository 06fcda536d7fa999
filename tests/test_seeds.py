"""Several seeds in one run (``train.num_seeds``): each seed is the single-seed run of its seed,
the stacked state resumes bit-exact, and sample/evaluate report per seed."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_train import tiny_config  # pylint: disable=wrong-import-order

from diffjax import cli
from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train.metrics_log import read_metrics

# Each test trains K seeds and K single-seed references: the slow suite.
pytestmark = pytest.mark.slow


def _run(config, workdir):
  config_lib.validate(config, num_devices=1)
  return loop.train(config, workdir, devices=jax.devices()[:1])


# OT-CFM's seeds share one host solve per chunk: the slow suite checks it too.
@pytest.fixture(scope="module", params=["icfm", pytest.param("otcfm", marks=pytest.mark.slow)])
def two_seeds(request, tmp_path_factory):
  """A 2-seed run of seed 42 and the single-seed runs of seeds 42 and 43 it must reproduce."""
  recipe = request.param
  root = tmp_path_factory.mktemp(f"seeds_{recipe}")
  stacked = _run(tiny_config(recipe, **{"train.num_seeds": 2}), root / "stacked")
  singles = [_run(tiny_config(recipe, seed=42 + k), root / f"single{k}") for k in range(2)]
  return dict(recipe=recipe, root=root, stacked=stacked, singles=singles)


def test_each_seed_is_the_single_seed_run(two_seeds):
  """Seed k of a 2-seed run (vmapped state, one program) follows the separate run with seed
  42 + k: same per-seed losses and parameters up to float32 rounding of the vmapped programs
  (OT-CFM: the stacked problems solved in one host call give the same pairs)."""
  stacked, singles = two_seeds["stacked"], two_seeds["singles"]
  assert stacked["trace_count"] == 1
  rows = read_metrics(two_seeds["root"] / "stacked" / "metrics.jsonl")
  per_seed = np.array([row["loss_per_seed"] for row in rows])
  for k, single in enumerate(singles):
    np.testing.assert_allclose(per_seed[:, k], [l for _, l in single["losses"]], rtol=1e-4)
    seed_params = jax.tree.map(lambda x, k=k: x[k], stacked["state"].params)
    for a, b in zip(jax.tree.leaves(seed_params), jax.tree.leaves(single["state"].params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # The seeds really differ (not one model twice).
  assert abs(per_seed[-1, 0] - per_seed[-1, 1]) > 1e-4


def test_stacked_seeds_resume_bit_exact(two_seeds, tmp_path):
  recipe = two_seeds["recipe"]
  half = tiny_config(recipe, **{"train.num_seeds": 2, "train.steps": 10})
  _run(half, tmp_path)
  resumed = _run(tiny_config(recipe, **{"train.num_seeds": 2}), tmp_path)
  assert resumed["start_step"] == 10
  for a, b in zip(
    jax.tree.leaves(resumed["state"]), jax.tree.leaves(two_seeds["stacked"]["state"])
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_and_evaluate_report_per_seed(two_seeds, capsys):
  """`evaluate` reports each seed, and mean and std over seeds equal to those of the per-seed
  figures; `--seed-index` picks one; an index out of range is one line."""
  if two_seeds["recipe"] != "icfm":
    pytest.skip("one recipe is enough for the CLI")
  workdir = str(two_seeds["root"] / "stacked")
  assert cli.main(["evaluate", "--workdir", workdir, "--num", "64", "--steps", "4"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["seeds"] == [0, 1]
  w2 = [seed["w2"] for seed in report["per_seed"]]
  assert report["mean"]["w2"] == pytest.approx(np.mean(w2))
  assert report["std"]["w2"] == pytest.approx(np.std(w2))
  assert w2[0] != w2[1]
  out = two_seeds["root"] / "one.npz"
  assert (
    cli.main(
      [
        "sample",
        "--workdir",
        workdir,
        "--num",
        "16",
        "--steps",
        "2",
        "--out",
        str(out),
        "--seed-index",
        "1",
      ]
    )
    == 0
  )
  with np.load(out) as saved:
    assert saved["samples"].shape == (1, 16, 2) and list(saved["seed_index"]) == [1]
  assert (
    cli.main(
      ["sample", "--workdir", workdir, "--num", "16", "--out", str(out), "--seed-index", "2"]
    )
    == 2
  )
  assert "choose 0 .. 1" in capsys.readouterr().err
