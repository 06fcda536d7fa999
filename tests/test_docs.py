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


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_scaling_page_sections_are_rendered_from_their_json():
  """docs/scaling.md's exact-OT table is docs/ot_bench.json's rendering, and its memory section
  is docs/memory_bench.json's (each figure typed by a script, not by hand)."""
  page = (ROOT / "docs" / "scaling.md").read_text()
  renderer = _renderer()
  assert renderer.OT_BEGIN in page and "| 4096 |" in page
  assert renderer.render_scaling(page) == page, (
    "docs/scaling.md is stale: python scripts/render_benchmarks.py"
  )
  memory = _script("bench_memory")
  section = memory.render(json.loads((ROOT / "docs" / "memory_bench.json").read_text()))
  assert section.strip() in page, (
    "docs/scaling.md is stale: python scripts/bench_memory.py --render"
  )
