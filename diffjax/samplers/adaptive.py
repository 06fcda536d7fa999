"""Adaptive Runge-Kutta integration through diffrax, with the number of field evaluations.

``dy/dt = field(y, t)`` from ``times[0]`` to ``times[-1]`` (either direction) with an embedded
Runge-Kutta pair and diffrax's PID step-size controller: a step is accepted when the local error
estimate satisfies ``|err_i| <= atol + rtol max(|y_i|, |y'_i|)`` in RMS norm (Hairer, Norsett &
Wanner, "Solving ODEs I", Sec. II.4; Kidger 2021, "On Neural Differential Equations",
https://arxiv.org/abs/2202.02435). Solvers: Dormand-Prince 5(4) ("dopri5", Dormand & Prince 1980),
Tsitouras 5(4) ("tsit5", Tsitouras 2011), Dormand-Prince 8(7) ("dopri8", for references).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.samplers.ode import Field, ODESolution, check_times

__all__ = ["ADAPTIVE_SOLVERS", "get_adaptive_solver", "evaluations_per_step", "integrate_adaptive"]

PyTree = Any

ADAPTIVE_SOLVERS: dict[str, Callable[[], diffrax.AbstractAdaptiveSolver]] = {
  "dopri5": diffrax.Dopri5,
  "tsit5": diffrax.Tsit5,
  "dopri8": diffrax.Dopri8,
}


def get_adaptive_solver(name: str) -> diffrax.AbstractAdaptiveSolver:
  """Resolves a diffrax solver by name ("dopri5", "tsit5", "dopri8")."""
  return lookup(ADAPTIVE_SOLVERS, name, "adaptive solver")()


def evaluations_per_step(solver: diffrax.AbstractAdaptiveSolver) -> tuple[int, int]:
  """``(per_step, extra)`` field evaluations of an explicit Runge-Kutta solver.

  A tableau with ``s`` stages costs ``s`` evaluations per attempted step, or ``s - 1`` when the
  last stage is reused as the next first ("first same as last", FSAL); FSAL methods evaluate the
  very first stage once more (``extra = 1``). Dopri5 and Tsit5: 7 stages, FSAL, 6 per step.
  """
  tableau = solver.tableau
  stages = len(tableau.c) + 1
  fsal = int(bool(tableau.fsal))
  return stages - fsal, fsal


def integrate_adaptive(
  field: Field,
  y0: PyTree,
  *,
  times: Array,
  solver: diffrax.AbstractAdaptiveSolver,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 4096,
  initial_step_fraction: float = 1.0 / 64,
  return_trajectory: bool = False,
) -> ODESolution:
  """Integrates ``dy/dt = field(y, t)`` from ``times[0]`` to ``times[-1]`` adaptively.

  The interior ``times`` only say where the trajectory is saved (dense output); steps are chosen
  by the controller. The first step is ``initial_step_fraction (times[-1] - times[0])`` (given
  rather than estimated, so every field evaluation is counted).

  Returns:
    :class:`~diffjax.samplers.ode.ODESolution`; ``nfe = num_steps * per_step + extra`` from
    diffrax's ``stats["num_steps"]`` (accepted plus rejected steps) and
    :func:`evaluations_per_step`.
  """
  check_times(times)
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol={rtol}, atol={atol}: both tolerances must be > 0")
  times = jnp.asarray(times)
  t0, t1 = times[0], times[-1]
  saveat = diffrax.SaveAt(ts=times) if return_trajectory else diffrax.SaveAt(t1=True)
  solution = diffrax.diffeqsolve(
    diffrax.ODETerm(lambda t, y, args: field(y, t)),
    solver,
    t0=t0,
    t1=t1,
    dt0=initial_step_fraction * (t1 - t0),
    y0=y0,
    saveat=saveat,
    stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
    max_steps=max_steps,
  )
  per_step, extra = evaluations_per_step(solver)
  nfe = (solution.stats["num_steps"] * per_step + extra).astype(jnp.int32)
  # SaveAt(t1=True) saves one time and SaveAt(ts=times) ends at t1: the last entry either way.
  final = jax.tree.map(lambda a: a[-1], solution.ys)
  return ODESolution(final=final, trajectory=solution.ys if return_trajectory else None, nfe=nfe)
