"""diffjax: a JAX/Flax research framework for diffusion models and flow matching.

The public modules are attributes of the package, imported on first use (``import diffjax`` alone
starts neither JAX nor any model code)::

  import diffjax

  path = diffjax.paths.get_path("icfm", sigma=0.1)
  sampler = diffjax.samplers.get_sampler("euler", target="velocity",
                                         times=diffjax.samplers.uniform_grid(num_steps=50))

``schedules``, ``forward``, ``paths``, ``couplings``, ``losses``, ``parameterization``,
``samplers``, ``models``, ``evaluate``, ``objectives`` and ``data`` are the math and model
layers (DESIGN.md); ``train`` is the trainer. ``__version__`` is the installed package's version.
"""

from __future__ import annotations

import importlib

__all__ = [
  "__version__",
  "schedules",
  "forward",
  "paths",
  "couplings",
  "losses",
  "parameterization",
  "samplers",
  "models",
  "evaluate",
  "objectives",
  "data",
  "train",
]

_MODULES = frozenset(__all__) - {"__version__"}


def _version() -> str:
  """The installed distribution's version (pyproject.toml's ``version``)."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel

  try:
    return importlib.metadata.version("diffjax")
  except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    return "0+unknown"


def __getattr__(name: str):
  # Importing every module eagerly takes seconds (JAX, Flax, diffrax, ott), and reading the
  # package metadata a tenth of one; each is done on first use instead. importlib caches a
  # module in sys.modules and sets it as an attribute of the package.
  if name in _MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name == "__version__":
    globals()["__version__"] = version = _version()
    return version
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | _MODULES)
