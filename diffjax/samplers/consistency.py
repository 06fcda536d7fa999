"""Multistep consistency sampling in flow time (source at ``t = 0``, data at ``t = 1``).

A consistency function ``f(x_t, t)`` maps any point of a probability-flow ODE trajectory to the
trajectory's data end. Song et al. (2023), "Consistency Models", Algorithm 1,
https://arxiv.org/abs/2303.01469, sample with it in ``N`` network evaluations: one jump from the
prior, then ``N - 1`` rounds of re-noising to an earlier time and jumping again. In flow time
with a source sampler instead of Gaussian noise, the re-noising is a fresh draw of the path:

    x = f(x0, t_0),  then for k = 1 .. N - 1:
        x_{t_k} = (1 - t_k) x0' + t_k x,   x0' ~ source (fresh),   x = f(x_{t_k}, t_k).

With the exact ``f``, ``x`` after every round is a sample of the data (``x_{t_k}`` has the
path's marginal at ``t_k``, which ``f`` transports to the data), so more steps only correct the
errors of a learned ``f``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.samplers.fields import Predictor, SamplerOutput, prepend_initial
from diffjax.samplers.guidance import classifier_free_guidance
from diffjax.shapes import broadcast_to_data

__all__ = ["multistep_times", "multistep_consistency_sample", "consistency_sampler"]


def multistep_times(*, num_steps: int) -> Array:
  """The ``N`` flow times a consistency function is evaluated at: ``t_k = k / N``, ``k = 0 ..
  N - 1`` (``t_0 = 0``, the source). Uniform in flow time, the re-noising of each round keeps a
  share ``1 - t_k`` of fresh source, Song et al.'s (2023, Algorithm 1) decreasing noise levels.

  Args:
    num_steps: ``N >= 1``, the number of network evaluations.
  """
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: must be a positive integer")
  return jnp.arange(num_steps, dtype=jnp.float32) / num_steps


def multistep_consistency_sample(
  key: Array,
  consistency_fn: Predictor,
  noise: Array,
  *,
  times: Array,
  source: Callable[[Array, int], Array],
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Song et al.'s (2023) multistep consistency sampling (Algorithm 1) in flow time:
  ``x = f(noise, t_0)``, then for each later time ``x = f((1 - t_k) x0' + t_k x, t_k)`` with a
  fresh source draw ``x0'`` (module docstring), in a ``lax.scan``.

  Args:
    key: PRNG key of the fresh source draws (one ``split`` per round).
    consistency_fn: ``(x, t) -> f(x, t)``, the data end of the ODE trajectory through ``x``;
      ``t`` is ``[batch]``.
    noise: ``[batch, *event]`` draws of the source: the trajectory's start at ``t_0``.
    times: ``[N]`` increasing flow times in ``[0, 1)``, ``times[0]`` the start
      (:func:`multistep_times`).
    source: ``(key, num) -> [num, *event]`` draws of the source, for the re-noising.
    return_trajectory: also return ``[N + 1, batch, *event]``: ``noise``, then ``x`` after each
      evaluation.

  Returns:
    :class:`~diffjax.samplers.fields.SamplerOutput` with ``nfe = N``.
  """
  times = jnp.asarray(times)
  num = noise.shape[0]

  def at(t):
    return jnp.full((num,), t, noise.dtype)

  first = consistency_fn(noise, at(times[0]))

  def renoise_and_jump(x, inputs):
    key_round, t = inputs
    fresh = source(key_round, num).astype(x.dtype)
    w = broadcast_to_data(at(t), x)
    x = consistency_fn((1 - w) * fresh + w * x, at(t))
    return x, x if return_trajectory else None

  keys = jax.random.split(key, times.shape[0] - 1)
  x, path = jax.lax.scan(renoise_and_jump, first, (keys, times[1:]))
  trajectory = None
  if return_trajectory:
    trajectory = prepend_initial(noise, jnp.concatenate([first[None], path]))
  return SamplerOutput(samples=x, trajectory=trajectory, nfe=jnp.asarray(times.shape[0]))


def consistency_sampler(*, times: Array, source: Callable[[Array, int], Array]):
  """:func:`multistep_consistency_sample` over ``times`` behind the one sampler signature
  ``sample(key, predict, noise, *, predict_uncond=None, guidance_scale=1.0,
  return_trajectory=False)`` of :mod:`~diffjax.samplers.registry`, ``predict`` being the
  consistency function. Guidance mixes the two consistency functions: ``f`` is affine in the
  network's output at fixed ``(x, t)``, so this equals guiding the output
  (:mod:`~diffjax.samplers.guidance`).

  Args:
    times: ``[N]`` increasing flow times from :func:`multistep_times`.
    source: ``(key, num) -> [num, *event]`` draws of the source.
  """

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ) -> SamplerOutput:
    if predict_uncond is not None:
      predict = classifier_free_guidance(predict, predict_uncond, scale=guidance_scale)
    return multistep_consistency_sample(
      key, predict, noise, times=times, source=source, return_trajectory=return_trajectory
    )

  return sample
