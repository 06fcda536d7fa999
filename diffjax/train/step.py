"""The train step: one pure function from (state, batch) to (state, metrics)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffjax.train.state import TrainState

__all__ = ["LossFn", "step_keys", "train_step", "fused_train_steps"]

# loss_fn(params, key, batch) -> scalar loss; built by diffjax.train.objective from the model's
# apply function, the objective's pair-making and the regression loss.
LossFn = Callable[[Any, jax.Array, Any], jax.Array]


def step_keys(base_key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(data_key, loss_key)`` of step ``step``: the two halves of ``split(fold_in(base, step))``.

  Every random draw of a step descends from exactly one of the two, by ``split`` only. Mixing
  ``fold_in(k, i)`` with ``split(k, n)`` on one key is a trap: with threefry, ``split(k, n)[i]``
  *equals* ``fold_in(k, i)``, so "independent" streams silently coincide (we had data and
  noise correlated that way: the moon of each point drawn with the same bits as its time ``t``).
  """
  data_key, loss_key = jax.random.split(jax.random.fold_in(base_key, step))
  return data_key, loss_key


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


def train_step(state: TrainState, batch, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, ema_decay: float,
               accumulate_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """Loss, gradients, optax update and EMA ``ema <- d ema + (1 - d) params``.

  ``d = min(ema_decay, (1 + step) / (10 + step))`` warms the average up (TensorFlow's
  ``ExponentialMovingAverage(num_updates=step)``): without it a short run's EMA would still be
  mostly the random initialisation.

  The step's randomness is the loss key of :func:`step_keys`. A step whose loss or gradient
  norm is not finite changes nothing but ``step`` and ``nonfinite_streak`` (the loop halts when the
  streak exceeds ``train.max_nonfinite_steps``), so one bad batch cannot poison the parameters.
  Unlike ``optax.apply_if_finite``, which applies the update anyway after
  ``max_consecutive_errors``, the update is never applied: halting is the loop's job.
  """
  _, key = step_keys(state.key, state.step)
  loss, grads = _loss_and_grads(state.params, key, batch, loss_fn=loss_fn,
                                accumulate_steps=accumulate_steps)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)

  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  new_state = state.replace(
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema_params, state.ema_params),
      step=state.step + 1,
      nonfinite_streak=streak,
  )
  return new_state, {"loss": loss, "grad_norm": grad_norm, "nonfinite_streak": streak}


def fused_train_steps(state: TrainState, *, num_steps: int, sample_batch: Callable,
                      **step_kwargs) -> tuple[TrainState, dict[str, jax.Array]]:
  """``num_steps`` train steps in one ``lax.scan`` for data generated on device.

  ``sample_batch(key)`` draws step ``s``'s batch from the data key of :func:`step_keys`, a
  branch apart from the loss key, so data and noise never share randomness and the batch depends
  only on the step (exact resume). Returns the final state and
  the metrics stacked over the fused steps.
  """
  def body(state, _):
    data_key, _ = step_keys(state.key, state.step)
    return train_step(state, sample_batch(data_key), **step_kwargs)

  return jax.lax.scan(body, state, None, length=num_steps)
