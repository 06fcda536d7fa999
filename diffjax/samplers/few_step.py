"""Few-step sampling with a model of two times, in flow time (source ``t = 0``, data ``t = 1``).

A model ``F(x_t, t, s)`` that predicts the mean velocity between two times moves a state from
``t`` to ``s`` in one evaluation, ``x_s = x_t + (s - t) F(x_t, t, s)``: MeanFlow's average
velocity ``u(z_t, t, s) = 1 / (s - t) int_t^s v(z_tau, tau) d tau`` (Geng et al. 2025,
https://arxiv.org/abs/2505.13447) and the shortcut model ``s(x_t, t, d)`` with step ``d = s - t``
(Frans et al. 2024, https://arxiv.org/abs/2410.12557). At ``s = t`` both are the instantaneous
velocity ``v(x_t, t)``, so the ODE solvers sample them too (:func:`at_equal_times`).

``predict(x, ts)`` receives ``ts = [batch, 2]``, the pair ``(t, s)`` per example; the objective
maps the pair to its network's own time inputs (``(t, s - t)``, a step-size level, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.samplers.fields import Predictor, SamplerOutput, prepend_initial
from diffjax.samplers.guidance import classifier_free_guidance
from diffjax.samplers.ode import check_times

__all__ = ["time_pairs", "few_step_sampler", "at_equal_times"]


def time_pairs(t: Array, s: Array, batch: int) -> Array:
  """``[batch, 2]`` rows ``(t, s)`` from two scalar (or ``[batch]``) times."""
  return jnp.stack([jnp.broadcast_to(t, (batch,)), jnp.broadcast_to(s, (batch,))], axis=-1)


def few_step_sampler(*, times: Array):
  """Jumps along a time grid with a mean-velocity model of two times.

  ``x_{k+1} = x_k + (t_{k+1} - t_k) F(x_k, t_k, t_{k+1})``, ``k = 0 .. N - 1``, from ``x_0`` =
  the source draws: MeanFlow's ``z_r = z_t - (t - r) u(z_t, r, t)`` in its own time direction
  (Geng et al. 2025, https://arxiv.org/abs/2505.13447) and the shortcut model's ``x_{t + d} =
  x_t + d s(x_t, t, d)`` (Frans et al. 2024, https://arxiv.org/abs/2410.12557). With the exact
  mean velocity every jump lands on the ODE trajectory, whatever ``N``; one scan, ``N``
  evaluations.

  Args:
    times: ``[N + 1]`` grid from the source time to the data time.

  Returns:
    ``sample(key, predict, noise, *, predict_uncond=None, guidance_scale=1.0,
    return_trajectory=False) -> SamplerOutput`` with ``predict(x, ts)``, ``ts`` ``[batch, 2]``.
  """
  check_times(times)
  times = jnp.asarray(times, jnp.float32)

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ) -> SamplerOutput:
    del key
    if predict_uncond is not None:
      predict = classifier_free_guidance(predict, predict_uncond, scale=guidance_scale)
    batch = noise.shape[0]

    def jump(x, pair):
      t, s = pair
      x_next = x + (s - t).astype(x.dtype) * predict(x, time_pairs(t, s, batch)).astype(x.dtype)
      return x_next, (x_next if return_trajectory else None)

    final, path = jax.lax.scan(jump, noise, (times[:-1], times[1:]))
    nfe = jnp.asarray(times.shape[0] - 1, jnp.int32)
    return SamplerOutput(samples=final, trajectory=prepend_initial(noise, path), nfe=nfe)

  return sample


def _at_equal(predict: Predictor | None) -> Predictor | None:
  if predict is None:
    return None
  return lambda x, t: predict(x, jnp.stack([t, t], axis=-1))


def at_equal_times(sampler):
  """A velocity sampler (``predict(x, t)``, ``t`` ``[batch]``) run on a model of two times
  through its instantaneous velocity ``v(x, t) = F(x, t, t)`` (the mean velocity over an empty
  interval: MeanFlow's ``u(z, t, t) = v(z, t)``, Geng et al. 2025, and the shortcut model's
  ``s(x, t, 0)``, its flow-matching velocity, Frans et al. 2024)."""

  def sample(key, predict, noise, *, predict_uncond=None, **options) -> SamplerOutput:
    return sampler(
      key, _at_equal(predict), noise, predict_uncond=_at_equal(predict_uncond), **options
    )

  return sample
