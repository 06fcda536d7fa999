"""Consistency training in continuous time on the linear flow-matching path (any source).

Flow time runs from the source (``t = 0``) to the data (``t = 1``) on the path ``x_t = (1 - t) x0
+ t x1``. The consistency function maps every point of a probability-flow ODE trajectory to its
data end, ``f(x_t, t) = x_1``; it is parameterised so the boundary condition ``f(x, 1) = x`` holds
exactly for any network ``F``:

    f(x_t, t) = x_t + (1 - t) F(x_t, t),

(``c_skip = 1``, ``c_out = 1 - t`` in Song et al. 2023's ``f = c_skip x + c_out F``; ``F`` is
then the average velocity from ``t`` to 1 along the trajectory, the instantaneous one at ``t =
1``).

Why continuous time. ECT (Geng et al. 2024, "Consistency Models Made Easy",
https://arxiv.org/abs/2406.14548) compares ``f(x_t, t)`` with ``f(x_r, r)`` at a gap ``r - t``
that shrinks over training, so its loss depends on the training step, which diffjax's
``loss_fn(params, key, batch)`` does not see. Its limit ``r -> t`` is the continuous-time
consistency objective of sCM (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", https://arxiv.org/abs/2410.11081, Sec. 2-4), which needs
no step and no gap schedule: with ``f^-`` the model under stop-gradient, its gradient is

    grad = -E[ w(t) (dF/dtheta)^T g ],   g = df^-/dt = v + (1 - t) dF^-/dt - F^-,

the total derivative of ``f^-`` along the path, ``dF^-/dt = d_x F^- v + d_t F^-`` by one
``jax.jvp``, with the conditional velocity ``v = x1 - x0`` of the pair. The loss here, ``w 1/D
||F - sg(F^- + g)||^2``, has the gradient ``-(2/D) w (dF/dtheta)^T g``: this one, scaled. ``g``
is affine in ``v`` at fixed ``(x_t, t)``, so with the squared-L2 distance this gradient equals,
in expectation, the one with the marginal velocity ``E[v | x_t]`` (the continuous-time
consistency training of Song et al. 2023, Sec. 6, https://arxiv.org/abs/2303.01469): the source
need not be Gaussian.

The distance. "l2" (the default) keeps that unbiasedness. "pseudo_huber" normalises the
tangent, ``g <- g / sqrt(|g|^2 + c^2)`` (``|g|`` the root mean square over the features): the
``r -> t`` limit of ECT's pseudo-Huber distance ``sqrt(||a||^2 + c'^2) - c'`` with ``c' = (r -
t) c``, and sCM's tangent normalisation ``g / (||g|| + c)`` (Sec. 4) in all but the form of the
denominator. It bounds each example's gradient, which sCM needs for stability at scale, but
``E[g / |g|]`` is not ``E[g] / |E[g]|``: the expected gradient no longer vanishes at the exact
``f`` in general, most visibly in low dimensions, where ``|g|`` varies most between pairs. sCM's
tangent warm-up (a ramp over training steps) and adaptive weighting (a second network output)
are not used: one needs the step, the other another head.

A researcher tunes the time sampler (logit-normal by default: sCM's CIFAR-10 proposal
``ln(sigma / sigma_d) ~ N(-1, 1.4^2)`` is ``logit(t) ~ N(1, 1.4^2)`` on this path, whose
noise-to-signal ratio is ``(1 - t) / t``), the weighting, the distance and ``c``. Sampling is
Song et al.'s multistep consistency sampling in flow time (:mod:`diffjax.samplers.consistency`),
``steps`` network evaluations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from diffjax import losses as losses_lib
from diffjax import paths as paths_lib
from diffjax import samplers as samplers_lib
from diffjax._lookup import lookup
from diffjax.objectives import base
from diffjax.shapes import broadcast_to_data, compute_dtype

__all__ = [
  "consistency",
  "check",
  "consistency_function",
  "consistency_model",
  "consistency_tangent",
  "uniform_weighting",
  "endpoint_weighting",
  "squared_l2_tangent",
  "pseudo_huber_tangent",
  "WEIGHTINGS",
  "DISTANCES",
  "SPEC",
]


def consistency_function(raw: Array, *, x_t: Array, t: Array) -> Array:
  """``f(x_t, t) = x_t + (1 - t) F`` from the network's output ``F = raw``: exactly ``x_t`` at
  the data end ``t = 1`` whatever ``F`` is (the boundary condition of Song et al. 2023, Sec. 3,
  https://arxiv.org/abs/2303.01469, in flow time). ``t`` is ``[batch]`` or a scalar."""
  return x_t + broadcast_to_data(1 - t, x_t).astype(x_t.dtype) * raw


def consistency_model(apply: Callable) -> Callable:
  """``apply_f(params, x_t, t, cond, dropout_key=None) -> f(x_t, t)``: the network ``apply ->
  F`` made a consistency function by :func:`consistency_function`."""

  def apply_f(params, x_t, t, cond=None, *, dropout_key=None):
    raw = apply(params, x_t, t, cond, dropout_key=dropout_key)
    return consistency_function(raw, x_t=x_t, t=t)

  return apply_f


def consistency_tangent(
  network: Callable[[Array, Array], Array], *, x_t: Array, t: Array, velocity: Array
) -> tuple[Array, Array]:
  """``(F, df/dt)``: the output ``F = network(x_t, t)`` and the total derivative of ``f(x_t, t)
  = x_t + (1 - t) F(x_t, t)`` along the path ``dx_t/dt = velocity``,

      df/dt = velocity + (1 - t) (d_x F velocity + d_t F) - F,

  with ``d_x F velocity + d_t F`` from one ``jax.jvp`` with tangents ``(velocity, 1)`` (Lu &
  Song 2024, https://arxiv.org/abs/2410.11081, on the linear path instead of TrigFlow).

  Args:
    network: ``(x_t, t) -> F``, ``t`` ``[batch]``.
    x_t: ``[batch, *event]`` points of the path.
    t: ``[batch]`` flow times.
    velocity: ``[batch, *event]``, ``dx_t/dt`` (``x1 - x0`` for a pair).
  """
  raw, d_raw = jax.jvp(network, (x_t, t), (velocity, jnp.ones_like(t)))
  tangent = velocity + broadcast_to_data(1 - t, x_t).astype(raw.dtype) * d_raw - raw
  return raw, tangent


# ---- weightings w(t) -----------------------------------------------------------------------


def uniform_weighting(t: Array) -> Array:
  """``w(t) = 1``: the residual in units of ``F``, a velocity."""
  return jnp.ones_like(t)


def endpoint_weighting(t: Array) -> Array:
  """``w(t) = 1 - t``: the ``r -> t`` limit of ECT's ``||f(x_t, t) - f(x_r, r)||^2 / (r - t)``
  in flow time (``df/dF = 1 - t``; Geng et al. 2024, https://arxiv.org/abs/2406.14548)."""
  return 1 - t


WEIGHTINGS: dict[str, Callable[[Array], Array]] = {
  "uniform": uniform_weighting,
  "endpoint": endpoint_weighting,
}


# ---- distances, as what they do to the tangent in continuous time -------------------------


def _rms(x: Array) -> Array:
  """Root mean square over each example's features, ``[batch]``."""
  return jnp.sqrt(jnp.mean(jnp.square(x).reshape(x.shape[0], -1), axis=-1))


def squared_l2_tangent(tangent: Array, *, c: float = 0.0) -> Array:
  """The squared-L2 distance's tangent, unchanged (unbiased in expectation over pairs)."""
  del c
  return tangent


def pseudo_huber_tangent(tangent: Array, *, c: float) -> Array:
  """``g / sqrt(|g|^2 + c^2)``, ``|g|`` the root mean square of each example's features: the
  continuous-time limit of the pseudo-Huber distance ``sqrt(||a||^2 + c^2) - c`` (Song & Dhariwal
  2023, https://arxiv.org/abs/2310.14189; ECT), the form of sCM's tangent normalisation ``g /
  (||g|| + c)`` (Lu & Song 2024, Sec. 4, https://arxiv.org/abs/2410.11081)."""
  dtype = compute_dtype(tangent)
  g = tangent.astype(dtype)
  scale = jax.lax.rsqrt(jnp.square(_rms(g)) + c**2)
  return broadcast_to_data(scale, g) * g


DISTANCES: dict[str, Callable[..., Array]] = {
  "l2": squared_l2_tangent,
  "pseudo_huber": pseudo_huber_tangent,
}


# ---- the objective -------------------------------------------------------------------------


def check(
  *,
  time_sampler: str = "logit_normal",
  time_loc: float = 1.0,
  time_scale: float = 1.4,
  weighting: str = "uniform",
  distance: str = "l2",
  huber_c: float = 0.1,
  label_dropout: float = 0.0,
) -> list[str]:
  """Unknown names, out-of-range values and values the chosen distance or time sampler would
  ignore, one line each."""
  problems = []  # any time_loc is a distribution's mean
  for key, value, table in [
    ("time_sampler", time_sampler, losses_lib.TIME_SAMPLERS),
    ("weighting", weighting, WEIGHTINGS),
    ("distance", distance, DISTANCES),
  ]:
    if value not in table:
      problems.append(f"objective.{key}={value!r}: unknown; choose one of {sorted(table)}")
  if not time_scale > 0:
    problems.append(f"objective.time_scale={time_scale!r}: must be > 0 (the std of logit(t))")
  if not huber_c > 0:
    problems.append(
      f"objective.huber_c={huber_c!r}: must be > 0 (the pseudo-Huber constant; "
      "distance='l2' for none)"
    )
  problems += base.label_dropout_problems(label_dropout)
  unread = {}
  if distance != "pseudo_huber":
    unread["huber_c"] = (huber_c, f"distance={distance!r} does not normalise the tangent")
  if time_sampler != "logit_normal":
    why = f"time_sampler={time_sampler!r} is not 'logit_normal'"
    unread.update(time_loc=(time_loc, why), time_scale=(time_scale, why))
  return problems + base.unread_problems(consistency, unread)


def _time_sampler(name: str, *, loc: float, scale: float) -> losses_lib.TimeSampler:
  if name == "logit_normal":
    return losses_lib.get_time_sampler(name, loc=loc, scale=scale)
  return losses_lib.get_time_sampler(name)


def consistency(
  context: base.ObjectiveContext,
  *,
  time_sampler: str = "logit_normal",
  time_loc: float = 1.0,
  time_scale: float = 1.4,
  weighting: str = "uniform",
  distance: str = "l2",
  huber_c: float = 0.1,
  label_dropout: float = 0.0,
) -> base.Objective:
  """Continuous-time consistency training on the linear path (module docstring): with ``t ~
  time_sampler``, ``x_t = (1 - t) x0 + t x1``, ``v = x1 - x0`` and ``(F^-, g)`` from
  :func:`consistency_tangent` on the stop-gradient parameters,

      L = E[ w(t) 1/D ||F(x_t, t) - sg(F^- + d(g))||^2 ],

  ``d`` the distance's tangent map (``DISTANCES``) and ``w`` the weighting (``WEIGHTINGS``);
  the model ``f = x_t + (1 - t) F`` (:func:`consistency_function`). Lu & Song 2024,
  https://arxiv.org/abs/2410.11081; Geng et al. 2024, https://arxiv.org/abs/2406.14548.

  Args:
    time_sampler: a name of :data:`~diffjax.losses.TIME_SAMPLERS`.
    time_loc, time_scale: ``logit(t) ~ N(time_loc, time_scale^2)`` for "logit_normal" (sCM's
      CIFAR-10 ``P_mean = -1``, ``P_std = 1.4``); unused by the other samplers.
    weighting: "uniform" (``w = 1``) or "endpoint" (``w = 1 - t``).
    distance: "l2" (unbiased) or "pseudo_huber" (the tangent normalised with ``huber_c``,
      sCM's choice for images).
    huber_c: the pseudo-Huber constant ``c``, in units of the tangent's root mean square
      (sCM's 0.1; used by "pseudo_huber" only).
    label_dropout: the fraction of labels dropped for classifier-free guidance.
  """
  problems = check(
    time_sampler=time_sampler,
    time_loc=time_loc,
    time_scale=time_scale,
    weighting=weighting,
    distance=distance,
    huber_c=huber_c,
    label_dropout=label_dropout,
  )
  if problems:
    raise ValueError("; ".join(problems))
  sample_time = _time_sampler(time_sampler, loc=time_loc, scale=time_scale)
  weight_of = lookup(WEIGHTINGS, weighting, "weighting")
  normalise = functools.partial(lookup(DISTANCES, distance, "distance"), c=huber_c)
  path = paths_lib.linear_path()
  num_classes = context.num_classes
  apply = context.apply

  def pair_fn(key, batch):
    """The source draws (independent pairs): no parameters, so fused steps draw them ahead."""
    paired = {"x0": context.source(key, batch["x"].shape[0]), "x": batch["x"]}
    if num_classes and "label" in batch:
      paired["label"] = batch["label"]
    return paired

  def loss_fn(params, key, batch):
    k_time, k_labels, k_dropout = jax.random.split(key, 3)
    x1 = batch["x"]
    labels = batch.get("label") if num_classes else None
    labels = base.drop_labels_for_guidance(
      k_labels, labels, num_classes=num_classes, label_dropout=label_dropout
    )
    t = sample_time(k_time, x1.shape[0])
    pair = path.interpolate(x0=batch["x0"], x1=x1, t=t)
    x_t = pair["x_t"]
    frozen = jax.lax.stop_gradient(params)
    network = lambda x, s: apply(frozen, x, s, labels, dropout_key=k_dropout)
    raw_frozen, tangent = consistency_tangent(network, x_t=x_t, t=t, velocity=pair["target"])
    target = jax.lax.stop_gradient(raw_frozen + normalise(tangent))
    raw = apply(params, x_t, t, labels, dropout_key=k_dropout)
    example = losses_lib.TrainingExample(
      model_input=x_t, model_time=t, cond=labels, target=target, weight=weight_of(t)
    )
    return losses_lib.regression_loss(raw, example)

  generate = samplers_lib.consistency_generator(
    apply=consistency_model(apply), source=context.source, num_classes=num_classes
  )
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=pair_fn,
    host_pairing=None,
    generate=generate,
    log_likelihood=None,
  )


SPEC = base.ObjectiveSpec(
  build=consistency,
  check=check,
  samplers=samplers_lib.CONSISTENCY_SAMPLERS,
  default_sampler="consistency",
  output="F of the consistency function f(x_t, t) = x_t + (1 - t) F(x_t, t)",
  summary="consistency model: continuous-time consistency training (sCM/ECT), multistep sampling",
  any_source=True,
)
