"""The notebooks are stored clean and in sync with their sources, and run top to bottom.

Each notebook's source is the jupytext percent-format file beside it
(notebooks/01_isotropic_shortcut.py for notebooks/01_isotropic_shortcut.ipynb, ...), paired
through the notebooks' ``jupytext: formats: ipynb,py:percent`` metadata: one edits the .py and
runs ``jupytext --sync notebooks/*.py``. The fast tests check that every stored .ipynb has the
cells (types and sources) of its .py and carries no outputs; no kernel is started.

The slow tests execute the stored notebooks. Each notebook asserts its own claims in code cells,
so executing it is the test: any failing cell (an assertion or an error) fails here, with the
cell's traceback. The kernel is this interpreter (a kernelspec written to a temporary directory
whose ``argv[0]`` is ``sys.executable``, so the notebooks see the same diffjax and JAX as the
tests), started in notebooks/ with ``JAX_PLATFORMS=cpu`` and ``MPLBACKEND=Agg`` and without the 8
simulated devices of conftest.py, which the notebooks do not use.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import sys
import time

import jupytext
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = (
  "00_your_first_flow.ipynb",
  "01_isotropic_shortcut.ipynb",
  "02_dirac_decoupling.ipynb",
  "03_schedules_and_targets.ipynb",
)
PAIRING = "ipynb,py:percent"
CELL_TIMEOUT_S = 300  # each notebook is meant to finish in under 3 minutes on 2 CPU cores
KERNEL_NAME = "diffjax-notebook-test"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  return env


def _kernel_manager(spec_root: pathlib.Path) -> AsyncKernelManager:
  """A kernel manager whose only kernel runs ``sys.executable -m ipykernel_launcher``."""
  spec_dir = spec_root / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "diffjax (test interpreter)",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(spec_root)], ensure_native_kernel=False)
  return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path):
  notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = NotebookClient(
    notebook,
    km=_kernel_manager(tmp_path / "kernels"),
    timeout=CELL_TIMEOUT_S,
    startup_timeout=120,
    shutdown_kernel="immediate",
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  start = time.perf_counter()
  # Raises CellExecutionError, with the cell's traceback, on the first failing cell; the kernel
  # is shut down either way (cleanup_kc: nbclient keeps kernels it did not create otherwise).
  client.execute(env=_kernel_env(), cleanup_kc=True)
  elapsed = time.perf_counter() - start
  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code_cells and all(cell.execution_count for cell in code_cells)
  print(f"{name}: {elapsed:.1f} s")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name}: cell {index} has stored outputs; clear them"
      assert cell.execution_count is None, f"{name}: cell {index} has an execution count"


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_every_notebook_has_a_source_and_is_listed():
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.py")) == sorted(
    name.replace(".ipynb", ".py") for name in NOTEBOOKS
  )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_in_sync_with_its_source(name):
  source = NOTEBOOK_DIR / name.replace(".ipynb", ".py")
  notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  from_source = jupytext.read(source, fmt="py:percent")
  for paired in (notebook, from_source):
    assert paired.metadata.get("jupytext", {}).get("formats") == PAIRING, (
      f"{name}: pairing metadata missing; run jupytext --set-formats {PAIRING} {source}"
    )
  expected, stored = _cells(from_source), _cells(notebook)
  hint = f"edit {source.relative_to(ROOT)} and run jupytext --sync {source.relative_to(ROOT)}"
  assert len(stored) == len(expected), (
    f"{name} has {len(stored)} cells, its source {len(expected)}; {hint}"
  )
  for index, (got, want) in enumerate(zip(stored, expected)):
    if got != want:
      diff = difflib.unified_diff(
        f"[{got[0]}]\n{got[1]}".splitlines(),
        f"[{want[0]}]\n{want[1]}".splitlines(),
        fromfile=name,
        tofile=source.name,
        lineterm="",
      )
      pytest.fail(f"{name}: cell {index} differs from its source; {hint}\n" + "\n".join(diff))
