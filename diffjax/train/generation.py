"""Sample generators for a trained experiment: the model's apply function closed into a sampler.

``flow_generator``: integrate the learned velocity from the source (t = 0) to data (t = 1).
``diffusion_generator``: reverse the discrete diffusion from noise.
Both return ``generate(params, key, num, *, steps, sampler=None, labels=None, guidance=None,
return_trajectories=False) -> {"samples", "trajectories"?, "nfe"}``.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["flow_generator", "diffusion_generator"]


def flow_generator(*, apply: Callable, source: Callable, data_shape: tuple[int, ...]):
  """Euler integration of ``dx/dt = v_theta(x, t)`` over a uniform grid on [0, 1]."""

  @functools.partial(jax.jit, static_argnames=("num", "steps", "return_trajectories"))
  def _generate(params, key, num, steps, return_trajectories):
    x0 = source(key, num)
    dt = 1.0 / steps

    def step(x, i):
      t = jnp.full((num,), i * dt, x.dtype)
      x = x + dt * apply(params, x, t, None)
      return x, x

    x1, path = jax.lax.scan(step, x0, jnp.arange(steps))
    trajectories = jnp.concatenate([x0[None], path]) if return_trajectories else None
    return x1, trajectories

  def generate(params, key, num, *, steps, sampler=None, labels=None, guidance=None,
               return_trajectories=False):
    del sampler, labels, guidance
    samples, trajectories = _generate(params, key, num, steps, return_trajectories)
    out = {"samples": samples, "nfe": steps}
    if return_trajectories:
      out["trajectories"] = trajectories
    return out

  return generate


def diffusion_generator(*, apply: Callable, schedule, prediction: str,
                        data_shape: tuple[int, ...]):
  raise NotImplementedError("wired to diffjax.samplers next")
