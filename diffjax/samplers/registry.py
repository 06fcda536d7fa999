"""Every sampler by name, behind one call signature: :func:`get_sampler`.

``get_sampler(name, **kwargs)`` resolves the name once and binds the sampler's settings (the
process, the grid, solver options); it returns a callable with one signature for all samplers:

    sample(key, predict, noise, *, predict_uncond=None, guidance_scale=1.0,
           return_trajectory=False) -> SamplerOutput

* ``key``: PRNG key (used by the stochastic samplers: "ddpm", "ddim" with ``eta > 0``, "edm"
  with ``s_churn > 0``, "euler_ancestral", "euler_maruyama", "sde_heun", "pc" and
  "dpmpp_2m_sde" with ``eta > 0``; ignored by the others).
* ``predict``: ``(x, t) -> prediction`` at model time ``t`` (``[batch]``).
* ``noise``: ``[batch, *event]`` standard normal draws. The sampler scales them to its prior,
  ``N(0, sigma(t_start)^2 I)`` (the data's share ``alpha x0`` is dropped: ``alpha(t_start) ~ 0``):
  ``sigma(times[0])`` for time grids, ``sigmas[0]`` for noise-level grids, ``sqrt(1 -
  abar_{steps[0]})`` for discrete steps. A pure velocity model (``coefficients_fn=None``) uses
  ``noise`` as given: pass samples of the flow's source.
* ``predict_uncond``, ``guidance_scale``: classifier-free guidance, ``uncond + w (cond -
  uncond)`` on the predictions (:mod:`diffjax.samplers.guidance`).
* ``return_trajectory``: also return ``[num_steps + 1, batch, *event]`` states (for "edm" and
  "euler_ancestral" in variance-exploding coordinates ``x / alpha``; for the adaptive solvers at
  ``times``).

Settings per family (all keyword-only; ``target`` is a PredictionTarget or its name):

* "euler", "heun", "midpoint", "rk4": ``target, times, coefficients_fn=None``;
* "dopri5", "tsit5": the same plus ``rtol=1e-5, atol=1e-5, max_steps=4096``;
* "dpmpp_2m", "dpmpp_3m": ``target, times, coefficients_fn``;
* "unipc": the same plus ``order=2, variant="bh2", corrector=True, lower_order_final=True``
  (:func:`~diffjax.samplers.multistep.unipc_sample`);
* "deis": the same plus ``order=2`` (:func:`~diffjax.samplers.multistep.deis_sample`);
* "dpmpp_2m_sde": the same plus ``eta=1, s_noise=1, solver_type="midpoint"``
  (:func:`~diffjax.samplers.multistep.dpmpp_2m_sde_sample`);
* "euler_maruyama", "sde_heun": ``target, times, coefficients_fn, eta=1`` (the reverse SDE of
  :mod:`~diffjax.samplers.sde`; ``alpha > 0`` on the whole grid);
* "pc": the same plus ``snr=0.16, corrector_steps=1`` (:func:`~diffjax.samplers.sde.pc_sample`);
* "edm": ``target, coefficients_fn, sigmas, s_churn=0, s_tmin=0, s_tmax=inf, s_noise=1,
  time_of_sigma=None, t_min=0, t_max=1``;
* "euler_ancestral": ``target, coefficients_fn, sigmas, eta=1, s_noise=1, time_of_sigma=None,
  t_min=0, t_max=1``;
* "ddpm": ``target, schedule, steps=None, variance="small", time_of_step=None``;
* "ddim": ``target, schedule, steps=None, eta=0, time_of_step=None``.

``times`` come from :func:`~diffjax.samplers.grids.get_time_grid`, ``sigmas`` from
:func:`~diffjax.samplers.grids.edm_sigmas`, ``steps`` from
:func:`~diffjax.samplers.grids.get_discrete_steps` (``None``: all ``T`` steps).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Protocol

import jax.numpy as jnp
from jax import Array

from diffjax._lookup import lookup
from diffjax.parameterization import PredictionTarget, get_prediction_target
from diffjax.samplers import adaptive, diffusion, edm, grids, multistep, ode, sde
from diffjax.samplers.fields import (
  CoefficientsFn,
  Predictor,
  SamplerOutput,
  denoiser,
  ode_field,
  sigma_denoiser,
  velocity_field,
)
from diffjax.samplers.guidance import classifier_free_guidance
from diffjax.schedules import DiscreteSchedule, alpha_sigma_from_log_snr
from diffjax.shapes import in_compute_dtype

__all__ = ["Sampler", "SAMPLERS", "get_sampler", "guided", "on_head"]


class Sampler(Protocol):
  """The one signature of every sampler returned by :func:`get_sampler`."""

  def __call__(
    self,
    key: Array,
    predict: Predictor,
    noise: Array,
    *,
    predict_uncond: Predictor | None = None,
    guidance_scale: float | Array = 1.0,
    return_trajectory: bool = False,
  ) -> SamplerOutput: ...


def _target(target: PredictionTarget | str) -> PredictionTarget:
  return get_prediction_target(target) if isinstance(target, str) else target


def guided(predict: Predictor, predict_uncond: Predictor | None, scale) -> Predictor:
  """``predict`` itself without an unconditional prediction, else classifier-free guidance
  ``uncond + scale (cond - uncond)`` (:func:`~diffjax.samplers.classifier_free_guidance`)."""
  if predict_uncond is None:
    return predict
  return classifier_free_guidance(predict, predict_uncond, scale=scale)


def on_head(sampler: Sampler, head: Callable[[Array], Array]) -> Sampler:
  """``sampler`` fed ``head(prediction)``: one field of a model with several output heads (a
  velocity-and-score or drift-and-denoiser model run by an ODE solver of its first head)."""

  def pick(predict):
    return None if predict is None else (lambda x, t: head(predict(x, t)))

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ):
    return sampler(
      key,
      pick(predict),
      noise,
      predict_uncond=pick(predict_uncond),
      guidance_scale=guidance_scale,
      return_trajectory=return_trajectory,
    )

  return sample


def _require(coefficients_fn, name: str):
  if coefficients_fn is None:
    raise ValueError(
      f"sampler {name!r} needs the process: pass coefficients_fn (e.g. "
      "functools.partial(parameterization.diffusion_coefficients, schedule))"
    )


def _sigma_at(coefficients_fn: CoefficientsFn, t) -> Array:
  return coefficients_fn(in_compute_dtype(jnp.reshape(jnp.asarray(t), (1,)))).sigma[0]


def _ode_sampler(
  name: str,
  integrate: Callable[..., ode.ODESolution],
  *,
  target: PredictionTarget | str,
  times: Array,
  coefficients_fn: CoefficientsFn | None = None,
) -> Sampler:
  """Probability-flow ODE samplers: integrate :func:`velocity_field` over ``times``."""
  ode.check_times(times)
  grids.check_sampling_direction(times, coefficients_fn=coefficients_fn, name=f"sampler {name!r}")
  target = _target(target)
  if coefficients_fn is None and target.name != "velocity":
    raise ValueError(
      f"sampler {name!r}: a {target.name!r} prediction needs coefficients_fn to "
      "become a velocity; only a 'velocity' model may omit it"
    )

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ) -> SamplerOutput:
    del key
    predict = guided(predict, predict_uncond, guidance_scale)
    if coefficients_fn is None:
      velocity, x_init = predict, noise
    else:
      velocity = velocity_field(predict, target=target, coefficients_fn=coefficients_fn)
      x_init = _sigma_at(coefficients_fn, times[0]).astype(noise.dtype) * noise
    solution = integrate(
      ode_field(velocity), x_init, times=times, return_trajectory=return_trajectory
    )
    return SamplerOutput(samples=solution.final, trajectory=solution.trajectory, nfe=solution.nfe)

  return sample


def _fixed_factory(method: str):
  def factory(*, target, times, coefficients_fn=None) -> Sampler:
    integrate = functools.partial(ode.integrate_fixed, method=ode.get_fixed_step_method(method))
    return _ode_sampler(
      method, integrate, target=target, times=times, coefficients_fn=coefficients_fn
    )

  factory.__name__ = f"{method}_sampler"
  factory.__doc__ = f"The fixed-step {method!r} probability-flow ODE sampler over ``times``."
  return factory


def _adaptive_factory(solver: str):
  def factory(
    *,
    target,
    times,
    coefficients_fn=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
  ) -> Sampler:
    if not (rtol > 0 and atol > 0):
      raise ValueError(f"rtol={rtol}, atol={atol}: both tolerances must be > 0")
    integrate = functools.partial(
      adaptive.integrate_adaptive,
      solver=adaptive.get_adaptive_solver(solver),
      rtol=rtol,
      atol=atol,
      max_steps=max_steps,
    )
    return _ode_sampler(
      solver, integrate, target=target, times=times, coefficients_fn=coefficients_fn
    )

  factory.__name__ = f"{solver}_sampler"
  factory.__doc__ = (
    f"The adaptive {solver!r} (diffrax) probability-flow ODE sampler from "
    "``times[0]`` to ``times[-1]``, saving the trajectory at ``times``."
  )
  return factory


def _dpmpp_factory(order: int):
  def factory(*, target, times, coefficients_fn=None) -> Sampler:
    name = f"dpmpp_{order}m"
    _require(coefficients_fn, name)
    ode.check_times(times)
    grids.check_sampling_direction(times, coefficients_fn=coefficients_fn, name=f"sampler {name!r}")
    resolved = _target(target)

    def sample(
      key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
    ) -> SamplerOutput:
      del key
      predict = guided(predict, predict_uncond, guidance_scale)
      denoise = denoiser(predict, target=resolved, coefficients_fn=coefficients_fn)
      x_init = _sigma_at(coefficients_fn, times[0]).astype(noise.dtype) * noise
      return diffusion.dpm_solver_pp_sample(
        denoise,
        x_init,
        times=times,
        coefficients_fn=coefficients_fn,
        order=order,
        return_trajectory=return_trajectory,
      )

    return sample

  factory.__name__ = f"dpmpp_{order}m_sampler"
  factory.__doc__ = f"DPM-Solver++ ({order}M) over ``times``."
  return factory


def _process_factory(
  name: str,
  run: Callable[..., SamplerOutput],
  defaults: dict,
  *,
  resolvers: dict[str, Callable] | None = None,
  check: Callable[..., None] | None = None,
):
  """Samplers of a process on a time grid: ``run(key, denoise, x_init, times=,
  coefficients_fn=, return_trajectory=, **options)`` with the denoiser of :func:`denoiser`.

  ``options`` are checked against ``defaults``, named ones resolved by ``resolvers`` and the
  settings checked by ``check(times, coefficients_fn, **options)``, all when the sampler is
  built (before any tracing)."""
  resolvers = resolvers or {}

  def factory(*, target, times, coefficients_fn=None, **options) -> Sampler:
    unknown = set(options) - set(defaults)
    if unknown:
      raise ValueError(
        f"sampler {name!r} does not take {sorted(unknown)}; its options are {sorted(defaults)}"
      )
    options = {**defaults, **options}
    _require(coefficients_fn, name)
    ode.check_times(times)
    grids.check_sampling_direction(times, coefficients_fn=coefficients_fn, name=f"sampler {name!r}")
    if check is not None:
      check(times, coefficients_fn, **options)
    options = {k: resolvers[k](v) if k in resolvers else v for k, v in options.items()}
    resolved = _target(target)

    def sample(
      key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
    ) -> SamplerOutput:
      predict = guided(predict, predict_uncond, guidance_scale)
      denoise = denoiser(predict, target=resolved, coefficients_fn=coefficients_fn)
      x_init = _sigma_at(coefficients_fn, times[0]).astype(noise.dtype) * noise
      return run(
        key,
        denoise,
        x_init,
        times=times,
        coefficients_fn=coefficients_fn,
        return_trajectory=return_trajectory,
        **options,
      )

    return sample

  factory.__name__ = f"{name}_sampler"
  factory.__doc__ = f"The {name!r} sampler over ``times``; options {defaults}."
  return factory


def _deterministic(run: Callable[..., SamplerOutput]) -> Callable[..., SamplerOutput]:
  """``run`` without the key argument it does not use."""

  def with_key(key, denoise, x_init, **kwargs):
    del key
    return run(denoise, x_init, **kwargs)

  return with_key


def _check_order(order) -> None:
  if isinstance(order, bool) or order not in (1, 2, 3):
    raise ValueError(f"order={order!r}: choose 1, 2 or 3")


def _check_eta(eta) -> None:
  if not eta >= 0:
    raise ValueError(f"eta={eta!r}: must be >= 0 (0: probability-flow ODE, 1: reverse SDE)")


def _check_deis(times, coefficients_fn, *, order):
  del times, coefficients_fn
  _check_order(order)


def _check_unipc(times, coefficients_fn, *, order, variant, corrector, lower_order_final):
  del times, coefficients_fn, corrector, lower_order_final
  _check_order(order)
  multistep.get_unipc_variant(variant)


def _check_dpmpp_sde(times, coefficients_fn, *, eta, s_noise, solver_type):
  del times, coefficients_fn
  _check_eta(eta)
  if not s_noise >= 0:
    raise ValueError(f"s_noise={s_noise!r}: must be >= 0")
  multistep.get_dpmpp_sde_solver_type(solver_type)


def _check_sde(times, coefficients_fn, *, eta):
  _check_eta(eta)
  sde.check_sde_times(times, coefficients_fn)


def _check_pc(times, coefficients_fn, *, eta, snr, corrector_steps):
  _check_sde(times, coefficients_fn, eta=eta)
  if not snr > 0:
    raise ValueError(f"snr={snr!r}: the corrector's signal-to-noise ratio must be > 0")
  if isinstance(corrector_steps, bool) or int(corrector_steps) != corrector_steps:
    raise ValueError(f"corrector_steps={corrector_steps!r}: must be an integer >= 0")
  if corrector_steps < 0:
    raise ValueError(f"corrector_steps={corrector_steps!r}: must be an integer >= 0")


def _sigma_factory(name: str, run: Callable[..., SamplerOutput], defaults: dict):
  """EDM-style samplers: noise levels ``sigmas`` and the denoiser :func:`sigma_denoiser`."""

  def factory(
    *,
    target,
    coefficients_fn=None,
    sigmas,
    time_of_sigma=None,
    t_min: float = 0.0,
    t_max: float = 1.0,
    **options,
  ) -> Sampler:
    unknown = set(options) - set(defaults)
    if unknown:
      raise ValueError(
        f"sampler {name!r} does not take {sorted(unknown)}; its options are {sorted(defaults)}"
      )
    options = {**defaults, **options}
    _require(coefficients_fn, name)
    diffusion.check_sigmas(sigmas)
    resolved = _target(target)

    def sample(
      key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
    ) -> SamplerOutput:
      predict = guided(predict, predict_uncond, guidance_scale)
      denoise = sigma_denoiser(
        predict,
        target=resolved,
        coefficients_fn=coefficients_fn,
        time_of_sigma=time_of_sigma,
        t_min=t_min,
        t_max=t_max,
      )
      x_init = jnp.asarray(sigmas)[0].astype(noise.dtype) * noise
      return run(
        key, denoise, x_init, sigmas=sigmas, return_trajectory=return_trajectory, **options
      )

    return sample

  factory.__name__ = f"{name}_sampler"
  factory.__doc__ = f"The {name!r} sampler on noise levels ``sigmas``; options {defaults}."
  return factory


def _discrete_start(schedule: DiscreteSchedule, steps: Array) -> Array:
  """``sigma = sqrt(1 - abar) = sqrt(sigmoid(-lambda))`` at the first step."""
  return alpha_sigma_from_log_snr(schedule.log_snr[steps[0]])[1]


def _discrete_factory(
  name: str,
  run: Callable[..., SamplerOutput],
  defaults: dict,
  resolvers: dict[str, Callable] | None = None,
):
  """DDPM-style samplers over ``steps`` of a discrete ``schedule``."""
  resolvers = resolvers or {}

  def factory(
    *, target, schedule: DiscreteSchedule, steps=None, time_of_step=None, **options
  ) -> Sampler:
    unknown = set(options) - set(defaults)
    if unknown:
      raise ValueError(
        f"sampler {name!r} does not take {sorted(unknown)}; its options are {sorted(defaults)}"
      )
    options = {**defaults, **options}
    options = {k: resolvers[k](v) if k in resolvers else v for k, v in options.items()}
    resolved = _target(target)
    diffusion.check_discrete_target(resolved)
    if steps is None:
      steps = jnp.arange(schedule.num_steps - 1, -1, -1, dtype=jnp.int32)
    diffusion.check_steps(steps, schedule.num_steps)

    def sample(
      key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
    ) -> SamplerOutput:
      predict = guided(predict, predict_uncond, guidance_scale)
      x_init = _discrete_start(schedule, steps).astype(noise.dtype) * noise
      return run(
        key,
        predict,
        x_init,
        target=resolved,
        schedule=schedule,
        steps=steps,
        time_of_step=time_of_step,
        return_trajectory=return_trajectory,
        **options,
      )

    return sample

  factory.__name__ = f"{name}_sampler"
  factory.__doc__ = f"The discrete {name!r} sampler over ``steps`` of ``schedule``."
  return factory


SAMPLERS: dict[str, Callable[..., Sampler]] = {
  "ddpm": _discrete_factory(
    "ddpm",
    diffusion.ddpm_sample,
    dict(variance="small"),
    dict(variance=diffusion.get_ddpm_variance),
  ),
  "ddim": _discrete_factory("ddim", diffusion.ddim_sample, dict(eta=0.0)),
  "euler": _fixed_factory("euler"),
  "heun": _fixed_factory("heun"),
  "midpoint": _fixed_factory("midpoint"),
  "rk4": _fixed_factory("rk4"),
  "edm": _sigma_factory(
    "edm", edm.edm_sample, dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
  ),
  "dpmpp_2m": _dpmpp_factory(2),
  "dpmpp_3m": _dpmpp_factory(3),
  "euler_ancestral": _sigma_factory(
    "euler_ancestral", diffusion.euler_ancestral_sample, dict(eta=1.0, s_noise=1.0)
  ),
  "dopri5": _adaptive_factory("dopri5"),
  "tsit5": _adaptive_factory("tsit5"),
  "unipc": _process_factory(
    "unipc",
    _deterministic(multistep.unipc_sample),
    dict(order=2, variant="bh2", corrector=True, lower_order_final=True),
    resolvers=dict(variant=multistep.get_unipc_variant),
    check=_check_unipc,
  ),
  "deis": _process_factory(
    "deis", _deterministic(multistep.deis_sample), dict(order=2), check=_check_deis
  ),
  "dpmpp_2m_sde": _process_factory(
    "dpmpp_2m_sde",
    multistep.dpmpp_2m_sde_sample,
    dict(eta=1.0, s_noise=1.0, solver_type="midpoint"),
    resolvers=dict(solver_type=multistep.get_dpmpp_sde_solver_type),
    check=_check_dpmpp_sde,
  ),
  "euler_maruyama": _process_factory(
    "euler_maruyama", sde.euler_maruyama_sample, dict(eta=1.0), check=_check_sde
  ),
  "sde_heun": _process_factory("sde_heun", sde.sde_heun_sample, dict(eta=1.0), check=_check_sde),
  "pc": _process_factory(
    "pc", sde.pc_sample, dict(eta=1.0, snr=0.16, corrector_steps=1), check=_check_pc
  ),
}


def get_sampler(name: str, **kwargs) -> Sampler:
  """Resolves a sampler by name (once, at the edge) and binds its settings.

  Args:
    name: one of ``SAMPLERS``: "ddpm", "ddim", "euler", "heun", "midpoint", "rk4", "edm",
      "dpmpp_2m", "dpmpp_3m", "euler_ancestral", "dopri5", "tsit5", "unipc", "deis",
      "dpmpp_2m_sde", "euler_maruyama", "sde_heun", "pc".
    **kwargs: the family's settings (module docstring).

  Returns:
    ``sample(key, predict, noise, *, predict_uncond=None, guidance_scale=1.0,
    return_trajectory=False) -> SamplerOutput``.
  """
  factory = lookup(SAMPLERS, name, "sampler")
  parameters = inspect.signature(factory).parameters
  takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
  unknown = set(kwargs) - set(parameters)
  if unknown and not takes_options:
    raise ValueError(
      f"sampler {name!r} does not take {sorted(unknown)}; it takes {sorted(parameters)}"
    )
  missing = [
    p.name
    for p in parameters.values()
    if p.default is inspect.Parameter.empty
    and p.kind is inspect.Parameter.KEYWORD_ONLY
    and p.name not in kwargs
  ]
  if missing:
    raise ValueError(f"sampler {name!r} needs {missing}")
  return factory(**kwargs)
