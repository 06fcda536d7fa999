"""Samplers of a Schrodinger bridge learned as a drift and a score (SF2M).

A model with two output heads (:func:`~diffjax.models.create_model` with ``output_heads=2``)
predicts, in flow time (source at ``t = 0``, data at ``t = 1``), the probability-flow velocity
``v(x, t)`` and the score ``s(x, t) = grad_x log p_t(x)`` of the bridge's marginals, in that
order along the last axis. The marginals ``p_t`` are those of the forward SDE

    dx = [v(x, t) + g^2 / 2 s(x, t)] dt + g dW,       x_0 ~ source,

and of the probability-flow ODE ``dx/dt = v(x, t)`` alike (Tong et al. 2023, "Simulation-free
Schrodinger bridges via score and flow matching", Sec. 3, https://arxiv.org/abs/2307.03672; the
Fokker-Planck equation of the SDE is the continuity equation of ``v`` because ``g^2 / 2 s`` is
exactly cancelled by the diffusion term ``g^2 / 2 Laplacian p``). The SDE is sampled by
Euler-Maruyama (:func:`forward_sde_euler_maruyama`); the ODE by any of
:data:`~diffjax.samplers.FLOW_SAMPLERS` on the velocity head alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax.samplers import grids
from diffjax.samplers.fields import SamplerOutput
from diffjax.samplers.generate import FLOW_SAMPLERS, make_generate
from diffjax.samplers.ode import check_times
from diffjax.samplers.registry import Sampler, get_sampler, guided, on_head
from diffjax.samplers.sde import euler_maruyama_integrate
from diffjax.shapes import concrete

__all__ = [
  "BRIDGE_SDE_SAMPLERS",
  "BRIDGE_SAMPLERS",
  "velocity_and_score",
  "bridge_drift",
  "forward_sde_euler_maruyama",
  "bridge_generator",
]

BRIDGE_SDE_SAMPLERS = ("euler_maruyama",)
"""Samplers of the bridge's forward SDE (velocity and score)."""

BRIDGE_SAMPLERS = BRIDGE_SDE_SAMPLERS + FLOW_SAMPLERS
"""Every sampler of a velocity-and-score model: the SDE and the probability-flow ODE solvers."""


def velocity_and_score(output: Array) -> tuple[Array, Array]:
  """``(v, s)``: the two heads of a model's output, ``jnp.split`` in two along the last axis
  (``[..., 2 C] -> [..., C], [..., C]``)."""
  velocity, score = jnp.split(output, 2, axis=-1)
  return velocity, score


def _velocity(output: Array) -> Array:
  return velocity_and_score(output)[0]


def bridge_drift(output: Array, *, diffusion: float) -> Array:
  """``v + g^2 / 2 s``, the drift of the forward SDE with constant diffusion ``g``, from a
  model's two heads (Tong et al. 2023, Sec. 3 and Alg. 3, https://arxiv.org/abs/2307.03672)."""
  velocity, score = velocity_and_score(output)
  return velocity + 0.5 * diffusion**2 * score


def forward_sde_euler_maruyama(
  key: Array,
  drift: Callable[[Array, Array], Array],
  x_init: Array,
  *,
  times: Array,
  diffusion: float,
  return_trajectory: bool = False,
) -> SamplerOutput:
  """Euler-Maruyama on ``dx = f(x, t) dt + g dW`` with constant ``g``, forward in time:
  ``x_{i+1} = x_i + f(x_i, t_i) dt_i + g sqrt(dt_i) z_i``, ``z_i ~ N(0, I)``, ``dt_i = t_{i+1} -
  t_i > 0`` (Kloeden & Platen 1992, Ch. 10; strong order 1/2, weak order 1). One evaluation of
  ``f`` per step (:func:`~diffjax.samplers.sde.euler_maruyama_integrate` with ``b = g``).

  Raises:
    ValueError: ``times`` not a 1-D grid of at least two times, or (when concrete) not
      increasing: the SDE runs forward, from the source to the data.

  Args:
    key: PRNG key of the Brownian increments.
    drift: ``(x [batch, *event], t [batch]) -> [batch, *event]``.
    x_init: ``[batch, *event]`` the state at ``times[0]``.
    times: ``[N + 1]`` increasing times.
    diffusion: ``g``.
    return_trajectory: also return the ``[N + 1, batch, *event]`` states.
  """
  check_times(times)
  increments = concrete(jnp.diff(jnp.asarray(times)))
  if increments is not None and not np.all(increments > 0):
    raise ValueError(
      "times must increase: the bridge's SDE runs forward, from the source (t = 0) to the "
      f"data (t = 1); got {np.asarray(concrete(jnp.asarray(times)))}"
    )
  terms = lambda x, t: (drift(x, t), jnp.full(t.shape, diffusion, x.dtype))
  return euler_maruyama_integrate(
    key, terms, x_init, times=times, return_trajectory=return_trajectory
  )


def _sde_sampler(times: Array, diffusion: float) -> Sampler:
  """The registry's sampler signature over :func:`forward_sde_euler_maruyama` of the drift
  ``v + g^2 / 2 s`` of a two-head prediction (guidance mixes both heads linearly)."""

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ):
    guided_predict = guided(predict, predict_uncond, guidance_scale)
    drift = lambda x, t: bridge_drift(guided_predict(x, t), diffusion=diffusion)
    return forward_sde_euler_maruyama(
      key, drift, noise, times=times, diffusion=diffusion, return_trajectory=return_trajectory
    )

  return sample


def bridge_generator(
  *,
  apply: Callable,
  source: Callable[[Array, int], Array],
  diffusion: float,
  num_classes: int = 0,
  default_sampler: str = "euler_maruyama",
) -> Callable[..., dict]:
  """Generator for a velocity-and-score model (the module docstring): ``apply(params, x_t, t,
  cond) -> [v, s]`` along the last axis, in flow time, from ``source`` draws at ``t = 0`` to
  ``t = 1`` on a uniform grid of ``steps`` steps. "euler_maruyama" integrates the SDE ``dx = [v
  + g^2 / 2 s] dt + g dW`` (``g = diffusion``; ``steps`` network evaluations); the
  :data:`~diffjax.samplers.FLOW_SAMPLERS` integrate the probability-flow ODE ``dx/dt = v``. The
  signature of the returned ``generate`` is :mod:`~diffjax.samplers.generate`'s.

  Args:
    apply: ``apply(params, x_t, t, cond) -> [batch, ..., 2 C]``.
    source: ``(key, num) -> [num, *data_shape]`` samples of the source.
    diffusion: the SDE's constant ``g`` (SF2M's ``sigma``).
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    default_sampler: used when ``sampler`` is None.
  """
  if not diffusion > 0:
    raise ValueError(f"diffusion={diffusion!r}: the bridge's SDE needs g > 0")

  def build(name: str, steps: int) -> Sampler:
    times = grids.uniform_grid(num_steps=steps, t_start=0.0, t_end=1.0)
    if name in BRIDGE_SDE_SAMPLERS:
      return _sde_sampler(times, diffusion)
    if name in FLOW_SAMPLERS:
      return on_head(get_sampler(name, target="velocity", times=times), _velocity)
    raise ValueError(
      f"sampler {name!r} cannot sample a velocity-and-score (Schrodinger bridge) model; "
      f"choose one of {list(BRIDGE_SAMPLERS)}"
    )

  return make_generate(
    build, apply=apply, source=source, default=default_sampler, num_classes=num_classes
  )
