"""Tests of diffjax.forward: every closed form against the sequential Markov chain.

Statistical checks use fixed keys and tolerances in standard errors (s.e.), derived where used.
The sequential chain is the reference; its own deterministic part and its per-example stopping
are checked exactly; the closed forms are checked against moments computed independently in
float64 numpy (brute-force sums over steps, the circulant covariance from numpy's inverse FFT,
scalar Gaussian Bayes for the posterior).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffjax import forward
from diffjax.schedules import get_discrete_schedule

NUM_STEPS = 50
# A short schedule whose betas reach 0.4, so 50 steps go from data to (almost) noise.
SCHEDULE = get_discrete_schedule("linear", num_steps=NUM_STEPS, beta_start=2e-3, beta_end=0.4)
BETAS = np.linspace(2e-3, 0.4, NUM_STEPS, dtype=np.float32).astype(np.float64)
ALPHA_BARS = np.cumprod(1.0 - BETAS)  # independent float64 reference for abar_t
NUM_SAMPLES = 10_000
MID_STEP = 12  # abar ~ 0.3: signal and noise both matter
# Each s.e. bound below uses 5 s.e.: a two-sided normal tail of 5.7e-7 per check.
NUM_SE = 5.0


@functools.partial(jax.jit, static_argnames=("return_trajectory",))
def _sequential(key, data, t, noise_model, return_trajectory=False):
  return forward.q_sample_sequential(
    data=data,
    t=t,
    key=key,
    schedule=SCHEDULE,
    noise_model=noise_model,
    return_trajectory=return_trajectory,
  )


@jax.jit
def _closed(key, data, t, noise_model):
  return forward.q_sample_closed_form(
    data=data, t=t, key=key, schedule=SCHEDULE, noise_model=noise_model
  )


@jax.jit
def _closed_and_sequential(key, data, t, noise_model):
  """Both samplers in one compile, with independent keys."""
  closed_key, sequential_key = jax.random.split(key)
  return (
    _closed(closed_key, data, t, noise_model),
    _sequential(sequential_key, data, t, noise_model),
  )


def _gaussian_cov_se(cov: np.ndarray, n: int) -> np.ndarray:
  """s.e. of a sample covariance entry of a Gaussian: Var(S_ij) = (C_ii C_jj + C_ij^2) / n."""
  diag = np.diag(cov)
  return np.sqrt((diag[:, None] * diag[None, :] + cov**2) / n)


def _assert_matches_gaussian(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> None:
  """Sample mean within 5 s.e. (s.e. = sqrt(C_ii / n)) and covariance within 5 s.e."""
  n = samples.shape[0]
  mean_se = np.sqrt(np.diag(cov) / n)
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), NUM_SE * mean_se)
  sample_cov = np.cov(samples, rowvar=False).reshape(cov.shape)
  np.testing.assert_array_less(np.abs(sample_cov - cov), NUM_SE * _gaussian_cov_se(cov, n))


def _assert_same_distribution(closed: np.ndarray, sequential: np.ndarray, cov: np.ndarray) -> None:
  """Two-sample checks: mean and covariance differences within 5 s.e. of a difference of two
  independent estimates (sqrt(2) times the one-sample s.e.), and per-coordinate KS tests at
  p > 1e-3 with a Bonferroni correction over the d coordinates."""
  n, dim = closed.shape
  mean_se = np.sqrt(2.0 * np.diag(cov) / n)
  np.testing.assert_array_less(np.abs(closed.mean(0) - sequential.mean(0)), NUM_SE * mean_se)
  cov_diff = np.cov(closed, rowvar=False) - np.cov(sequential, rowvar=False)
  np.testing.assert_array_less(
    np.abs(cov_diff).reshape(cov.shape), NUM_SE * np.sqrt(2.0) * _gaussian_cov_se(cov, n)
  )
  for i in range(dim):
    p_value = stats.ks_2samp(closed[:, i], sequential[:, i]).pvalue
    assert p_value > 1e-3 / dim, (i, p_value)


# --------------------------------------------------------------------------------------------
# standard_normal: the draw training makes, with float32 tails in every dtype.
# --------------------------------------------------------------------------------------------


def test_standard_normal_is_the_float32_draw_of_jax_random_normal_in_any_dtype():
  key, shape = jax.random.key(3), (33, 7)
  np.testing.assert_array_equal(forward.standard_normal(key, shape), jax.random.normal(key, shape))
  low = forward.standard_normal(key, shape, jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_array_equal(low, jax.random.normal(key, shape).astype(jnp.bfloat16))
  keys = jax.random.split(jax.random.key(4), 3)
  batched = jax.jit(jax.vmap(lambda k: forward.standard_normal(k, shape)))(keys)
  for k, draw in zip(keys, batched):
    np.testing.assert_array_equal(draw, jax.random.normal(k, shape))


def test_low_precision_noise_keeps_its_tails():
  # Of 10^6 standard normals, about 60 lie beyond 4 sigma (2 * norm.sf(4) * 1e6 = 63); a bfloat16
  # draw of jax.random.normal has none beyond 2.9, which is why the draw is made in float32.
  key, num = jax.random.key(5), 1_000_000
  beyond = lambda x: int(np.sum(np.abs(np.asarray(x, np.float32)) > 4.0))
  assert beyond(jax.random.normal(key, (num,), jnp.bfloat16)) == 0
  assert beyond(forward.standard_normal(key, (num,), jnp.bfloat16)) > 30


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_closed_forms_use_standard_normal_noise(dtype):
  # The isotropic and diagonal closed forms are q_sample with the noise of
  # standard_normal(key, data.shape), computed in float32, returned in the data's dtype.
  shape = (6, 4, 4, 3)
  rng = np.random.default_rng(1)
  data = jnp.asarray(rng.normal(size=shape), dtype)
  t = jnp.asarray(rng.integers(0, NUM_STEPS, size=shape[0]), jnp.int32)
  key = jax.random.key(8)
  eps = forward.standard_normal(key, shape, jnp.float32)
  expected = forward.q_sample(data=data, t=t, noise=eps, schedule=SCHEDULE)
  closed_form = lambda k, x, s: forward.q_sample_closed_form(data=x, t=s, key=k, schedule=SCHEDULE)
  x_t = jax.jit(closed_form)(key, data, t)
  assert x_t.dtype == dtype
  # The same noise; the scales may round differently by an ulp (float32: 2.4e-7 seen).
  ulp = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(
    np.asarray(x_t, np.float32), np.asarray(expected, np.float32), rtol=ulp, atol=ulp
  )
  variance = jnp.asarray(rng.uniform(0.5, 2.0, size=shape[-1]), jnp.float32)
  diagonal = forward.get_noise_model("diagonal", variance=variance)
  x_t = forward.q_sample_closed_form(
    data=data, t=t, key=key, schedule=SCHEDULE, noise_model=diagonal
  )
  signal, noise = np.sqrt(ALPHA_BARS[t]), np.sqrt(1.0 - ALPHA_BARS[t])
  expand = (-1,) + (1,) * (len(shape) - 1)
  reference = signal.reshape(expand) * np.asarray(data, np.float32) + noise.reshape(
    expand
  ) * np.sqrt(np.asarray(variance)) * np.asarray(eps)
  # float32 against a float64 reference; bfloat16 output rounds to 8 significant bits.
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(x_t, np.float32), reference, rtol=tolerance, atol=tolerance)


# --------------------------------------------------------------------------------------------
# q_sample: the isotropic closed form.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (6, 3), (6, 4, 4, 2)])
def test_q_sample_formula_per_example_t_any_shape(shape):
  rng = np.random.default_rng(0)
  data = rng.normal(size=shape).astype(np.float32)
  noise = rng.normal(size=shape).astype(np.float32)
  t = np.array([0, 1, 10, 25, 48, 49], dtype=np.int32)
  x_t = forward.q_sample(data=data, t=t, noise=noise, schedule=SCHEDULE)
  expand = (-1,) + (1,) * (len(shape) - 1)
  abar = ALPHA_BARS[t].reshape(expand)
  expected = np.sqrt(abar) * data + np.sqrt(1.0 - abar) * noise
  np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=2e-6)


def test_q_sample_bfloat16_keeps_dtype_and_rounds_once():
  rng = np.random.default_rng(1)
  data = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  noise = rng.normal(size=data.shape).astype(np.float32)
  t = np.array([0, 5, 20, 49], dtype=np.int32)
  data_bf16 = jnp.asarray(data, jnp.bfloat16)
  noise_bf16 = jnp.asarray(noise, jnp.bfloat16)
  x_t = forward.q_sample(data=data_bf16, t=t, noise=noise_bf16, schedule=SCHEDULE)
  assert x_t.dtype == jnp.bfloat16
  abar = ALPHA_BARS[t][:, None, None, None]
  exact = np.sqrt(abar) * np.asarray(data_bf16, np.float64) + np.sqrt(1.0 - abar) * np.asarray(
    noise_bf16, np.float64
  )
  # Math in float32, one rounding to bfloat16 at the end: error <= half an ulp, 2^-8 relative.
  np.testing.assert_array_less(
    np.abs(np.asarray(x_t, np.float64) - exact), 2.0**-8 * np.abs(exact) + 1e-6
  )


def test_q_sample_grad_and_vmap():
  data = jnp.ones((3, 2))
  noise = jnp.zeros((3, 2))
  t = jnp.array([0, 10, 40])
  grad = jax.jit(
    jax.grad(lambda x: forward.q_sample(data=x, t=t, noise=noise, schedule=SCHEDULE).sum())
  )(data)
  np.testing.assert_allclose(
    grad, np.broadcast_to(np.sqrt(ALPHA_BARS[[0, 10, 40]])[:, None], (3, 2)), rtol=1e-5
  )
  single = jax.jit(
    jax.vmap(lambda x, n, s: forward.q_sample(data=x, t=s, noise=n, schedule=SCHEDULE))
  )
  noise = jax.random.normal(jax.random.key(0), (3, 2))
  np.testing.assert_allclose(
    single(data, noise, t),
    forward.q_sample(data=data, t=t, noise=noise, schedule=SCHEDULE),
    rtol=1e-6,
  )


def test_closed_form_has_no_loop_and_sequential_has_one():
  data = jnp.zeros((4, 3))
  t = jnp.array([0, 1, 2, 3])
  key = jax.random.key(0)
  full = forward.get_noise_model("full_covariance", covariance=np.eye(3) + 0.5)
  for model in (None, full):
    jaxpr = str(
      jax.make_jaxpr(
        lambda k, x, s, m=model: forward.q_sample_closed_form(
          data=x, t=s, key=k, schedule=SCHEDULE, noise_model=m
        )
      )(key, data, t)
    )
    assert "scan" not in jaxpr and "while" not in jaxpr
  jaxpr = str(
    jax.make_jaxpr(
      lambda k, x, s: forward.q_sample_sequential(data=x, t=s, key=k, schedule=SCHEDULE)
    )(key, data, t)
  )
  assert "scan" in jaxpr


# --------------------------------------------------------------------------------------------
# The sequential reference itself.
# --------------------------------------------------------------------------------------------


def test_sequential_signal_part_is_the_product_of_alphas():
  # With zero step variance the chain is deterministic: x_t = prod_{s<=t} sqrt(alpha_s) x_0.
  model = forward.get_noise_model("diagonal", variance=[0.0])
  data = jnp.full((NUM_STEPS, 1), 2.0)
  t = jnp.arange(NUM_STEPS)
  x_t = _sequential(jax.random.key(0), data, t, model)
  np.testing.assert_allclose(x_t[:, 0], 2.0 * np.sqrt(ALPHA_BARS), rtol=2e-5)


def test_sequential_stops_each_example_at_its_own_step():
  data = jnp.tile(jnp.array([[1.0, -1.0]]), (5, 1))
  t = jnp.array([0, 3, 17, 30, 49])
  key = jax.random.key(1)
  x_t, trajectory = map(
    np.asarray, _sequential(key, data, t, forward.IsotropicNoise(), return_trajectory=True)
  )
  full = np.asarray(
    _sequential(
      key, data, jnp.full((5,), NUM_STEPS - 1), forward.IsotropicNoise(), return_trajectory=True
    )[1]
  )
  for i, stop in enumerate(np.asarray(t)):
    np.testing.assert_array_equal(x_t[i], trajectory[stop, i])
    np.testing.assert_array_equal(
      trajectory[stop:, i], np.broadcast_to(x_t[i], (NUM_STEPS - stop, 2))
    )
    # Up to its stop the example follows the unstopped chain exactly (same step noise).
    np.testing.assert_array_equal(trajectory[: stop + 1, i], full[: stop + 1, i])


# --------------------------------------------------------------------------------------------
# Closed forms against the sequential chain, model by model.
# --------------------------------------------------------------------------------------------


def _rotation(angle: float) -> np.ndarray:
  """A rotation of the first two of three coordinates."""
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _per_step_covariances() -> np.ndarray:
  # The principal axes turn by 90 degrees over the schedule, so C_t mixes very different Sigma_s.
  angles = np.linspace(0.0, np.pi / 2, NUM_STEPS)
  base = np.diag([4.0, 0.25, 1.0])
  return np.stack([_rotation(a) @ base @ _rotation(a).T for a in angles])


def _brute_force_accumulated(step_covariances: np.ndarray, t: int) -> np.ndarray:
  """C_t = sum_{s <= t} (abar_t / abar_s) beta_s Sigma_s, summed term by term in float64."""
  weights = ALPHA_BARS[t] / ALPHA_BARS[: t + 1] * BETAS[: t + 1]
  return np.tensordot(weights, step_covariances[: t + 1], axes=1)


def _full_covariance() -> np.ndarray:
  factor = np.random.default_rng(2).normal(size=(3, 3))
  return factor @ factor.T + 0.3 * np.eye(3)


def _shared_basis_case():
  basis = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
  ramp = np.linspace(0.0, 1.0, NUM_STEPS)[:, None]
  eigenvalues = np.concatenate([0.2 + 3.0 * ramp, 1.0 + 0.0 * ramp, 3.0 - 2.5 * ramp], axis=1)
  return basis, eigenvalues


@functools.lru_cache(maxsize=1)
def _vector_cases():
  """(name, model, exact covariance of x_t - sqrt(abar_t) x_0 at MID_STEP) for d = 3 models."""
  scale = 1.0 - ALPHA_BARS[MID_STEP]
  sigma = _full_covariance()
  step_covariances = _per_step_covariances()
  basis, eigenvalues = _shared_basis_case()
  shared = np.einsum("ij,tj,kj->tik", basis, eigenvalues, basis)
  variance = np.array([0.25, 1.0, 4.0])
  return [
    ("isotropic", forward.get_noise_model("isotropic"), scale * np.eye(3)),
    ("diagonal", forward.get_noise_model("diagonal", variance=variance), scale * np.diag(variance)),
    (
      "full_covariance",
      forward.get_noise_model("full_covariance", covariance=sigma),
      scale * sigma,
    ),
    (
      "per_step_covariance",
      forward.get_noise_model(
        "per_step_covariance", covariances=step_covariances, schedule=SCHEDULE
      ),
      _brute_force_accumulated(step_covariances, MID_STEP),
    ),
    (
      "shared_eigenbasis",
      forward.get_noise_model(
        "shared_eigenbasis", basis=basis, eigenvalues=eigenvalues, schedule=SCHEDULE
      ),
      _brute_force_accumulated(shared, MID_STEP),
    ),
  ]


@pytest.mark.parametrize(
  "case",
  range(5),
  ids=["isotropic", "diagonal", "full_covariance", "per_step_covariance", "shared_eigenbasis"],
)
def test_closed_form_matches_sequential_vectors(case):
  name, model, exact_cov = _vector_cases()[case]
  x0 = np.array([1.0, -0.5, 2.0], dtype=np.float32)
  data = jnp.broadcast_to(x0, (NUM_SAMPLES, 3))
  t = jnp.full((NUM_SAMPLES,), MID_STEP)
  closed, sequential = (
    np.asarray(x, np.float64) for x in _closed_and_sequential(jax.random.key(10), data, t, model)
  )
  mean = np.sqrt(ALPHA_BARS[MID_STEP]) * x0
  _assert_matches_gaussian(closed, mean, exact_cov)
  _assert_matches_gaussian(sequential, mean, exact_cov)
  _assert_same_distribution(closed, sequential, exact_cov)


def test_closed_form_matches_sequential_colored_images():
  height, width = 4, 4
  spectrum = forward.power_law_spectrum(height=height, width=width, exponent=2.0)
  # Independent full-grid spectrum (numpy FFT frequencies) and its circulant covariance:
  # Cov[p, q] = c(p - q) with c = ifft2(S), by Wiener-Khinchin for orthonormal FFTs.
  k_y = np.fft.fftfreq(height) * height
  k_x = np.fft.fftfreq(width) * width
  full = 1.0 / (k_y[:, None] ** 2 + k_x[None, :] ** 2 + 1.0)
  full /= full.mean()
  np.testing.assert_allclose(spectrum, full[:, : width // 2 + 1], rtol=1e-12)
  autocovariance = np.fft.ifft2(full).real
  pixels = [(y, x) for y in range(height) for x in range(width)]
  circulant = np.array(
    [
      [autocovariance[(p[0] - q[0]) % height, (p[1] - q[1]) % width] for q in pixels]
      for p in pixels
    ]
  )
  exact_cov = (1.0 - ALPHA_BARS[MID_STEP]) * circulant
  model = forward.get_noise_model("colored", power_spectrum=spectrum)
  image = np.random.default_rng(4).normal(size=(height, width, 1)).astype(np.float32)
  data = jnp.broadcast_to(image, (NUM_SAMPLES, height, width, 1))
  t = jnp.full((NUM_SAMPLES,), MID_STEP)
  closed, sequential = (
    np.asarray(x, np.float64) for x in _closed_and_sequential(jax.random.key(12), data, t, model)
  )
  closed, sequential = closed.reshape(NUM_SAMPLES, -1), sequential.reshape(NUM_SAMPLES, -1)
  mean = np.sqrt(ALPHA_BARS[MID_STEP]) * image.reshape(-1)
  _assert_matches_gaussian(closed, mean, exact_cov)
  _assert_matches_gaussian(sequential, mean, exact_cov)
  _assert_same_distribution(closed, sequential, exact_cov)


def test_naive_shortcut_for_per_step_covariances_is_detected():
  # The seed's intuition made concrete: using the current step's Sigma_t as if it were fixed,
  # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) chol(Sigma_t) eps, is wrong, and the covariance
  # check above sees it (this guards the power of those checks).
  step_covariances = _per_step_covariances()
  naive_cov = (1.0 - ALPHA_BARS[MID_STEP]) * step_covariances[MID_STEP]
  model = forward.get_noise_model(
    "per_step_covariance", covariances=step_covariances, schedule=SCHEDULE
  )
  sequential = np.asarray(
    _sequential(
      jax.random.key(14), jnp.zeros((NUM_SAMPLES, 3)), jnp.full((NUM_SAMPLES,), MID_STEP), model
    ),
    np.float64,
  )
  exact_cov = _brute_force_accumulated(step_covariances, MID_STEP)
  sample_cov = np.cov(sequential, rowvar=False)
  z_naive = np.abs(sample_cov - naive_cov) / _gaussian_cov_se(exact_cov, NUM_SAMPLES)
  assert z_naive.max() > 20.0, z_naive


# --------------------------------------------------------------------------------------------
# Where the shortcut does not exist.
# --------------------------------------------------------------------------------------------


def test_heteroscedastic_has_only_the_sequential_form():
  offset, x0, n = 2.0, 1.0, 20_000
  model = forward.get_noise_model("heteroscedastic", offset=offset)
  with pytest.raises(NotImplementedError, match="heteroscedastic.*only the sequential"):
    forward.q_sample_closed_form(
      data=jnp.zeros((2, 1)),
      t=jnp.array([1, 2]),
      key=jax.random.key(0),
      schedule=SCHEDULE,
      noise_model=model,
    )
  step = 15
  t = jnp.full((n,), step)
  samples = np.asarray(_sequential(jax.random.key(15), jnp.full((n, 1), x0), t, model))[:, 0]
  samples = samples.astype(np.float64)
  # Exact moments of the chain: E x_t = sqrt(abar_t) x_0 and, since alpha_s + beta_s = 1,
  # E x_t^2 = x_0^2 + c sum_{s <= t} beta_s.
  mean = np.sqrt(ALPHA_BARS[step]) * x0
  variance = x0**2 + offset * BETAS[: step + 1].sum() - mean**2
  centered = samples - samples.mean()
  # s.e. of the sample variance for any distribution: sqrt((m4 - m2^2) / n), moments estimated.
  variance_se = np.sqrt((np.mean(centered**4) - np.mean(centered**2) ** 2) / n)
  assert abs(samples.mean() - mean) < NUM_SE * np.sqrt(variance / n)
  assert abs(samples.var() - variance) < NUM_SE * variance_se
  # The naive shortcut (isotropic closed form with the kernel frozen at x_0):
  # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) g(x_0) eps, variance (1 - abar_t)(c + x_0^2).
  naive_variance = (1.0 - ALPHA_BARS[step]) * (offset + x0**2)
  assert abs(samples.var() - naive_variance) > 8.0 * variance_se
  naive = mean + np.sqrt(naive_variance) * np.random.default_rng(5).normal(size=n)
  assert stats.ks_2samp(samples, naive).pvalue < 1e-20
  # Even the moment-matched Gaussian is wrong: the chain is a heavy-tailed scale mixture.
  moment_matched = stats.norm(loc=mean, scale=np.sqrt(variance))
  assert stats.kstest(samples, moment_matched.cdf).pvalue < 1e-20


@pytest.mark.parametrize("name,step_kurtosis", [("laplace", 3.0), ("uniform", -1.2)])
def test_non_gaussian_noise_kurtosis_is_the_cumulant_sum(name, step_kurtosis):
  model = forward.get_noise_model(name)
  with pytest.raises(NotImplementedError, match=f"{name}.*only the sequential"):
    forward.q_sample_closed_form(
      data=jnp.zeros((2, 1)),
      t=jnp.array([1, 2]),
      key=jax.random.key(0),
      schedule=SCHEDULE,
      noise_model=model,
    )
  step, n = 3, 40_000
  samples = np.asarray(
    _sequential(jax.random.key(16), jnp.zeros((n, 1)), jnp.full((n,), step), model), np.float64
  )[:, 0]
  # x_t = sum_s w_s n_s with w_s = sqrt(abar_t / abar_s) sqrt(beta_s): variance sum w_s^2
  # (= 1 - abar_t, as for isotropic noise) and, cumulants adding, excess kurtosis
  # kappa sum w_s^4 / (sum w_s^2)^2, which the Gaussian shortcut sets to 0.
  weights_sq = ALPHA_BARS[step] / ALPHA_BARS[: step + 1] * BETAS[: step + 1]
  np.testing.assert_allclose(weights_sq.sum(), 1.0 - ALPHA_BARS[step], rtol=1e-12)
  expected = step_kurtosis * (weights_sq**2).sum() / weights_sq.sum() ** 2
  m2 = np.mean(samples**2)
  m4 = np.mean(samples**4)
  kurtosis = m4 / m2**2 - 3.0
  # s.e. by the delta method: influence of one draw on m4 / m2^2 is
  # (x^4 - m4) / m2^2 - 2 m4 (x^2 - m2) / m2^3 (the mean is known to be 0).
  influence = (samples**4 - m4) / m2**2 - 2.0 * m4 * (samples**2 - m2) / m2**3
  kurtosis_se = influence.std() / np.sqrt(n)
  variance_se = np.std(samples**2) / np.sqrt(n)
  assert abs(m2 - (1.0 - ALPHA_BARS[step])) < NUM_SE * variance_se
  assert abs(kurtosis - expected) < NUM_SE * kurtosis_se, (kurtosis, expected, kurtosis_se)
  assert abs(kurtosis) > 10.0 * kurtosis_se  # the Gaussian closed form (kurtosis 0) is rejected


# --------------------------------------------------------------------------------------------
# The posterior q(x_{t-1} | x_t, x_0).
# --------------------------------------------------------------------------------------------


def test_posterior_is_scalar_gaussian_bayes():
  x0, x_t = 0.7, -1.3
  t = np.arange(1, NUM_STEPS)
  moments = forward.posterior_mean_variance(
    data=jnp.full((t.size,), x0), x_t=jnp.full((t.size,), x_t), t=t, schedule=SCHEDULE
  )
  # Prior x_{t-1} | x_0 ~ N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}), likelihood
  # x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t): precisions add, means weight by precision.
  prior_mean = np.sqrt(ALPHA_BARS[t - 1]) * x0
  prior_var = 1.0 - ALPHA_BARS[t - 1]
  alpha = 1.0 - BETAS[t]
  precision = 1.0 / prior_var + alpha / BETAS[t]
  variance = 1.0 / precision
  mean = variance * (prior_mean / prior_var + np.sqrt(alpha) * x_t / BETAS[t])
  np.testing.assert_allclose(moments.mean, mean, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(moments.variance, variance, rtol=2e-5)
  np.testing.assert_allclose(moments.log_variance, np.log(variance), rtol=2e-5, atol=2e-6)
  # t = 0: the posterior is the point x_0; the log-variance is clipped to log var_1 (DDPM code).
  at_zero = forward.posterior_mean_variance(
    data=jnp.array([[x0]]), x_t=jnp.array([[x_t]]), t=jnp.array([0]), schedule=SCHEDULE
  )
  np.testing.assert_allclose(at_zero.mean, [[x0]], rtol=1e-6)
  assert float(at_zero.variance.ravel()[0]) == 0.0
  assert at_zero.log_variance.shape == (1, 1)
  np.testing.assert_allclose(at_zero.log_variance.ravel(), np.log(variance[:1]), rtol=2e-5)


def test_posterior_matches_conditional_moments_of_the_chain():
  x0, step, n = 1.0, 20, 20_000
  _, trajectory = _sequential(
    jax.random.key(17),
    jnp.full((n, 1), x0),
    jnp.full((n,), NUM_STEPS - 1),
    forward.IsotropicNoise(),
    return_trajectory=True,
  )
  previous = np.asarray(trajectory[step - 1, :, 0], np.float64)
  current = np.asarray(trajectory[step, :, 0], np.float64)
  # (x_{t-1}, x_t) is jointly Gaussian given x_0, so E[x_{t-1} | x_t] is linear: regress.
  slope, intercept = np.polyfit(current, previous, 1)
  residual_var = np.var(previous - (slope * current + intercept), ddof=2)
  moments = forward.posterior_mean_variance(
    data=jnp.full((2,), x0), x_t=jnp.array([0.0, 1.0]), t=jnp.array([step, step]), schedule=SCHEDULE
  )
  model_intercept = float(moments.mean[0])
  model_slope = float(moments.mean[1] - moments.mean[0])
  model_var = float(moments.variance[0])
  # OLS s.e.: slope sqrt(s^2 / (n var x)), intercept sqrt(s^2 (1/n + mean(x)^2 / (n var x)));
  # residual variance of a Gaussian: s^2 sqrt(2 / n).
  slope_se = np.sqrt(residual_var / (n * current.var()))
  intercept_se = np.sqrt(residual_var * (1.0 / n + current.mean() ** 2 / (n * current.var())))
  assert abs(slope - model_slope) < NUM_SE * slope_se
  assert abs(intercept - model_intercept) < NUM_SE * intercept_se
  assert abs(residual_var - model_var) < NUM_SE * model_var * np.sqrt(2.0 / n)


# --------------------------------------------------------------------------------------------
# Errors a user can make.
# --------------------------------------------------------------------------------------------


def test_errors_name_the_value_and_the_fix():
  with pytest.raises(ValueError, match="unknown noise model 'pink'.*isotropic"):
    forward.get_noise_model("pink")
  with pytest.raises(ValueError, match="positive definite"):
    forward.get_noise_model("full_covariance", covariance=[[1.0, 2.0], [2.0, 1.0]])
  with pytest.raises(ValueError, match="orthonormal"):
    forward.get_noise_model(
      "shared_eigenbasis",
      basis=2 * np.eye(2),
      eigenvalues=np.ones((NUM_STEPS, 2)),
      schedule=SCHEDULE,
    )
  with pytest.raises(ValueError, match=r"\[T, d, d\]"):
    forward.get_noise_model(
      "per_step_covariance", covariances=np.ones((3, 2, 2)), schedule=SCHEDULE
    )
  data = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="integer step"):
    forward.q_sample(data=data, t=jnp.array([0.5, 0.1]), noise=data, schedule=SCHEDULE)
  with pytest.raises(ValueError, match=r"\[0, 49\]"):
    forward.q_sample(data=data, t=jnp.array([0, 50]), noise=data, schedule=SCHEDULE)
  with pytest.raises(ValueError, match="one step per example"):
    forward.q_sample(data=data, t=jnp.array([0, 1, 2]), noise=data, schedule=SCHEDULE)
  other = get_discrete_schedule("linear", num_steps=10)
  model = forward.get_noise_model(
    "shared_eigenbasis", basis=np.eye(3), eigenvalues=np.ones((NUM_STEPS, 3)), schedule=SCHEDULE
  )
  with pytest.raises(ValueError, match="rebuild it with this schedule"):
    forward.q_sample_closed_form(
      data=data, t=jnp.array([0, 1]), key=jax.random.key(0), schedule=other, noise_model=model
    )
  with pytest.raises(ValueError, match="last axis"):
    forward.q_sample_closed_form(
      data=jnp.zeros((2, 4)),
      t=jnp.array([0, 1]),
      key=jax.random.key(0),
      schedule=SCHEDULE,
      noise_model=model,
    )
