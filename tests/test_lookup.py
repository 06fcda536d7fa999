"""The one name lookup (diffjax._lookup) and every ``get_*`` that resolves its name through it."""

from __future__ import annotations

import re

import pytest

from diffjax import couplings, forward, losses, parameterization, paths, schedules
from diffjax._lookup import lookup
from diffjax.data import images, toy2d
from diffjax.models import embeddings, factory, mlp
from diffjax.samplers import adaptive, diffusion, grids, likelihood, multistep, ode, registry

TABLE = {"beta": 2, "alpha": 1}


def test_lookup_returns_the_entry():
  assert lookup(TABLE, "alpha", "letter") == 1


def test_unknown_name_is_one_line_with_the_sorted_choices():
  with pytest.raises(ValueError) as info:
    lookup(TABLE, "gamma", "letter")
  assert str(info.value) == "unknown letter 'gamma'; choose one of ['alpha', 'beta']"
  assert info.value.__cause__ is None and info.value.__suppress_context__  # no KeyError chained


def test_hint_ends_the_message():
  with pytest.raises(ValueError, match=r"choose one of \['alpha', 'beta'\] or None$"):
    lookup(TABLE, "gamma", "letter", hint=" or None")


@pytest.mark.parametrize("name", [["alpha"], {"a": 1}, None, 3])
def test_a_name_of_the_wrong_type_is_a_value_error(name):
  with pytest.raises(ValueError, match=re.escape(f"unknown letter {name!r}; choose one of")):
    lookup(TABLE, name, "letter")


# Every public get_* of the package (get_objective lives in diffjax.objectives, which keeps its
# own config-style message), with its table and the word its message uses.
GETTERS = [
  (schedules.get_discrete_schedule, schedules.DISCRETE_SCHEDULES, "discrete schedule"),
  (schedules.get_continuous_schedule, schedules.CONTINUOUS_SCHEDULES, "continuous schedule"),
  (
    parameterization.get_prediction_target,
    parameterization.PREDICTION_TARGETS,
    "prediction target",
  ),
  (forward.get_noise_model, forward.NOISE_MODELS, "noise model"),
  (paths.get_path, paths.PATHS, "path"),
  (couplings.get_coupling, couplings.COUPLINGS, "coupling"),
  (losses.get_time_sampler, losses.TIME_SAMPLERS, "time sampler"),
  (losses.get_flow_matching_recipe, losses.FLOW_MATCHING_RECIPES, "flow-matching recipe"),
  (losses.get_weighting, losses.WEIGHTINGS, "weighting"),
  (registry.get_sampler, registry.SAMPLERS, "sampler"),
  (grids.get_time_grid, grids.TIME_GRIDS, "time grid"),
  (grids.get_discrete_steps, grids.DISCRETE_STEPS, "step spacing"),
  (ode.get_fixed_step_method, ode.FIXED_STEP_METHODS, "fixed-step method"),
  (adaptive.get_adaptive_solver, adaptive.ADAPTIVE_SOLVERS, "adaptive solver"),
  (diffusion.get_ddpm_variance, diffusion.DDPM_VARIANCES, "DDPM variance"),
  (multistep.get_unipc_variant, multistep.UNIPC_VARIANTS, "UniPC variant"),
  (
    multistep.get_dpmpp_sde_solver_type,
    multistep.DPMPP_SDE_SOLVER_TYPES,
    "DPM-Solver++ SDE solver type",
  ),
  (likelihood.get_divergence, likelihood.DIVERGENCES, "divergence"),
  (likelihood.get_probes, likelihood.PROBES, "probe distribution"),
  (embeddings.get_time_features, embeddings.TIME_FEATURES, "time features"),
  (mlp.get_activation, mlp.ACTIVATIONS, "activation"),
  (toy2d.get_toy2d, toy2d.TOY2D, "toy distribution"),
  (images.get_dataset, images.DATASETS, "image dataset"),
  (factory.model_kwargs, factory.MODELS, "model"),
]


@pytest.mark.parametrize("get, table, what", GETTERS, ids=[g.__name__ for g, _, _ in GETTERS])
def test_every_getter_raises_the_one_message(get, table, what):
  with pytest.raises(ValueError) as info:
    get("nonesuch")
  # The one message, optionally followed by a hint saying what the choices mean.
  message = f"unknown {what} 'nonesuch'; choose one of {sorted(table)}"
  assert str(info.value) == message or str(info.value).startswith(f"{message} (")
