"""The train state: one pytree holding everything a resumed run needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "PosthocTrainState", "init_train_state"]


@flax.struct.dataclass
class TrainState:
  """Parameters, optimizer state, EMA parameters, step and the run's base key.

  ``key`` never changes: step ``s`` draws its randomness from ``fold_in(key, s)`` (big_vision,
  vdm; see :func:`diffjax.train.step.step_keys`), so a resumed run replays exactly the keys an
  uninterrupted one would.
  ``nonfinite_streak`` counts consecutive steps whose loss or gradient was not finite (their
  update is skipped), and survives checkpoints with the rest.
  """

  params: Any
  opt_state: Any
  ema_params: Any
  step: jax.Array
  key: jax.Array
  nonfinite_streak: jax.Array


@flax.struct.dataclass
class PosthocTrainState(TrainState):
  """A :class:`TrainState` that also tracks post-hoc EMA profiles (EDM2,
  :mod:`diffjax.train.posthoc_ema`): ``posthoc_ema`` holds one parameter tree per tracked
  ``sigma_rel``. A class of its own, so a run without post-hoc EMA keeps the checkpoint layout
  of :class:`TrainState` and older workdirs resume unchanged."""

  posthoc_ema: tuple = ()


def init_train_state(
  *,
  key: jax.Array,
  init_params: Callable[[jax.Array], Any],
  optimizer: optax.GradientTransformation,
  posthoc_profiles: int = 0,
) -> TrainState:
  """Creates the state from a base key: ``split(key)`` gives the initialisation key and the
  run's base key, two separate branches, so no step key repeats the initialisation's. With
  ``posthoc_profiles > 0``, a :class:`PosthocTrainState` with that many copies of the
  parameters as the post-hoc EMA profiles."""
  init_key, base_key = jax.random.split(key)
  params = init_params(init_key)
  fields = dict(
    params=params,
    opt_state=optimizer.init(params),
    ema_params=jax.tree.map(jnp.copy, params),
    step=jnp.zeros((), jnp.int32),
    key=base_key,
    nonfinite_streak=jnp.zeros((), jnp.int32),
  )
  if posthoc_profiles:
    profiles = tuple(jax.tree.map(jnp.copy, params) for _ in range(posthoc_profiles))
    return PosthocTrainState(**fields, posthoc_ema=profiles)
  return TrainState(**fields)
