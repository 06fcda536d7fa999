"""docs/benchmarks.md is the rendering of the benchmark JSON beside it (no figure typed by hand)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _renderer():
  spec = importlib.util.spec_from_file_location(
    "render_benchmarks", ROOT / "scripts" / "render_benchmarks.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmarks_page_is_rendered_from_the_json():
  renderer = _renderer()
  page = (ROOT / "docs" / "benchmarks.md").read_text()
  assert page == renderer.render(), (
    "docs/benchmarks.md is stale: python scripts/render_benchmarks.py"
  )
  # Every section the renderer knows has its JSON, and each names its command and date.
  for name, _ in renderer.SECTIONS:
    data = json.loads((ROOT / "docs" / name).read_text())
    assert data["command"] and data["date"], name
