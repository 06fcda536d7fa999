"""The train step: one pure function from (state, batch) to (state, metrics).

A step has two stages. ``pair_fn(key, batch) -> batch`` (optional) draws what the loss needs
besides the data and does not depend on the parameters: for flow matching, the source points and
their minibatch coupling to the data. :func:`update_step` then takes loss, gradients, the optax
update and the EMA on the paired batch. Because pairing never reads the parameters,
:func:`fused_train_steps` pairs the batches of all ``K`` fused steps at once, before its
``lax.scan``.

A coupling solved on the host (exact OT) comes as a :class:`HostPairing` instead: the trainer
runs ``propose`` (:func:`propose_fused_pairs`, :func:`propose_pairs`), solves the stacked problems
on the host between programs, and finishes the pairs inside the update program
(:func:`finish_fused_steps`, :func:`finish_step`). ``K`` fused steps' problems are solved in one
host call, on threads. Why not one program with a callback: see
:class:`diffjax.couplings.HostSolvedCoupling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffjax.objectives import HostPairing
from diffjax.train.posthoc_ema import power_ema_update
from diffjax.train.state import TrainState

__all__ = [
  "LossFn",
  "PairFn",
  "HostPairing",
  "step_keys",
  "update_step",
  "train_step",
  "fused_train_steps",
  "propose_pairs",
  "finish_step",
  "propose_fused_pairs",
  "finish_fused_steps",
]

# loss_fn(params, key, batch) -> scalar loss; built by diffjax.train.experiment from the model's
# apply function and the objective's regression loss.
LossFn = Callable[[Any, jax.Array, Any], jax.Array]
# pair_fn(key, batch) -> batch: the parameter-free part of the objective (source draws, coupling).
PairFn = Callable[[jax.Array, Any], Any]


def step_keys(base_key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(data_key, pair_key, loss_key)`` of step ``step``: ``split(fold_in(base, step), 3)``.

  Every random draw of a step descends from exactly one of the three, by ``split`` only. Mixing
  ``fold_in(k, i)`` with ``split(k, n)`` on one key is a trap: with threefry, ``split(k, n)[i]``
  *equals* ``fold_in(k, i)``, so "independent" streams silently coincide (we had data and
  noise correlated that way: the moon of each point drawn with the same bits as its time ``t``).
  """
  data_key, pair_key, loss_key = jax.random.split(jax.random.fold_in(base_key, step), 3)
  return data_key, pair_key, loss_key


def _split_micro_batches(batch, count: int):
  return jax.tree.map(lambda x: x.reshape((count, x.shape[0] // count) + x.shape[1:]), batch)


def _loss_and_grads(params, key, batch, *, loss_fn: LossFn, accumulate_steps: int):
  """Mean loss and gradient over the batch, computed in ``accumulate_steps`` micro-batches whose
  gradients are averaged in a ``lax.scan`` (memory of one micro-batch, result of the full one)."""
  grad_fn = jax.value_and_grad(loss_fn)
  if accumulate_steps == 1:
    return grad_fn(params, key, batch)
  micro_batches = _split_micro_batches(batch, accumulate_steps)
  keys = jax.random.split(key, accumulate_steps)

  def accumulate(carry, inputs):
    loss_sum, grad_sum = carry
    loss, grads = grad_fn(params, *inputs)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, zeros, (keys, micro_batches))
  return loss_sum / accumulate_steps, jax.tree.map(lambda g: g / accumulate_steps, grad_sum)


def update_step(
  state: TrainState,
  batch,
  *,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  ema_decay: float,
  accumulate_steps: int = 1,
  posthoc_gammas: tuple[float, ...] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
  """Loss, gradients, optax update and EMA ``ema <- d ema + (1 - d) params`` on a paired batch.

  ``posthoc_gammas`` (a :class:`~diffjax.train.state.PosthocTrainState`): each post-hoc EMA
  profile ``k`` also takes the power-function update of exponent ``posthoc_gammas[k]`` at
  ``t = step + 1`` (:func:`diffjax.train.posthoc_ema.power_ema_update`, EDM2).

  ``d = min(ema_decay, (1 + step) / (10 + step))`` warms the average up (TensorFlow's
  ``ExponentialMovingAverage(num_updates=step)``): without it a short run's EMA would still be
  mostly the random initialisation.

  The step's randomness is the loss key of :func:`step_keys`. A step whose loss or gradient
  norm is not finite changes nothing but ``step`` and ``nonfinite_streak`` (the loop halts when the
  streak exceeds ``train.max_nonfinite_steps``), so one bad batch cannot poison the parameters.
  Unlike ``optax.apply_if_finite``, which applies the update anyway after
  ``max_consecutive_errors``, the update is never applied: halting is the loop's job.
  """
  _, _, key = step_keys(state.key, state.step)
  loss, grads = _loss_and_grads(
    state.params, key, batch, loss_fn=loss_fn, accumulate_steps=accumulate_steps
  )
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)

  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  extra = {}
  if posthoc_gammas:
    profiles = tuple(
      power_ema_update(p, params, t=state.step + 1, gamma=g)
      for p, g in zip(state.posthoc_ema, posthoc_gammas, strict=True)
    )
    extra["posthoc_ema"] = keep(profiles, state.posthoc_ema)
  new_state = state.replace(
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    ema_params=keep(ema_params, state.ema_params),
    step=state.step + 1,
    nonfinite_streak=streak,
    **extra,
  )
  return new_state, {"loss": loss, "grad_norm": grad_norm, "nonfinite_streak": streak}


def train_step(
  state: TrainState, batch, *, pair_fn: PairFn | None = None, **update_kwargs
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step: ``pair_fn`` with the step's pair key (if given), then :func:`update_step`."""
  if pair_fn is not None:
    _, pair_key, _ = step_keys(state.key, state.step)
    batch = pair_fn(pair_key, batch)
  return update_step(state, batch, **update_kwargs)


def _chunk_keys(key: jax.Array, first_step: jax.Array, num_steps: int):
  steps = first_step + jnp.arange(num_steps, dtype=jnp.asarray(first_step).dtype)
  data_keys, pair_keys, _ = jax.vmap(step_keys, in_axes=(None, 0))(key, steps)
  return data_keys, pair_keys


def _scan_update_steps(state: TrainState, batches, **update_kwargs):
  """:func:`update_step` over the leading step axis of ``batches``, metrics stacked on it.

  One step runs outside any loop: XLA CPU rewrites convolutions to the dimension order of its
  Eigen kernels (``ConvCanonicalization``) only in a program's entry computation, so the
  gradient convolutions inside a ``lax.scan`` body (a while loop, even of length 1) fall back
  to its naive loop emitter, about ten times slower for a UNet.
  """
  if jax.tree.leaves(batches)[0].shape[0] == 1:
    state, metrics = update_step(state, jax.tree.map(lambda x: x[0], batches), **update_kwargs)
    return state, jax.tree.map(lambda m: m[None], metrics)
  return jax.lax.scan(lambda s, batch: update_step(s, batch, **update_kwargs), state, batches)


def fused_train_steps(
  state: TrainState,
  *,
  num_steps: int,
  sample_batch: Callable,
  pair_fn: PairFn | None = None,
  **update_kwargs,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """``num_steps`` train steps in one ``lax.scan`` for data generated on device.

  Step ``s``'s batch is ``sample_batch(data_key)`` and its pairing ``pair_fn(pair_key, batch)``
  with the keys of :func:`step_keys`, so the batch depends only on the step (exact resume) and
  equals what :func:`train_step` would use. Neither reads the parameters, so all ``num_steps``
  batches are drawn and paired up front, vmapped. Returns the final state and the metrics
  stacked over the fused steps.
  """
  data_keys, pair_keys = _chunk_keys(state.key, state.step, num_steps)
  batches = jax.vmap(sample_batch)(data_keys)
  if pair_fn is not None:
    batches = jax.vmap(pair_fn)(pair_keys, batches)
  return _scan_update_steps(state, batches, **update_kwargs)


def propose_fused_pairs(
  key: jax.Array,
  first_step: jax.Array,
  *,
  num_steps: int,
  sample_batch: Callable,
  propose: Callable,
):
  """The batches of steps ``first_step ... first_step + num_steps - 1`` with their source draws
  and coupling problems, stacked on a leading step axis (the keys of :func:`step_keys`)."""
  data_keys, pair_keys = _chunk_keys(key, first_step, num_steps)
  return jax.vmap(propose)(pair_keys, jax.vmap(sample_batch)(data_keys))


def finish_fused_steps(
  state: TrainState, batches, solutions, *, finish: Callable, **update_kwargs
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The pairs of :func:`propose_fused_pairs`'s batches from the host's ``solutions``, then one
  :func:`update_step` per batch in a ``lax.scan``; equal to :func:`fused_train_steps`."""
  return _scan_update_steps(state, jax.vmap(finish)(batches, solutions), **update_kwargs)


def propose_pairs(key: jax.Array, step: jax.Array, batch, *, propose: Callable):
  """``propose`` with the pair key of step ``step`` (:func:`step_keys`)."""
  _, pair_key, _ = step_keys(key, step)
  return propose(pair_key, batch)


def finish_step(
  state: TrainState, batch, solution, *, finish: Callable, **update_kwargs
) -> tuple[TrainState, dict[str, jax.Array]]:
  """``finish`` the pairs of :func:`propose_pairs` with the host's ``solution``, then
  :func:`update_step`; equal to :func:`train_step` with the composed ``pair_fn``."""
  return update_step(state, finish(batch, solution), **update_kwargs)
