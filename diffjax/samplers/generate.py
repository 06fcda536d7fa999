"""Sample generators for trained models: a network ``apply`` plus a sampler name -> samples.

The edge between the training code and the samplers: :func:`flow_generator` (a velocity model in
flow time, any source) and :func:`diffusion_generator` (a model trained on a discrete DDPM
schedule) return

    generate(params, key, num, *, steps, sampler=None, labels=None, guidance=None,
             return_trajectories=False) -> dict(samples=..., trajectories=..., nfe=...)

with ``apply(params, x_t, t, cond) -> prediction`` (``cond=None`` is the null label of a
class-conditional model). The sampler name is resolved once per distinct call (and the jitted
program cached); ``guidance`` is the classifier-free guidance weight ``w`` (None: no guidance).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.parameterization import get_prediction_target
from diffjax.samplers import grids
from diffjax.samplers.diffusion import interpolated_coefficients_fn
from diffjax.samplers.registry import SAMPLERS, Sampler, get_sampler
from diffjax.schedules import DiscreteSchedule

__all__ = ["FLOW_SAMPLERS", "flow_generator", "diffusion_generator"]

FLOW_SAMPLERS = ("euler", "heun", "midpoint", "rk4", "dopri5", "tsit5")
"""Samplers that need only a velocity (any source distribution)."""

Generate = Callable[..., dict]


def _make_generate(build: Callable[[str, int], Sampler], *, apply: Callable, source: Callable,
                   default: str, num_classes: int) -> Generate:
  cache: dict[tuple, Callable] = {}

  def generate(params: Any, key: Array, num: int, *, steps: int, sampler: str | None = None,
               labels: Array | None = None, guidance: float | None = None,
               return_trajectories: bool = False) -> dict:
    name = default if sampler is None else sampler
    if int(steps) != steps or steps < 1:
      raise ValueError(f"steps={steps!r}: must be a positive integer")
    if guidance is not None and labels is None and num_classes < 1:
      raise ValueError("guidance needs a class-conditional model: pass labels, or build the "
                       "generator with num_classes > 0 to draw them")
    signature = (name, int(steps), int(num), guidance is not None, labels is None,
                 bool(return_trajectories))
    if signature not in cache:
      sample_fn = build(name, int(steps))

      def run(params, key, labels, scale):
        key_source, key_labels, key_sampler = jax.random.split(key, 3)
        if labels is None and guidance is not None:
          labels = jax.random.randint(key_labels, (num,), 0, num_classes)
        noise = source(key_source, num)
        predict = lambda x, t: apply(params, x, t, labels)
        uncond = None
        if guidance is not None:
          uncond = lambda x, t: apply(params, x, t, None)
        out = sample_fn(key_sampler, predict, noise, predict_uncond=uncond,
                        guidance_scale=scale, return_trajectory=return_trajectories)
        return dict(samples=out.samples, trajectories=out.trajectory, nfe=out.nfe)

      cache[signature] = jax.jit(run)
    scale = jnp.asarray(1.0 if guidance is None else guidance, jnp.float32)
    return cache[signature](params, key, labels, scale)
  return generate


def flow_generator(*, apply: Callable, source: Callable[[Array, int], Array],
                   data_shape: tuple[int, ...], num_classes: int = 0,
                   default_sampler: str = "euler") -> Generate:
  """Generator for a flow-matching model: ``apply`` predicts the velocity in flow time.

  Integrates ``dx/dt = apply(params, x, t, cond)`` from ``t = 0`` (``x ~ source``) to ``t = 1``
  on a uniform grid of ``steps`` steps with one of :data:`FLOW_SAMPLERS` (for the adaptive ones
  ``steps`` only sets where trajectories are saved).

  Args:
    apply: ``apply(params, x_t, t, cond) -> velocity``.
    source: ``(key, num) -> [num, *data_shape]`` samples of the source.
    data_shape: shape of one example (for error messages).
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    default_sampler: used when ``sampler`` is None.
  """
  def build(name: str, steps: int) -> Sampler:
    if name not in FLOW_SAMPLERS:
      raise ValueError(f"sampler {name!r} cannot sample a velocity model of an arbitrary source; "
                       f"choose one of {list(FLOW_SAMPLERS)}")
    times = grids.uniform_grid(num_steps=steps, t_start=0.0, t_end=1.0)
    return get_sampler(name, target="velocity", times=times)

  del data_shape
  return _make_generate(build, apply=apply, source=source, default=default_sampler,
                        num_classes=num_classes)


def diffusion_generator(*, apply: Callable, schedule: DiscreteSchedule, prediction: str,
                        data_shape: tuple[int, ...], num_classes: int = 0,
                        default_sampler: str = "ddim") -> Generate:
  """Generator for a model trained on a discrete DDPM ``schedule`` (model time ``(s + 1) / T``).

  "ddpm" and "ddim" use ``steps`` trailing steps (Lin et al. 2024); every other sampler of
  :data:`~diffjax.samplers.registry.SAMPLERS` runs on
  :func:`~diffjax.samplers.diffusion.interpolated_coefficients_fn` over model times ``1 -> 1/T``
  (uniform grid), or EDM noise levels between the schedule's extremes for "edm" and
  "euler_ancestral".

  Args:
    apply: ``apply(params, x_t, t, cond) -> prediction``.
    schedule: the training schedule.
    prediction: the training target's name ("eps", "x0", "v", "score").
    data_shape: shape of one example.
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    default_sampler: used when ``sampler`` is None.
  """
  target = get_prediction_target(prediction)
  num_train = schedule.num_steps
  coefficients_fn = interpolated_coefficients_fn(schedule)
  t_first = 1.0 / num_train

  def source(key, num):
    return jax.random.normal(key, (num,) + tuple(data_shape), jnp.float32)

  def build(name: str, steps: int) -> Sampler:
    if name not in SAMPLERS:
      raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if name in ("ddpm", "ddim"):
      steps_seq = grids.trailing_steps(num_steps=min(steps, num_train), num_train_steps=num_train)
      return get_sampler(name, target=target, schedule=schedule, steps=steps_seq)
    if name in ("edm", "euler_ancestral"):
      log_snr = jnp.clip(schedule.log_snr, -30.0, None)
      sigmas = grids.edm_sigmas(num_steps=steps, sigma_min=float(jnp.exp(-0.5 * log_snr[0])),
                                sigma_max=float(jnp.exp(-0.5 * log_snr[-1])))
      return get_sampler(name, target=target, coefficients_fn=coefficients_fn, sigmas=sigmas,
                         t_min=t_first, t_max=1.0)
    times = grids.uniform_grid(num_steps=steps, t_start=1.0, t_end=t_first)
    return get_sampler(name, target=target, coefficients_fn=coefficients_fn, times=times)

  return _make_generate(build, apply=apply, source=source, default=default_sampler,
                        num_classes=num_classes)
