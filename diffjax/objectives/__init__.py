"""Training objectives as values, found in one table.

``config.objective`` is ``name`` plus exactly the keyword arguments of that objective's factory;
:func:`get_objective` resolves the name once, at the edge, and the factory returns an
:class:`~diffjax.objectives.base.Objective` carrying the pairing, the loss, the generator and the
likelihood. Validation, the CLI's sampler check and the config fuzz read :data:`OBJECTIVES`. A new
method is one module with a factory, a ``check`` and an :class:`ObjectiveSpec`, plus one entry
below.
"""

from __future__ import annotations

from diffjax.objectives import consistency as _consistency
from diffjax.objectives import continuous_diffusion as _continuous_diffusion
from diffjax.objectives import diffusion as _diffusion
from diffjax.objectives import edm as _edm
from diffjax.objectives import flow_matching as _flow_matching
from diffjax.objectives import marginal_fm as _marginal_fm
from diffjax.objectives import meanflow as _meanflow
from diffjax.objectives import reflow as _reflow
from diffjax.objectives import sf2m as _sf2m
from diffjax.objectives import shortcut as _shortcut
from diffjax.objectives import stochastic_interpolant as _stochastic_interpolant
from diffjax.objectives.base import (
  HostPairing,
  Objective,
  ObjectiveContext,
  ObjectiveSpec,
  Teacher,
  accepted_samplers,
  defaults,
  keywords,
)

__all__ = [
  "OBJECTIVES",
  "get_objective",
  "objective_problems",
  "Objective",
  "ObjectiveContext",
  "ObjectiveSpec",
  "HostPairing",
  "Teacher",
  "defaults",
  "keywords",
  "accepted_samplers",
]

OBJECTIVES: dict[str, ObjectiveSpec] = {
  **_flow_matching.SPECS,
  "diffusion": _diffusion.SPEC,
  "continuous_diffusion": _continuous_diffusion.SPEC,
  "edm": _edm.SPEC,
  "marginal_fm": _marginal_fm.SPEC,
  "meanflow": _meanflow.SPEC,
  "shortcut": _shortcut.SPEC,
  "stochastic_interpolant": _stochastic_interpolant.SPEC,
  "reflow": _reflow.SPEC,
  "consistency": _consistency.SPEC,
  "sf2m": _sf2m.SPEC,
}


def _spec(name: str) -> ObjectiveSpec:
  if name not in OBJECTIVES:
    raise ValueError(f"objective.name={name!r}: unknown; choose one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def objective_problems(group: dict) -> list[str]:
  """What is wrong with a ``config.objective`` group, one line each: an unknown name, keys the
  objective does not take (with the keys it does), then the objective's own checks."""
  name = group.get("name")
  if name not in OBJECTIVES:
    return [f"objective.name={name!r}: unknown; choose one of {sorted(OBJECTIVES)}"]
  spec = OBJECTIVES[name]
  accepted = keywords(spec.build)
  unknown = sorted(set(group) - set(accepted) - {"name"})
  if unknown:
    return [
      f"objective.{key}: objective {name!r} does not take it (its keywords: "
      f"{sorted(accepted)}); drop it, or start from a config of the objective that "
      "does"
      for key in unknown
    ]
  return spec.check(**{k: v for k, v in group.items() if k != "name"})


def get_objective(name: str, context: ObjectiveContext, **kwargs) -> Objective:
  """Builds the objective ``name`` for ``context`` from its factory's keywords."""
  return _spec(name).build(context, **kwargs)
