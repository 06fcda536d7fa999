"""scripts/results_fewstep.py's summary and page: means over seeds, diverged seeds counted apart,
and the issue's goal read off the numbers (a synthetic report, so the rules are checked exactly)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
  "results_fewstep", ROOT / "scripts/results_fewstep.py"
)
fewstep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fewstep)

TASK = "8gaussians->moons"


def _cell(method: str, w2_by_seed: list[dict]) -> dict:
  cell = {
    "method": method,
    "task": TASK,
    "train_s_per_seed": 1.0,
    "seeds": [
      {"seed": i, "w2": w2, "nfe": {k: int(k) for k in w2}} for i, w2 in enumerate(w2_by_seed)
    ],
  }
  cell["summary"] = fewstep.summarise(cell, [1, 4, 100])
  return cell


def _report(cells: list[dict]) -> dict:
  return {
    "command": "python scripts/results_fewstep.py",
    "date": "2026-12-06T00:00",
    "commit": "abc",
    "machine": "test",
    "steps": 10,
    "seeds": [0, 1, 2],
    "nfe": [1, 4, 100],
    "eval_samples": 10,
    "cells": {f"{c['method']}|{TASK}": c for c in cells},
  }


def test_diverged_seeds_are_counted_apart_not_averaged():
  cell = _cell(
    "shortcut",
    [
      {"1": 0.5, "4": 0.4, "100": 0.3},
      {"1": 1e7, "4": None, "100": 0.5},
      {"1": 0.7, "4": 0.6, "100": 0.4},
    ],
  )
  one = cell["summary"]["w2"]["1"]
  assert one["mean"] == pytest.approx(0.6) and one["n"] == 2 and one["failed"] == 1
  assert cell["summary"]["w2"]["100"]["failed"] == 0
  assert cell["summary"]["w2"]["100"]["mean"] == pytest.approx(0.4)


@pytest.mark.parametrize("one_nfe,verdict", [(0.44, "met"), (0.46, "not met")])
def test_goal_is_read_off_the_table(one_nfe, verdict):
  # OT-CFM at 100 NFE: mean 0.3, std 0.1 -> bounds 0.45 (1 NFE) and 0.4 (4 NFE).
  otcfm = _cell("otcfm", [{"1": 1.0, "4": 1.0, "100": v} for v in (0.2, 0.3, 0.4)])
  few = _cell("rf2", [{"1": one_nfe, "4": 0.35, "100": 0.3}] * 3)
  page = fewstep.to_markdown(_report([otcfm, few]))
  line = next(line for line in page.splitlines() if line.startswith("- NFE 1:"))
  assert f"**{verdict}**" in line and "2-RF" in line
  four = next(line for line in page.splitlines() if line.startswith("- NFE 4:"))
  assert "**met**" in four and "bound 0.400" in four
  assert "**Not run in this report:** N->moons." in page
