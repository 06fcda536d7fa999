"""Toy 2D samplers against independent samplers: sklearn, or numpy transcriptions of the sources.

Tolerances. With n = 20000 draws per side, a difference of two sample means has standard error
sqrt(s1^2 / n + s2^2 / n); a covariance entry is the mean of the products (x - mx)(y - my), whose
standard error is std(product) / sqrt(n). Moments must agree within 5 s.e. (two-sided tail 5.7e-7
per check). Distributions are compared by two-sample Kolmogorov-Smirnov tests on 4 projections
(x, y, x + y, x - y: marginals alone would miss a wrong rotation or sign), Bonferroni-corrected to
a family level of 1e-3 over all datasets. References that place points deterministically
(sklearn's linspace angles, FFJORD's equal class counts) are stratified samples of the same
distribution, with smaller variance; that only makes these checks conservative.
"""

from __future__ import annotations

import itertools
import math
import zlib

import jax
import numpy as np
import pytest
import sklearn.datasets
from scipy import stats

from diffjax.data import toy2d

N = 20000
DIRECTIONS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]) / np.array(
  [[1.0], [1.0], [math.sqrt(2)], [math.sqrt(2)]]
)
KS_LEVEL = 1e-3 / (len(DIRECTIONS) * len(toy2d.TOY2D))  # 11 names: a conservative count


# --------------------------------------------------------------------------------------------
# Independent references, written from the sources (not from diffjax's code).
# --------------------------------------------------------------------------------------------


def ref_normal(rng, n):
  return rng.standard_normal((n, 2)), None


def ref_8gaussians(rng, n, scale=5.0, var=0.1):
  # TorchCFM eight_normal_sample: MultivariateNormal(0, sqrt(var) * I); centers in its list order.
  s = 1.0 / math.sqrt(2)
  centers = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
  angle_index = np.array([0, 4, 2, 6, 1, 7, 3, 5])  # list position -> k with angle k pi / 4
  pick = rng.integers(0, 8, n)
  noise = rng.multivariate_normal(np.zeros(2), math.sqrt(var) * np.eye(2), size=n)
  return centers[pick] * scale + noise, angle_index[pick]


def ref_25gaussians(rng, n):
  # WGAN-GP gan_toy.py: point = randn * 0.05 + 2 (x, y) for x, y in range(-2, 3); / 2.828.
  grid = list(itertools.product(range(-2, 3), range(-2, 3)))
  pick = rng.integers(0, 25, n)
  points = rng.standard_normal((n, 2)) * 0.05 + 2.0 * np.array(grid, float)[pick]
  return points / 2.828, pick


def ref_moons(rng, n):
  x, y = sklearn.datasets.make_moons(n, noise=0.2, random_state=rng.integers(2**31))
  return x * 3 - 1, y


def ref_scurve(rng, n):
  x, _ = sklearn.datasets.make_s_curve(n, noise=0.1, random_state=rng.integers(2**31))
  return x[:, [0, 2]], None


def ref_checkerboard(rng, n):
  # FFJORD toy_data.py; the label (2 column + upper) is read off the FFJORD variables.
  x1 = rng.random(n) * 4 - 2
  b = rng.integers(0, 2, n)
  x2_ = rng.random(n) - b * 2
  x2 = x2_ + (np.floor(x1) % 2)
  return np.stack([x1, x2], 1) * 2, 2 * (np.floor(x1).astype(int) + 2) + 1 - b


def ref_pinwheel(rng, n):
  # FFJORD toy_data.py, verbatim in structure (equal counts per arm, then shuffled).
  radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
  num_per_class = n // 5
  rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
  features = rng.standard_normal((num_classes * num_per_class, 2)) * np.array(
    [radial_std, tangential_std]
  )
  features[:, 0] += 1.0
  labels = np.repeat(np.arange(num_classes), num_per_class)
  angles = rads[labels] + rate * np.exp(features[:, 0])
  rotations = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)])
  rotations = np.reshape(rotations.T, (-1, 2, 2))
  order = rng.permutation(len(labels))
  return 2 * np.einsum("ti,tij->tj", features, rotations)[order], labels[order]


def ref_swissroll(rng, n):
  x, _ = sklearn.datasets.make_swiss_roll(n, noise=1.0, random_state=rng.integers(2**31))
  return x[:, [0, 2]] / 5, None


def ref_2spirals(rng, n):
  # FFJORD toy_data.py (first half spiral d, second half -d).
  m = n // 2
  r = np.sqrt(rng.random((m, 1))) * 540 * (2 * np.pi) / 360
  d1x = -np.cos(r) * r + rng.random((m, 1)) * 0.5
  d1y = np.sin(r) * r + rng.random((m, 1)) * 0.5
  x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3
  x += rng.standard_normal(x.shape) * 0.1
  return x, np.repeat([0, 1], m)


def ref_circles(rng, n):
  x, y = sklearn.datasets.make_circles(n, factor=0.5, noise=0.08, random_state=rng.integers(2**31))
  return x * 3, y


REFERENCES = {
  "normal": ref_normal,
  "gaussian": ref_normal,
  "8gaussians": ref_8gaussians,
  "25gaussians": ref_25gaussians,
  "moons": ref_moons,
  "scurve": ref_scurve,
  "checkerboard": ref_checkerboard,
  "pinwheel": ref_pinwheel,
  "swissroll": ref_swissroll,
  "2spirals": ref_2spirals,
  "circles": ref_circles,
}


# --------------------------------------------------------------------------------------------
# Comparisons.
# --------------------------------------------------------------------------------------------


def _moment_violations(a, b, k=5.0) -> list[str]:
  """Means and covariance entries of two samples that differ by more than k standard errors."""
  bad = []
  se_mean = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
  for i in range(2):
    if abs(a[:, i].mean() - b[:, i].mean()) > k * se_mean[i]:
      bad.append(f"mean[{i}]: {a[:, i].mean():.4f} vs {b[:, i].mean():.4f}")
  for i, j in [(0, 0), (0, 1), (1, 1)]:
    pa = (a[:, i] - a[:, i].mean()) * (a[:, j] - a[:, j].mean())
    pb = (b[:, i] - b[:, i].mean()) * (b[:, j] - b[:, j].mean())
    se = math.sqrt(pa.var() / len(pa) + pb.var() / len(pb))
    if abs(pa.mean() - pb.mean()) > k * se:
      bad.append(f"cov[{i}{j}]: {pa.mean():.4f} vs {pb.mean():.4f} (s.e. {se:.4f})")
  return bad


def _ks_pvalues(a, b) -> np.ndarray:
  return np.array([stats.ks_2samp(a @ d, b @ d).pvalue for d in DIRECTIONS])


_SAMPLES: dict = {}


def _ours(name: str) -> dict:
  """Draws of the plain (and, if any, labelled) sampler; one jit per name, compiled once, since
  compiles dominate this file's runtime. Keys: "points", "again" (same key), "other" (new key),
  "labelled" ((points, labels) for the same key, or None)."""
  if name not in _SAMPLES:
    plain = toy2d.get_toy2d(name)
    labelled = toy2d.get_toy2d(name, labelled=True) if name in toy2d.TOY2D_LABELLED else None
    fn = jax.jit(lambda key: (plain(key, N), None if labelled is None else labelled(key, N)))
    (points, pair), (again, _), (other, _) = (fn(jax.random.key(k)) for k in (0, 0, 1))
    _SAMPLES[name] = dict(points=points, again=again, other=other, labelled=pair)
  return _SAMPLES[name]


def _reference(name: str):
  # crc32, not hash(): str hashes are salted per process and the draw must be reproducible.
  return REFERENCES[name](np.random.default_rng(zlib.crc32(name.encode())), N)


@pytest.mark.parametrize("name", sorted(set(toy2d.TOY2D) - {"gaussian"}))
def test_sampler_is_jittable_deterministic_and_matches_reference(name):
  draws = _ours(name)
  out, again, other = draws["points"], draws["again"], draws["other"]
  assert out.shape == (N, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out, again)  # a key fixes the draw
  assert not np.array_equal(out, other)
  ours = np.asarray(out, np.float64)
  ref, _ = _reference(name)
  assert not _moment_violations(ours, ref), _moment_violations(ours, ref)
  pvalues = _ks_pvalues(ours, ref)
  assert np.all(pvalues > KS_LEVEL), pvalues


def _wrong_8gaussians(rng, n):
  # The classic misreading of eight_normal_sample: var = 0.1 taken as the per-coordinate variance.
  angle = rng.integers(0, 8, n) * math.pi / 4
  centers = 5.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
  return centers + math.sqrt(0.1) * rng.standard_normal((n, 2)), None


def _wrong_pinwheel(rng, n):
  x, y = ref_pinwheel(rng, n)
  return x * np.array([1.0, -1.0]), y  # the mirror image: same marginal of x, wrong turn


def _wrong_moons(rng, n):
  x, y = sklearn.datasets.make_moons(n, noise=0.15, random_state=rng.integers(2**31))
  return x * 3 - 1, y


@pytest.mark.parametrize(
  "name, wrong",
  [("8gaussians", _wrong_8gaussians), ("pinwheel", _wrong_pinwheel), ("moons", _wrong_moons)],
)
def test_comparison_rejects_a_nearby_wrong_distribution(name, wrong):
  # Negative control: the checks above have the power to see small convention errors.
  ours = np.asarray(_ours(name)["points"], np.float64)
  ref, _ = wrong(np.random.default_rng(7), N)
  assert _moment_violations(ours, ref) or np.any(_ks_pvalues(ours, ref) <= KS_LEVEL)


@pytest.mark.parametrize("name", sorted(toy2d.TOY2D_LABELLED))
def test_labelled_sampler_labels_match_reference(name):
  points, labels = _ours(name)["labelled"]
  assert labels.shape == (N,) and labels.dtype == np.int32
  # The labelled sampler draws the same points as the plain one for the same key.
  np.testing.assert_array_equal(points, _ours(name)["points"])
  points, labels = np.asarray(points, np.float64), np.asarray(labels)
  ref, ref_labels = _reference(name)
  k = toy2d.num_classes(name)
  assert set(np.unique(labels)) == set(range(k))
  for c in range(k):
    # Class frequency: mean of n Bernoulli(1/k) draws, s.e. sqrt(p (1 - p) / n); 5 s.e.
    p = 1.0 / k
    assert abs((labels == c).mean() - p) <= 5 * math.sqrt(p * (1 - p) / N), c
    mine, theirs = points[labels == c], ref[ref_labels == c]
    se = np.sqrt(mine.var(0) / len(mine) + theirs.var(0) / len(theirs))
    assert np.all(np.abs(mine.mean(0) - theirs.mean(0)) <= 5 * se + 1e-9), (
      c,
      mine.mean(0),
      theirs.mean(0),
    )


def test_8gaussians_components_have_covariance_sqrt_var():
  points, labels = _ours("8gaussians")["labelled"]
  points, labels = np.asarray(points, np.float64), np.asarray(labels)
  angle = labels * math.pi / 4
  residual = points - 5.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
  # Sample variance of n Gaussian draws has s.e. sigma^2 sqrt(2 / n); 5 s.e. (0.016 here) is far
  # below the 0.216 gap between sqrt(0.1) and the misread 0.1.
  expected = math.sqrt(0.1)
  se = expected * math.sqrt(2.0 / N)
  np.testing.assert_allclose(residual.var(0), expected, atol=5 * se)
  assert abs(np.mean(residual[:, 0] * residual[:, 1])) <= 5 * expected / math.sqrt(N)


def test_checkerboard_labels_name_the_cell():
  points, labels = _ours("checkerboard")["labelled"]
  a, c = np.asarray(points, np.float64).T / 2.0
  column = np.floor(a).astype(int) + 2
  parity = np.floor(a) % 2
  upper = (c >= parity - 0.5).astype(int)  # black cells: [parity - 2, parity - 1), [parity, +1)
  np.testing.assert_array_equal(np.asarray(labels), 2 * column + upper)
  # Only black cells are hit: (floor(a) + floor(c)) is even on the board.
  assert np.all((np.floor(a) + np.floor(c)) % 2 == 0)


def test_options_change_the_distribution():
  points = jax.jit(
    toy2d.get_toy2d("circles", labelled=True, factor=0.25, scale=1.0, noise=0.0), static_argnums=1
  )(jax.random.key(0), 1000)
  radius = np.linalg.norm(np.asarray(points[0]), axis=1)
  np.testing.assert_allclose(radius, np.where(np.asarray(points[1]) == 1, 0.25, 1.0), atol=1e-5)
  assert toy2d.num_classes("pinwheel", arms=3) == 3


def test_gaussian_is_an_alias_of_normal():
  assert toy2d.TOY2D["gaussian"] is toy2d.TOY2D["normal"]


def test_get_toy2d_rejects_bad_names_options_and_sizes():
  with pytest.raises(ValueError, match="unknown toy distribution 'spiral'.*2spirals"):
    toy2d.get_toy2d("spiral")
  with pytest.raises(ValueError, match="'swissroll' has no labelled variant"):
    toy2d.get_toy2d("swissroll", labelled=True)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['sigma'\].*noise"):
    toy2d.get_toy2d("moons", sigma=0.1)
  with pytest.raises(ValueError, match="num must be a non-negative Python int"):
    toy2d.moons(jax.random.key(0), -1)
  with pytest.raises(ValueError, match="has no labels"):
    toy2d.num_classes("normal")
