"""Time grids for the samplers, each in integration order (first entry = where sampling starts).

Continuous grids are ``[num_steps + 1]`` times of the process's own clock (diffusion time runs
1 -> 0, flow time 0 -> 1; the grid's direction decides). Discrete step sequences are
``[num_steps]`` DDPM step indices in sampling order (noisiest first), for DDPM/DDIM respacing.

* :func:`uniform_grid`: equal steps in ``t``;
* :func:`edm_sigmas`: Karras et al.'s rho-spaced noise levels with a final 0 (eq. 5), the grid of
  the EDM and Euler-ancestral samplers; :func:`edm_grid` is the same spacing as model times;
* :func:`log_snr_grid`: equal steps in log-SNR (Lu et al. 2022, the DPM-Solver default);
* :func:`linspace_steps`, :func:`leading_steps`, :func:`trailing_steps`: the three spacings of
  Lin et al. 2024, Table 2.

Names resolve once, at the edge: :func:`get_time_grid`, :func:`get_discrete_steps`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import Array

from diffjax._lookup import lookup
from diffjax.samplers.fields import CoefficientsFn, log_snr_of, time_of_log_snr

__all__ = [
  "uniform_grid",
  "edm_sigmas",
  "edm_grid",
  "log_snr_grid",
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


def uniform_grid(
  *,
  num_steps: int,
  t_start: float = 1.0,
  t_end: float = 0.0,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """``t_i = t_start + i / N (t_end - t_start)``, ``i = 0..N``.

  With ``t_start = 1`` this is also the "trailing" continuous-time spacing of Lin et al. 2024
  (https://arxiv.org/abs/2305.08891, Sec. 3.3): sampling starts at the last (noisiest) time.
  ``coefficients_fn`` is unused (accepted so every grid takes the same keywords).
  """
  del coefficients_fn
  _check_num_steps(num_steps)
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
  t_start: float = 1.0,
  t_end: float = 0.0,
  rho: float = 7.0,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """Times whose variance-exploding noise levels ``sigma_ve = sigma / alpha`` follow EDM's rho
  spacing (Karras et al. 2022, eq. 5) from ``sigma_ve(t_start)`` to ``sigma_ve(t_end)``.

  ``sigma_i^(1/rho)`` is linear in ``i`` over ``i = 0..N`` (no appended zero: the last time is
  ``t_end``); times come from :func:`~diffjax.samplers.fields.time_of_log_snr`.
  """
  _check_num_steps(num_steps)
  _check_coefficients_fn(coefficients_fn, "edm")
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
  t_start: float = 1.0,
  t_end: float = 0.0,
  coefficients_fn: CoefficientsFn | None = None,
) -> Array:
  """Times equally spaced in log-SNR: ``lambda_i = lambda(t_start) + i / N (lambda(t_end) -
  lambda(t_start))``, the "logSNR" spacing of DPM-Solver (Lu et al. 2022, Sec. 3.3,
  https://arxiv.org/abs/2206.00927). Both ends must have finite log-SNR.
  """
  _check_num_steps(num_steps)
  _check_coefficients_fn(coefficients_fn, "log_snr")
  ends = log_snr_of(coefficients_fn(jnp.asarray([t_start, t_end], jnp.float32)))
  log_snr = ends[0] + jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32) * (ends[1] - ends[0])
  times = time_of_log_snr(
    log_snr, coefficients_fn=coefficients_fn, t_min=min(t_start, t_end), t_max=max(t_start, t_end)
  )
  return times.at[0].set(t_start).at[-1].set(t_end)


TIME_GRIDS: dict[str, Callable[..., Array]] = {
  "uniform": uniform_grid,
  "edm": edm_grid,
  "log_snr": log_snr_grid,
}


def get_time_grid(name: str, **kwargs) -> Array:
  """Resolves a continuous time grid by name (once, at the edge) and builds it.

  Args:
    name: one of ``TIME_GRIDS`` ("uniform", "edm", "log_snr").
    **kwargs: ``num_steps``, ``t_start``, ``t_end``, ``coefficients_fn`` (and ``rho`` for "edm").
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
