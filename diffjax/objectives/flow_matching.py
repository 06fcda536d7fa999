"""Conditional flow matching: the I-CFM, OT-CFM, SB-CFM and Lipman FM recipes.

Each recipe is a path and a coupling (``diffjax.losses.FLOW_MATCHING_RECIPES``); here either can
be replaced by name (``path``, ``coupling``: empty keeps the recipe's own), with any time sampler.
The model regresses the conditional velocity ``u_t(x | x0, x1)`` of the path (Lipman et al. 2023,
https://arxiv.org/abs/2210.02747; Tong et al. 2024, https://arxiv.org/abs/2302.00482); flow time
runs from the source (``t = 0``) to the data (``t = 1``).
"""

from __future__ import annotations

import functools

import jax

from diffjax import couplings as couplings_lib
from diffjax import losses as losses_lib
from diffjax import paths as paths_lib
from diffjax import samplers as samplers_lib
from diffjax.objectives import base

__all__ = ["icfm", "otcfm", "sbcfm", "fm", "check", "noise_keywords", "COUPLING_SCOPES", "SPECS"]

COUPLING_SCOPES = ("global", "per_device")

SOLVED_COUPLINGS = ("exact_ot", "label_exact_ot")
"""The couplings that solve an assignment with ``ot_solver``."""


def noise_keywords(path_name: str, noise: dict) -> dict:
  """The recipe's noise level for a path that takes one (``sigma`` or ``sigma_min``)."""
  accepted = base.keywords(paths_lib.PATHS[path_name])
  value = next(iter(noise.values()))
  return {name: value for name in ("sigma", "sigma_min") if name in accepted}


def _coupling(
  name: str, recipe: losses_lib.FlowMatchingRecipe, *, ot_solver: str, num_classes: int
):
  """The coupling by name; exact OT binds the solver and, with labels, pairs within a class
  (class-agnostic OT pairs noise meant for one class with data of another)."""
  if name in ("exact_ot", "label_exact_ot"):
    return couplings_lib.get_coupling(
      "label_exact_ot" if num_classes else "exact_ot", solver=ot_solver
    )
  kwargs = recipe.coupling_kwargs if name == recipe.coupling else {}
  return couplings_lib.get_coupling(name, **kwargs)


def _paired(x0, x1, labels):
  paired = {"x0": x0, "x": x1}
  if labels is not None:
    paired["label"] = labels
  return paired


def _build(
  context: base.ObjectiveContext,
  recipe_name: str,
  noise: dict,
  *,
  path: str,
  coupling: str,
  time_sampler: str,
  ot_solver: str,
  coupling_scope: str,
  label_dropout: float,
) -> base.Objective:
  recipe = losses_lib.get_flow_matching_recipe(recipe_name, **noise)
  path_name = path or recipe.path
  path_fn = paths_lib.get_path(path_name, **noise_keywords(path_name, noise))
  pair_coupling = _coupling(
    coupling or recipe.coupling, recipe, ot_solver=ot_solver, num_classes=context.num_classes
  )
  if coupling_scope == "per_device":
    pair_coupling = couplings_lib.blockwise_coupling(
      pair_coupling, num_blocks=context.num_batch_shards
    )
  sample_time = losses_lib.get_time_sampler(time_sampler)
  num_classes = context.num_classes

  def draw(key, batch):
    k_source, k_pairs = jax.random.split(key)
    x1 = batch["x"]
    x0 = context.source(k_source, x1.shape[0])
    labels = batch.get("label") if num_classes else None
    return k_pairs, x0, x1, labels

  def pair_fn(key, batch):
    """Source draws and the coupling: no parameters, so fused steps pair ahead of the scan."""
    return _paired(*pair_coupling(*draw(key, batch)))

  host_pairing = None
  if isinstance(pair_coupling, couplings_lib.HostSolvedCoupling):

    def propose(key, batch):
      k_pairs, x0, x1, labels = draw(key, batch)
      return _paired(x0, x1, labels), pair_coupling.problem(k_pairs, x0, x1, labels)

    def finish(batch, solution):
      return _paired(*pair_coupling.apply(solution, batch["x0"], batch["x"], batch.get("label")))

    host_pairing = base.HostPairing(propose=propose, solve=pair_coupling.solve, finish=finish)

  def make_example(key, batch, labels):
    return losses_lib.flow_matching_example(
      key, x0=batch["x0"], x1=batch["x"], path=path_fn, time_sampler=sample_time, cond=labels
    )

  loss_fn = base.regression_loss_fn(context, make_example, label_dropout=label_dropout)

  # The velocity gives the score only on the path's Gaussian kernel: an N(0, I) source drawn
  # independently of the data (an OT coupling makes x0 depend on x1).
  has_score = context.source_is_normal and (coupling or recipe.coupling) == "independent"
  generate = samplers_lib.flow_generator(
    apply=context.apply,
    source=context.source,
    data_shape=context.data_shape,
    num_classes=num_classes,
    coefficients_fn=path_fn.gaussian_coefficients if has_score else None,
  )
  log_likelihood = None
  if context.source_is_normal:
    log_likelihood = base.flow_likelihood(context)
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=pair_fn,
    host_pairing=host_pairing,
    generate=generate,
    log_likelihood=log_likelihood,
  )


def check(
  *,
  path: str = "",
  coupling: str = "",
  time_sampler: str = "uniform",
  ot_solver: str = "emd",
  coupling_scope: str = "global",
  label_dropout: float = 0.0,
  recipe: str = "",
  **noise,
) -> list[str]:
  """Unknown names and out-of-range values, one line each; with ``recipe`` (bound per table
  entry), also keywords set away from their defaults that the resolved path and coupling do
  not read."""
  problems = []
  choices = [
    ("path", path, paths_lib.PATHS, True),
    ("coupling", coupling, couplings_lib.COUPLINGS, True),
    ("time_sampler", time_sampler, losses_lib.TIME_SAMPLERS, False),
    ("ot_solver", ot_solver, couplings_lib.OT_SOLVERS, False),
    ("coupling_scope", coupling_scope, COUPLING_SCOPES, False),
  ]
  for key, value, table, may_be_empty in choices:
    if not (value in table or (may_be_empty and value == "")):
      empty = " ('' keeps the recipe's own)" if may_be_empty else ""
      problems.append(f"objective.{key}={value!r}: unknown; choose one of {sorted(table)}{empty}")
  problems += base.label_dropout_problems(label_dropout)
  for key, value in noise.items():
    if not value >= 0:
      problems.append(f"objective.{key}={value!r}: a noise level must be >= 0")
  if recipe and not problems:
    problems += _unread_problems(
      recipe,
      noise,
      path=path,
      coupling=coupling,
      ot_solver=ot_solver,
      coupling_scope=coupling_scope,
    )
  return problems


def _unread_problems(recipe_name: str, noise: dict, *, path, coupling, ot_solver, coupling_scope):
  """Keywords the recipe's resolved path and coupling do not read, set away from defaults."""
  factory = FACTORIES[recipe_name]
  noise = noise or {k: v for k, v in base.defaults(factory).items() if k in ("sigma", "sigma_min")}
  recipe = losses_lib.get_flow_matching_recipe(recipe_name, **noise)
  path_name, coupling_name = path or recipe.path, coupling or recipe.coupling
  unread = {}
  if not noise_keywords(path_name, noise):
    key, value = next(iter(noise.items()))
    unread[key] = (value, f"the {path_name} path takes no noise level")
  if coupling_name not in SOLVED_COUPLINGS:
    unread["ot_solver"] = (
      ot_solver,
      f"only the couplings {list(SOLVED_COUPLINGS)} solve an assignment, and the coupling is "
      f"{coupling_name!r}",
    )
  if coupling_name == "independent":
    unread["coupling_scope"] = (
      coupling_scope,
      "independent pairs are the same drawn globally or per device",
    )
  return base.unread_problems(factory, unread)


def icfm(
  context: base.ObjectiveContext,
  *,
  sigma: float = 0.1,
  path: str = "",
  coupling: str = "",
  time_sampler: str = "uniform",
  ot_solver: str = "emd",
  coupling_scope: str = "global",
  label_dropout: float = 0.0,
) -> base.Objective:
  """I-CFM: ``x_t = t x1 + (1 - t) x0 + sigma z``, target ``x1 - x0``, independent pairs."""
  return _build(
    context,
    "icfm",
    {"sigma": sigma},
    path=path,
    coupling=coupling,
    time_sampler=time_sampler,
    ot_solver=ot_solver,
    coupling_scope=coupling_scope,
    label_dropout=label_dropout,
  )


def otcfm(
  context: base.ObjectiveContext,
  *,
  sigma: float = 0.1,
  path: str = "",
  coupling: str = "",
  time_sampler: str = "uniform",
  ot_solver: str = "emd",
  coupling_scope: str = "global",
  label_dropout: float = 0.0,
) -> base.Objective:
  """OT-CFM: I-CFM's path on the pairs of an exact minibatch OT permutation."""
  return _build(
    context,
    "otcfm",
    {"sigma": sigma},
    path=path,
    coupling=coupling,
    time_sampler=time_sampler,
    ot_solver=ot_solver,
    coupling_scope=coupling_scope,
    label_dropout=label_dropout,
  )


def sbcfm(
  context: base.ObjectiveContext,
  *,
  sigma: float = 1.0,
  path: str = "",
  coupling: str = "",
  time_sampler: str = "uniform",
  ot_solver: str = "emd",
  coupling_scope: str = "global",
  label_dropout: float = 0.0,
) -> base.Objective:
  """SB-CFM: the Brownian bridge of variance ``sigma^2`` on pairs drawn from the entropic OT
  plan with ``eps = 2 sigma^2`` (the static Schrodinger bridge, Tong et al. 2024, Prop. 3.5)."""
  return _build(
    context,
    "sbcfm",
    {"sigma": sigma},
    path=path,
    coupling=coupling,
    time_sampler=time_sampler,
    ot_solver=ot_solver,
    coupling_scope=coupling_scope,
    label_dropout=label_dropout,
  )


def fm(
  context: base.ObjectiveContext,
  *,
  sigma_min: float = 1e-4,
  path: str = "",
  coupling: str = "",
  time_sampler: str = "uniform",
  ot_solver: str = "emd",
  coupling_scope: str = "global",
  label_dropout: float = 0.0,
) -> base.Objective:
  """Lipman's FM: ``x_t = t x1 + (1 - (1 - sigma_min) t) x0``, independent pairs."""
  return _build(
    context,
    "fm",
    {"sigma_min": sigma_min},
    path=path,
    coupling=coupling,
    time_sampler=time_sampler,
    ot_solver=ot_solver,
    coupling_scope=coupling_scope,
    label_dropout=label_dropout,
  )


_SUMMARIES = {
  "icfm": "I-CFM: icfm path (sigma), independent pairs (Tong et al. 2024)",
  "otcfm": "OT-CFM: icfm path (sigma), exact minibatch OT pairs (Tong et al. 2024)",
  "sbcfm": "SB-CFM: Brownian bridge (sigma), entropic OT with eps = 2 sigma^2 (Tong et al.)",
  "fm": "Lipman's FM: linear path with sigma_min, independent pairs (Lipman et al. 2023)",
}

FACTORIES = {"icfm": icfm, "otcfm": otcfm, "sbcfm": sbcfm, "fm": fm}


def sampler_choices(recipe_name: str, *, source_is_normal: bool, coupling: str = "", **_) -> tuple:
  """:data:`~diffjax.samplers.GAUSSIAN_FLOW_SAMPLERS` for an ``N(0, I)`` source with independent
  pairs (the velocity then gives the score), else :data:`~diffjax.samplers.FLOW_SAMPLERS`."""
  recipe_coupling = losses_lib.FLOW_MATCHING_RECIPES[recipe_name]().coupling
  if source_is_normal and (coupling or recipe_coupling) == "independent":
    return samplers_lib.GAUSSIAN_FLOW_SAMPLERS
  return samplers_lib.FLOW_SAMPLERS


SPECS = {
  name: base.ObjectiveSpec(
    build=factory,
    check=functools.partial(check, recipe=name),
    samplers=samplers_lib.GAUSSIAN_FLOW_SAMPLERS,
    default_sampler="euler",
    output="velocity",
    summary=_SUMMARIES[name],
    any_source=True,
    sampler_choices=functools.partial(sampler_choices, name),
  )
  for name, factory in FACTORIES.items()
}
