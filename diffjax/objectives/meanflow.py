"""MeanFlow: one-step generation by regressing the average velocity (Geng, Deng, Bai, Kolter & He
2025, "Mean Flows for One-step Generative Modeling", https://arxiv.org/abs/2505.13447).

Time. Flow time runs from the source (``t = 0``) to the data (``t = 1``) on the linear path
``z_t = (1 - t) x0 + t x1``, whose conditional velocity is ``v = x1 - x0``. The paper's time runs
the other way (data at 0, noise at 1, its ``u(z_t, r, t)`` with ``r < t``); here the model is the
average velocity from ``t`` forward to ``s >= t``::

  u(z_t, t, s) = 1 / (s - t) int_t^s v(z_tau, tau) d tau,   so   z_s = z_t + (s - t) u(z_t, t, s),

and ``u(z_t, t, t) = v(z_t, t)``, the flow-matching velocity.

The identity, in this time direction. Write ``(s - t) u(z_t, t, s) = int_t^s v(z_tau, tau) d
tau`` and differentiate in ``t`` along the trajectory, ``s`` held fixed (``dz_t / dt = v``,
``ds / dt = 0``)::

  left:   d/dt [(s - t) u] = -u + (s - t) du/dt              (product rule)
  right:  d/dt int_t^s v(z_tau, tau) d tau = -v(z_t, t)       (fundamental theorem of calculus)

  =>  u(z_t, t, s) = v(z_t, t) + (s - t) du/dt,   du/dt = (d_z u) v + d_t u.

The total derivative is one Jacobian-vector product of the network with tangents ``(v, 1, 0)``
for ``(z, t, s)``. (Substituting ``t -> 1 - t`` flips the signs of ``v`` and of ``d/dt`` and
gives the paper's ``u = v - (t - r) du/dt``.)

Training (the paper's Algorithm 1, in this time direction): ``u_tgt = v + (s - t) sg(du_theta /
dt)`` with the conditional ``v = x1 - x0`` both as the velocity and as the jvp's tangent (its
expectation given ``z_t`` is the marginal velocity, and ``u_tgt`` is linear in it, so the
conditional target has the marginal target's expectation: the Dirac decoupling of flow matching);
loss ``sg(w) ||u_theta - sg(u_tgt)||^2`` with the adaptive weight ``w = 1 / (||Delta||^2 + c)^p``.
At ``s = t`` the target is ``v`` and the loss is flow matching's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array

from diffjax import losses as losses_lib
from diffjax import samplers as samplers_lib
from diffjax.objectives import base, mean_velocity
from diffjax.shapes import broadcast_to_data

__all__ = [
  "TIME_INPUTS",
  "network_times",
  "sample_time_pairs",
  "meanflow_target",
  "adaptive_weight",
  "meanflow_loss",
  "meanflow",
  "check",
  "SPEC",
]

TIME_INPUTS = ("interval", "endpoints")
"""What the network's two time inputs are: ``(t, s - t)`` (the paper's best, its ``(t, t - r)``)
or ``(t, s)``."""


def network_times(ts: Array, *, time_input: str) -> Array:
  """The network's two time inputs for the pairs ``ts = [batch, 2]`` of rows ``(t, s)``:
  ``(t, s - t)`` for "interval", ``(t, s)`` for "endpoints" (Geng et al. 2025, the ablation of
  the time conditioning in Table 1, https://arxiv.org/abs/2505.13447)."""
  if time_input == "endpoints":
    return ts
  return jnp.stack([ts[:, 0], ts[:, 1] - ts[:, 0]], axis=-1)


def sample_time_pairs(
  key: Array, batch: int, *, time_sampler: losses_lib.TimeSampler, interval_fraction: float
) -> tuple[Array, Array]:
  """``(t, s)``, ``[batch]`` each, with ``0 <= t <= s <= 1``.

  Two independent draws of ``time_sampler``, the smaller ``t`` and the larger ``s``; then on all
  but ``round(interval_fraction * batch)`` examples (at random places) ``s = t``, plain flow
  matching (Geng et al. 2025, the "ratio of r != t" of Table 1, 25% best,
  https://arxiv.org/abs/2505.13447).

  Args:
    key: PRNG key.
    batch: number of pairs.
    time_sampler: ``(key, batch) -> [batch]`` times in ``[0, 1]``.
    interval_fraction: the fraction of pairs with ``s != t``.
  """
  k_first, k_second, k_place = jax.random.split(key, 3)
  a, b = time_sampler(k_first, batch), time_sampler(k_second, batch)
  t, s = jnp.minimum(a, b), jnp.maximum(a, b)
  num_intervals = int(round(interval_fraction * batch))
  distinct = jax.random.permutation(k_place, jnp.arange(batch) < num_intervals)
  return t, jnp.where(distinct, s, t)


def meanflow_target(u_fn, *, z: Array, t: Array, s: Array, velocity: Array) -> tuple[Array, Array]:
  """The prediction ``u = u_fn(z, t, s)`` and its MeanFlow target, from one ``jax.jvp``.

  ``u_tgt = v + (s - t) du/dt`` with ``du/dt = (d_z u) v + d_t u``, the jvp of ``u_fn`` at
  ``(z, t, s)`` along ``(v, 1, 0)``; ``u_tgt`` is stop-gradient'ed, ``u`` carries the gradient
  (the MeanFlow identity in flow time, see the module docstring; Geng et al. 2025,
  https://arxiv.org/abs/2505.13447).

  Args:
    u_fn: ``(z [batch, ...], t [batch], s [batch]) -> [batch, ...]`` the average velocity.
    z: ``[batch, ...]`` points ``z_t``.
    t, s: ``[batch]`` start and end times.
    velocity: ``[batch, ...]`` the velocity ``v`` at ``(z_t, t)`` (the conditional ``x1 - x0`` in
      training, the marginal field for the identity itself).

  Returns:
    ``(u, u_tgt)``.
  """
  u, du_dt = jax.jvp(u_fn, (z, t, s), (velocity, jnp.ones_like(t), jnp.zeros_like(s)))
  target = velocity + broadcast_to_data(s - t, du_dt).astype(du_dt.dtype) * du_dt
  return u, jax.lax.stop_gradient(target)


def adaptive_weight(squared_norm: Array, *, power: float, eps: float) -> Array:
  """``w = sg(1 / (||Delta||^2 + c)^p)`` per example (Geng et al. 2025, adaptive loss weighting,
  ``p = 1`` best in their ablation, https://arxiv.org/abs/2505.13447; ``p = 1/2`` is close to
  the pseudo-Huber loss). ``p = 0`` gives ``w = 1``.

  With ``p > 0`` the loss is a robust M-estimator: where the conditional target given ``z_t`` is
  spread over several modes and ``||Delta||^2`` varies with the draw (low dimensions, 2D toys),
  its minimiser is pulled toward a mode, away from the conditional mean that flow matching
  needs; configs/toy2d_meanflow.py trains with ``p = 0`` for this reason."""
  return jax.lax.stop_gradient((squared_norm + eps) ** -power)


def meanflow_loss(u: Array, target: Array, *, weight_power: float, weight_eps: float) -> Array:
  """``1/B sum_i w_i 1/D sum_d (u_i,d - target_i,d)^2``, ``w_i = adaptive_weight(||u_i -
  target_i||^2)`` with the squared norm summed over the ``D`` dimensions, as the paper's ``c``
  expects; the per-dimension mean is diffjax's regression loss (:func:`losses.regression_loss`),
  which ``weight_power = 0`` gives exactly."""
  delta = (u - target).astype(jnp.promote_types(u.dtype, jnp.float32))
  squared = jnp.square(delta).reshape(delta.shape[0], -1)
  w = adaptive_weight(jnp.sum(squared, axis=-1), power=weight_power, eps=weight_eps)
  return jnp.mean(w * jnp.mean(squared, axis=-1))


def _time_sampler(name: str, loc: float, scale: float) -> losses_lib.TimeSampler:
  if name == "logit_normal":
    return losses_lib.get_time_sampler(name, loc=loc, scale=scale)
  return losses_lib.get_time_sampler(name)


def meanflow(
  context: base.ObjectiveContext,
  *,
  interval_fraction: float = 0.25,
  time_sampler: str = "logit_normal",
  time_loc: float = 0.4,
  time_scale: float = 1.0,
  weight_power: float = 1.0,
  weight_eps: float = 1e-3,
  time_input: str = "interval",
  label_dropout: float = 0.0,
) -> base.Objective:
  """MeanFlow (Geng et al. 2025, https://arxiv.org/abs/2505.13447); see the module docstring.

  The defaults are the paper's ImageNet ablation choices (its Table 1): 25% of pairs with
  ``s != t``, times logit-normal with the paper's ``(-0.4, 1.0)`` (``loc = +0.4`` in this flow
  time, which runs the other way), adaptive weighting ``p = 1``, ``c = 10^-3``, the network
  conditioned on ``(t, s - t)``.

  Args:
    context: the model and source (the edge resolves them).
    interval_fraction: fraction of each batch with ``s != t`` (the rest is flow matching).
    time_sampler: a name in :data:`~diffjax.losses.TIME_SAMPLERS` for both draws of a pair.
    time_loc, time_scale: the logit-normal's location and scale (``time_sampler =
      "logit_normal"`` only), in this flow time.
    weight_power, weight_eps: ``p`` and ``c`` of the adaptive weight (``p = 0``: plain L2).
    time_input: "interval" (the network sees ``(t, s - t)``) or "endpoints" (``(t, s)``).
    label_dropout: label dropout for classifier-free guidance (conditional models).
  """
  num_classes = context.num_classes
  sample_time = _time_sampler(time_sampler, time_loc, time_scale)

  def pair_apply(params, x, ts, cond, dropout_key=None):
    times = network_times(ts, time_input=time_input)
    return context.apply(params, x, times, cond, dropout_key=dropout_key)

  def loss_fn(params, key, batch):
    k_example, k_labels, k_dropout = jax.random.split(key, 3)
    labels = batch.get("label") if num_classes else None
    labels = base.drop_labels_for_guidance(
      k_labels, labels, num_classes=num_classes, label_dropout=label_dropout
    )
    x0, x1 = batch["x0"], batch["x"]
    t, s = sample_time_pairs(
      k_example, x1.shape[0], time_sampler=sample_time, interval_fraction=interval_fraction
    )
    path = mean_velocity.LINEAR_PATH.interpolate(x0=x0, x1=x1, t=t)

    def u_fn(z, t, s):
      return pair_apply(params, z, jnp.stack([t, s], axis=-1), labels, dropout_key=k_dropout)

    u, target = meanflow_target(u_fn, z=path["x_t"], t=t, s=s, velocity=path["target"])
    return meanflow_loss(u, target, weight_power=weight_power, weight_eps=weight_eps)

  return mean_velocity.build_objective(
    context, loss_fn=loss_fn, pair_apply=pair_apply, jump_sampler="meanflow"
  )


def check(
  *,
  interval_fraction: float = 0.25,
  time_sampler: str = "logit_normal",
  time_loc: float = 0.4,
  time_scale: float = 1.0,
  weight_power: float = 1.0,
  weight_eps: float = 1e-3,
  time_input: str = "interval",
  label_dropout: float = 0.0,
) -> list[str]:
  """Unknown names and out-of-range values, one line each."""
  problems = []
  if time_sampler not in losses_lib.TIME_SAMPLERS:
    problems.append(
      f"objective.time_sampler={time_sampler!r}: unknown; choose one of "
      f"{sorted(losses_lib.TIME_SAMPLERS)}"
    )
  elif time_sampler != "logit_normal":
    why = f"only the logit_normal time sampler reads it (time_sampler={time_sampler!r})"
    unread = {"time_loc": (time_loc, why), "time_scale": (time_scale, why)}
    problems += base.unread_problems(meanflow, unread)
  if time_input not in TIME_INPUTS:
    problems.append(f"objective.time_input={time_input!r}: unknown; choose one of {TIME_INPUTS}")
  if not 0.0 <= interval_fraction <= 1.0:
    problems.append(
      f"objective.interval_fraction={interval_fraction!r}: a fraction of the batch, in [0, 1] "
      "(0 is plain flow matching)"
    )
  if not (math.isfinite(time_loc) and math.isfinite(time_scale) and time_scale > 0):
    problems.append(
      f"objective.time_scale={time_scale!r}: the logit-normal needs a finite loc and a scale > 0"
    )
  if weight_power == 0:
    why = "with weight_power=0 the weight is 1 whatever c"
    problems += base.unread_problems(meanflow, {"weight_eps": (weight_eps, why)})
  if not weight_power >= 0:
    problems.append(
      f"objective.weight_power={weight_power!r}: must be >= 0 (0: plain L2, 1: the paper's)"
    )
  if not weight_eps > 0:
    problems.append(
      f"objective.weight_eps={weight_eps!r}: the adaptive weight's c must be > 0 (paper: 1e-3)"
    )
  problems += base.label_dropout_problems(label_dropout)
  return problems


SPEC = base.ObjectiveSpec(
  build=meanflow,
  check=check,
  samplers=("meanflow",) + samplers_lib.FLOW_SAMPLERS,
  default_sampler="meanflow",
  output="average velocity u(z, t, s)",
  summary="MeanFlow: average velocity u(z, t, s) by the MeanFlow identity (Geng et al. 2025)",
  any_source=True,
  time_inputs=2,
)
