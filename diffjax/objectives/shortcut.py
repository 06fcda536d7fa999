"""Shortcut models: one network for every step size (Frans, Hafner, Levine & Abbeel 2024, "One
Step Diffusion via Shortcut Models", https://arxiv.org/abs/2410.12557).

Time is the paper's own, flow time from the source (``t = 0``) to the data (``t = 1``) on the
linear path ``x_t = (1 - t) x0 + t x1``. The model ``s(x_t, t, d)`` is the mean velocity over a
step of size ``d``, ``x_{t + d} ~ x_t + d s(x_t, t, d)``; at ``d = 0`` it is the flow velocity.

Training. Each batch splits into

* flow-matching rows: ``t ~ time_sampler``, ``d = 0``, target ``x1 - x0`` (I-CFM with
  ``sigma = 0``);
* self-consistency rows, the first ``round(bootstrap_fraction * B)``: a step ``2d = 2^-k``,
  ``k ~ U{0, ..., log2(M) - 1}``, from ``t ~ U{0, 2d, ..., 1 - 2d}`` (the grid that steps of
  ``2d`` visit), regressed on two half steps::

    s(x_t, t, 2d) <- sg[(s(x_t, t, d) + s(x'_{t + d}, t + d, d)) / 2],
    x'_{t + d} = x_t + d s(x_t, t, d),

and the loss is the mean squared error over all rows (the paper's self-consistency loss, the
second half step at time ``t + d``). As in the reference code (github.com/kvfrans/shortcut-models,
``targets_shortcut.py``), the midpoint ``x'_{t + d}`` and the target are clipped to the box
``[-c, c]`` (``bootstrap_clip``, the reference's 4): a model whose outputs grow cannot feed its
own growth back through its targets. A true mean velocity is an average of ``x1 - x0``, so a box
wider than the data's extent never changes the target of a good model. The half steps use the
current parameters without dropout: the reference code can use the EMA's, which a loss does not
see (the trainer's ``loss_fn(params, key, batch)`` gets the parameters being differentiated
only). The finest half step, ``d = 1/M``, is read as ``d = 0``, the flow velocity, as in the
paper. Sampling jumps ``steps`` times with ``d = 1 / steps``.

The network's step-size input is the level ``lambda(d) = log2(1 / max(d, 1/M)) / log2(M)`` in
``[0, 1]``: 0 for one step of size 1, 1 for the finest step ``1/M`` and for ``d = 0``: the
reference code's integer ``log2(1/d)`` (flow matching at the finest step's value), scaled to the
range of a time. ``steps > M`` reads as ``M``.
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
  "step_level",
  "network_times",
  "sample_steps",
  "self_consistency_target",
  "shortcut_example",
  "shortcut",
  "check",
  "SPEC",
]


def step_level(d: Array, *, max_steps: int) -> Array:
  """``lambda(d) = log2(1 / max(d, 1/M)) / log2(M)``, the step size as the network sees it: 0 at
  ``d = 1``, 1 at ``d <= 1/M`` (``d = 0`` included). Frans et al. 2024,
  https://arxiv.org/abs/2410.12557, condition on ``log2(1/d)``; here scaled to ``[0, 1]``."""
  finest = 1.0 / max_steps
  return -jnp.log2(jnp.maximum(d, finest)) / math.log2(max_steps)


def network_times(ts: Array, *, max_steps: int) -> Array:
  """The network's two time inputs ``(t, lambda(s - t))`` for pairs ``ts = [batch, 2]`` of rows
  ``(t, s)``, ``d = s - t`` the step size."""
  t, s = ts[:, 0], ts[:, 1]
  return jnp.stack([t, step_level(s - t, max_steps=max_steps)], axis=-1)


def sample_steps(key: Array, batch: int, *, max_steps: int) -> tuple[Array, Array]:
  """``(t, d)``, ``[batch]`` each, of the self-consistency rows: ``2d = 2^-k`` with ``k ~
  U{0, ..., log2(M) - 1}`` (so ``d`` in ``{1/M, ..., 1/2}``) and ``t = j 2d``, ``j ~ U{0, ...,
  2^k - 1}``: the starts and steps a sampler of ``2^k`` steps uses (Frans et al. 2024,
  https://arxiv.org/abs/2410.12557; the reference code spreads ``k`` evenly, here it is drawn)."""
  k_level, k_start = jax.random.split(key)
  levels = jax.random.randint(k_level, (batch,), 0, int(math.log2(max_steps)))
  sections = jnp.left_shift(1, levels)  # 2^k steps of size 2d = 2^-k
  start = jax.random.randint(k_start, (batch,), 0, sections)
  full = 1.0 / sections.astype(jnp.float32)
  return start.astype(jnp.float32) * full, 0.5 * full


def self_consistency_target(
  field, *, x_t: Array, t: Array, d: Array, clip: float = math.inf
) -> Array:
  """``sg[clip_c((s(x_t, t, d) + s(x', t + d, d)) / 2)]`` with ``x' = clip_c(x_t + d s(x_t, t,
  d))``: one step of ``2d`` as two steps of ``d`` (Frans et al. 2024,
  https://arxiv.org/abs/2410.12557), ``clip_c`` the elementwise clip to ``[-c, c]`` of the
  reference code (``c = inf``: none).

  Args:
    field: ``(x, ts) -> s`` with ``ts = [batch, 2]`` rows ``(t, t + d)``.
    x_t: ``[batch, ...]`` points; t, d: ``[batch]``.
    clip: ``c > 0``, the half width of the box the midpoint and the target are clipped to.
  """
  first = field(x_t, jnp.stack([t, t + d], axis=-1))
  x_mid = jnp.clip(x_t + broadcast_to_data(d, first).astype(first.dtype) * first, -clip, clip)
  second = field(x_mid, jnp.stack([t + d, t + 2 * d], axis=-1))
  return jax.lax.stop_gradient(jnp.clip(0.5 * (first + second), -clip, clip))


def shortcut_example(
  key: Array,
  *,
  x0: Array,
  x1: Array,
  field,
  num_bootstrap: int,
  max_steps: int,
  time_sampler: losses_lib.TimeSampler,
  cond: Array | None = None,
  bootstrap_clip: float = math.inf,
) -> losses_lib.TrainingExample:
  """The regression pairs of one batch (see the module docstring): rows ``[:num_bootstrap]``
  self-consistency, the rest flow matching at ``d = 0``; ``model_time`` is ``[batch, 2]`` rows
  ``(t, t + step)`` (step ``2d`` or 0), weights 1.

  The flow-matching rows are :func:`~diffjax.losses.flow_matching_example` of the noise-free
  linear path on ``key``, I-CFM's draws with ``sigma = 0``; the self-consistency rows draw from
  ``fold_in(key, 1)``.

  Args:
    key: PRNG key.
    x0, x1: ``[batch, ...]`` source and data, paired.
    field: ``(x, ts) -> s``, the model (its output is stop-gradient'ed here).
    num_bootstrap: how many rows are self-consistency rows (static).
    max_steps: ``M``, a power of two.
    time_sampler: the flow-matching rows' times.
    cond: ``[batch]`` labels or None (the model's ``field`` closes over them for the targets).
    bootstrap_clip: the box of :func:`self_consistency_target` (``inf``: no clipping).
  """
  fm = losses_lib.flow_matching_example(
    key,
    x0=x0[num_bootstrap:],
    x1=x1[num_bootstrap:],
    path=mean_velocity.LINEAR_PATH,
    time_sampler=time_sampler,
  )
  if num_bootstrap == 0:
    times, x_t, target = fm.model_time, fm.model_input, fm.target
    return losses_lib.TrainingExample(
      model_input=x_t,
      model_time=jnp.stack([times, times], axis=-1),
      cond=cond,
      target=target,
      weight=jnp.ones_like(times),
    )
  t, d = sample_steps(jax.random.fold_in(key, 1), num_bootstrap, max_steps=max_steps)
  pair = mean_velocity.LINEAR_PATH.interpolate(x0=x0[:num_bootstrap], x1=x1[:num_bootstrap], t=t)
  boot_target = self_consistency_target(field, x_t=pair["x_t"], t=t, d=d, clip=bootstrap_clip)
  fm_times = jnp.stack([fm.model_time, fm.model_time], axis=-1)
  times = jnp.concatenate([jnp.stack([t, t + 2 * d], axis=-1), fm_times])
  return losses_lib.TrainingExample(
    model_input=jnp.concatenate([pair["x_t"], fm.model_input]),
    model_time=times,
    cond=cond,
    target=jnp.concatenate([boot_target.astype(fm.target.dtype), fm.target]),
    weight=jnp.ones(times.shape[:1], fm.target.dtype),
  )


def shortcut(
  context: base.ObjectiveContext,
  *,
  bootstrap_fraction: float = 0.25,
  max_steps: int = 128,
  time_sampler: str = "uniform",
  label_dropout: float = 0.0,
  bootstrap_clip: float = 4.0,
) -> base.Objective:
  """Shortcut models (Frans et al. 2024, https://arxiv.org/abs/2410.12557); see the module
  docstring. Defaults are the paper's: a quarter of each batch self-consistency rows
  (``bootstrap_every = 4``), ``M = 128`` (the finest step 1/128).

  Args:
    context: the model and source (the edge resolves them).
    bootstrap_fraction: fraction of each batch trained on the self-consistency target.
    max_steps: ``M``, the number of the finest steps (a power of two >= 2).
    time_sampler: a name in :data:`~diffjax.losses.TIME_SAMPLERS`, the flow-matching rows' times
      (the reference code draws them on the grid of ``1/M``).
    label_dropout: label dropout for classifier-free guidance (conditional models).
    bootstrap_clip: ``c``, the self-consistency midpoint and target are clipped to ``[-c, c]``
      (the reference code's 4, for data of unit scale; ``inf`` turns it off). Choose ``c`` above
      the largest ``|x1 - x0|`` coordinate, or the clip biases the targets of a good model.
  """
  num_classes = context.num_classes
  sample_time = losses_lib.get_time_sampler(time_sampler)

  def pair_apply(params, x, ts, cond, dropout_key=None):
    times = network_times(ts, max_steps=max_steps)
    return context.apply(params, x, times, cond, dropout_key=dropout_key)

  def loss_fn(params, key, batch):
    k_example, k_labels, k_dropout = jax.random.split(key, 3)
    labels = batch.get("label") if num_classes else None
    labels = base.drop_labels_for_guidance(
      k_labels, labels, num_classes=num_classes, label_dropout=label_dropout
    )
    x0, x1 = batch["x0"], batch["x"]
    num_bootstrap = int(round(bootstrap_fraction * x1.shape[0]))
    labels_boot = None if labels is None else labels[:num_bootstrap]
    example = shortcut_example(
      k_example,
      x0=x0,
      x1=x1,
      field=lambda x, ts: pair_apply(params, x, ts, labels_boot),
      num_bootstrap=num_bootstrap,
      max_steps=max_steps,
      time_sampler=sample_time,
      cond=labels,
      bootstrap_clip=bootstrap_clip,
    )
    output = pair_apply(
      params, example.model_input, example.model_time, example.cond, dropout_key=k_dropout
    )
    return losses_lib.regression_loss(output, example)

  return mean_velocity.build_objective(
    context, loss_fn=loss_fn, pair_apply=pair_apply, jump_sampler="shortcut"
  )


def check(
  *,
  bootstrap_fraction: float = 0.25,
  max_steps: int = 128,
  time_sampler: str = "uniform",
  label_dropout: float = 0.0,
  bootstrap_clip: float = 4.0,
) -> list[str]:
  """Unknown names and out-of-range values, one line each."""
  problems = []
  if time_sampler not in losses_lib.TIME_SAMPLERS:
    problems.append(
      f"objective.time_sampler={time_sampler!r}: unknown; choose one of "
      f"{sorted(losses_lib.TIME_SAMPLERS)}"
    )
  if not 0.0 <= bootstrap_fraction <= 1.0:
    problems.append(
      f"objective.bootstrap_fraction={bootstrap_fraction!r}: a fraction of the batch, in [0, 1] "
      "(0 is plain flow matching)"
    )
  if isinstance(max_steps, bool) or max_steps < 2 or max_steps & (max_steps - 1):
    problems.append(
      f"objective.max_steps={max_steps!r}: must be a power of two >= 2 (the paper: 128)"
    )
  if isinstance(bootstrap_clip, bool) or not bootstrap_clip > 0:
    problems.append(
      f"objective.bootstrap_clip={bootstrap_clip!r}: the half width of the box the "
      "self-consistency targets are clipped to, > 0 (the reference: 4.0; inf: no clipping)"
    )
  problems += base.label_dropout_problems(label_dropout)
  return problems


SPEC = base.ObjectiveSpec(
  build=shortcut,
  check=check,
  samplers=("shortcut",) + samplers_lib.FLOW_SAMPLERS,
  default_sampler="shortcut",
  output="shortcut s(x, t, d)",
  summary="Shortcut models: s(x, t, d) by self-consistency of step sizes (Frans et al. 2024)",
  any_source=True,
  time_inputs=2,
)
