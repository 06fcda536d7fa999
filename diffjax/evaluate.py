"""Sample-quality metrics: pure functions of arrays (no files, no global state).

* :func:`wasserstein2`: exact W2 between two empirical distributions (POT's network simplex).
* :func:`mmd_rbf`: unbiased MMD^2 with a mixture of Gaussian (RBF) kernels, in ``jnp``.
* :func:`frechet_distance`: the Frechet distance between Gaussians fitted to two feature sets;
  :func:`digits_frechet_distance` applies it in the features of a small classifier trained on
  scikit-learn's 8x8 digits (:func:`train_digits_classifier`). That number is *not* FID: it uses
  neither Inception-v3 features nor natural images and is not comparable with published FIDs.
* :func:`straightness`: how far a flow's own ODE paths are from straight lines at constant speed
  (Liu et al. 2022), from a velocity and source samples; :func:`euler_straightness` from a
  generator's Euler trajectories, :func:`path_straightness` from any path with its velocities.

Negative log-likelihood (bits per dimension, through the instantaneous change of variables of
the probability-flow ODE) lives with the ODE solvers, in ``diffjax.samplers.likelihood``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ot
import scipy.linalg
from jax import Array

__all__ = [
  "wasserstein2",
  "mmd_rbf",
  "DEFAULT_BANDWIDTHS",
  "frechet_distance_from_moments",
  "frechet_distance",
  "train_digits_classifier",
  "digits_frechet_distance",
  "straightness",
  "euler_straightness",
  "path_straightness",
  "median_pairwise_distance",
]

DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)


def _as_points(name: str, values) -> np.ndarray:
  """``[n, ...]`` -> float64 ``[n, d]``, with a clear error for empty or non-finite input."""
  points = np.asarray(values, dtype=np.float64)
  if points.ndim == 0 or points.shape[0] == 0:
    raise ValueError(f"{name} has shape {points.shape}; expected [n, ...] with n >= 1 points")
  points = points.reshape(points.shape[0], -1)
  if not np.all(np.isfinite(points)):
    raise ValueError(
      f"{name} contains {int(np.sum(~np.isfinite(points)))} NaN or infinite "
      "values; metrics need finite samples"
    )
  return points


def _check_same_dim(x: np.ndarray, y: np.ndarray, x_shape, y_shape) -> None:
  if x.shape[1] != y.shape[1]:
    raise ValueError(
      f"samples of shapes {tuple(x_shape)} and {tuple(y_shape)} have different "
      "event shapes; compare samples of the same space"
    )


def wasserstein2(x, y, *, num_iter_max: int = 10_000_000) -> float:
  """Exact 2-Wasserstein distance ``W2`` (not ``W2^2``) between two uniform empirical measures.

  ``W2(x, y) = ( min_{P in U(a, b)} sum_ij P_ij ||x_i - y_j||^2 )^(1/2)`` with uniform weights
  ``a = 1/n``, ``b = 1/m``, solved exactly by POT's network simplex (``ot.emd2`` on the squared
  Euclidean cost; Flamary et al. 2021, JMLR 22(78); Bonneel et al. 2011) in float64. This is
  TorchCFM's ``wasserstein(x0, x1, power=2)`` (Tong et al. 2024,
  https://arxiv.org/abs/2302.00482), which returns ``sqrt(emd2(a, b, M**2))`` with ``M`` the
  Euclidean distance. Cost: O(n^3) time, O(n m) memory; a few thousand points per side.

  Args:
    x: ``[n, ...]`` samples (flattened per point).
    y: ``[m, ...]`` samples of the same event shape.
    num_iter_max: network-simplex iteration cap; hitting it raises instead of returning a
      suboptimal value.

  Returns:
    ``W2`` as a Python float.
  """
  x_points, y_points = _as_points("x", x), _as_points("y", y)
  _check_same_dim(x_points, y_points, np.shape(x), np.shape(y))
  a = np.full(x_points.shape[0], 1.0 / x_points.shape[0])
  b = np.full(y_points.shape[0], 1.0 / y_points.shape[0])
  cost = ot.dist(x_points, y_points, metric="sqeuclidean")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    squared = float(ot.emd2(a, b, cost, numItermax=num_iter_max))
  for warning in caught:
    if "numItermax" in str(warning.message) or "Iteration limit" in str(warning.message):
      raise RuntimeError(
        f"POT's exact solver stopped at num_iter_max={num_iter_max} before "
        "optimality; pass a larger num_iter_max or fewer samples"
      )
    warnings.warn(warning.message, warning.category, stacklevel=2)
  # Rounding can leave a tiny negative cost for identical samples.
  return float(np.sqrt(max(squared, 0.0)))


def mmd_rbf(x: Array, y: Array, *, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> Array:
  """Unbiased squared maximum mean discrepancy with a mixture of Gaussian kernels.

  ``MMD_u^2 = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
  - 2/(n m) sum_{i, j} k(x_i, y_j)`` (Gretton et al. 2012, JMLR 13, Lemma 6,
  https://jmlr.org/papers/v13/gretton12a.html), with
  ``k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2))`` over the length scales ``s`` in
  ``bandwidths`` (a mixture as in Li et al. 2015, https://arxiv.org/abs/1502.02761). Its
  expectation is the population MMD^2, so it can be slightly negative when both samples come
  from one distribution.

  The default length scales (0.1 ... 10, in data units) suit data of roughly unit scale, such
  as the toy 2D targets; for images pass scales near the median pairwise distance. ``jnp``
  throughout: jit/vmap-safe; memory O((n + m)^2).

  Args:
    x: ``[n, ...]`` samples, ``n >= 2``.
    y: ``[m, ...]`` samples of the same event shape, ``m >= 2``.
    bandwidths: positive kernel length scales ``s``.

  Returns:
    Scalar ``MMD_u^2``.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  scales = tuple(float(s) for s in bandwidths)
  if not scales or min(scales) <= 0:
    raise ValueError(
      f"bandwidths={tuple(bandwidths)!r} must be a non-empty tuple of positive length scales"
    )
  if x.ndim < 1 or y.ndim < 1 or x.shape[0] < 2 or y.shape[0] < 2:
    raise ValueError(
      f"samples of shapes {x.shape} and {y.shape}: each needs >= 2 points for "
      "the unbiased estimator"
    )
  if x.shape[1:] != y.shape[1:]:
    raise ValueError(f"samples of shapes {x.shape} and {y.shape} have different event shapes")
  return _mmd_rbf(x, y, bandwidths=scales)


@functools.partial(jax.jit, static_argnames="bandwidths")
def _mmd_rbf(x: Array, y: Array, *, bandwidths: tuple[float, ...]) -> Array:
  # Jitted once per shape so eager calls do not dispatch a dozen small ops.
  x = jnp.reshape(x, (x.shape[0], -1))
  y = jnp.reshape(y, (y.shape[0], -1))
  n, m = x.shape[0], y.shape[0]
  inv_two_s2 = 1.0 / (2.0 * jnp.square(jnp.asarray(bandwidths, x.dtype)))

  def kernel(a: Array, b: Array) -> Array:
    sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
    # The expanded form can round below zero for near-identical points.
    sq = jnp.maximum(sq, 0.0)
    return jnp.sum(jnp.exp(-sq[..., None] * inv_two_s2), axis=-1)

  k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
  term_xx = (jnp.sum(k_xx) - jnp.trace(k_xx)) / (n * (n - 1))
  term_yy = (jnp.sum(k_yy) - jnp.trace(k_yy)) / (m * (m - 1))
  return term_xx + term_yy - 2.0 * jnp.mean(k_xy)


def frechet_distance_from_moments(*, mean_a, cov_a, mean_b, cov_b) -> float:
  """Frechet (2-Wasserstein) distance squared between ``N(mean_a, cov_a)`` and
  ``N(mean_b, cov_b)``.

  ``d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Dowson & Landau 1982; the FID
  formula of Heusel et al. 2017, https://arxiv.org/abs/1706.08500). ``(S_a S_b)^(1/2)`` comes
  from ``scipy.linalg.sqrtm``; its eigenvalues are real and non-negative in exact arithmetic
  (``S_a S_b`` is similar to ``S_a^(1/2) S_b S_a^(1/2)``), so the tiny imaginary part rounding
  leaves is dropped, as in pytorch-fid. If the product is singular enough that ``sqrtm`` fails,
  ``1e-6 I`` is added to both covariances (pytorch-fid's fallback).

  Returns:
    ``d^2`` as a Python float (float64 arithmetic).
  """
  mean_a, mean_b = (
    np.atleast_1d(np.asarray(mean_a, np.float64)),
    np.atleast_1d(np.asarray(mean_b, np.float64)),
  )
  cov_a, cov_b = (
    np.atleast_2d(np.asarray(cov_a, np.float64)),
    np.atleast_2d(np.asarray(cov_b, np.float64)),
  )
  d = mean_a.shape[0]
  if mean_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
    raise ValueError(
      f"moments of shapes mean_a {mean_a.shape}, cov_a {cov_a.shape}, mean_b "
      f"{mean_b.shape}, cov_b {cov_b.shape}; expected [d] and [d, d]"
    )
  with warnings.catch_warnings():
    # Singular covariances are common (dead ReLU features, n < d); sqrtm warns but stays
    # accurate for the PSD product, and a failure shows up as non-finite entries below.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(root)):
      offset = 1e-6 * np.eye(d)
      root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
  diff = mean_a - mean_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root)))


def frechet_distance(features_a, features_b) -> float:
  """Frechet distance squared between Gaussians fitted to two feature sets ``[n, d]``.

  ``d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with sample means and
  unbiased sample covariances (``np.cov``, ddof = 1, as pytorch-fid); see
  :func:`frechet_distance_from_moments`. The estimate is biased upward by O(d / n).
  """
  a, b = _as_points("features_a", features_a), _as_points("features_b", features_b)
  _check_same_dim(a, b, np.shape(features_a), np.shape(features_b))
  if a.shape[0] < 2 or b.shape[0] < 2:
    raise ValueError(
      f"features of shapes {np.shape(features_a)} and {np.shape(features_b)}: "
      "a covariance needs >= 2 points per set"
    )
  return frechet_distance_from_moments(
    mean_a=a.mean(axis=0),
    cov_a=np.cov(a, rowvar=False),
    mean_b=b.mean(axis=0),
    cov_b=np.cov(b, rowvar=False),
  )


# ------------------------------------------------------------------------------------------------
# A small digits classifier whose penultimate layer is the feature space of the Frechet distance.

_HIDDEN = (128, 64)
_TEST_FRACTION = 0.25


def _mlp_init(key: Array, sizes: Sequence[int]) -> list[dict[str, Array]]:
  keys = jax.random.split(key, len(sizes) - 1)
  # He initialisation (He et al. 2015, https://arxiv.org/abs/1502.01852) for ReLU layers.
  return [
    {"w": jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i), "b": jnp.zeros((o,))}
    for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def _mlp_features(params: list[dict[str, Array]], images: Array) -> Array:
  h = jnp.reshape(images, (images.shape[0], -1))
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h


def _mlp_logits(params: list[dict[str, Array]], images: Array) -> Array:
  return _mlp_features(params, images) @ params[-1]["w"] + params[-1]["b"]


@functools.cache
def train_digits_classifier(seed: int = 0) -> tuple[Callable[[Array], Array], float]:
  """Trains an MLP ``64 -> 128 -> 64 -> 10`` (ReLU) on the digits; returns its feature map.

  The data are :func:`diffjax.data.images.load_digits` (8x8 in ``[-1, 1]``), split 75% / 25% at
  random by ``seed``; 300 full-batch AdamW steps (Loshchilov & Hutter 2019,
  https://arxiv.org/abs/1711.05101) on softmax cross-entropy, in one ``jax.lax.scan``. Held-out
  accuracy is 97-98%. Cached per process and seed: later calls are free.

  Args:
    seed: seeds the split and the initialisation.

  Returns:
    ``(feature_fn, accuracy)``: ``feature_fn(images [N, 8, 8, 1] in [-1, 1]) -> [N, 64]``, the
    penultimate ReLU activations (jitted), and the held-out accuracy as a float.
  """
  from diffjax.data import images as image_data  # pylint: disable=import-outside-toplevel

  x, y = image_data.load_digits()
  order = np.random.default_rng(seed).permutation(x.shape[0])
  n_test = int(round(_TEST_FRACTION * x.shape[0]))
  test, train = order[:n_test], order[n_test:]
  x_train, y_train = jnp.asarray(x[train]), jnp.asarray(y[train])
  params = jax.jit(_mlp_init, static_argnums=1)(jax.random.PRNGKey(seed), (64, *_HIDDEN, 10))
  optimizer = optax.adamw(learning_rate=3e-3, weight_decay=1e-4)

  def loss_fn(p, inputs, labels):
    logits = _mlp_logits(p, inputs)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  @jax.jit
  def fit(p, inputs, labels):
    # Data enter as arguments, not closed-over constants, which XLA would fold at compile time.
    def step(carry, _):
      p, opt_state = carry
      grads = jax.grad(loss_fn)(p, inputs, labels)
      updates, opt_state = optimizer.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    (p, _), _ = jax.lax.scan(step, (p, optimizer.init(p)), None, length=300)
    return p

  params = fit(params, x_train, y_train)
  logits = jax.jit(_mlp_logits)(params, jnp.asarray(x[test]))
  accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y[test]))
  feature_fn = jax.jit(functools.partial(_mlp_features, params))
  return feature_fn, accuracy


def digits_frechet_distance(samples, reference=None, *, seed: int = 0) -> float:
  """Frechet distance squared between ``samples`` and ``reference`` in digits-classifier features.

  ``d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` over the 64 penultimate
  activations of :func:`train_digits_classifier` (``seed``) — the recipe of FID (Heusel et al.
  2017, https://arxiv.org/abs/1706.08500) with a digits MLP in place of Inception-v3. It is not
  FID: values are not comparable with published FIDs, only with each other.

  Args:
    samples: ``[N, 8, 8, 1]`` images in ``[-1, 1]`` (the model range of the digits loader).
    reference: images of the same shape; default: all 1797 digits.
    seed: which cached classifier to use.
  """
  samples = np.asarray(samples, np.float32)
  if samples.ndim < 1 or samples.shape[1:] != (8, 8, 1):
    raise ValueError(
      f"samples of shape {samples.shape}; expected [N, 8, 8, 1] digits images in [-1, 1]"
    )
  if reference is None:
    from diffjax.data import images as image_data  # pylint: disable=import-outside-toplevel

    reference = image_data.load_digits()[0]
  reference = np.asarray(reference, np.float32)
  if reference.shape[1:] != (8, 8, 1):
    raise ValueError(f"reference of shape {reference.shape}; expected [N, 8, 8, 1]")
  feature_fn, _ = train_digits_classifier(seed)
  return frechet_distance(np.asarray(feature_fn(samples)), np.asarray(feature_fn(reference)))


def median_pairwise_distance(x, *, max_points: int = 1000) -> float:
  """Median Euclidean distance ``median_{i < j} ||x_i - x_j||`` over the first ``max_points``
  points: the median heuristic for a Gaussian kernel's length scale (Gretton et al. 2012, JMLR
  13, Sec. 8, https://jmlr.org/papers/v13/gretton12a.html; its behaviour: Garreau et al. 2017,
  https://arxiv.org/abs/1707.07269). For :func:`mmd_rbf` on data whose scale is not about 1
  (images): ``bandwidths = (c_1 m, c_2 m, ...)`` for ``m`` this median.

  Args:
    x: ``[n, ...]`` points (flattened per point), ``n >= 2``.
    max_points: at most this many points are used (memory O(max_points^2)).

  Returns:
    The median as a Python float (float64 arithmetic); positive unless the points coincide.
  """
  points = _as_points("x", x)[:max_points]
  if points.shape[0] < 2:
    raise ValueError(f"x has shape {np.shape(x)}; a pairwise distance needs >= 2 points")
  squared = np.sum(points * points, axis=1)
  # The expanded form can round below zero for near-identical points.
  gram = np.maximum(squared[:, None] + squared[None, :] - 2.0 * points @ points.T, 0.0)
  upper = np.triu_indices(points.shape[0], k=1)
  return float(np.median(np.sqrt(gram[upper])))


# ---- straightness of a flow (Liu, Gong & Liu 2022) ------------------------------------------


def _check_path(name: str, path) -> Array:
  path = jnp.asarray(path)
  if path.ndim < 2 or path.shape[0] < 2:
    raise ValueError(
      f"{name} has shape {path.shape}; expected [steps + 1, batch, *event] with steps >= 1 "
      "(e.g. generate(..., sampler='euler', return_trajectories=True)['trajectories'])"
    )
  return path


def _squared_norms(x: Array) -> Array:
  """``||x_j||^2`` over every axis but the leading (batch) one."""
  return jnp.sum(jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32) ** 2, axis=-1)


def path_straightness(trajectory, velocities, *, times=None) -> Array:
  """Per-example straightness of a given path with its velocities,
  ``S_j = int_0^1 ||(x_1 - x_0) - v_t||^2 dt`` (trapezoid rule over ``times``).

  The straightness of a flow ``dZ_t = v(Z_t, t) dt`` is ``S(Z) = int_0^1 E ||(Z_1 - Z_0) -
  dZ_t/dt||^2 dt``, zero exactly when every path is a straight line run at constant speed
  (Liu, Gong & Liu 2022, "Flow Straight and Fast", https://arxiv.org/abs/2209.03003); its
  estimate is the mean of the returned values over ``x_0``.

  Args:
    trajectory: ``[N + 1, batch, *event]`` states at ``times`` (``x_0`` first, ``x_1`` last).
    velocities: ``[N + 1, batch, *event]`` ``dZ_t/dt`` at the same states and times.
    times: ``[N + 1]`` increasing times from 0 to 1 (default: uniform).

  Returns:
    ``[batch]`` float32.
  """
  trajectory = _check_path("trajectory", trajectory)
  velocities = jnp.asarray(velocities)
  if velocities.shape != trajectory.shape:
    raise ValueError(
      f"velocities of shape {velocities.shape} for a trajectory of shape {trajectory.shape}; "
      "pass the velocity at every state of the trajectory"
    )
  steps = trajectory.shape[0] - 1
  times = jnp.linspace(0.0, 1.0, steps + 1) if times is None else jnp.asarray(times, jnp.float32)
  if times.shape != (steps + 1,):
    raise ValueError(f"times of shape {times.shape}; expected ({steps + 1},), one per state")
  chord = trajectory[-1] - trajectory[0]
  deviation = jax.vmap(lambda v: _squared_norms(chord - v))(velocities)  # [N + 1, batch]
  widths = jnp.diff(times)[:, None]
  return jnp.sum(0.5 * widths * (deviation[1:] + deviation[:-1]), axis=0)


def euler_straightness(trajectory) -> Array:
  """Per-example straightness of an Euler path on a uniform grid of ``N`` steps:
  ``S_j = 1/N sum_i ||(x_N - x_0) - v_i||^2`` with ``v_i = N (x_{i+1} - x_i)``, the velocity
  the solver followed on step ``i`` (left Riemann sum of :func:`path_straightness`'s integral,
  exact for the piecewise-linear path; Liu, Gong & Liu 2022, https://arxiv.org/abs/2209.03003).

  Takes the trajectories of a flow generator, ``generate(params, key, num, steps=N,
  sampler="euler", return_trajectories=True)["trajectories"]``.

  Args:
    trajectory: ``[N + 1, batch, *event]``, ``x_0`` first.

  Returns:
    ``[batch]`` float32.
  """
  trajectory = _check_path("trajectory", trajectory).astype(jnp.float32)
  steps = trajectory.shape[0] - 1
  velocities = steps * jnp.diff(trajectory, axis=0)
  chord = trajectory[-1] - trajectory[0]
  return jnp.mean(jax.vmap(lambda v: _squared_norms(chord - v))(velocities), axis=0)


def straightness(velocity: Callable[[Array, Array], Array], x0, *, steps: int = 128) -> Array:
  """Per-example straightness ``S_j`` of the flow ``dx/dt = velocity(x, t)`` from ``x0_j``
  along its own Euler path of ``steps`` uniform steps (:func:`euler_straightness`), computed in
  one ``lax.scan`` with memory ``O(batch)``; the estimate of ``S`` is the mean over ``x0``
  (Liu, Gong & Liu 2022, https://arxiv.org/abs/2209.03003).

  On an Euler path ``x_N - x_0 = mean_i v_i``, so ``S_j`` is the variance of the velocity along
  the path, ``1/N sum_i ||v_i - mean v||^2``: accumulated by Welford's update (a difference of
  two large sums would cancel for a nearly straight flow). The discretisation error is
  ``O(1/steps)``.

  Args:
    velocity: ``(x [batch, *event], t [batch]) -> dx/dt``, e.g.
      ``lambda x, t: apply(params, x, t, None)`` of a flow-matching model (flow time: source
      ``t = 0``, data ``t = 1``).
    x0: ``[batch, *event]`` source samples.
    steps: Euler steps ``N >= 1``.

  Returns:
    ``[batch]`` float32.
  """
  if isinstance(steps, bool) or int(steps) != steps or steps < 1:
    raise ValueError(f"steps={steps!r}: must be a positive integer")
  x0 = jnp.asarray(x0, jnp.float32)
  if x0.ndim < 1 or x0.shape[0] < 1:
    raise ValueError(f"x0 has shape {x0.shape}; expected [batch, *event] with batch >= 1")
  steps = int(steps)
  h = 1.0 / steps

  def body(carry, i):
    x, mean, m2 = carry
    t = jnp.full(x.shape[:1], i * h, jnp.float32)
    v = jnp.asarray(velocity(x, t), jnp.float32)
    delta = v - mean
    mean = mean + delta / (i + 1.0)
    m2 = m2 + jnp.sum(jnp.reshape(delta * (v - mean), (x.shape[0], -1)), axis=-1)
    return (x + h * v, mean, m2), None

  zeros = jnp.zeros_like(x0)
  init = (x0, zeros, jnp.zeros(x0.shape[:1], jnp.float32))
  (_, _, m2), _ = jax.lax.scan(body, init, jnp.arange(steps, dtype=jnp.float32))
  return m2 / steps
