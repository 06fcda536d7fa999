"""Fixed-step ODE integrators over a given time grid, for any field and any pytree state.

A field here is ``field(y, t) -> dy/dt`` with a scalar time ``t`` and a pytree state ``y``
(:func:`~diffjax.samplers.fields.ode_field` turns a batched velocity into one). The grid's
direction decides the direction of integration: diffusion samplers run ``t`` from 1 to 0, flow
samplers from 0 to 1, likelihoods the other way. One step of each method is a small pure
function ``step(field, y, t, t_next) -> y_next``; :func:`integrate_fixed` scans it over the grid.

Orders (global error ``O(h^p)``): Euler 1, Heun 2, midpoint 2, RK4 4 (Hairer, Norsett & Wanner,
"Solving Ordinary Differential Equations I", Sec. II.1). Tested on a log-log slope.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup

__all__ = [
  "ODESolution",
  "euler_step",
  "heun_step",
  "midpoint_step",
  "rk4_step",
  "FixedStepMethod",
  "FIXED_STEP_METHODS",
  "get_fixed_step_method",
  "integrate_fixed",
]

PyTree = Any
Field = Callable[[PyTree, Array], PyTree]


class ODESolution(NamedTuple):
  """Result of an ODE integration.

  Attributes:
    final: the state at the last time of the grid.
    trajectory: the state at every time of the grid (leading axis ``[len(times)]``), or None.
    nfe: number of field evaluations (int scalar).
  """

  final: PyTree
  trajectory: PyTree | None
  nfe: Array


def _axpy(a, x, y):
  """``y + a x`` over pytrees (``a`` a scalar)."""
  return jax.tree.map(lambda xi, yi: yi + (a * xi).astype(yi.dtype), x, y)


def _combine(y, h, coefficients, slopes):
  """``y + h sum_k c_k k_k`` over pytrees."""

  def leaf(yi, *ks):
    return yi + (h * sum(c * k for c, k in zip(coefficients, ks))).astype(yi.dtype)

  return jax.tree.map(leaf, y, *slopes)


def euler_step(field: Field, y: PyTree, t: Array, t_next: Array) -> PyTree:
  """Explicit Euler: ``y' = y + h f(y, t)``, ``h = t_next - t``. Order 1."""
  return _axpy(t_next - t, field(y, t), y)


def heun_step(field: Field, y: PyTree, t: Array, t_next: Array) -> PyTree:
  """Heun (explicit trapezoid): ``k1 = f(y, t)``, ``k2 = f(y + h k1, t + h)``,
  ``y' = y + h (k1 + k2) / 2``. Order 2; EDM's deterministic sampler (Karras et al. 2022,
  Algorithm 1, https://arxiv.org/abs/2206.00364)."""
  h = t_next - t
  k1 = field(y, t)
  k2 = field(_axpy(h, k1, y), t_next)
  return _combine(y, h, (0.5, 0.5), (k1, k2))


def midpoint_step(field: Field, y: PyTree, t: Array, t_next: Array) -> PyTree:
  """Explicit midpoint: ``k1 = f(y, t)``, ``k2 = f(y + h/2 k1, t + h/2)``, ``y' = y + h k2``.
  Order 2."""
  h = t_next - t
  k1 = field(y, t)
  return _axpy(h, field(_axpy(0.5 * h, k1, y), t + 0.5 * h), y)


def rk4_step(field: Field, y: PyTree, t: Array, t_next: Array) -> PyTree:
  """Classical Runge-Kutta: ``k1 = f(y, t)``, ``k2 = f(y + h/2 k1, t + h/2)``, ``k3 = f(y + h/2
  k2, t + h/2)``, ``k4 = f(y + h k3, t + h)``, ``y' = y + h (k1 + 2 k2 + 2 k3 + k4) / 6``.
  Order 4 (Kutta 1901)."""
  h = t_next - t
  half = t + 0.5 * h
  k1 = field(y, t)
  k2 = field(_axpy(0.5 * h, k1, y), half)
  k3 = field(_axpy(0.5 * h, k2, y), half)
  k4 = field(_axpy(h, k3, y), t_next)
  return _combine(y, h, (1 / 6, 1 / 3, 1 / 3, 1 / 6), (k1, k2, k3, k4))


@dataclasses.dataclass(frozen=True)
class FixedStepMethod:
  """A one-step method and its cost: ``step(field, y, t, t_next)``, ``evals_per_step`` field
  evaluations each."""

  name: str
  step: Callable[[Field, PyTree, Array, Array], PyTree]
  evals_per_step: int


FIXED_STEP_METHODS: dict[str, FixedStepMethod] = {
  "euler": FixedStepMethod("euler", euler_step, 1),
  "heun": FixedStepMethod("heun", heun_step, 2),
  "midpoint": FixedStepMethod("midpoint", midpoint_step, 2),
  "rk4": FixedStepMethod("rk4", rk4_step, 4),
}


def get_fixed_step_method(name: str) -> FixedStepMethod:
  """Resolves a fixed-step method by name ("euler", "heun", "midpoint", "rk4")."""
  return lookup(FIXED_STEP_METHODS, name, "fixed-step method")


def check_times(times) -> None:
  """A grid needs at least two times (one step); raised before tracing."""
  shape = jnp.shape(times)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(
      f"times must be a 1-D grid of at least 2 times (one step), got shape "
      f"{shape}; build one with diffjax.samplers.get_time_grid"
    )


def integrate_fixed(
  field: Field,
  y0: PyTree,
  *,
  times: Array,
  method: FixedStepMethod,
  return_trajectory: bool = False,
) -> ODESolution:
  """Integrates ``dy/dt = field(y, t)`` over ``times[0] -> times[1] -> ... -> times[-1]``.

  ``y_{i+1} = method.step(field, y_i, t_i, t_{i+1})`` in one ``jax.lax.scan``; jit-, vmap- and
  grad-safe.

  Args:
    field: ``(y, t_scalar) -> dy/dt`` over a pytree ``y``.
    y0: the state at ``times[0]``.
    times: ``[N + 1]`` grid, monotone in either direction.
    method: a :class:`FixedStepMethod` (:func:`get_fixed_step_method`).
    return_trajectory: also return ``[N + 1, ...]`` states (``y0`` first).

  Returns:
    :class:`ODESolution` with ``nfe = N * method.evals_per_step``.
  """
  check_times(times)
  times = jnp.asarray(times)

  def body(y, t_pair):
    y_next = method.step(field, y, t_pair[0], t_pair[1])
    return y_next, (y_next if return_trajectory else None)

  final, path = jax.lax.scan(body, y0, (times[:-1], times[1:]))
  trajectory = None
  if return_trajectory:
    trajectory = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), y0, path)
  nfe = jnp.asarray((times.shape[0] - 1) * method.evals_per_step, jnp.int32)
  return ODESolution(final=final, trajectory=trajectory, nfe=nfe)
