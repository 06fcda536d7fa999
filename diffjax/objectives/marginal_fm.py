"""Exact marginal flow matching on a finite data set: the objective conditional FM replaces.

The data distribution is the empirical measure ``q = (1/N) sum_i delta(x1_i)`` of ``N`` points
drawn once from the 2D toy target. With ``x0 ~ N(0, I)`` independent of ``x1 ~ q``, the model
regresses the exact marginal velocity of the path,

    L(theta) = E_{t, x ~ p_t} ||v_theta(x, t) - u_t(x)||^2 / D,
    u_t(x) = sum_i w_i(x, t) u_t(x | x1_i),   w_i = softmax_i(-||x - alpha_t x1_i||^2 / 2 s_t^2)

(Lipman et al. 2023, eq. 8, https://arxiv.org/abs/2210.02747; :func:`diffjax.losses.
marginal_velocity`): ``O(N)`` work and memory per training example. Conditional flow matching
regresses ``u_t(x | x1)`` instead, ``O(1)`` per example, with the same gradient in expectation
(Lipman et al. 2023, Theorem 2; Tong et al. 2024, Theorem 3.2, https://arxiv.org/abs/2302.00482):
this objective is the reference for that identity and for what it saves. Flow time runs from
the source (``t = 0``) to the data (``t = 1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import losses as losses_lib
from diffjax import paths as paths_lib
from diffjax import samplers as samplers_lib
from diffjax.objectives import base, flow_matching

__all__ = ["marginal_fm", "check", "finite_data_set", "SPEC"]

# The branch of the seed's key the finite set is drawn from: the trainer takes branches 0 (the
# initialisation) and 1 (the base key of every step) of split(PRNGKey(seed)), i.e. fold_in 0, 1.
_DATA_SET_BRANCH = 0x6D666D


# The kernel width at the data end, s_1 = sqrt(sigma_1^2 + gamma_1^2), in closed form, because
# check() runs before jax.distributed.initialize and must not start a JAX backend: 0 whatever the
# noise level (the bridge's gamma and vp's sigma vanish at t = 1), or the noise level itself;
# positive for the others (cosine). The tests compare both against paths.py for every path.
_ZERO_WIDTH_AT_DATA = ("brownian_bridge", "schrodinger_bridge", "vp")
_WIDTH_AT_DATA_IS_SIGMA = ("icfm", "linear", "cond_ot")


def finite_data_set(target_sampler, *, seed: int, num_points: int) -> jax.Array:
  """The ``[num_points, *event]`` points of the empirical measure: one draw of
  ``target_sampler(key, num_points)`` with ``key = fold_in(PRNGKey(seed), _DATA_SET_BRANCH)``,
  the same for every step and every process of a run (and for a resumed one)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _DATA_SET_BRANCH)
  return jnp.asarray(target_sampler(key, num_points), jnp.float32)


def _path(path: str, sigma: float) -> paths_lib.Path:
  """The path with noise level ``sigma``, by the CFM objectives' rule (its ``sigma`` or
  ``sigma_min``, whichever it takes; none for vp and cosine)."""
  noise = flow_matching.noise_keywords(path, {"sigma": sigma})
  return paths_lib.get_path(path, **noise)


def check(
  *, num_points: int = 1024, path: str = "icfm", sigma: float = 0.1, time_sampler: str = "uniform"
) -> list[str]:
  """Unknown names and out-of-range values, one line each with the reason."""
  problems = []
  if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
    problems.append(
      f"objective.num_points={num_points!r}: the size of the finite data set must be an int >= 1"
    )
  if time_sampler not in losses_lib.TIME_SAMPLERS:
    problems.append(
      f"objective.time_sampler={time_sampler!r}: unknown; choose one of "
      f"{sorted(losses_lib.TIME_SAMPLERS)}"
    )
  if not sigma >= 0:
    problems.append(f"objective.sigma={sigma!r}: a noise level must be >= 0")
  if path not in paths_lib.PATHS:
    problems.append(f"objective.path={path!r}: unknown; choose one of {sorted(paths_lib.PATHS)}")
  elif path in _ZERO_WIDTH_AT_DATA or (path in _WIDTH_AT_DATA_IS_SIGMA and sigma == 0):
    # u_t(x) divides by the kernel width s_t (the posterior weights' temperature), and in
    # float32 the u-shaped and logit-normal samplers can return t = 1.0 exactly (rounding up),
    # where s_1 = 0 would make every weight 0 / 0.
    problems.append(
      f"objective.path={path!r} with objective.sigma={sigma!r}: the kernel "
      "width s_t of p_t(x | x1) = N(alpha_t x1, s_t^2 I) is 0 at t = 1, where "
      "the marginal field's posterior weights are 0 / 0; use path 'icfm' or "
      "'linear' with sigma > 0, or 'cosine'"
    )
  if not problems and not flow_matching.noise_keywords(path, {"sigma": sigma}):
    why = f"the {path} path takes no noise level"
    problems += base.unread_problems(marginal_fm, {"sigma": (sigma, why)})
  return problems


def _context_problems(context: base.ObjectiveContext) -> list[str]:
  """What the experiment must provide: a target to draw the finite set from, an ``N(0, I)``
  source (the marginal field's Gaussian kernel) and no labels."""
  problems = []
  if context.target_sampler is None:
    problems.append(
      "objective marginal_fm draws its finite data set from a target generated on "
      "device: it needs data.kind='toy2d' (2D toys only; images have no sampler "
      "to draw num_points examples from)"
    )
  if not context.source_is_normal:
    problems.append(
      "objective marginal_fm needs data.source='normal': its exact field "
      "u_t(x) = sum_i w_i u_t(x | x1_i) assumes x0 ~ N(0, I), so that p_t(x | x1) "
      "is the Gaussian N(alpha_t x1, s_t^2 I)"
    )
  if context.num_classes:
    problems.append(
      f"objective marginal_fm is unconditional (the field of the whole finite "
      f"set), but data.num_classes={context.num_classes}; set data.num_classes=0"
    )
  return problems


def marginal_fm(
  context: base.ObjectiveContext,
  *,
  num_points: int = 1024,
  path: str = "icfm",
  sigma: float = 0.1,
  time_sampler: str = "uniform",
) -> base.Objective:
  """Marginal FM on ``num_points`` target points:
  ``E_t E_{x ~ p_t} ||v(x, t) - u_t(x)||^2 / D`` with the exact field
  :func:`diffjax.losses.marginal_fm_loss` (Lipman et al. 2023, eq. 5 and 8,
  https://arxiv.org/abs/2210.02747).

  ``x_t`` is drawn as in conditional FM (``x1`` uniform on the finite set, ``x0`` from the
  source, then the path), so ``x_t ~ p_t``; only the target changes. Costs ``O(B N D)`` time and
  memory per step for a batch of ``B`` (I-CFM: ``O(B D)``).

  Args:
    context: the experiment's :class:`~diffjax.objectives.base.ObjectiveContext`; needs a
      ``target_sampler`` (2D toys), an ``N(0, I)`` source and no labels.
    num_points: ``N``, the size of the finite data set (:func:`finite_data_set`).
    path: a :data:`diffjax.paths.PATHS` name whose kernel width stays positive up to ``t = 1``.
    sigma: the path's noise level (``sigma`` of icfm, ``sigma_min`` of linear; vp and cosine
      take none).
    time_sampler: a :data:`diffjax.losses.TIME_SAMPLERS` name.
  """
  problems = check(
    num_points=num_points, path=path, sigma=sigma, time_sampler=time_sampler
  ) + _context_problems(context)
  if problems:
    raise ValueError("; ".join(problems))
  path_fn = _path(path, sigma)
  sample_time = losses_lib.get_time_sampler(time_sampler)
  points = finite_data_set(context.target_sampler, seed=context.seed, num_points=num_points)

  def pair_fn(key, batch):
    """``x1`` uniform on the finite set and ``x0`` from the source; the loader's ``x`` (fresh
    target draws) sets only the batch size: the field regressed is that of the finite set, so
    ``x_t`` must come from its ``p_t``."""
    k_pick, k_source = jax.random.split(key)
    num = batch["x"].shape[0]
    index = jax.random.randint(k_pick, (num,), 0, num_points)
    # An index drawn from a key alone carries no sharding, and on a mesh every device would
    # then compute the whole batch's O(B N) field. A select on the loader's values (a no-op:
    # toy draws are finite) ties the index, and so the pairs, to the batch's sharding.
    index = jnp.where(jnp.isnan(batch["x"][:, 0]), 0, index)
    return {"x0": context.source(k_source, num), "x": points[index]}

  def loss_fn(params, key, batch):
    # Split as flow_matching's loss does, so one key gives both objectives the same (t, x_t).
    k_example, _, k_dropout = jax.random.split(key, 3)
    example = losses_lib.flow_matching_example(
      k_example, x0=batch["x0"], x1=batch["x"], path=path_fn, time_sampler=sample_time
    )
    prediction = context.apply(
      params, example.model_input, example.model_time, None, dropout_key=k_dropout
    )
    return losses_lib.marginal_fm_loss(prediction, example, data=points, path=path_fn)

  # x0 ~ N(0, I) independent of x1: the velocity gives the score through the path's kernel.
  generate = samplers_lib.flow_generator(
    apply=context.apply,
    source=context.source,
    data_shape=context.data_shape,
    coefficients_fn=path_fn.gaussian_coefficients,
  )
  log_likelihood = base.flow_likelihood(context)
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=pair_fn,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


SPEC = base.ObjectiveSpec(
  build=marginal_fm,
  check=check,
  samplers=samplers_lib.GAUSSIAN_FLOW_SAMPLERS,
  default_sampler="euler",
  output="velocity",
  summary="Marginal FM: the exact O(N) field of N toy points, no Dirac decoupling "
  "(Lipman et al. 2023, eq. 8)",
)
