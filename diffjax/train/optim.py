"""The optimizer from config: Adam/AdamW, warm-up then constant or cosine decay, clipping.

Gradient accumulation is not an optimizer wrapper here: the train step splits its batch into
micro-batches and averages their gradients in a ``lax.scan`` (diffjax.train.step), so one step is
always one update on ``train.batch_size`` examples whatever ``train.accumulate_steps`` is."""

from __future__ import annotations

import optax

__all__ = ["learning_rate_schedule", "make_optimizer"]


def learning_rate_schedule(
  *, learning_rate: float, warmup_steps: int, decay: str, total_steps: int
) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then constant or cosine decay to 0 at
  ``total_steps`` (Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983)."""
  if decay == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, learning_rate, warmup_steps),
        optax.constant_schedule(learning_rate),
      ],
      [warmup_steps],
    )
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=0.0,
    )
  raise ValueError(f"optimizer.decay={decay!r}: choose 'constant' or 'cosine'")


def make_optimizer(
  *,
  name: str,
  learning_rate: float,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float,
  warmup_steps: int,
  decay: str,
  grad_clip_norm: float,
  total_steps: int,
) -> optax.GradientTransformation:
  """``config.optimizer`` as an optax transformation (the sub-dict is exactly these keywords,
  plus ``total_steps`` from ``config.train.steps``).

  Clipping by global norm comes first, as in TorchCFM's CIFAR-10 recipe.
  """
  schedule = learning_rate_schedule(
    learning_rate=learning_rate, warmup_steps=warmup_steps, decay=decay, total_steps=total_steps
  )
  if name == "adam":
    if weight_decay:
      # Adam with L2 decay added to the gradient (PyTorch's Adam(weight_decay=...)).
      core = optax.chain(
        optax.add_decayed_weights(weight_decay), optax.adam(schedule, b1=b1, b2=b2, eps=eps)
      )
    else:
      core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  else:
    raise ValueError(f"optimizer.name={name!r}: choose 'adam' or 'adamw'")
  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  return optax.chain(*chain, core)
