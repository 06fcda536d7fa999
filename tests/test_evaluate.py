"""Tests of the metrics against brute force, closed forms and sampling standard errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from diffjax import evaluate

# ------------------------------------------------------------------------------------------------
# Wasserstein-2.


@pytest.mark.parametrize("n", [3, 5, 6])
def test_wasserstein2_matches_brute_force_over_permutations(n):
  # Equal sizes, uniform weights: an optimal plan is a permutation (Birkhoff-von Neumann), so
  # W2^2 = min over permutations p of (1/n) sum_i ||x_i - y_p(i)||^2.
  rng = np.random.default_rng(n)
  x, y = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + 0.3
  brute = min(
    np.mean(np.sum((x - y[list(p)]) ** 2, axis=1)) for p in itertools.permutations(range(n))
  )
  np.testing.assert_allclose(evaluate.wasserstein2(x, y) ** 2, brute, rtol=1e-10)


def test_wasserstein2_matches_linear_program_for_unequal_sizes():
  # The transport LP solved independently by scipy's HiGHS: min <P, C> s.t. P 1 = a, P^T 1 = b.
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(3, 2)), rng.normal(size=(5, 2))
  cost = np.sum((x[:, None] - y[None]) ** 2, axis=-1)
  rows = np.kron(np.eye(3), np.ones((1, 5)))
  cols = np.kron(np.ones((1, 3)), np.eye(5))
  lp = scipy.optimize.linprog(
    cost.ravel(),
    A_eq=np.vstack([rows, cols]),
    b_eq=np.concatenate([np.full(3, 1 / 3), np.full(5, 1 / 5)]),
    bounds=(0, None),
    method="highs",
  )
  np.testing.assert_allclose(evaluate.wasserstein2(x, y) ** 2, lp.fun, rtol=1e-8)


def test_wasserstein2_closed_forms():
  rng = np.random.default_rng(2)
  # 1D: the monotone (sorted) matching is optimal, W2^2 = mean (x_(i) - y_(i))^2.
  x, y = rng.normal(size=50), rng.exponential(size=50)
  sorted_w2 = np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
  np.testing.assert_allclose(evaluate.wasserstein2(x[:, None], y[:, None]), sorted_w2, rtol=1e-9)
  # A translated copy: W2 = ||shift|| exactly (the cross term vanishes), for any point cloud;
  # points given as [n, 2, 2] images are flattened to R^4.
  cloud = rng.normal(size=(30, 2, 2))
  shift = np.array([[1.5, -2.0], [0.5, 0.0]])
  np.testing.assert_allclose(
    evaluate.wasserstein2(cloud, cloud + shift), np.linalg.norm(shift), rtol=1e-9
  )
  assert evaluate.wasserstein2(cloud, cloud[::-1]) == pytest.approx(0.0, abs=1e-7)


def test_wasserstein2_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
    evaluate.wasserstein2(np.zeros((4, 2)), np.zeros((4, 3)))
  bad = np.zeros((4, 2))
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="1 NaN"):
    evaluate.wasserstein2(bad, np.zeros((4, 2)))
  rng = np.random.default_rng(0)
  with pytest.raises(RuntimeError, match="num_iter_max=2"):
    evaluate.wasserstein2(rng.normal(size=(40, 2)), rng.normal(size=(40, 2)), num_iter_max=2)


# ------------------------------------------------------------------------------------------------
# MMD.


def _brute_mmd2(x, y, bandwidths):
  def k(a, b):
    return sum(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in bandwidths)

  n, m = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
  return xx + yy - 2 * xy


def test_mmd_rbf_matches_brute_force():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5
  got = evaluate.mmd_rbf(
    jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), bandwidths=(0.5, 2.0)
  )
  # float32 kernel sums of O(1) terms: rounding well below 1e-5.
  np.testing.assert_allclose(float(got), _brute_mmd2(x, y, (0.5, 2.0)), atol=1e-5)
  with pytest.raises(ValueError, match="bandwidths"):
    evaluate.mmd_rbf(jnp.zeros((3, 2)), jnp.zeros((3, 2)), bandwidths=(1.0, 0.0))
  with pytest.raises(ValueError, match=">= 2 points"):
    evaluate.mmd_rbf(jnp.zeros((1, 2)), jnp.zeros((3, 2)))


def _gaussian_kernel_mean(mean, cov, bandwidths):
  """E k(X, X') for X - X' ~ N(mean, cov): sum_s det(I + cov/s^2)^(-1/2)
  exp(-mean^T (cov + s^2 I)^(-1) mean / 2) (a Gaussian integral)."""
  eye = np.eye(len(mean))
  return sum(
    np.linalg.det(eye + cov / s**2) ** -0.5
    * np.exp(-0.5 * mean @ np.linalg.solve(cov + s**2 * eye, mean))
    for s in bandwidths
  )


def test_mmd_rbf_is_unbiased_against_the_population_value():
  # R independent replicate estimates, each from n = m = 100 draws. Their mean has standard
  # error std / sqrt(R); an unbiased estimator must land within 5 s.e. of the population MMD^2,
  # known in closed form for Gaussians. (A biased V-statistic would be off by about
  # 2 (k(x, x) - E k) / n ~ 0.05 here, dozens of s.e.)
  reps, n, bandwidths = 300, 100, evaluate.DEFAULT_BANDWIDTHS
  mean_q, cov_q = np.array([0.5, 0.0]), np.diag([1.0, 0.5])
  kx, ky, kz = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (reps, n, 2))
  y_same = jax.random.normal(ky, (reps, n, 2))
  y_diff = mean_q + jax.random.normal(kz, (reps, n, 2)) * jnp.sqrt(jnp.diag(cov_q))
  estimate = jax.jit(jax.vmap(lambda a, b: evaluate.mmd_rbf(a, b, bandwidths=bandwidths)))
  eye = np.eye(2)
  zero = np.zeros(2)
  truths = {
    "same": 0.0,
    "diff": (
      _gaussian_kernel_mean(zero, 2 * eye, bandwidths)
      + _gaussian_kernel_mean(zero, 2 * cov_q, bandwidths)
      - 2 * _gaussian_kernel_mean(mean_q, eye + cov_q, bandwidths)
    ),
  }
  for name, y in [("same", y_same), ("diff", y_diff)]:
    values = np.asarray(estimate(x, y), np.float64)
    se = values.std(ddof=1) / np.sqrt(reps)
    assert abs(values.mean() - truths[name]) < 5 * se, (name, values.mean(), truths[name], se)
  assert truths["diff"] > 20 * se  # different distributions: clearly positive


# ------------------------------------------------------------------------------------------------
# Frechet distance.


def _psd_sqrt(matrix):
  w, v = np.linalg.eigh(matrix)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_frechet(mean_a, cov_a, mean_b, cov_b):
  # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): symmetric eigendecompositions only,
  # independent of scipy.linalg.sqrtm.
  root_a = _psd_sqrt(cov_a)
  cross = np.trace(_psd_sqrt(root_a @ cov_b @ root_a))
  return np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross


def _samples_with_moments(rng, n, mean, cov):
  """n points whose sample mean and (ddof=1) sample covariance are exactly mean and cov."""
  z = rng.normal(size=(n, len(mean)))
  z -= z.mean(axis=0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_diagonal_closed_form():
  # Commuting (diagonal) covariances: d^2 = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 0.0, 1.0])
  var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  exact = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
  got = evaluate.frechet_distance_from_moments(
    mean_a=mean_a, cov_a=np.diag(var_a), mean_b=mean_b, cov_b=np.diag(var_b)
  )
  np.testing.assert_allclose(got, exact, rtol=1e-12)
  rng = np.random.default_rng(4)
  a = _samples_with_moments(rng, 50, mean_a, np.diag(var_a))
  b = _samples_with_moments(rng, 70, mean_b, np.diag(var_b))
  np.testing.assert_allclose(evaluate.frechet_distance(a, b), exact, rtol=1e-9)
  assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def _full_covariances():
  rng = np.random.default_rng(5)
  ma, mb = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
  return ma @ ma.T + 0.5 * np.eye(3), mb @ mb.T + 0.2 * np.eye(3)


def test_frechet_distance_full_covariances_exact_moments():
  cov_a, cov_b = _full_covariances()
  assert not np.allclose(cov_a @ cov_b, cov_b @ cov_a)  # the non-commuting case
  mean_a, mean_b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.5, -0.5])
  reference = _reference_frechet(mean_a, cov_a, mean_b, cov_b)
  got = evaluate.frechet_distance_from_moments(
    mean_a=mean_a, cov_a=cov_a, mean_b=mean_b, cov_b=cov_b
  )
  np.testing.assert_allclose(got, reference, rtol=1e-9)
  rng = np.random.default_rng(6)
  a, b = (
    _samples_with_moments(rng, 40, mean_a, cov_a),
    _samples_with_moments(rng, 40, mean_b, cov_b),
  )
  np.testing.assert_allclose(evaluate.frechet_distance(a, b), reference, rtol=1e-8)


def test_frechet_distance_from_large_samples():
  # R replicates of n draws per Gaussian. The estimate's mean differs from the exact d^2 by its
  # O(1/n) bias, E|mu_a_hat - mu_b_hat|^2 - |mu_a - mu_b|^2 = (tr S_a + tr S_b) / n, plus at most
  # as much again from the trace-sqrt term; allow 5 s.e. of the replicate mean plus twice that.
  reps, n = 20, 20000
  cov_a, cov_b = _full_covariances()
  mean_a, mean_b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.5, -0.5])
  exact = _reference_frechet(mean_a, cov_a, mean_b, cov_b)
  rng = np.random.default_rng(7)
  values = np.array(
    [
      evaluate.frechet_distance(
        rng.multivariate_normal(mean_a, cov_a, size=n),
        rng.multivariate_normal(mean_b, cov_b, size=n),
      )
      for _ in range(reps)
    ]
  )
  se = values.std(ddof=1) / np.sqrt(reps)
  bias_bound = 2 * (np.trace(cov_a) + np.trace(cov_b)) / n
  assert abs(values.mean() - exact) < 5 * se + bias_bound, (values.mean(), exact, se)


def test_digits_classifier_and_frechet_distance():
  feature_fn, accuracy = evaluate.train_digits_classifier(0)
  assert accuracy >= 0.95
  from diffjax.data import images

  x, _ = images.load_digits()
  assert feature_fn(jnp.asarray(x[:5])).shape == (5, 64)
  order = np.random.default_rng(0).permutation(len(x))
  halves = evaluate.digits_frechet_distance(x[order[:898]], x[order[898:]])
  noise = np.random.default_rng(1).uniform(-1.0, 1.0, size=(898, 8, 8, 1)).astype(np.float32)
  to_noise = evaluate.digits_frechet_distance(noise)
  assert 0.0 < halves < 0.05 * to_noise
  assert evaluate.train_digits_classifier(0)[0] is feature_fn  # cached per process
  with pytest.raises(ValueError, match=r"\(4, 8, 8\)"):
    evaluate.digits_frechet_distance(np.zeros((4, 8, 8)))
