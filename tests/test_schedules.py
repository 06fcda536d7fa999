"""Tests of diffjax.schedules against independent float64 references (NumPy closed forms, SciPy
quadrature, central finite differences).

Tolerances for float32 results: one float32 rounding is eps/2 = 6e-8 relative. Discrete
``alpha_bars`` come from a float32 cumulative sum of T = 1000 logs; rounding errors of a sum add
like a random walk, sqrt(T) * 6e-8 * |log abar| <= 32 * 6e-8 * 12 ~ 2e-5 relative in ``abar`` at
worst over the schedules here, so ``alpha_bars`` are checked at rtol 2e-5; single-formula values
(betas, continuous alpha/sigma) at a few eps, rtol 2e-6.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffjax import schedules

T = 1000
ABAR_RTOL = 2e-5  # float32 cumsum of 1000 logs, see the module docstring
FORMULA_RTOL = 2e-6  # a handful of float32 roundings
BF16_RTOL = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding is <= 2^-9 relative


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _chen_gamma(t, start, end, tau, clip_min=None):
  """Chen (2023), Algorithm 1, transcribed in float64 NumPy."""
  v_start, v_end = _np_sigmoid(start / tau), _np_sigmoid(end / tau)
  out = (v_end - _np_sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
  return out if clip_min is None else np.clip(out, clip_min, 1.0)


def _lin_rescale(betas):
  """Lin et al. (2024), Algorithm 1, transcribed literally in float64 NumPy."""
  betas = np.asarray(betas, np.float64)
  root = np.sqrt(np.cumprod(1.0 - betas))
  root = (root - root[-1]) * root[0] / (root[0] - root[-1])
  alpha_bars = root**2
  return 1.0 - np.concatenate([alpha_bars[:1], alpha_bars[1:] / alpha_bars[:-1]])


def _cosine_alpha_bar(t, s=0.008):
  """Nichol & Dhariwal (2021), eq. 17, in float64 NumPy."""
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  return f(t) / f(0.0)


# ------------------------------------------------------------------------------------------
# Discrete schedules.
# ------------------------------------------------------------------------------------------


def test_linear_betas_match_ddpm_formula():
  betas = np.asarray(schedules.linear_betas())
  ref = 1e-4 + np.arange(T) / (T - 1) * (0.02 - 1e-4)
  np.testing.assert_allclose(betas, ref, rtol=FORMULA_RTOL)
  np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=FORMULA_RTOL)


def test_scaled_linear_betas_match_stable_diffusion_formula():
  betas = np.asarray(schedules.scaled_linear_betas())
  lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
  ref = (lo + np.arange(T) / (T - 1) * (hi - lo)) ** 2
  np.testing.assert_allclose(betas, ref, rtol=FORMULA_RTOL)
  np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=FORMULA_RTOL)


def test_discrete_schedule_matches_sequential_product():
  betas = schedules.linear_betas()
  schedule = schedules.discrete_schedule(betas)
  # Reference: the literal product of Ho et al. eq. 4, step by step, in float64.
  ref = np.cumprod(1.0 - np.asarray(betas, np.float64))
  np.testing.assert_allclose(schedule.alpha_bars, ref, rtol=ABAR_RTOL)
  np.testing.assert_allclose(schedule.alphas, 1.0 - np.asarray(betas, np.float64), rtol=1e-7)
  # log SNR inherits the relative error of abar divided by (1 - abar) >= 1e-4; the expm1 form
  # keeps 1 - abar relatively accurate, so the absolute error stays ~ABAR_RTOL.
  np.testing.assert_allclose(schedule.log_snr, np.log(ref / (1.0 - ref)), atol=5 * ABAR_RTOL)
  assert schedule.num_steps == T


def test_cosine_alpha_bar_matches_closed_form():
  schedule = schedules.get_discrete_schedule("cosine")
  grid = np.arange(T + 1) / T
  closed = _cosine_alpha_bar(grid)
  ref_betas = np.minimum(1.0 - closed[1:] / closed[:-1], 0.999)
  np.testing.assert_allclose(schedule.betas, ref_betas, rtol=FORMULA_RTOL)
  # Only the last step is clipped (its unclipped beta is 1 since f(1) = 0), so every earlier
  # alpha_bar is the closed form at (i + 1) / T.
  np.testing.assert_allclose(schedule.alpha_bars[:-1], closed[1:-1], rtol=ABAR_RTOL)
  assert float(schedule.betas[-1]) == pytest.approx(0.999, rel=1e-7)
  assert float(schedule.betas[-2]) < 0.999


@pytest.mark.parametrize("start,end,tau", [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.3)])
def test_chen_sigmoid_betas_match_algorithm_1(start, end, tau):
  schedule = schedules.get_discrete_schedule("sigmoid", start=start, end=end, tau=tau)
  gamma = _chen_gamma(np.arange(T + 1) / T, start, end, tau)
  assert gamma[0] == 1.0 and abs(gamma[-1]) < 1e-15  # the endpoints of Chen's gamma
  ref_betas = np.minimum(1.0 - gamma[1:] / gamma[:-1], 0.999)
  np.testing.assert_allclose(schedule.betas, ref_betas, rtol=FORMULA_RTOL)
  np.testing.assert_allclose(schedule.alpha_bars[:-1], gamma[1:-1], rtol=ABAR_RTOL)


def test_geodiff_sigmoid_is_a_ramp_of_betas_not_chens_schedule():
  betas = np.asarray(schedules.geodiff_sigmoid_betas())
  ref = _np_sigmoid(np.linspace(-6.0, 6.0, T)) * (2e-3 - 1e-7) + 1e-7
  np.testing.assert_allclose(betas, ref, rtol=FORMULA_RTOL)
  chen = schedules.get_discrete_schedule("sigmoid")
  geodiff = schedules.get_discrete_schedule("geodiff_sigmoid")
  assert np.max(np.abs(np.asarray(chen.alpha_bars) - np.asarray(geodiff.alpha_bars))) > 0.1


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescaling(name):
  original = schedules.get_discrete_schedule(name)
  rescaled = schedules.get_discrete_schedule(name, zero_terminal_snr=True)
  assert float(rescaled.alpha_bars[-1]) == 0.0
  assert float(rescaled.betas[-1]) == 1.0
  assert np.isneginf(float(rescaled.log_snr[-1]))
  assert float(rescaled.alpha_bars[0]) == float(original.alpha_bars[0])
  # Lin et al.: sqrt(abar') = a sqrt(abar) + b. An affine map is fixed by two points, so the
  # endpoint checks above plus an affine fit with zero residual pin the rescaling down.
  root = np.sqrt(np.asarray(original.alpha_bars, np.float64))
  root_new = np.sqrt(np.asarray(rescaled.alpha_bars, np.float64))
  slope, intercept = np.polyfit(root, root_new, 1)
  assert np.max(np.abs(slope * root + intercept - root_new)) < 2e-5
  np.testing.assert_allclose(slope, root[0] / (root[0] - root[-1]), rtol=2e-5)
  assert np.all(np.diff(np.asarray(rescaled.log_snr)) < 0)
  # Every beta against the literal algorithm in float64 (ours avoids its 1 - ratio cancellation,
  # so float32 keeps a few eps of relative accuracy even for the ~1e-4 first betas).
  np.testing.assert_allclose(rescaled.betas, _lin_rescale(original.betas), rtol=FORMULA_RTOL)


def test_zero_terminal_snr_acts_per_row_of_a_stack():
  stack = jnp.stack([schedules.linear_betas(), schedules.cosine_betas()])
  together = jax.jit(schedules.rescale_zero_terminal_snr)(stack)
  for row in range(2):
    np.testing.assert_allclose(together[row], _lin_rescale(stack[row]), rtol=FORMULA_RTOL)


@pytest.mark.parametrize("name", sorted(schedules.DISCRETE_SCHEDULES))
def test_discrete_snr_decreases_and_alpha_bars_are_valid(name):
  schedule = schedules.get_discrete_schedule(name)
  assert schedule.betas.shape == (T,)
  assert np.all(np.diff(np.asarray(schedule.log_snr)) < 0)
  alpha_bars = np.asarray(schedule.alpha_bars)
  assert np.all((alpha_bars > 0) & (alpha_bars <= 1))


def test_discrete_schedule_passes_through_jit_and_vmap():
  stack = jnp.stack([schedules.linear_betas(), schedules.cosine_betas(), schedules.sigmoid_betas()])
  batched = jax.jit(jax.vmap(schedules.discrete_schedule))(stack)
  assert batched.alpha_bars.shape == (3, T) and batched.num_steps == T
  for row in range(3):
    single = schedules.discrete_schedule(stack[row])
    for got, want in zip(batched, single):
      np.testing.assert_allclose(got[row], want, rtol=1e-6)

  @jax.jit
  def terminal_log_snr(schedule):
    return schedule.log_snr[-1]

  np.testing.assert_allclose(jax.vmap(terminal_log_snr)(batched), batched.log_snr[:, -1])
  single = schedules.discrete_schedule(stack[0])
  assert float(terminal_log_snr(single)) == pytest.approx(float(single.log_snr[-1]), rel=1e-6)
  assert len(jax.tree.leaves(single)) == 4


def test_discrete_schedule_bfloat16_betas():
  betas = schedules.linear_betas().astype(jnp.bfloat16)
  low = schedules.discrete_schedule(betas)
  high = schedules.discrete_schedule(betas.astype(jnp.float32))
  for got, want in zip(low, high):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=BF16_RTOL)


def test_discrete_errors_name_the_bad_value():
  with pytest.raises(ValueError, match=r"'nope'.*linear"):
    schedules.get_discrete_schedule("nope")
  with pytest.raises(ValueError, match="beta_start=0.1"):
    schedules.linear_betas(beta_start=0.1, beta_end=0.01)
  with pytest.raises(ValueError, match="num_steps"):
    schedules.cosine_betas(num_steps=0)
  with pytest.raises(ValueError, match="tau=0"):
    schedules.sigmoid_betas(tau=0.0)


# ------------------------------------------------------------------------------------------
# Variance preserving alpha, sigma from the log-SNR (both families).
# ------------------------------------------------------------------------------------------

# -inf: a zero-terminal-SNR step; +-60: where 1 - sigmoid(lambda) rounds to 0 in float32.
LOG_SNRS = np.array([-np.inf, -60.0, -20.0, -1.0, 0.0, 1.0, 20.0, 60.0, np.inf])


def test_alpha_sigma_from_log_snr_is_sqrt_sigmoid_to_float32_precision():
  with np.errstate(over="ignore"):  # exp(inf) in the reference at lambda = -inf: sigmoid is 0
    want_alpha, want_sigma = np.sqrt(_np_sigmoid(LOG_SNRS)), np.sqrt(_np_sigmoid(-LOG_SNRS))
  alpha, sigma = jax.jit(schedules.alpha_sigma_from_log_snr)(jnp.asarray(LOG_SNRS, jnp.float32))
  assert alpha.dtype == sigma.dtype == jnp.float32
  # Relative at every lambda: sigma(60) = e^-30 ~ 9.4e-14 keeps all its digits.
  np.testing.assert_allclose(alpha, want_alpha, rtol=FORMULA_RTOL, atol=0.0)
  np.testing.assert_allclose(sigma, want_sigma, rtol=FORMULA_RTOL, atol=0.0)
  assert (alpha[0], sigma[0], alpha[-1], sigma[-1]) == (0.0, 1.0, 1.0, 0.0)
  # The naive sqrt(1 - sigmoid(lambda)) loses sigma entirely at lambda = 60.
  assert float(jnp.sqrt(1.0 - jax.nn.sigmoid(jnp.float32(60.0)))) == 0.0 < float(sigma[-2])
  log_alpha, log_sigma = schedules.log_alpha_sigma_from_log_snr(jnp.asarray(LOG_SNRS))
  np.testing.assert_allclose(np.exp(log_alpha), alpha, rtol=FORMULA_RTOL, atol=0.0)
  np.testing.assert_allclose(np.exp(log_sigma), sigma, rtol=FORMULA_RTOL, atol=0.0)


def test_alpha_sigma_from_log_snr_of_a_zero_terminal_snr_schedule():
  schedule = schedules.get_discrete_schedule("linear", zero_terminal_snr=True)
  assert float(schedule.log_snr[-1]) == -np.inf
  alpha, sigma = schedules.alpha_sigma_from_log_snr(schedule.log_snr)
  assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma))
  assert (float(alpha[-1]), float(sigma[-1])) == (0.0, 1.0)
  np.testing.assert_allclose(alpha**2, schedule.alpha_bars, rtol=ABAR_RTOL, atol=1e-30)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=FORMULA_RTOL)


def test_alpha_sigma_from_log_snr_computes_in_float32_and_returns_bfloat16():
  log_snr = jnp.asarray(LOG_SNRS[1:-1], jnp.bfloat16)
  alpha, sigma = schedules.alpha_sigma_from_log_snr(log_snr)
  assert alpha.dtype == sigma.dtype == jnp.bfloat16
  want_alpha, want_sigma = schedules.alpha_sigma_from_log_snr(log_snr.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(alpha, np.float32), want_alpha, rtol=BF16_RTOL)
  np.testing.assert_allclose(np.asarray(sigma, np.float32), want_sigma, rtol=BF16_RTOL)


# ------------------------------------------------------------------------------------------
# Continuous schedules.
# ------------------------------------------------------------------------------------------

CONTINUOUS = sorted(schedules.CONTINUOUS_SCHEDULES)
VARIANCE_PRESERVING = ["vp", "cosine", "shifted_cosine", "linear_log_snr", "sigmoid"]
# Every continuous check evaluates 16 times at once: one shape means one compile per dtype.
N_T = 16
GRID = np.linspace(0.0, 1.0, N_T)  # endpoints included
INTERIOR = np.linspace(0.05, 0.95, N_T)  # where every derivative is finite
FD_STEP = 1e-6


def _methods(schedule: schedules.ContinuousSchedule, t: jax.Array) -> dict[str, jax.Array]:
  alpha, sigma, d_alpha, d_sigma = schedule.alpha_sigma_and_derivatives(t)
  return dict(
    alpha=alpha,
    sigma=sigma,
    d_alpha=d_alpha,
    d_sigma=d_sigma,
    log_snr=schedule.log_snr(t),
    d_log_snr=schedule.d_log_snr(t),
  )


@jax.jit
def _all_methods(t):
  """Every method of every named schedule (default settings) at ``t``."""
  return {name: _methods(schedules.get_continuous_schedule(name), t) for name in CONTINUOUS}


@functools.cache
def _results(kind: str):
  """Cached NumPy results of ``_all_methods``: float32 and bfloat16 on GRID and INTERIOR, and
  float64 on INTERIOR and INTERIOR +- FD_STEP for central differences."""
  if kind == "float64":
    with jax.enable_x64(True):
      return {
        shift: jax.tree.map(np.asarray, _all_methods(jnp.asarray(INTERIOR + shift)))
        for shift in (-FD_STEP, 0.0, FD_STEP)
      }
  dtype = dict(float32=jnp.float32, bfloat16=jnp.bfloat16)[kind]
  return {
    grid: jax.tree.map(
      lambda x: np.asarray(x.astype(jnp.float32)) if x.dtype != jnp.float32 else np.asarray(x),
      _all_methods(jnp.asarray(values).astype(dtype)),
    )
    for grid, values in (("grid", GRID), ("interior", INTERIOR))
  }


def _vp_beta(s):
  return 0.1 + s * (20.0 - 0.1)


def test_vp_alpha_matches_quadrature_of_beta_and_hand_derivatives():
  integral = np.array([integrate.quad(_vp_beta, 0.0, t)[0] for t in INTERIOR])
  alpha_ref = np.exp(-0.5 * integral)
  sigma_ref = np.sqrt(1.0 - alpha_ref**2)
  beta = _vp_beta(INTERIOR)
  out = _results("float64")[0.0]["vp"]
  np.testing.assert_allclose(out["alpha"], alpha_ref, rtol=1e-12)
  np.testing.assert_allclose(out["sigma"], sigma_ref, rtol=1e-12)
  # alpha = exp(-1/2 int beta): alpha' = -beta alpha / 2, sigma' = -alpha alpha' / sigma,
  # lambda' = 2 alpha' / (alpha sigma^2) = -beta / sigma^2.
  np.testing.assert_allclose(out["d_alpha"], -0.5 * beta * alpha_ref, rtol=1e-12)
  np.testing.assert_allclose(out["d_sigma"], 0.5 * beta * alpha_ref**2 / sigma_ref, rtol=1e-12)
  np.testing.assert_allclose(out["d_log_snr"], -beta / sigma_ref**2, rtol=1e-12)
  out32 = _results("float32")["interior"]["vp"]
  np.testing.assert_allclose(out32["alpha"], alpha_ref, rtol=FORMULA_RTOL)
  np.testing.assert_allclose(out32["d_alpha"], -0.5 * beta * alpha_ref, rtol=5 * FORMULA_RTOL)
  # Endpoints: data at t = 0, alpha(1) = exp(-(beta_min + beta_max) / 4).
  ends = _results("float32")["grid"]["vp"]
  assert ends["alpha"][0] == 1.0 and ends["sigma"][0] == 0.0
  assert ends["alpha"][-1] == pytest.approx(math.exp(-20.1 / 4), rel=FORMULA_RTOL)


def test_ve_is_geometric_between_its_endpoints():
  out = _results("float32")["grid"]["ve"]
  np.testing.assert_array_equal(out["d_alpha"], 0.0)
  np.testing.assert_allclose(out["sigma"], 0.01 * (50.0 / 0.01) ** GRID, rtol=FORMULA_RTOL)
  np.testing.assert_allclose(out["sigma"][[0, -1]], [0.01, 50.0], rtol=FORMULA_RTOL)


def test_edm_matches_karras_discretisation():
  n, sigma_min, sigma_max, rho = N_T, 0.002, 80.0, 7.0
  i = np.arange(n)
  # Karras et al. (2022), eq. 5: sigma_i for i = 0 .. N-1, from sigma_max down to sigma_min;
  # GRID reversed is 1 - i / (N - 1).
  ref = (
    sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
  ) ** rho
  sigma = _results("float32")["grid"]["edm"]["sigma"][::-1]
  # (.)^7 multiplies the base's relative rounding error by 7.
  np.testing.assert_allclose(sigma, ref, rtol=7 * FORMULA_RTOL)
  np.testing.assert_allclose(sigma[[-1, 0]], [sigma_min, sigma_max], rtol=7 * FORMULA_RTOL)


def test_unclipped_cosine_is_cos_and_sin():
  schedule = schedules.cosine_schedule(log_snr_min=-math.inf, log_snr_max=math.inf)
  out = _methods(schedule, jnp.asarray(INTERIOR, jnp.float32))
  angle = np.pi * INTERIOR / 2
  np.testing.assert_allclose(out["alpha"], np.cos(angle), rtol=1e-5)
  np.testing.assert_allclose(out["sigma"], np.sin(angle), rtol=1e-5)
  np.testing.assert_allclose(out["d_alpha"], -np.pi / 2 * np.sin(angle), rtol=1e-5)
  np.testing.assert_allclose(out["d_sigma"], np.pi / 2 * np.cos(angle), rtol=1e-5)


def test_clipped_cosine_endpoints():
  log_snr = _results("float32")["grid"]["cosine"]["log_snr"][[0, -1]]
  # lambda = -2 log tan(x) near x = pi/2 moves 2 / cos(x) ~ 3600 per radian; one float32 ulp of
  # x (1.2e-7) is then 4e-4 in lambda.
  np.testing.assert_allclose(log_snr, [15.0, -15.0], atol=1e-3)


def test_shifted_cosine_is_cosine_plus_resolution_shift():
  t = jnp.asarray(GRID, jnp.float32)
  base = _results("float32")["grid"]["cosine"]["log_snr"]
  for resolution in (64, 256, 512):
    shifted = schedules.shifted_cosine_schedule(resolution=resolution).log_snr(t)
    np.testing.assert_allclose(shifted - base, 2 * math.log(64 / resolution), atol=1e-5)


def test_linear_log_snr_and_custom_log_snr_family():
  np.testing.assert_allclose(
    _results("float32")["grid"]["linear_log_snr"]["log_snr"], 10.0 - 20.0 * GRID, atol=1e-5
  )
  out = _methods(
    schedules.log_snr_schedule(lambda u: 4.0 - 8.0 * u**3, name="cubic"),
    jnp.asarray(GRID, jnp.float32),
  )
  lam = 4.0 - 8.0 * GRID**3
  np.testing.assert_allclose(out["alpha"] ** 2, _np_sigmoid(lam), rtol=1e-5)
  np.testing.assert_allclose(out["sigma"] ** 2, _np_sigmoid(-lam), rtol=1e-5)
  np.testing.assert_allclose(out["d_log_snr"], -24.0 * GRID**2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start,end,tau", [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.3)])
def test_chen_sigmoid_continuous_matches_algorithm_1(start, end, tau):
  t_np = np.concatenate([[0.0, 1e-4, 1e-3], np.linspace(0.05, 0.95, N_T - 4), [1.0]])
  gamma = _chen_gamma(t_np, start, end, tau, clip_min=1e-9)
  out = _methods(
    schedules.sigmoid_schedule(start=start, end=end, tau=tau), jnp.asarray(t_np, jnp.float32)
  )
  alpha, sigma = np.asarray(out["alpha"]), np.asarray(out["sigma"])
  np.testing.assert_allclose(alpha**2, gamma, rtol=1e-5)
  # 1 - gamma is formed without cancellation, so it keeps float32 relative accuracy even where
  # it is ~1e-4 (t = 1e-4); the float64 reference is accurate to ~1e-12 relative there.
  one_minus = (_np_sigmoid((t_np * (end - start) + start) / tau) - _np_sigmoid(start / tau)) / (
    _np_sigmoid(end / tau) - _np_sigmoid(start / tau)
  )
  np.testing.assert_allclose(sigma**2, np.minimum(one_minus, 1 - 1e-9), rtol=1e-5)
  assert alpha[0] == 1.0 and sigma[0] == 0.0
  assert alpha[-1] ** 2 == pytest.approx(1e-9, rel=1e-5)
  assert np.all(np.isfinite(np.asarray(out["d_alpha"])))  # the clip at t = 1 keeps d/dt finite


@pytest.mark.parametrize("name", CONTINUOUS)
def test_continuous_invariants(name):
  out = _results("float32")["grid"][name]
  assert np.all(np.diff(out["log_snr"]) < 0)
  assert np.all(out["d_log_snr"][1:-1] < 0)
  alpha, sigma = out["alpha"], out["sigma"]
  if name in VARIANCE_PRESERVING:
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  else:
    np.testing.assert_array_equal(alpha, 1.0)
  # log SNR is its definition 2 log(alpha / sigma) wherever both are representable.
  inner = slice(1, -1)
  np.testing.assert_allclose(
    out["log_snr"][inner], 2 * np.log(alpha[inner] / sigma[inner]), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("name", CONTINUOUS)
def test_autodiff_derivatives_match_central_differences(name):
  results = _results("float64")
  minus, exact, plus = (results[shift][name] for shift in (-FD_STEP, 0.0, FD_STEP))
  assert exact["d_alpha"].dtype == np.float64
  for key in ("alpha", "sigma", "log_snr"):
    # Central differences: truncation h^2 f''' / 6 ~ 1e-12 f''' plus rounding eps f / h ~ 1e-10 f.
    finite = (plus[key] - minus[key]) / (2 * FD_STEP)
    np.testing.assert_allclose(exact["d_" + key], finite, rtol=1e-6, atol=1e-8)


GRAD_CHECKED = ["vp", "cosine", "edm", "sigmoid"]  # one of each construction


@jax.jit
def _through_transforms(t):
  """Derivative methods under vmap(grad(.)) and vmap, for the GRAD_CHECKED schedules."""
  out = {}
  for name in GRAD_CHECKED:
    schedule = schedules.get_continuous_schedule(name)
    grad = lambda f: jax.vmap(jax.grad(f))(t)
    out[name] = dict(
      d_alpha=grad(schedule.alpha),
      d_sigma=grad(schedule.sigma),
      d2_log_snr=grad(schedule.d_log_snr),
      d2_sigma=grad(lambda u, s=schedule: s.alpha_sigma_and_derivatives(u)[3]),
      vmapped=jax.vmap(schedule.alpha_sigma_and_derivatives)(t),
    )
  return out


@pytest.mark.parametrize("name", GRAD_CHECKED)
def test_derivative_methods_under_grad_and_vmap(name):
  with jax.enable_x64(True):
    got = jax.tree.map(np.asarray, _through_transforms(jnp.asarray(INTERIOR)))[name]
  results = _results("float64")
  minus, exact, plus = (results[shift][name] for shift in (-FD_STEP, 0.0, FD_STEP))
  # Reverse mode through the public methods agrees with their forward-mode derivatives.
  np.testing.assert_allclose(got["d_alpha"], exact["d_alpha"], rtol=1e-10)
  np.testing.assert_allclose(got["d_sigma"], exact["d_sigma"], rtol=1e-10)
  # Derivative methods are themselves differentiable: second derivatives against central
  # differences of the first (same error budget as above).
  for key, first in (("d2_log_snr", "d_log_snr"), ("d2_sigma", "d_sigma")):
    finite = (plus[first] - minus[first]) / (2 * FD_STEP)
    np.testing.assert_allclose(got[key], finite, rtol=1e-5, atol=1e-6)
  for vmapped, key in zip(got["vmapped"], ("alpha", "sigma", "d_alpha", "d_sigma")):
    np.testing.assert_allclose(vmapped, exact[key], rtol=1e-12)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_float32_and_bfloat16_times(name):
  # bfloat16 times are GRID rounded to 8 bits; compare with float32 at those same times.
  t16 = jnp.asarray(GRID).astype(jnp.bfloat16)
  assert _all_methods(t16)[name]["alpha"].dtype == jnp.bfloat16  # compiled already: cheap
  high = _all_methods(t16.astype(jnp.float32))[name]
  assert high["alpha"].dtype == jnp.float32
  low = _results("bfloat16")["grid"][name]
  for key in low:
    # Both compute in float32; the bf16 result is the float32 one rounded to 8 bits.
    np.testing.assert_allclose(low[key], high[key], rtol=BF16_RTOL)


def test_integer_times_become_float32():
  alpha = schedules.vp_schedule().alpha(jnp.array([0, 1]))
  assert alpha.dtype == jnp.float32 and float(alpha[0]) == 1.0


def test_equal_schedules_share_one_compile():
  traces = []

  @functools.partial(jax.jit, static_argnames="schedule")
  def alpha(t, schedule):
    traces.append(schedule.name)
    return schedule.alpha(t)

  t = jnp.array([0.5])
  first = alpha(t, schedule=schedules.vp_schedule())
  alpha(t, schedule=schedules.get_continuous_schedule("vp"))
  assert len(traces) == 1
  other = alpha(t, schedule=schedules.vp_schedule(beta_max=10.0))
  assert len(traces) == 2 and float(other[0]) > float(first[0])
  assert schedules.cosine_schedule() == schedules.get_continuous_schedule("cosine")
  assert schedules.cosine_schedule() != schedules.cosine_schedule(log_snr_max=10.0)


def test_continuous_errors_name_the_bad_value():
  with pytest.raises(ValueError, match=r"'nope'.*cosine"):
    schedules.get_continuous_schedule("nope")
  bad = [
    ("vp", dict(beta_min=20.0, beta_max=0.1), "beta_min=20"),
    ("ve", dict(sigma_min=0.0), "sigma_min=0"),
    ("edm", dict(rho=0.0), "rho=0"),
    ("cosine", dict(log_snr_min=5.0, log_snr_max=-5.0), "log_snr_min=5"),
    ("shifted_cosine", dict(resolution=0), "resolution=0"),
    ("sigmoid", dict(start=3.0, end=-3.0), "start=3"),
  ]
  for name, kwargs, message in bad:
    with pytest.raises(ValueError, match=message):
      schedules.get_continuous_schedule(name, **kwargs)
