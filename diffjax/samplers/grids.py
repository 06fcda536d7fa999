"""Time grids for the samplers, each in integration order (first entry = where sampling starts).

Continuous grids are ``[num_steps + 1]`` times of the process's own clock, from the noise end
to the data end unless ``t_start``/``t_end`` say otherwise. Each family keeps its literature's
clock (diffusion: data at ``t = 0``, noise at ``t = 1``; flow matching: noise at ``t = 0``, data
at ``t = 1``), so the direction of sampling is not the same number in both: it is taken from
what is sampled (:func:`sampling_interval`). Without ``coefficients_fn`` the model is a velocity
field in flow-matching time and sampling runs ``0 -> 1``; with it, sampling starts at the end of
lower log-SNR (``1 -> 0`` for a diffusion schedule, ``0 -> 1`` for a flow path's coefficients).
The ODE samplers refuse a grid that runs from data to noise (:func:`check_sampling_direction`):
a flow integrated backwards lands far from the data without any error. Discrete step sequences
are ``[num_steps]`` DDPM step indices in sampling order (noisiest first), for DDPM/DDIM respacing.

* :func:`uniform_grid`: equal steps in ``t``;
* :func:`edm_sigmas`: Karras et al.'s rho-spaced noise levels with a final 0 (eq. 5), the grid of
  the EDM and Euler-ancestral samplers; :func:`edm_grid` is the same spacing as model times;
* :func:`log_snr_grid`: equal steps in log-SNR (Lu et al. 2022, the DPM-Solver default);
* :func:`shifted_grid`: a uniform grid under SD3's time shift (Esser et al. 2024),
  :func:`shift_times` for any grid;
* :func:`linspace_steps`, :func:`leading_steps`, :func:`trailing_steps`: the three spacings of
  Lin et al. 2024, Table 2.

Names resolve once, at the edge: :func:`get_time_grid`, :func:`get_discrete_steps`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax._jax_compat import is_tracer
from diffjax._lookup import lookup
from diffjax.samplers.fields import CoefficientsFn, log_snr_of, time_of_log_snr

__all__ = [
  "sampling_interval",
  "check_sampling_direction",
  "uniform_grid",
  "edm_sigmas",
  "edm_grid",
  "log_snr_grid",
  "shift_times",
  "shifted_grid",
  "TIME_GRIDS",
  "get_time_grid",
  "linspace_steps",
  "leading_steps",
  "trailing_steps",
  "DISCRETE_STEPS",
  "get_discrete_steps",
]


def _check_num_steps(num_steps: int):
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: must be a positive integer")


def _ends_log_snr(coefficients_fn: CoefficientsFn, t_start, t_end) -> tuple[float, float]:
  ends = log_snr_of(coefficients_fn(jnp.asarray([t_start, t_end], jnp.float32)))
  return float(ends[0]), float(ends[1])


def sampling_interval(*, coefficients_fn: CoefficientsFn | None = None) -> tuple[float, float]:
  """``(t_noise, t_data)``: where sampling starts and ends on ``[0, 1]`` for what is sampled.

  * no ``coefficients_fn``: a velocity model in flow-matching time, whose source (noise) is at
    ``t = 0`` and data at ``t = 1`` (Lipman et al. 2023, https://arxiv.org/abs/2210.02747):
    ``(0, 1)``;
  * a process ``x_t = alpha(t) x_0 + sigma(t) eps``: the end of lower log-SNR
    ``lambda = log(alpha^2 / sigma^2)`` first, ``(1, 0)`` for a diffusion schedule (Kingma et al.
    2021, https://arxiv.org/abs/2107.00630) and ``(0, 1)`` for a flow path's coefficients
    (:func:`~diffjax.parameterization.flow_coefficients`).

  Raises:
    ValueError: when the log-SNR is the same (or undefined) at both ends.
  """
  if coefficients_fn is None:
    return 0.0, 1.0
  at_zero, at_one = _ends_log_snr(coefficients_fn, 0.0, 1.0)
  if not at_zero != at_one or np.isnan(at_zero) or np.isnan(at_one):
    raise ValueError(
      f"the process's log-SNR is {at_zero} at t = 0 and {at_one} at t = 1, so its noise end is "
      "unknown; pass t_start (the noise end) and t_end (the data end) explicitly"
    )
  return (1.0, 0.0) if at_one < at_zero else (0.0, 1.0)


def check_sampling_direction(
  times: Array, *, coefficients_fn: CoefficientsFn | None = None, name: str = "sampler"
) -> None:
  """Raises a ValueError, before tracing, when ``times`` run from data toward noise.

  Sampling starts from noise: without ``coefficients_fn`` (a velocity model in flow-matching
  time, source at ``t = 0``) the times must increase; with it, the log-SNR must increase from
  ``times[0]`` to ``times[-1]``. Traced ``times`` are not checked.
  """
  if is_tracer(times) or jnp.shape(times)[0] < 2:
    return
  first, last = float(times[0]), float(times[-1])
  if coefficients_fn is None:
    if first > last:
      raise ValueError(
        f"{name}: times run from t={first:g} down to t={last:g}, backwards for a velocity model "
        "in flow-matching time (source at t = 0, data at t = 1); build the grid with "
        "samplers.uniform_grid(num_steps=N), which runs 0 -> 1 here, or pass the process's "
        "coefficients_fn if the model's clock is a diffusion's (noise at t = 1)"
      )
    return
  start, end = _ends_log_snr(coefficients_fn, first, last)
  if start > end:
    raise ValueError(
      f"{name}: times run from t={first:g} (log-SNR {start:.3g}) to t={last:g} (log-SNR "
      f"{end:.3g}), from data toward noise; sampling starts at the noise end: build the grid "
      "with the same coefficients_fn (its direction then follows the process) or swap t_start "
      "and t_end"
    )


def _ends(t_start, t_end, coefficients_fn) -> tuple[float, float]:
  """``(t_start, t_end)`` with the missing ones from :func:`sampling_interval`."""
  if t_start is None or t_end is None:
    noise, data = sampling_interval(coefficients_fn=coefficients_fn)
    t_start = noise if t_start is None else t_start
    t_end = data if t_end is None else t_end
  return t_start, t_end


def uniform_grid(
  *,
  num_steps: int,
  t_start: float | None = None,
  t_end: float | None = None,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """``t_i = t_start + i / N (t_end - t_start)``, ``i = 0..N``.

  ``t_start`` and ``t_end`` default to the noise and data ends of what is sampled
  (:func:`sampling_interval`): ``0 -> 1`` for a velocity model without ``coefficients_fn``
  (flow matching), ``1 -> 0`` for a diffusion schedule's ``coefficients_fn``. Starting at the
  noisiest time ``1`` of a diffusion it is the "trailing" continuous-time spacing of Lin et al.
  2024 (https://arxiv.org/abs/2305.08891, Sec. 3.3). Explicit ends are taken as given (a
  likelihood integrates from data to noise).
  """
  _check_num_steps(num_steps)
  t_start, t_end = _ends(t_start, t_end, coefficients_fn)
  return jnp.linspace(t_start, t_end, num_steps + 1, dtype=jnp.float32)


def edm_sigmas(
  *, num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Array:
  """EDM's noise levels: ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho`` for ``i < N`` and ``sigma_N = 0``.

  Karras et al. (2022), eq. 5, https://arxiv.org/abs/2206.00364; ``[N + 1]`` values, decreasing.
  """
  _check_num_steps(num_steps)
  if not 0.0 < sigma_min < sigma_max:
    raise ValueError(
      f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
    )
  ramp = jnp.linspace(0.0, 1.0, num_steps, dtype=jnp.float32)
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  sigmas = (hi + ramp * (lo - hi)) ** rho
  return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def _check_coefficients_fn(coefficients_fn, name):
  if coefficients_fn is None:
    raise ValueError(
      f"the {name!r} grid is defined by the process's noise levels: pass "
      "coefficients_fn (e.g. functools.partial(diffusion_coefficients, schedule))"
    )


def edm_grid(
  *,
  num_steps: int,
  t_start: float | None = None,
  t_end: float | None = None,
  rho: float = 7.0,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """Times whose variance-exploding noise levels ``sigma_ve = sigma / alpha`` follow EDM's rho
  spacing (Karras et al. 2022, eq. 5) from ``sigma_ve(t_start)`` to ``sigma_ve(t_end)``.

  ``sigma_i^(1/rho)`` is linear in ``i`` over ``i = 0..N`` (no appended zero: the last time is
  ``t_end``); times come from :func:`~diffjax.samplers.fields.time_of_log_snr`. The ends default
  to the process's noise and data ends (:func:`sampling_interval`).
  """
  _check_num_steps(num_steps)
  _check_coefficients_fn(coefficients_fn, "edm")
  t_start, t_end = _ends(t_start, t_end, coefficients_fn)
  ends = jnp.asarray([t_start, t_end], jnp.float32)
  log_sigma_ve = -0.5 * log_snr_of(coefficients_fn(ends))
  root = jnp.exp(log_sigma_ve / rho)
  ramp = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)
  log_snr = -2.0 * rho * jnp.log(root[0] + ramp * (root[1] - root[0]))
  times = time_of_log_snr(
    log_snr, coefficients_fn=coefficients_fn, t_min=min(t_start, t_end), t_max=max(t_start, t_end)
  )
  return times.at[0].set(t_start).at[-1].set(t_end)


def log_snr_grid(
  *,
  num_steps: int,
  t_start: float | None = None,
  t_end: float | None = None,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """Times equally spaced in log-SNR: ``lambda_i = lambda(t_start) + i / N (lambda(t_end) -
  lambda(t_start))``, the "logSNR" spacing of DPM-Solver (Lu et al. 2022, Sec. 3.3,
  https://arxiv.org/abs/2206.00927). Both ends must have finite log-SNR; they default to the
  process's noise and data ends (:func:`sampling_interval`).
  """
  _check_num_steps(num_steps)
  _check_coefficients_fn(coefficients_fn, "log_snr")
  t_start, t_end = _ends(t_start, t_end, coefficients_fn)
  ends = log_snr_of(coefficients_fn(jnp.asarray([t_start, t_end], jnp.float32)))
  log_snr = ends[0] + jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32) * (ends[1] - ends[0])
  times = time_of_log_snr(
    log_snr, coefficients_fn=coefficients_fn, t_min=min(t_start, t_end), t_max=max(t_start, t_end)
  )
  return times.at[0].set(t_start).at[-1].set(t_end)


def shift_times(times: Array, *, shift: float) -> Array:
  """SD3's time shift, ``u' = shift u / (1 + (shift - 1) u)``, on any grid.

  ``u = (t - t_end) / (t_start - t_end)`` is each time's place between the grid's data end
  (``u = 0``, ``times[-1]``) and its noise end (``u = 1``, ``times[0]``), so the shift acts in
  the right direction whatever the clock (diffusion time 1 -> 0 or flow time 0 -> 1); the ends
  stay fixed. ``shift > 1`` moves every inner time toward the noise end: smaller steps there,
  larger ones near the data. Esser et al. (2024), Sec. 5.3.2, with ``shift = sqrt(m / n)`` for
  ``m`` pixels over a base resolution's ``n``, https://arxiv.org/abs/2403.03206; Flux uses a
  shift near 3. ``shift = 1`` returns the grid unchanged.
  """
  if not shift > 0:
    raise ValueError(f"shift={shift!r}: the time shift must be > 0 (1 leaves the grid unchanged)")
  times = jnp.asarray(times)
  if shift == 1:
    return times
  t_start, t_end = times[0], times[-1]
  u = (times - t_end) / (t_start - t_end)
  shifted = shift * u / (1.0 + (shift - 1.0) * u)
  return (t_end + shifted * (t_start - t_end)).at[0].set(t_start).at[-1].set(t_end)


def shifted_grid(
  *,
  num_steps: int,
  t_start: float | None = None,
  t_end: float | None = None,
  shift: float = 3.0,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """:func:`uniform_grid` under :func:`shift_times`: ``t_i = t_end + u'_i (t_start - t_end)``
  with ``u'_i = shift u_i / (1 + (shift - 1) u_i)``, ``u_i = 1 - i / N`` (Esser et al. 2024,
  Sec. 5.3.2, https://arxiv.org/abs/2403.03206). The ends default as :func:`uniform_grid`'s, from
  what is sampled."""
  return shift_times(
    uniform_grid(
      num_steps=num_steps, t_start=t_start, t_end=t_end, coefficients_fn=coefficients_fn
    ),
    shift=shift,
  )


TIME_GRIDS: dict[str, Callable[..., Array]] = {
  "uniform": uniform_grid,
  "edm": edm_grid,
  "log_snr": log_snr_grid,
  "shifted": shifted_grid,
}


def get_time_grid(name: str, **kwargs) -> Array:
  """Resolves a continuous time grid by name (once, at the edge) and builds it.

  Args:
    name: one of ``TIME_GRIDS`` ("uniform", "edm", "log_snr", "shifted").
    **kwargs: ``num_steps``, ``t_start``, ``t_end``, ``coefficients_fn`` (and ``rho`` for "edm",
      ``shift`` for "shifted"); the ends default to the noise and data ends of what is sampled
      (:func:`sampling_interval`).
  """
  return lookup(TIME_GRIDS, name, "time grid")(**kwargs)


# ---- discrete DDPM steps (0-indexed; Lin et al. 2024, Table 2, counts from 1) --------------


def _check_steps(num_steps, num_train_steps):
  _check_num_steps(num_steps)
  if num_steps > num_train_steps:
    raise ValueError(
      f"num_steps={num_steps} exceeds the schedule's {num_train_steps} steps; "
      f"pass num_steps <= {num_train_steps}"
    )


def linspace_steps(*, num_steps: int, num_train_steps: int) -> Array:
  """``round(linspace(0, T - 1, K))``, noisiest first (Lin et al. 2024, Table 2 "linspace";
  https://arxiv.org/abs/2305.08891). Its first step is not ``T - 1`` only when rounding says so."""
  _check_steps(num_steps, num_train_steps)
  steps = np.round(np.linspace(0, num_train_steps - 1, num_steps)).astype(np.int32)
  return jnp.asarray(steps[::-1].copy())


def leading_steps(*, num_steps: int, num_train_steps: int, offset: int = 0) -> Array:
  """``arange(0, K) * (T // K) + offset``, noisiest first (Lin et al. 2024, Table 2 "leading",
  the DDIM and Stable Diffusion default). Never reaches the last training step when ``K < T``,
  which Lin et al. show leaves signal at the start of sampling."""
  _check_steps(num_steps, num_train_steps)
  steps = np.arange(num_steps, dtype=np.int64) * (num_train_steps // num_steps) + offset
  if steps[-1] >= num_train_steps or offset < 0:
    raise ValueError(f"offset={offset} puts steps outside [0, {num_train_steps})")
  return jnp.asarray(steps[::-1].astype(np.int32))


def trailing_steps(*, num_steps: int, num_train_steps: int) -> Array:
  """``round(T - k T / K) - 1`` for ``k = 0..K-1`` (Lin et al. 2024, Table 2 "trailing"): always
  starts at the last training step ``T - 1``, so a zero-terminal-SNR schedule starts from pure
  noise."""
  _check_steps(num_steps, num_train_steps)
  steps = np.round(num_train_steps - np.arange(num_steps) * num_train_steps / num_steps) - 1
  return jnp.asarray(steps.astype(np.int32))


DISCRETE_STEPS: dict[str, Callable[..., Array]] = {
  "linspace": linspace_steps,
  "leading": leading_steps,
  "trailing": trailing_steps,
}


def get_discrete_steps(name: str, **kwargs) -> Array:
  """Resolves a discrete step spacing by name ("linspace", "leading", "trailing") and builds the
  ``[num_steps]`` step indices (noisiest first); ``kwargs``: ``num_steps``, ``num_train_steps``."""
  return lookup(DISCRETE_STEPS, name, "step spacing")(**kwargs)
