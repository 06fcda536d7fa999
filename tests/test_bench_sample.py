"""scripts/bench_sample.py: its NFE plan against the samplers' own counts, the goal and the page
on synthetic reports, the peer's weight transfer (which must fail when done wrong), and a slow
smoke run."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import paths
from diffjax.samplers import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_sample", ROOT / "scripts" / "bench_sample.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_sample"] = bench
_spec.loader.exec_module(bench)


@pytest.mark.parametrize(
  "evals, nfe, steps",
  [(1, 1, 1), (1, 100, 100), (2, 1, None), (2, 4, 2), (2, 100, 50), (4, 2, None), (4, 8, 2)]
  + [(4, 100, 25), (4, 6, None), (None, 8, None)],
)
def test_steps_for_nfe(evals, nfe, steps):
  assert bench.steps_for_nfe(evals, nfe) == steps


def _check_counts(names):
  """The table against the NFE each sampler reports, on a Gaussian flow path where every sampler
  of the table runs (a 2-step draw: a table entry off by one step or one stage fails)."""
  path = paths.icfm_path(sigma=0.1)
  gen = generate.flow_generator(
    apply=lambda params, x, t, cond: params * x,
    source=lambda key, n: jax.random.normal(key, (n, 2)),
    data_shape=(2,),
    coefficients_fn=path.gaussian_coefficients,
  )
  for name in names:
    out = gen(jnp.float32(-0.1), jax.random.PRNGKey(0), 2, steps=2, sampler=name)
    assert int(out["nfe"]) == 2 * bench.EVALS_PER_STEP[name], name


def test_evals_per_step_of_two_stage_samplers():
  assert set(bench.EVALS_PER_STEP) == set(generate.GAUSSIAN_FLOW_SAMPLERS)
  _check_counts(["midpoint", "pc"])


@pytest.mark.slow
def test_evals_per_step_of_every_sampler():
  _check_counts([name for name, k in bench.EVALS_PER_STEP.items() if k is not None])


def test_plan_skips_what_whole_steps_cannot_reach():
  cells = bench.plan_cells(["heun", "rk4", "dopri5"], (1, 2, 4, 8), bench.EVALS_PER_STEP)
  got = [(c["sampler"], c["nfe_target"], c["steps"]) for c in cells]
  assert got == [
    ("heun", 2, 1),
    ("heun", 4, 2),
    ("heun", 8, 4),
    ("rk4", 4, 1),
    ("rk4", 8, 2),
    ("dopri5", None, 1),
  ]
  with pytest.raises(ValueError, match="'ddim'"):
    bench.plan_cells(["ddim"], (1,), bench.EVALS_PER_STEP)


def _cell(impl, sampler, nfe, w2, nfe_target="same"):
  w2 = list(w2)
  return dict(
    impl=impl,
    sampler=sampler,
    nfe_target=nfe if nfe_target == "same" else nfe_target,
    nfe=nfe,
    steps=1,
    w2=w2,
    w2_mean=float(np.mean(w2)),
    w2_std=float(np.std(w2, ddof=1)),
    samples_per_s=1000.0,
  )


CELLS = [
  _cell("diffjax", "euler", 4, [0.30, 0.32, 0.34]),
  _cell("diffjax", "heun", 4, [0.20, 0.21, 0.22]),
  _cell("diffjax", "rk4", 4, [0.25, 0.26, 0.27]),
  _cell("torchdiffeq", "midpoint", 4, [0.23, 0.24, 0.25]),
  _cell("torchdiffeq", "euler", 4, [0.30, 0.32, 0.34]),
  _cell("diffjax", "euler", 8, [0.10, 0.11, 0.12]),
  _cell("diffjax", "heun", 8, [0.15, 0.16, 0.17]),
  _cell("torchdiffeq", "euler", 8, [0.10, 0.11, 0.12]),
  _cell("diffjax", "dopri5", 8, [0.01, 0.01, 0.01], nfe_target=None),  # adaptive, NFE 8 counted
]


def test_goal_summary_on_a_synthetic_report():
  goal = bench.goal_summary(CELLS)
  four = goal["4"]
  assert four["best"]["sampler"] == "heun" and four["met"] is True
  assert four["euler"]["w2_mean"] == pytest.approx(0.32)
  assert four["peer_best"]["sampler"] == "midpoint"
  # (0.24 - 0.21) / sqrt(0.01^2 / 3 + 0.01^2 / 3)
  assert four["peer_best"]["margin_se"] == pytest.approx(0.03 / np.sqrt(2e-4 / 3), abs=0.01)
  eight = goal["8"]  # dopri5 ran at NFE 8 and is counted there; Euler beats heun
  assert eight["best"]["sampler"] == "dopri5" and eight["met"] is True
  no_dopri = bench.goal_summary(CELLS[:-1])["8"]
  assert no_dopri["best"]["sampler"] == "heun" and no_dopri["met"] is False
  no_peer = bench.goal_summary([c for c in CELLS if c["impl"] == "diffjax"])
  assert no_peer["4"]["met"] is None and no_peer["4"]["peer_best"] is None
  assert bench.goal_summary([CELLS[0]])["4"]["best"] is None


def _report(cells, **over):
  env = dict(cpu_count=2, loadavg_start=[9.0, 8.0, 7.0], loadavg_end=[9.5, 8.0, 7.0])
  env["versions"] = dict(jax="0.x", torch="2.x", torchcfm="1.x", torchdiffeq="0.2")
  model = dict(
    title="I-CFM, normal -> 8gaussians",
    config="configs/toy2d_icfm.py",
    workdir="/w/icfm",
    step=20000,
    samplers=sorted({c["sampler"] for c in cells if c["impl"] == "diffjax"}),
    w2_floor_mean=0.1,
    w2_floor_std=0.01,
    transfer_max_abs_diff=2e-7,
    cells=cells,
    goal=bench.goal_summary(cells),
    command="python scripts/bench_sample.py",
  )
  report = dict(
    command="python scripts/bench_sample.py",
    date="2026-12-06 23:00 UTC",
    environment=env,
    settings=dict(nfes=[4, 8], num=2000, seeds=3, timing_batch=10000, reps=3),
    peer=dict(status="TorchCFM"),
    models=dict(icfm=model),
  )
  report.update(over)
  return report


def test_render_shows_tables_and_goal_lines():
  page = bench.render_markdown(_report(CELLS))
  assert "| diffjax | heun | 0.210 ± 0.010 | 0.160 ± 0.010 |  |" in page
  assert "| diffjax | dopri5 |  |  | 0.010 ± 0.000 (8) |" in page
  assert "| torchdiffeq | midpoint | 0.240 ± 0.010 |  |  |" in page
  assert "I-CFM, normal -> 8gaussians, NFE 4: best diffjax solver `heun`" in page
  assert page.count("**met**") == 2
  assert "largest output difference 2e-07" in page
  goal_run = _report(CELLS[:5], settings=dict(nfes=[4], num=2000, seeds=3))
  page = bench.render_markdown(_report(CELLS, goal_run=goal_run))
  assert "### The same at 2000 samples per side and 3 seeds" in page
  assert page.count("**met**") == 3


def test_merge_and_combine_keep_every_cell_once():
  a = _report(CELLS[:3])
  b = _report(CELLS[3:] + [_cell("diffjax", "heun", 4, [0.5, 0.5, 0.5])])
  b["peer"] = dict(status="peer ran")
  combined = bench.combine_reports([a, b], note="two processes")
  cells = combined["models"]["icfm"]["cells"]
  keys = [(c["impl"], c["sampler"], c["nfe_target"]) for c in cells]
  assert len(keys) == len(set(keys)) == len(CELLS)
  heun4 = [c for c in cells if (c["sampler"], c["nfe_target"]) == ("heun", 4)]
  assert heun4[0]["w2_mean"] == 0.5  # the later run's cell replaces the earlier one
  assert combined["peer"]["status"] == "peer ran" and len(combined["runs"]) == 2
  assert combined["models"]["icfm"]["goal"]["4"]["best"]["sampler"] == "rk4"
  other = _report(CELLS[:3])
  other["settings"] = dict(other["settings"], num=100)
  with pytest.raises(ValueError, match="settings differ"):
    bench.combine_reports([a, other])


def test_peer_skipped_cleanly_without_torchcfm(monkeypatch):
  monkeypatch.setitem(sys.modules, "torchcfm", None)  # `import torchcfm` raises ImportError
  peer, status = bench.import_peer()
  assert peer is None and status.startswith("skipped: torch/torchcfm/torchdiffeq not importable")


def test_weight_transfer_check_fails_on_a_wrong_transfer():
  pytest.importorskip("torch")
  pytest.importorskip("torchcfm")
  pytest.importorskip("torchdiffeq")
  from diffjax import models  # pylint: disable=import-outside-toplevel

  peer, _ = bench.import_peer()
  fns = models.create_model("mlp", data_shape=(2,), width=64, depth=3, activation="selu")
  params = fns.init(jax.random.PRNGKey(0))
  torch_model = bench.torch_mlp_from_params(peer, params)
  assert bench.transfer_error(peer, torch_model, fns.apply, params) <= bench.TRANSFER_ATOL
  # A transfer that forgets to transpose one square kernel: the shapes fit, the outputs do not.
  wrong = bench.torch_mlp_from_params(peer, params)
  with peer["torch"].no_grad():
    wrong.net[2].weight.copy_(wrong.net[2].weight.T.clone())
  assert bench.transfer_error(peer, wrong, fns.apply, params) > 100 * bench.TRANSFER_ATOL


def test_page_is_rendered_from_the_json():
  data = ROOT / "docs" / "sampler_bench.json"
  if not data.exists():
    pytest.skip("docs/sampler_bench.json not written yet")
  page = bench.render_markdown(json.loads(data.read_text()))
  assert (ROOT / "docs" / "sampler_bench.md").read_text() == page, (
    "docs/sampler_bench.md is stale: python scripts/bench_sample.py --render "
    "docs/sampler_bench.json > docs/sampler_bench.md"
  )


@pytest.mark.slow
def test_smoke_run(tmp_path, capsys):
  out = tmp_path / "report.json"
  argv = ["--quick", "--models", "icfm", "--samplers", "euler,heun", "--no-peer"]
  argv += ["--workdir-root", str(tmp_path), "--train-steps", "20", "--out", str(out)]
  assert bench.main(argv) == 0
  report = json.loads(out.read_text())
  cells = report["models"]["icfm"]["cells"]
  got = sorted((c["sampler"], c["nfe_target"], c["nfe"]) for c in cells)
  assert got == [("euler", 1, 1), ("euler", 4, 4), ("heun", 4, 4)]
  assert all(np.isfinite(c["w2_mean"]) and c["samples_per_s"] > 0 for c in cells)
  assert report["models"]["icfm"]["step"] == 20
  assert re.search(
    r"\| diffjax \| heun \|  \| \d+\.\d{3} ± 0\.000 \|", bench.render_markdown(report)
  )
  capsys.readouterr()
