"""`diffjax evaluate`: samplers compared in one table with the NFE each used, each metric beside
its two-sample noise floor, the likelihood once (or not at all), a plot and the JSON table.

The workdirs hold a tiny model's initial state (tests/workdirs.py's
``workdir_at_init``): the table's plumbing does not need a trained model.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
import types

import jax
import numpy as np
import pytest
from workdirs import digits_config, workdir_at_init

from diffjax import cli, evaluate
from diffjax import run as run_lib
from diffjax.data import toy2d

NUM = 48


def counting_likelihood(monkeypatch) -> list:
  """Makes every restored experiment count its likelihood calls in the returned list."""
  calls = []
  real = run_lib.restore_for_inference

  def restore(workdir):
    config, experiment, params, step = real(workdir)
    log_likelihood = experiment.log_likelihood

    def counted(*args, **kwargs):
      calls.append(1)
      return log_likelihood(*args, **kwargs)

    return config, experiment._replace(log_likelihood=counted), params, step

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)
  return calls


def run_evaluate(capsys, workdir, *args) -> tuple[dict, str]:
  code = cli.main(["evaluate", "--workdir", str(workdir), "--num", str(NUM), *args])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.fixture(scope="module")
def toy(toy_init_workdir, tmp_path_factory):
  """A copy of the shared initial-state workdir (conftest.py): evaluate writes WORKDIR/eval."""
  copy = tmp_path_factory.mktemp("toy") / "w"
  shutil.copytree(toy_init_workdir, copy)
  return copy


@pytest.fixture(scope="module")
def comparison(toy, tmp_path_factory):
  """One comparison run: euler and heun with 1 and 3 steps, dopri5 once."""
  out = tmp_path_factory.mktemp("eval") / "cmp.png"
  stdout, stderr = io.StringIO(), io.StringIO()
  with pytest.MonkeyPatch.context() as monkeypatch:
    calls = counting_likelihood(monkeypatch)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      code = cli.main(
        [
          "evaluate",
          "--workdir",
          str(toy),
          "--num",
          str(NUM),
          "--sampler",
          "euler,heun,dopri5",
          "--steps",
          "1,3",
          "--out",
          str(out),
        ]
      )
  captured = types.SimpleNamespace(out=stdout.getvalue(), err=stderr.getvalue())
  assert code == 0, captured.err
  report = json.loads(captured.out.strip().splitlines()[-1])
  return dict(report=report, table=captured.err, out=out, likelihood_calls=len(calls))


def test_one_row_per_pair_with_the_nfe_used(comparison):
  rows = comparison["report"]["rows"]
  pairs = [(row["sampler"], row["steps"]) for row in rows]
  assert pairs == [("euler", 1), ("euler", 3), ("heun", 1), ("heun", 3), ("dopri5", None)]
  # Fixed-step methods: N steps of 1 (Euler) or 2 (Heun) evaluations each.
  assert [row["nfe"] for row in rows[:4]] == [1, 3, 2, 6]
  # Dopri5 (diffrax, first same as last): 6 evaluations per attempted step plus the first.
  nfe = rows[4]["nfe"]
  assert nfe >= 7 and (nfe - 1) % 6 == 0
  for row in rows:
    assert row["w2"] > 0 and np.isfinite(row["mmd"])


def test_one_table_with_the_floor_and_one_note(comparison):
  lines = comparison["table"].splitlines()
  headers = [line for line in lines if line.split()[:3] == ["sampler", "steps", "NFE"]]
  assert len(headers) == 1 and "W2" in headers[0] and "MMD^2" in headers[0]
  start = lines.index(headers[0])
  body = [line.split() for line in lines[start + 1 : start + 7]]
  assert [cells[:3] for cells in body] == [
    ["euler", "1", "1"],
    ["euler", "3", "3"],
    ["heun", "1", "2"],
    ["heun", "3", "6"],
    ["dopri5", "adaptive", str(comparison["report"]["rows"][4]["nfe"])],
    ["floor", "-", "-"],
  ]
  notes = [line for line in lines if line.startswith("note: ")]
  assert len(notes) == 1 and "dopri5" in notes[0] and "--steps does not apply" in notes[0]


def test_floor_is_the_metric_of_two_independent_target_sets(comparison, toy):
  """The floor is the metric of two target sets drawn from independent keys, recomputed here
  from the documented keys (PRNGKey(seed) split four ways: samples, target, floor,
  likelihood); each row is scored against the same target set."""
  report = comparison["report"]
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  sampler = toy2d.get_toy2d("8gaussians")
  target, fresh = np.asarray(sampler(keys[1], NUM)), np.asarray(sampler(keys[2], NUM))
  assert report["floor"]["w2"] == pytest.approx(evaluate.wasserstein2(fresh, target), rel=1e-9)
  assert report["floor"]["mmd"] == pytest.approx(float(evaluate.mmd_rbf(fresh, target)), rel=1e-5)
  config, experiment, params, _ = run_lib.restore_for_inference(toy)
  samples = experiment.generate(params, keys[0], NUM, steps=3, sampler="heun", chunk_size=1000)
  w2 = evaluate.wasserstein2(np.asarray(samples["samples"]), target)
  assert report["rows"][3]["w2"] == pytest.approx(w2, rel=1e-5)
  assert report["scored"] == NUM and config.data.kind == "toy2d"


def test_likelihood_once_with_units(comparison):
  report = comparison["report"]
  assert comparison["likelihood_calls"] == 1  # five rows, one likelihood
  assert np.isfinite(report["nll"]) and report["nll_units"] == "nats per example"
  assert report["nll_count"] == NUM and report["likelihood_steps"] == 2  # tiny sample.steps
  lines = [line for line in comparison["table"].splitlines() if line.startswith("likelihood")]
  assert len(lines) == 1 and "nats per example" in lines[0]
  assert "nll" not in report["rows"][0]


def test_straightness_once_equals_the_library_metric(comparison, toy):
  """A flow model's straightness is reported once (it is the model's, not a sampler's), equal
  to :func:`diffjax.evaluate.straightness` from the documented source draws (the likelihood
  key folded with 1)."""
  report = comparison["report"]
  _, experiment, params, _ = run_lib.restore_for_inference(toy)
  key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(0), 4)[3], 1)
  velocity = lambda x, t: experiment.model.apply(params, x, t, None)
  values = np.asarray(
    evaluate.straightness(velocity, experiment.source_sampler(key, NUM), steps=128)
  )
  assert report["straightness"] == pytest.approx(values.mean(), rel=1e-5)
  assert report["straightness_stderr"] == pytest.approx(values.std(ddof=1) / np.sqrt(NUM), rel=1e-4)
  lines = [line for line in comparison["table"].splitlines() if line.startswith("straightness")]
  assert len(lines) == 1 and "straightness" not in report["rows"][0]


def test_plot_and_json_table_are_written(comparison):
  out = comparison["out"]
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads(out.with_suffix(".json").read_text()) == comparison["report"]
  assert comparison["report"]["plot"] == str(out)


def test_no_likelihood_and_a_single_row_like_before(toy, capsys, monkeypatch):
  calls = counting_likelihood(monkeypatch)
  report, table = run_evaluate(capsys, toy, "--sampler", "euler", "--steps", "1", "--no-likelihood")
  assert calls == [] and report["nll"] is None
  assert "not computed (--no-likelihood)" in table
  # One pair: its row's keys also at the top level, as before the comparison existed.
  assert report["sampler"] == "euler" and report["nfe"] == 1 and report["w2"] > 0
  assert report["plot"] == str(toy / "eval" / "step_1_euler_steps_1.png")
  assert (toy / "eval" / "step_1_euler_steps_1.json").is_file()


def test_median_pairwise_distance_is_the_median_over_pairs():
  points = np.random.default_rng(0).normal(size=(9, 3))
  pairs = [np.linalg.norm(a - b) for a, b in itertools.combinations(points, 2)]
  assert evaluate.median_pairwise_distance(points) == pytest.approx(np.median(pairs), rel=1e-12)


@pytest.fixture()
def no_restore(monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("a bad argument reached the checkpoint restore")

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)


@pytest.mark.parametrize(
  "args, fragment",
  [
    (["--steps", "1,x"], "--steps 1,x: must be an integer or comma-separated integers"),
    (["--steps", "2,0"], "--steps 0: must be an integer in 1 .. "),
    (["--sampler", "euler,ddim"], "--sampler 'ddim': cannot sample a 'icfm' model"),
    (["--sampler", "euler,"], "an empty name"),
    (["--likelihood-steps", "0"], "--likelihood-steps 0: must be an integer in 1"),
    (["--out", "x.txt"], "the plot must be a .png file"),
  ],
)
def test_bad_arguments_are_one_line(toy, capsys, no_restore, args, fragment):
  code = cli.main(["evaluate", "--workdir", str(toy), *args])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("diffjax: error: "), err
  assert fragment in lines[0] and "Traceback" not in err, lines[0]


@pytest.mark.slow
def test_images_floor_and_default_without_likelihood(tmp_path, capsys):
  """Digits: the Frechet distance and MMD^2 against a random set of the digits, the floor a
  disjoint set of the same size scored the same way; no likelihood by default."""
  from diffjax.data import images  # pylint: disable=import-outside-toplevel

  workdir = workdir_at_init(digits_config(), tmp_path / "w")
  report, table = run_evaluate(capsys, workdir, "--sampler", "euler", "--steps", "1,2")
  assert list(report["metrics"]) == ["digits_frechet_distance", "mmd"]
  assert report["nll"] is None and "off by default for images" in table
  order = np.asarray(jax.random.permutation(jax.random.split(jax.random.PRNGKey(0), 4)[1], 1797))
  source = images.get_dataset("digits")
  reference = images.take(source, order[:NUM])
  floor = images.take(source, order[NUM : 2 * NUM])
  assert report["floor"]["digits_frechet_distance"] == pytest.approx(
    evaluate.digits_frechet_distance(floor, reference), rel=1e-6
  )
  for row in report["rows"]:
    assert row["digits_frechet_distance"] > report["floor"]["digits_frechet_distance"]
