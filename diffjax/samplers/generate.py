"""Sample generators for trained models: a network ``apply`` plus a sampler name -> samples.

The edge between the training code and the samplers: :func:`flow_generator` (a velocity model in
flow time, any source), :func:`diffusion_generator` (a model trained on a discrete DDPM
schedule), :func:`continuous_diffusion_generator` (a model trained on a continuous schedule),
:func:`edm_generator` (EDM's denoiser ``D(x; sigma)``) and :func:`consistency_generator` (a
consistency function in flow time, any source) return

    generate(params, key, num, *, steps, sampler=None, labels=None, guidance=None,
             return_trajectories=False, chunk_size=None, on_chunk=None,
             guidance_rule=None, guide_apply=None, guide_params=None)
      -> dict(samples=..., trajectories=..., nfe=...)

with ``apply(params, x_t, t, cond) -> prediction`` (``cond=None`` is the null label of a
class-conditional model). The sampler name is resolved once per distinct call (and the jitted
program kept in a cache of :data:`JIT_CACHE_SIZE` programs); ``guidance`` is the
classifier-free guidance weight ``w`` (None: no guidance). ``guidance_rule``
(:class:`~diffjax.samplers.guidance.Guidance`) adds a guidance interval or APG (on the x0
estimate of a Gaussian process; with momentum, carried through the steps of a flow model's
"euler" sampler); ``guide_apply(guide_params, x_t, t, cond)`` replaces the null label by an
autoguidance guide with the same labels (:mod:`~diffjax.samplers.guidance`).

``chunk_size=None`` draws the ``num`` samples as one batch from one key. With ``chunk_size``
they are drawn ``chunk_size`` at a time (memory flat in ``num``) and returned as NumPy arrays;
example ``i`` is sampled alone (``vmap``) from ``fold_in(key, i)``, so the samples do not
depend on the chunk size, and ``nfe`` is the largest over the examples (an adaptive solver
then controls each example's error on its own). ``on_chunk(count)`` is called after each chunk.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.parameterization import (
  Coefficients,
  PredictionTarget,
  diffusion_coefficients,
  get_prediction_target,
)
from diffjax.samplers import grids
from diffjax.samplers.consistency import consistency_sampler, multistep_times
from diffjax.samplers.diffusion import interpolated_coefficients_fn
from diffjax.samplers.few_step import at_equal_times, few_step_sampler
from diffjax.samplers.fields import CoefficientsFn, time_of_log_snr
from diffjax.samplers.guidance import Guidance, apg_momentum_euler_sampler, guided_predictor
from diffjax.samplers.registry import SAMPLERS, Sampler, get_sampler
from diffjax.schedules import ContinuousSchedule, DiscreteSchedule

__all__ = [
  "FLOW_SAMPLERS",
  "CONTINUOUS_SAMPLERS",
  "CONSISTENCY_SAMPLERS",
  "flow_generator",
  "few_step_generator",
  "consistency_generator",
  "diffusion_generator",
  "continuous_diffusion_generator",
  "edm_generator",
  "noise_level_coefficients",
  "make_generate",
]

FLOW_SAMPLERS = ("euler", "heun", "midpoint", "rk4", "dopri5", "tsit5")
"""Samplers that need only a velocity (any source distribution)."""

GAUSSIAN_SAMPLERS = (
  "dpmpp_2m",
  "dpmpp_3m",
  "unipc",
  "deis",
  "dpmpp_2m_sde",
  "euler_maruyama",
  "sde_heun",
  "pc",
)
"""Samplers on a time grid that need the Gaussian process ``x_t = alpha x0 + sigma eps`` itself
(``coefficients_fn``): the multistep exponential integrators (:mod:`~diffjax.samplers.diffusion`,
:mod:`~diffjax.samplers.multistep`) and the reverse-SDE samplers (:mod:`~diffjax.samplers.sde`),
which need the score."""

GAUSSIAN_FLOW_SAMPLERS = FLOW_SAMPLERS + GAUSSIAN_SAMPLERS
"""Samplers of a velocity model on a Gaussian path: an ``N(0, I)`` source drawn independently of
the data, so that the path's :meth:`~diffjax.paths.Path.gaussian_coefficients` turn the velocity
into ``x0_hat``, ``eps_hat`` and the score."""

CONTINUOUS_SAMPLERS = FLOW_SAMPLERS + GAUSSIAN_SAMPLERS + ("edm", "euler_ancestral")
"""Samplers of a continuous Gaussian process whose ``coefficients_fn`` is known: the
probability-flow ODE solvers and :data:`GAUSSIAN_SAMPLERS` on a time grid and the noise-level
samplers ("edm", "euler_ancestral"). Not "ddpm" and "ddim", which step a discrete schedule."""

_SDE_SAMPLERS = ("euler_maruyama", "sde_heun", "pc")
"""Samplers whose grid must keep ``alpha > 0`` (:func:`~diffjax.samplers.sde.check_sde_times`)."""

FLOW_SDE_SIGMA_MAX = 80.0
"""``sigma / alpha`` where the SDE samplers of a flow start (EDM's ``sigma_max``, Karras et al.
2022, https://arxiv.org/abs/2206.00364): the linear path's reverse SDE is infinitely stiff at
``alpha = 0``."""

_SIGMA_SAMPLERS = ("edm", "euler_ancestral")

Generate = Callable[..., dict]


# Compiled programs kept per generator: one per distinct (sampler, steps, batch, guidance, labels,
# trajectories, chunked) combination, least recently used dropped first. Sweeps over steps or
# batch sizes would otherwise keep every program alive.
JIT_CACHE_SIZE = 16


def _per_example_keys(key: Array, start: Array, count: int) -> Array:
  """``fold_in(key, i)`` for ``i = start .. start + count - 1``: example ``i``'s key depends on
  ``key`` and ``i`` only, so a chunked draw equals the one-batch draw whatever the chunk size."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, start + jnp.arange(count))


def make_generate(
  build: Callable[[str, int], Sampler],
  *,
  apply: Callable,
  source: Callable,
  default: str,
  num_classes: int,
  x0_space: tuple[PredictionTarget, CoefficientsFn] | None = None,
  euler_times: Callable[[int], Array] | None = None,
) -> Generate:
  """The generator every objective returns, around its ``build(name, steps) -> Sampler``.

  ``generate(params, key, num, *, steps, sampler=None, labels=None, guidance=None,
  return_trajectories=False, chunk_size=None, on_chunk=None, guidance_rule=None,
  guide_apply=None, guide_params=None) -> dict(samples, trajectories, nfe)`` draws ``source``
  points, labels (uniform over ``num_classes`` when guiding without labels) and runs the named
  sampler of ``apply``'s predictions, with classifier-free guidance, a guidance rule (interval,
  APG) or an autoguidance guide; one compiled program per setting (a bounded LRU cache), and
  with ``chunk_size`` a draw per example from ``fold_in(key, i)`` so samples do not depend on
  the chunk size.

  Args:
    build: ``(sampler name, steps) -> Sampler``; raises ``ValueError`` for a name it lacks.
    apply: ``apply(params, x_t, t, cond) -> prediction``.
    source: ``(key, num) -> [num, *data_shape]``.
    default: the sampler used when none is named.
    num_classes: > 0 for a class-conditional model.
    x0_space: the prediction target and coefficients that give the model's denoised (x0)
      prediction, for APG; None where the model defines none.
    euler_times: ``steps -> grid`` of the Euler sampler, for APG's momentum loop (flow models).
  """

  def draw(both, key, num, labels, scale, *, sample_fn, guided, trajectories, rule, guide_apply):
    """``num`` samples from one key (the whole batch shares the key of the source, the labels
    and the sampler). ``both`` is ``(params, guide_params)``."""
    params, guide_params = both
    key_source, key_labels, key_sampler = jax.random.split(key, 3)
    if labels is None and guided:
      labels = jax.random.randint(key_labels, (num,), 0, num_classes)
    noise = source(key_source, num)
    predict = lambda x, t: apply(params, x, t, labels)
    uncond = (lambda x, t: apply(params, x, t, None)) if guided else None
    if guide_apply is not None:  # autoguidance: the guide with the same labels is the reference
      uncond = lambda x, t: guide_apply(guide_params, x, t, labels)
    if rule is not None and not _stateful(rule):
      target, coefficients_fn = x0_space or (None, None)
      predict = guided_predictor(
        predict, uncond, scale=scale, guidance=rule, target=target, coefficients_fn=coefficients_fn
      )
      uncond = None
    out = sample_fn(
      key_sampler,
      predict,
      noise,
      predict_uncond=uncond,
      guidance_scale=scale,
      return_trajectory=trajectories,
    )
    return dict(samples=out.samples, trajectories=out.trajectory, nfe=jnp.asarray(out.nfe))

  def check_rule(name: str, rule: Guidance | None) -> None:
    """What a generator of this kind cannot do with ``rule``: one line, before tracing."""
    if rule is None or rule.apg is None:
      return
    if x0_space is None:
      raise ValueError(
        "APG works on the denoised (x0) prediction, which this model does not define (a "
        "Gaussian process is needed); use CFG (no APG options)"
      )
    if _stateful(rule) and (euler_times is None or name != "euler"):
      raise ValueError(
        f"APG momentum={rule.apg.momentum!r} is carried through the steps of the 'euler' "
        f"sampler of a flow model only (sampler {name!r}); pass sampler 'euler' on a "
        "flow-matching model, or set the momentum to 0"
      )

  @functools.lru_cache(maxsize=JIT_CACHE_SIZE)
  def compiled(name, steps, num, guided, trajectories, chunked, rule, guide_apply) -> Callable:
    if rule is not None and _stateful(rule):
      target, coefficients_fn = x0_space
      sample_fn = apg_momentum_euler_sampler(
        times=euler_times(steps), target=target, coefficients_fn=coefficients_fn, guidance=rule
      )
    else:
      sample_fn = build(name, steps)
    options = dict(
      sample_fn=sample_fn,
      guided=guided,
      trajectories=trajectories,
      rule=rule,
      guide_apply=guide_apply,
    )
    if not chunked:
      return jax.jit(
        lambda params, key, labels, scale: draw(params, key, num, labels, scale, **options)
      )

    def one(params, key, label, scale):
      labels = None if label is None else label[None]
      out = draw(params, key, 1, labels, scale, **options)
      trajectory = None if out["trajectories"] is None else out["trajectories"][:, 0]
      return dict(samples=out["samples"][0], trajectories=trajectory, nfe=out["nfe"])

    def chunk(params, key, start, labels, scale):
      keys = _per_example_keys(key, start, num)
      label_axis = None if labels is None else 0
      return jax.vmap(one, in_axes=(None, 0, label_axis, None))(params, keys, labels, scale)

    return jax.jit(chunk)

  def generate(
    params: Any,
    key: Array,
    num: int,
    *,
    steps: int,
    sampler: str | None = None,
    labels: Array | None = None,
    guidance: float | None = None,
    return_trajectories: bool = False,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    guidance_rule: Guidance | None = None,
    guide_apply: Callable | None = None,
    guide_params: Any = None,
  ) -> dict:
    name = default if sampler is None else sampler
    if (guidance_rule is not None or guide_apply is not None) and guidance is None:
      raise ValueError(
        "a guidance interval, APG or an autoguidance guide needs a guidance weight: pass "
        "guidance (1 is the conditional model)"
      )
    check_rule(name, guidance_rule)
    rule_options = (guidance_rule, guide_apply)
    both = (params, guide_params)
    if int(steps) != steps or steps < 1:
      raise ValueError(f"steps={steps!r}: must be a positive integer")
    if guidance is not None and labels is None and num_classes < 1:
      raise ValueError(
        "guidance needs a class-conditional model: pass labels, or build the "
        "generator with num_classes > 0 to draw them"
      )
    scale = jnp.asarray(1.0 if guidance is None else guidance, jnp.float32)
    guided = guidance is not None
    if chunk_size is None:
      run = compiled(
        name, int(steps), int(num), guided, bool(return_trajectories), False, *rule_options
      )
      return run(both, key, labels, scale)
    if int(chunk_size) != chunk_size or chunk_size < 1:
      raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    chunk = min(int(chunk_size), int(num))
    run = compiled(name, int(steps), chunk, guided, bool(return_trajectories), True, *rule_options)
    return _draw_in_chunks(
      run, both, key, int(num), chunk=chunk, labels=labels, scale=scale, on_chunk=on_chunk
    )

  generate.cache_info = compiled.cache_info
  return generate


def _stateful(rule: Guidance) -> bool:
  """APG with momentum: its running average is carried across the sampler's steps."""
  return rule.apg is not None and rule.apg.momentum != 0


def _draw_in_chunks(run, params, key, num, *, chunk, labels, scale, on_chunk) -> dict:
  """``num`` samples drawn ``chunk`` at a time by ``run``, gathered on the host (NumPy). One
  compiled shape: the last chunk is padded and cut. Example ``i`` uses ``fold_in(key, i)``, so
  the result does not depend on ``chunk``."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (num,):
      raise ValueError(f"labels of shape {labels.shape}: expected ({num},)")
  samples = trajectories = None
  nfe = 0
  for start in range(0, num, chunk):
    count = min(chunk, num - start)
    chunk_labels = None
    if labels is not None:
      chunk_labels = np.zeros((chunk,), labels.dtype)
      chunk_labels[:count] = labels[start : start + count]
    out = run(params, key, jnp.int32(start), chunk_labels, scale)
    part = np.asarray(out["samples"])[:count]
    if samples is None:
      samples = np.empty((num,) + part.shape[1:], part.dtype)
    samples[start : start + count] = part
    if out["trajectories"] is not None:
      path = np.asarray(out["trajectories"])[:count]  # [count, steps + 1, *event]
      if trajectories is None:
        trajectories = np.empty((num,) + path.shape[1:], path.dtype)
      trajectories[start : start + count] = path
    nfe = max(nfe, int(np.max(np.asarray(out["nfe"])[:count])))
    if on_chunk is not None:
      on_chunk(count)
  if trajectories is not None:
    trajectories = np.moveaxis(trajectories, 0, 1)  # [steps + 1, num, *event], as unchunked
  return dict(samples=samples, trajectories=trajectories, nfe=nfe)


def flow_generator(
  *,
  apply: Callable,
  source: Callable[[Array, int], Array],
  data_shape: tuple[int, ...],
  num_classes: int = 0,
  default_sampler: str = "euler",
  coefficients_fn: CoefficientsFn | None = None,
  time_shift: float = 1.0,
) -> Generate:
  """Generator for a flow-matching model: ``apply`` predicts the velocity in flow time.

  Integrates ``dx/dt = apply(params, x, t, cond)`` from ``t = 0`` (``x ~ source``) to ``t = 1``
  on a uniform grid of ``steps`` steps, under SD3's ``time_shift``
  (:func:`~diffjax.samplers.grids.shift_times`), with one of :data:`FLOW_SAMPLERS` (for the
  adaptive ones ``steps`` only sets where trajectories are saved).

  With ``coefficients_fn``, the path's Gaussian coefficients (an ``N(0, I)`` source drawn
  independently of the data, :meth:`~diffjax.paths.Path.gaussian_coefficients`), the velocity
  also gives ``x0_hat``, ``eps_hat`` and the score, and :data:`GAUSSIAN_SAMPLERS` sample it too:
  on the same grid, except the reverse-SDE samplers ("euler_maruyama", "sde_heun", "pc"), which
  run on EDM's time steps (:func:`~diffjax.samplers.grids.edm_grid`, ``rho = 7``, then the
  shift) from ``sigma / alpha =`` :data:`FLOW_SDE_SIGMA_MAX` to ``t = 1``: their drift is
  infinite at ``alpha = 0``. Every one of them starts from ``sigma(t_start) noise``.

  Args:
    apply: ``apply(params, x_t, t, cond) -> velocity``.
    source: ``(key, num) -> [num, *data_shape]`` samples of the source.
    data_shape: shape of one example (for error messages).
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    default_sampler: used when ``sampler`` is None.
    coefficients_fn: the Gaussian path's coefficients in flow time, or None (any source: only
      :data:`FLOW_SAMPLERS`).
    time_shift: SD3's shift of the grid toward the noise end (1: uniform; Esser et al. 2024,
      https://arxiv.org/abs/2403.03206).
  """
  choices = FLOW_SAMPLERS if coefficients_fn is None else GAUSSIAN_FLOW_SAMPLERS
  if not time_shift > 0:
    raise ValueError(f"time_shift={time_shift!r}: must be > 0 (1 leaves the grid uniform)")

  def uniform(steps: int) -> Array:
    times = grids.uniform_grid(num_steps=steps, t_start=0.0, t_end=1.0)
    return grids.shift_times(times, shift=time_shift)

  def sde_times(steps: int) -> Array:
    t_noise = time_of_log_snr(
      jnp.asarray(-2.0 * math.log(FLOW_SDE_SIGMA_MAX)), coefficients_fn=coefficients_fn
    )
    times = grids.edm_grid(
      num_steps=steps, t_start=float(t_noise), t_end=1.0, coefficients_fn=coefficients_fn
    )
    return grids.shift_times(times, shift=time_shift)

  def build(name: str, steps: int) -> Sampler:
    if name in FLOW_SAMPLERS:
      return get_sampler(name, target="velocity", times=uniform(steps))
    if name in choices:
      times = sde_times(steps) if name in _SDE_SAMPLERS else uniform(steps)
      return get_sampler(name, target="velocity", coefficients_fn=coefficients_fn, times=times)
    if name in GAUSSIAN_SAMPLERS:
      raise ValueError(
        f"sampler {name!r} needs the model's score, which a velocity model has only on a "
        "Gaussian path from an N(0, I) source with independent pairs; choose one of "
        f"{list(FLOW_SAMPLERS)}"
      )
    raise ValueError(
      f"sampler {name!r} cannot sample a velocity model of "
      f"{'an arbitrary source' if coefficients_fn is None else 'a Gaussian path'}; "
      f"choose one of {list(choices)}"
    )

  del data_shape
  gaussian = coefficients_fn is not None
  return make_generate(
    build,
    apply=apply,
    source=source,
    default=default_sampler,
    num_classes=num_classes,
    x0_space=(get_prediction_target("velocity"), coefficients_fn) if gaussian else None,
    euler_times=uniform if gaussian else None,
  )


CONSISTENCY_SAMPLERS = ("consistency",)
"""Samplers of a consistency function ``f(x_t, t)`` in flow time (the data end of the ODE
trajectory through ``x_t``)."""


def consistency_generator(
  *,
  apply: Callable,
  source: Callable[[Array, int], Array],
  num_classes: int = 0,
  default_sampler: str = "consistency",
) -> Generate:
  """Generator for a consistency model: ``apply(params, x_t, t, cond) -> f(x_t, t)`` in flow
  time, sampled by "consistency", Song et al.'s multistep consistency sampling (2023, Algorithm
  1, https://arxiv.org/abs/2303.01469) with ``steps`` network evaluations at the flow times
  :func:`~diffjax.samplers.consistency.multistep_times` and fresh ``source`` draws for the
  re-noising (:func:`~diffjax.samplers.consistency.multistep_consistency_sample`).

  Args:
    apply: ``apply(params, x_t, t, cond) -> f(x_t, t)``.
    source: ``(key, num) -> [num, *data_shape]`` samples of the source.
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    default_sampler: used when ``sampler`` is None.
  """

  def build(name: str, steps: int) -> Sampler:
    if name not in CONSISTENCY_SAMPLERS:
      raise ValueError(
        f"sampler {name!r} cannot sample a consistency model; choose one of "
        f"{list(CONSISTENCY_SAMPLERS)}"
      )
    return consistency_sampler(times=multistep_times(num_steps=steps), source=source)

  return make_generate(
    build, apply=apply, source=source, default=default_sampler, num_classes=num_classes
  )


def few_step_generator(
  *,
  apply: Callable,
  source: Callable[[Array, int], Array],
  jump_sampler: str,
  num_classes: int = 0,
  default_sampler: str | None = None,
) -> Generate:
  """Generator for a mean-velocity model of two times, ``apply(params, x_t, ts, cond) -> F``
  with ``ts = [batch, 2]`` rows ``(t, s)`` in flow time and ``x_s = x_t + (s - t) F``.

  ``jump_sampler`` (the objective's name for it: "meanflow", "shortcut") jumps along a uniform
  grid of ``steps`` steps from ``t = 0`` to ``t = 1``,
  :func:`~diffjax.samplers.few_step.few_step_sampler`; the :data:`FLOW_SAMPLERS` integrate the
  instantaneous velocity ``F(x, t, t)`` on the same grid
  (:func:`~diffjax.samplers.few_step.at_equal_times`).

  Args:
    apply: ``apply(params, x_t, ts, cond) -> F``.
    source: ``(key, num) -> [num, *data_shape]`` samples of the source.
    jump_sampler: the name of the jumping sampler.
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    default_sampler: used when ``sampler`` is None (None: ``jump_sampler``).
  """

  def build(name: str, steps: int) -> Sampler:
    times = grids.uniform_grid(num_steps=steps, t_start=0.0, t_end=1.0)
    if name == jump_sampler:
      return few_step_sampler(times=times)
    if name in FLOW_SAMPLERS:
      return at_equal_times(get_sampler(name, target="velocity", times=times))
    raise ValueError(
      f"sampler {name!r} cannot sample a model of two times; choose one of "
      f"{[jump_sampler, *FLOW_SAMPLERS]}"
    )

  return make_generate(
    build,
    apply=apply,
    source=source,
    default=default_sampler or jump_sampler,
    num_classes=num_classes,
  )


def _normal_source(data_shape: tuple[int, ...]) -> Callable[[Array, int], Array]:
  """``N(0, I)`` draws; every sampler given ``coefficients_fn`` scales them to its prior
  (``sigma(times[0])``, ``sigmas[0]`` or the first discrete step's, see
  :mod:`~diffjax.samplers.registry`)."""

  def source(key, num):
    return jax.random.normal(key, (num,) + tuple(data_shape), jnp.float32)

  return source


def diffusion_generator(
  *,
  apply: Callable,
  schedule: DiscreteSchedule,
  prediction: str,
  data_shape: tuple[int, ...],
  num_classes: int = 0,
  default_sampler: str = "ddim",
) -> Generate:
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

  def build(name: str, steps: int) -> Sampler:
    if name not in SAMPLERS:
      raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if name in ("ddpm", "ddim"):
      steps_seq = grids.trailing_steps(num_steps=min(steps, num_train), num_train_steps=num_train)
      return get_sampler(name, target=target, schedule=schedule, steps=steps_seq)
    if name in ("edm", "euler_ancestral"):
      log_snr = jnp.clip(schedule.log_snr, -30.0, None)
      sigmas = grids.edm_sigmas(
        num_steps=steps,
        sigma_min=float(jnp.exp(-0.5 * log_snr[0])),
        sigma_max=float(jnp.exp(-0.5 * log_snr[-1])),
      )
      return get_sampler(
        name,
        target=target,
        coefficients_fn=coefficients_fn,
        sigmas=sigmas,
        t_min=t_first,
        t_max=1.0,
      )
    times = grids.uniform_grid(num_steps=steps, t_start=1.0, t_end=t_first)
    return get_sampler(name, target=target, coefficients_fn=coefficients_fn, times=times)

  return make_generate(
    build,
    apply=apply,
    source=_normal_source(data_shape),
    default=default_sampler,
    num_classes=num_classes,
    x0_space=(target, coefficients_fn),
  )


def _process_build(
  *,
  target: PredictionTarget,
  coefficients_fn: CoefficientsFn,
  times: Callable[[int], Array],
  sigmas: Callable[[int], Array],
  denoiser_options: dict,
  edm_options: dict,
) -> Callable[[str, int], Sampler]:
  """``build(name, steps)`` for :data:`CONTINUOUS_SAMPLERS`: the ODE solvers and DPM-Solver++
  over ``times(steps)``, "edm" and "euler_ancestral" over ``sigmas(steps)``."""

  def build(name: str, steps: int) -> Sampler:
    if name not in CONTINUOUS_SAMPLERS:
      raise ValueError(
        f"sampler {name!r} cannot sample a continuous-time diffusion model; "
        f"choose one of {list(CONTINUOUS_SAMPLERS)}"
      )
    if name in _SIGMA_SAMPLERS:
      options = edm_options if name == "edm" else {}
      return get_sampler(
        name,
        target=target,
        coefficients_fn=coefficients_fn,
        sigmas=sigmas(steps),
        **denoiser_options,
        **options,
      )
    return get_sampler(name, target=target, coefficients_fn=coefficients_fn, times=times(steps))

  return build


def continuous_diffusion_generator(
  *,
  apply: Callable,
  schedule: ContinuousSchedule,
  prediction: str,
  data_shape: tuple[int, ...],
  num_classes: int = 0,
  t_min: float = 1e-5,
  default_sampler: str = "heun",
) -> Generate:
  """Generator for a model trained on a continuous ``schedule`` (diffusion time, ``t = 0``
  data, model time ``t`` in ``[t_min, 1]``).

  The process is ``x_t = alpha(t) x0 + sigma(t) eps`` with ``coefficients_fn = partial(
  diffusion_coefficients, schedule)``. Every sampler starts from ``N(0, sigma(1)^2 I)``, the
  terminal marginal up to the data's share ``alpha(1) x0`` (so ``N(0, sigma_max^2 I)`` for VE)
  and ends at ``t_min``. The time samplers of :data:`CONTINUOUS_SAMPLERS` run on EDM's time
  steps (:func:`~diffjax.samplers.grids.edm_grid`: ``sigma / alpha`` rho-spaced, rho = 7),
  which Karras et al. (2022, Sec. 3 and Fig. 2, https://arxiv.org/abs/2206.00364) found better
  than uniform steps for the VP and VE processes alike; "edm" and "euler_ancestral" run on
  :func:`~diffjax.samplers.grids.edm_sigmas` between ``sigma / alpha`` at ``t_min`` and at 1.

  Args:
    apply: ``apply(params, x_t, t, cond) -> prediction``.
    schedule: the training schedule.
    prediction: the training target's name ("eps", "x0", "v", "velocity", "score").
    data_shape: shape of one example.
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    t_min: the earliest time the model was trained on (where sampling stops).
    default_sampler: used when ``sampler`` is None.
  """
  target = get_prediction_target(prediction)
  coefficients_fn = functools.partial(diffusion_coefficients, schedule)
  # sigma / alpha = exp(-lambda / 2), the variance-exploding noise level.
  sigma_ve = jnp.exp(-0.5 * schedule.log_snr(jnp.asarray([t_min, 1.0], jnp.float32)))
  sigma_lo, sigma_hi = float(sigma_ve[0]), float(sigma_ve[1])

  def times(steps):
    return grids.edm_grid(
      num_steps=steps, t_start=1.0, t_end=t_min, coefficients_fn=coefficients_fn
    )

  def sigmas(steps):
    return grids.edm_sigmas(num_steps=steps, sigma_min=sigma_lo, sigma_max=sigma_hi)

  build = _process_build(
    target=target,
    coefficients_fn=coefficients_fn,
    times=times,
    sigmas=sigmas,
    denoiser_options=dict(t_min=t_min, t_max=1.0),
    edm_options={},
  )
  return make_generate(
    build,
    apply=apply,
    source=_normal_source(data_shape),
    default=default_sampler,
    num_classes=num_classes,
    x0_space=(target, coefficients_fn),
  )


def noise_level_coefficients(sigma: Array) -> Coefficients:
  """The process ``x = x0 + sigma eps`` with the noise level as its time: ``alpha = 1``,
  ``sigma(t) = t``, ``d_alpha = 0``, ``d_sigma = 1`` (EDM's choice ``sigma(t) = t``, ``s(t) =
  1``; Karras et al. 2022, Table 1, https://arxiv.org/abs/2206.00364). Its probability-flow
  field for an x0 (denoiser) prediction is ``dx / dsigma = (x - D(x; sigma)) / sigma``."""
  sigma = jnp.asarray(sigma)
  return Coefficients(
    alpha=jnp.ones_like(sigma),
    sigma=sigma,
    d_alpha=jnp.zeros_like(sigma),
    d_sigma=jnp.ones_like(sigma),
  )


def _identity(sigma: Array) -> Array:
  return sigma


def edm_generator(
  *,
  apply: Callable,
  data_shape: tuple[int, ...],
  num_classes: int = 0,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = float("inf"),
  s_noise: float = 1.0,
  default_sampler: str = "edm",
) -> Generate:
  """Generator for EDM's denoiser ``apply(params, x, sigma, cond) -> D(x; sigma)`` (the
  preconditioned network; model time is the noise level, :func:`noise_level_coefficients`).

  "edm" is Karras et al.'s Algorithm 2 (Heun with churn ``s_churn``, ``s_tmin``, ``s_tmax``,
  ``s_noise``; Algorithm 1 when ``s_churn = 0``) on the ``steps + 1`` noise levels of eq. 5
  from ``sigma_max`` to ``sigma_min`` and a final 0 (:func:`~diffjax.samplers.grids.edm_sigmas`),
  as is "euler_ancestral". The ODE solvers and DPM-Solver++ integrate ``dx / dsigma = (x -
  D(x; sigma)) / sigma`` over the same spacing without the final 0 (``steps + 1`` levels from
  ``sigma_max`` to ``sigma_min``, where ``D`` is not needed), so their samples keep noise of
  std ``sigma_min``. All start from ``N(0, sigma_max^2 I)`` (Karras et al. 2022,
  https://arxiv.org/abs/2206.00364, Algorithms 1 and 2).

  Args:
    apply: ``apply(params, x, sigma, cond) -> D(x; sigma)`` with ``sigma`` ``[batch]``.
    data_shape: shape of one example.
    num_classes: labels drawn uniformly for guidance when none are given (0: unconditional).
    sigma_min, sigma_max, rho: the noise levels of eq. 5.
    s_churn, s_tmin, s_tmax, s_noise: the churn of Algorithm 2 (used by "edm").
    default_sampler: used when ``sampler`` is None.
  """

  def sigmas(steps):
    return grids.edm_sigmas(num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)

  def times(steps):
    return grids.edm_sigmas(num_steps=steps + 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)[
      :-1
    ]

  build = _process_build(
    target=get_prediction_target("x0"),
    coefficients_fn=noise_level_coefficients,
    times=times,
    sigmas=sigmas,
    denoiser_options=dict(time_of_sigma=_identity),
    edm_options=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise),
  )
  return make_generate(
    build,
    apply=apply,
    source=_normal_source(data_shape),
    default=default_sampler,
    num_classes=num_classes,
    x0_space=(get_prediction_target("x0"), noise_level_coefficients),
  )
