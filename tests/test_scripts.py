"""Smoke tests of the benchmark scripts: each runs with --quick and prints valid JSON.

Each script runs as a subprocess of this interpreter (the project's virtualenv; torch absent
there, so the TorchCFM fields must be null with a note saying why). With torch importable the
peer fields must be filled instead. A script prints only its JSON on stdout, so ``json.loads``
of the whole stdout is the check that nothing else leaks there. The numbers themselves are
checked for internal consistency (a rate is steps over seconds, a W2 is finite and positive, a
mean lies between the per-seed values), not against fixed outputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

# Each script runs as a process of tens of seconds: the slow suite.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_PEER = all(importlib.util.find_spec(m) is not None for m in ("torch", "torchcfm"))
# A smoke run takes ~30-45 s of CPU; the limit is loose because the test machine is shared.
TIMEOUT_S = 300


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ)
  # One CPU device, as a user runs the script (tests/conftest.py forces 8 for the suite).
  env["XLA_FLAGS"] = " ".join(
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  )
  proc = subprocess.run(
    [sys.executable, str(ROOT / "scripts" / script), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def bench():
  return _run("bench_train.py", "--quick")


def test_bench_train_quick_json(bench):
  assert bench["benchmark"] == "bench_train"
  env = bench["environment"]
  assert len(env["loadavg_start"]) == 3 and len(env["loadavg_end"]) == 3
  assert env["cpu_count"] >= 1
  assert set(bench["results"]) == {"icfm", "otcfm"}
  for recipe, result in bench["results"].items():
    ours = result["ours"]
    assert result["steps"] == 200 and result["target_ratio"] in (10.0, 3.0)
    rates = [s["steps"] / s["wall_s"] for s in ours["segments"]]
    assert len(rates) == 2
    # The reported median and max are those of the segments' own steps / seconds.
    assert math.isclose(ours["steps_per_s_median"], statistics.median(rates), rel_tol=1e-3)
    assert math.isclose(ours["steps_per_s_max"], max(rates), rel_tol=1e-3)
    assert result["warmup_steps"] + 2 * result["segment_steps"] <= result["steps"]
    for key in ("w2_euler", "w2_euler_ema"):
      assert math.isfinite(ours[key]) and ours[key] > 0, (recipe, key, ours[key])
    if HAS_PEER:
      assert result["peer"]["steps_per_s_median"] > 0
      assert math.isclose(
        result["ratio_steps_per_s"],
        ours["steps_per_s_median"] / result["peer"]["steps_per_s_median"],
        rel_tol=0.01,
      )
    else:
      assert result["peer"] is None and result["ratio_steps_per_s"] is None
  if not HAS_PEER:
    assert bench["environment"]["torch_version"] is None
    assert "not importable" in bench["peer_note"]


def test_bench_train_quick_profile(bench):
  solvers = bench["profile"]["host_solvers_ms"]
  assert len(solvers) == 2
  assert all(0 < v["cpu_ms_min"] <= v["cpu_ms_median"] for v in solvers.values())


@pytest.fixture(scope="module")
def reproduce(tmp_path_factory):
  out = tmp_path_factory.mktemp("reproduce") / "results.md"
  return _run("reproduce_2d.py", "--quick", "--out", str(out)), out


def test_reproduce_2d_quick_json_and_markdown(reproduce):
  report, out = reproduce
  assert report["status"] == "complete"
  assert report["run"]["seeds"] == [42, 43] and report["run"]["steps"] == 100
  for method in ("icfm", "otcfm"):
    entry = report["results"][method]["N->moons"]
    ours = entry["ours"]
    assert ours["vectorised"] is True  # exact OT's pure_callback vmaps ("broadcast_all")
    seeds = ours["seeds"]
    assert [s["seed"] for s in seeds] == [42, 43]
    w2 = [s["w2_euler"] for s in seeds]
    assert all(math.isfinite(v) and v > 0 for v in w2)
    assert min(w2) <= ours["summary"]["w2_euler"]["mean"] <= max(w2)
    # dopri5 (FSAL Dormand-Prince): nfe = 6 * steps + 1, at least a few steps.
    assert all(s["nfe_dopri5"] >= 13 and (s["nfe_dopri5"] - 1) % 6 == 0 for s in seeds)
    if HAS_PEER:
      assert entry["peer"]["summary"]["w2_euler"]["n"] == 2
    else:
      assert entry["peer"] is None
  text = out.read_text()
  assert "REDUCED run, not the full protocol" in text
  assert "| I-CFM | diffjax |" in text and "| OT-CFM | diffjax |" in text
  embedded = text.split("```json\n", 1)[1].split("\n```", 1)[0]
  assert json.loads(embedded)["results"].keys() == report["results"].keys()


def test_reproduce_2d_render_adds_bench_section(reproduce, bench, tmp_path):
  """--render rebuilds the markdown from the written file alone, plus bench_train's JSON."""
  report, written = reproduce
  (tmp_path / "bench.json").write_text(json.dumps(bench))
  out = tmp_path / "rendered.md"
  rendered = _run(
    "reproduce_2d.py",
    "--render",
    str(written),
    "--bench-json",
    str(tmp_path / "bench.json"),
    "--out",
    str(out),
  )
  assert rendered["results"] == report["results"]
  text = out.read_text()
  assert "Training throughput" in text
  rate = bench["results"]["icfm"]["ours"]["steps_per_s_median"]
  assert f"| I-CFM | {rate:.0f} |" in text


def test_reproduce_2d_headline_says_which_side_is_reduced(reproduce):
  """The headline names the full protocol only for the side that ran it."""
  spec = importlib.util.spec_from_file_location(
    "reproduce_2d", ROOT / "scripts" / "reproduce_2d.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  report = json.loads(json.dumps(reproduce[0]))
  report["run"].update(
    steps=20_000, seeds=list(module.SEEDS), tasks=list(module.TASKS), methods=list(module.METHODS)
  )
  cases = {
    tuple(module.SEEDS): "**What was run: the full protocol**",
    (42,): "the full protocol for diffjax; TorchCFM REDUCED to seed(s) 42**",
    (): "the full protocol for diffjax; TorchCFM not run**",
  }
  for peer_seeds, headline in cases.items():
    report["run"]["peer_seeds"] = list(peer_seeds)
    assert headline in module.to_markdown(report)
  report["run"]["steps"] = 2000
  assert "a REDUCED run, not the full protocol" in module.to_markdown(report)


def test_reproduce_2d_merge_fills_missing_cells(reproduce, tmp_path):
  """--render A --merge B: the cells of a second run of the same protocol fill A's gaps, the
  status is recomputed and B's command is listed; a run of another protocol is refused."""
  report = reproduce[0]
  first = json.loads(json.dumps(report))
  del first["results"]["otcfm"]
  first["status"] = "partial: 1 of 2 (method, task) done"
  second = json.loads(json.dumps(report))
  del second["results"]["icfm"]
  second["run"]["command"] = "python scripts/reproduce_2d.py --methods otcfm (second run)"
  (tmp_path / "a.json").write_text(json.dumps(first))
  (tmp_path / "b.json").write_text(json.dumps(second))
  out = tmp_path / "merged.md"
  merged = _run(
    "reproduce_2d.py",
    "--render",
    str(tmp_path / "a.json"),
    "--merge",
    str(tmp_path / "b.json"),
    "--out",
    str(out),
  )
  assert merged["results"] == report["results"] and merged["status"] == "complete"
  assert "--methods otcfm (second run)" in out.read_text()
  second["run"]["steps"] = 7
  (tmp_path / "b.json").write_text(json.dumps(second))
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "reproduce_2d.py"),
      "--render",
      str(tmp_path / "a.json"),
      "--merge",
      str(tmp_path / "b.json"),
      "--out",
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0 and "run.steps is 7 there" in proc.stderr


def test_bench_forward_quick_json():
  result = _run("bench_forward.py", "--quick")
  (process,) = result["processes"]
  assert process["T"] == 100
  # The ratios are the printed times' ratios (rounded), and the T/2 flag says what they say.
  assert math.isclose(
    process["sequential_over_closed"], process["sequential_ms"] / process["closed_ms"], rel_tol=0.02
  )
  assert process["target_T_over_2_met"] == (process["sequential_over_closed"] >= 50)
  for figures in result["closed_form_variants"].values():
    assert 0 < figures["min_ms"] <= figures["median_ms"]
  share = result["noise_share_of_training"]
  assert math.isclose(
    share["noise_share_of_step"],
    share["noise_draw"]["median_ms"] / share["train_step"]["median_ms"],
    rel_tol=0.02,
    abs_tol=1e-5,
  )
  assert result["command"].startswith("python scripts/bench_forward.py") and result["date"]
  if HAS_PEER:
    head_to_head = result["peer"]["head_to_head"]
    assert result["peer"]["jax_closed_over_peer"] == head_to_head["closed_over_peer"]
  else:
    assert result["peer"] is None and "torch" in result["peer_note"]


def test_bench_forward_head_to_head_ratio():
  # Two known costs: a 4 ms and a 2 ms sleep (sleeps overshoot by a fraction of a millisecond,
  # hence the tolerance), alternated as the script alternates the peer and the closed form.
  import time  # noqa: PLC0415

  sys.path.insert(0, str(ROOT / "scripts"))
  try:
    import bench_forward  # noqa: PLC0415
  finally:
    sys.path.remove(str(ROOT / "scripts"))
  figures = bench_forward._head_to_head(
    lambda: time.sleep(0.004), lambda: time.sleep(0.002), rounds=3, reps=4
  )
  assert figures["rounds"] == 3 and figures["reps_per_round"] == 4
  assert 0.35 < figures["closed_over_peer"] < 0.65, figures
  assert figures["peer_min_ms"] >= 4.0 and figures["closed_min_ms"] >= 2.0
