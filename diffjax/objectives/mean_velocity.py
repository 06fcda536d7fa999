"""What MeanFlow and shortcut models share: a network of two times that predicts the mean velocity
between them.

Both regress ``F(x_t, t, s)`` with ``x_s = x_t + (s - t) F(x_t, t, s)`` on the linear path
``x_t = (1 - t) x0 + t x1`` (flow time: source ``t = 0``, data ``t = 1``; conditional velocity
``x1 - x0``) between independent source and data draws (MeanFlow: Geng et al. 2025,
https://arxiv.org/abs/2505.13447; shortcut models: Frans et al. 2024,
https://arxiv.org/abs/2410.12557). Above the network, ``F`` takes the pair ``ts = [batch, 2]``
of rows ``(t, s)``; each objective maps the pair to its network's own two time inputs. Both
sample by jumps (:func:`~diffjax.samplers.generate.few_step_generator`) or through the ODE of
the instantaneous velocity ``F(x, t, t)``, which gives the likelihood where the source is
``N(0, I)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from diffjax import paths as paths_lib
from diffjax.objectives import base
from diffjax.samplers.generate import few_step_generator

__all__ = ["LINEAR_PATH", "PairApply", "independent_pair_fn", "build_objective"]

LINEAR_PATH = paths_lib.icfm_path(sigma=0.0)
"""``x_t = t x1 + (1 - t) x0``, target ``x1 - x0``: I-CFM's path without noise (rectified flow;
Liu et al. 2023, https://arxiv.org/abs/2209.03003), whose trajectories mean velocities follow."""

PairApply = Callable[..., Array]
"""``(params, x_t, ts, cond, dropout_key=None) -> F``, ``ts`` ``[batch, 2]`` rows ``(t, s)``."""


def independent_pair_fn(context: base.ObjectiveContext) -> Callable:
  """``pair_fn(key, batch)``: ``x0 = source(split(key)[0], batch)`` beside the data ``x`` (and
  its labels), paired as drawn: the draws of I-CFM's independent coupling (Tong et al. 2024,
  https://arxiv.org/abs/2302.00482), so the same key gives the same ``x0``."""

  def pair_fn(key, batch):
    k_source, _ = jax.random.split(key)
    x1 = batch["x"]
    paired = {"x0": context.source(k_source, x1.shape[0]), "x": x1}
    if context.num_classes and "label" in batch:
      paired["label"] = batch["label"]
    return paired

  return pair_fn


def build_objective(
  context: base.ObjectiveContext, *, loss_fn: Callable, pair_apply: PairApply, jump_sampler: str
) -> base.Objective:
  """The :class:`~diffjax.objectives.base.Objective` of a mean-velocity model: independent
  pairs, ``loss_fn``, the generator with ``jump_sampler`` as its default, and, for an ``N(0,
  I)`` source, ``log p`` through the ODE of ``v(x, t) = F(x, t, t)`` (data at ``t = 1``)."""
  generate = few_step_generator(
    apply=pair_apply,
    source=context.source,
    jump_sampler=jump_sampler,
    num_classes=context.num_classes,
  )

  def instantaneous(params):
    return lambda x, t: pair_apply(params, x, jnp.stack([t, t], axis=-1), None)

  log_likelihood = None
  if context.source_is_normal:
    log_likelihood = base.flow_likelihood(context, instantaneous)
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=independent_pair_fn(context),
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )
