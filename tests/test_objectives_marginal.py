"""The marginal_fm objective: its minimiser is the exact marginal field, its gradient is the
expected gradient of I-CFM (the Dirac decoupling), its pairs come from the finite set, its
checks; and a smoke run of scripts/bench_marginal_fm.py."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

# The 16-point set and the tanh MLP of test_losses' own decoupling test, and its z-scores.
from test_losses import DATA, _init_mlp, _mlp, _z_scores

from diffjax import losses, objectives, paths
from diffjax import samplers as samplers_lib
from diffjax.data import toy2d
from diffjax.objectives import marginal_fm as marginal_fm_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIGMA = 0.3  # I-CFM's path N(t x1 + (1 - t) x0, sigma^2 I): wide enough that p_t overlaps DATA
DATA32 = jnp.asarray(DATA, jnp.float32)
PATH = paths.get_path("icfm", sigma=SIGMA)


def _normal(key, num):
  return jax.random.normal(key, (num, 2), jnp.float32)


def _data_target(key, num):
  """A "target" whose first ``num`` draws are DATA, so the finite set is DATA itself."""
  del key
  return DATA32[:num]


def _context(apply, **kwargs) -> objectives.ObjectiveContext:
  fields = dict(apply=apply, source=_normal, data_shape=(2,), target_sampler=_data_target)
  return objectives.ObjectiveContext(**{**fields, **kwargs})


def _marginal(context, **kwargs):
  return objectives.get_objective(
    "marginal_fm", context, num_points=len(DATA), sigma=SIGMA, **kwargs
  )


def _paired_batch(objective, key, num):
  """What the trainer feeds the loss: the loader's batch (here zeros) through ``pair_fn``."""
  return objective.pair_fn(key, {"x": jnp.zeros((num, 2))})


# --------------------------------------------------------------------------------------------
# The minimiser of the marginal loss is the marginal field.
# --------------------------------------------------------------------------------------------


def _exact_plus(params, x, t, cond, dropout_key=None):
  """The exact marginal field of DATA plus the perturbation ``c + A x``."""
  del cond, dropout_key
  field = jax.vmap(lambda xi, ti: losses.marginal_velocity(xi, ti, data=DATA32, path=PATH))(x, t)
  return field + params["c"] + x @ params["a"].T


def test_loss_vanishes_at_the_marginal_field_and_grows_by_the_perturbation():
  objective = _marginal(_context(_exact_plus))
  zero = {"c": jnp.zeros(2), "a": jnp.zeros((2, 2))}
  constant = {"c": jnp.array([0.3, -0.5]), "a": jnp.zeros((2, 2))}
  a = jnp.array([[0.5, 0.2], [-0.1, 0.3]])
  linear = {"c": jnp.zeros(2), "a": a}

  def batch_loss(params, key):
    k_pair, k_loss = jax.random.split(key)
    batch = _paired_batch(objective, k_pair, 4096)
    return objective.loss_fn(params, k_loss, batch)

  # One program: the loss and its gradient on each of the 64 batches (params traced).
  batch_losses = jax.jit(jax.vmap(jax.value_and_grad(batch_loss), in_axes=(None, 0)))
  keys = jax.random.split(jax.random.PRNGKey(0), 64)
  at, grads = {}, {}
  for name, p in [("zero", zero), ("constant", constant), ("linear", linear)]:
    values, grads[name] = batch_losses(p, keys)
    at[name] = np.asarray(values, np.float64)
  # The exact field is the minimiser: loss 0 (the same float ops as the target) and gradient 0.
  assert np.max(at["zero"]) < 1e-12, np.max(at["zero"])
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["zero"])) < 1e-6
  # A constant c adds ||c||^2 / D on every batch: regression_loss means over the D = 2 dims.
  np.testing.assert_allclose(at["constant"], float(jnp.sum(constant["c"] ** 2)) / 2, rtol=1e-5)
  # delta = A x adds E||A x_t||^2 / D = tr(A M A^T) / D, M = E[x_t x_t^T]. For x_t = t x1 +
  # (1 - t) x0 + sigma z with t ~ U[0, 1), x1 uniform on DATA, x0, z ~ N(0, I) independent:
  # M = E[t^2] Q + (E[(1 - t)^2] + sigma^2) I = Q / 3 + (1 / 3 + sigma^2) I, Q = DATA^T DATA / N.
  # The 64 batch losses are independent; their mean has s.e. std / sqrt(64); allow 5 s.e.
  second_moment = DATA.T @ DATA / len(DATA) / 3 + (1 / 3 + SIGMA**2) * np.eye(2)
  expected = np.trace(np.asarray(a) @ second_moment @ np.asarray(a).T) / 2
  standard_error = at["linear"].std() / math.sqrt(len(keys))
  assert abs(at["linear"].mean() - expected) < 5 * standard_error, (
    at["linear"].mean(),
    expected,
    standard_error,
  )
  assert expected > 50 * standard_error  # the check has power: the excess is far from 0


def test_generating_with_the_exact_field_gives_the_smoothed_data_set():
  """Integrating the exact field from N(0, I) to t = 1 gives p_1 = (1/N) sum N(x1_i, sigma^2 I):
  mean mean(DATA), covariance Cov(DATA) + sigma^2 I (the generator runs flow time 0 -> 1)."""
  objective = _marginal(_context(_exact_plus))
  zero = {"c": jnp.zeros(2), "a": jnp.zeros((2, 2))}
  num = 8192
  samples = np.asarray(
    objective.generate(zero, jax.random.PRNGKey(1), num, steps=200, sampler="rk4")["samples"],
    np.float64,
  )
  mean = DATA.mean(0)
  cov = np.cov(DATA.T, bias=True) + SIGMA**2 * np.eye(2)
  # Sample mean: s.e. sqrt(diag(cov) / n); 5 s.e. Covariance entries: s.e. of a product moment
  # estimated from the samples; 5 s.e. (plus RK4's error, far below either at 200 steps).
  assert np.all(np.abs(samples.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / num))
  centred = samples - samples.mean(0)
  products = centred[:, :, None] * centred[:, None, :]
  cov_se = products.std(0) / math.sqrt(num)
  assert np.all(np.abs(products.mean(0) - cov) < 5 * cov_se + 1e-3), (products.mean(0), cov)
  assert objective.log_likelihood is not None


# --------------------------------------------------------------------------------------------
# The Dirac decoupling: the marginal gradient is the expected conditional (I-CFM) gradient.
# --------------------------------------------------------------------------------------------


def _mlp_apply(params, x, t, cond, dropout_key=None):
  del cond, dropout_key
  return _mlp(params, x, t)


def test_marginal_gradient_is_the_expected_icfm_gradient():
  context = _context(_mlp_apply)
  marginal = _marginal(context)
  icfm = objectives.get_objective("icfm", context, sigma=SIGMA)
  # A negative control: I-CFM on another path (sigma 0.6) has another expected gradient.
  other_path = objectives.get_objective("icfm", context, sigma=0.6)
  n = 8192

  @jax.jit
  def per_example(params1, params2, key):
    """Per-example losses at two parameter vectors and gradients at the first, one example per
    batch, the pairs drawn by marginal_fm's pair_fn (x1 uniform on DATA) for every objective."""
    k_pair, k_loss = jax.random.split(key)
    batches = jax.vmap(lambda k: _paired_batch(marginal, k, 1))(jax.random.split(k_pair, n))
    loss_keys = jax.random.split(k_loss, n)
    out = {}
    for name, objective in [("marginal", marginal), ("icfm", icfm), ("other", other_path)]:
      value_and_grad = jax.vmap(jax.value_and_grad(objective.loss_fn), in_axes=(None, 0, 0))
      out[f"{name}.loss1"], grads = value_and_grad(params1, loss_keys, batches)
      out[f"{name}.grad1"] = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
      out[f"{name}.loss2"] = jax.vmap(objective.loss_fn, in_axes=(None, 0, 0))(
        params2, loss_keys, batches
      )
    return out

  k1, k2, k_draws = jax.random.split(jax.random.PRNGKey(7), 3)
  out = per_example(_init_mlp(k1), _init_mlp(k2), k_draws)
  out = {k: np.asarray(v, np.float64) for k, v in out.items()}
  # Each objective's loss on one key draws the same (t, x_t) (flow_matching's key split), so
  # the per-example difference cancels the shared noise (common random numbers); were the draws
  # independent, the test would stay valid with wider errors. The mean difference over n = 8192
  # examples has s.e. std / sqrt(n); 194 coordinates at 5 s.e. give a false alarm with
  # probability < 194 * 6e-7.
  z = _z_scores(out["icfm.grad1"] - out["marginal.grad1"])
  assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
  # The comparison has power: the gradient is far from 0 and another path's gradient fails.
  assert np.max(np.abs(_z_scores(out["marginal.grad1"]))) > 10.0
  assert np.max(np.abs(_z_scores(out["other.grad1"] - out["marginal.grad1"]))) > 10.0
  # L_icfm(theta) - L_mfm(theta) does not depend on theta (Lipman et al. 2023, Theorem 2): the
  # difference of the differences at two parameter vectors is 0 within 5 s.e.
  dd = (out["icfm.loss1"] - out["marginal.loss1"]) - (out["icfm.loss2"] - out["marginal.loss2"])
  assert abs(dd.mean()) < 5 * dd.std() / math.sqrt(n), (dd.mean(), dd.std() / math.sqrt(n))
  # ... and it is a positive constant: the conditional target is noisier than the marginal one.
  assert out["icfm.loss1"].mean() > out["marginal.loss1"].mean()


# --------------------------------------------------------------------------------------------
# The pairing: x1 only from the finite set, uniformly; x0 from the source.
# --------------------------------------------------------------------------------------------


def test_pairs_draw_x1_uniformly_from_the_finite_set_and_x0_from_the_source():
  moons = toy2d.get_toy2d("moons")
  marker = lambda key, num: jnp.full((num, 2), 7.0)  # noqa: E731 -- a source we can recognise
  context = _context(_mlp_apply, source=marker, target_sampler=moons, seed=5)
  objective = objectives.get_objective("marginal_fm", context, num_points=64)
  points = np.asarray(marginal_fm_lib.finite_data_set(moons, seed=5, num_points=64))
  assert points.shape == (64, 2) and len(np.unique(points, axis=0)) == 64

  num = 64 * 500
  loader = jax.jit(moons, static_argnums=1)(
    jax.random.PRNGKey(11), num
  )  # fresh target draws, as the trainer's loader
  paired = jax.jit(objective.pair_fn)(jax.random.PRNGKey(12), {"x": loader})
  x1, x0 = np.asarray(paired["x"]), np.asarray(paired["x0"])
  assert set(paired) == {"x", "x0"} and x1.shape == x0.shape == (num, 2)
  np.testing.assert_array_equal(x0, 7.0)
  # Every x1 is one of the points (exactly: a gather), none is one of the loader's draws.
  distance = np.min(np.sum((x1[:, None] - points[None]) ** 2, axis=-1), axis=1)
  np.testing.assert_array_equal(distance, 0.0)
  assert not np.any(np.all(x1 == np.asarray(loader), axis=-1))
  # Uniform: each count is Binomial(num, 1/64), sd sqrt(num p (1 - p)); 64 counts at 5 sd.
  index = np.argmin(np.sum((x1[:, None] - points[None]) ** 2, axis=-1), axis=1)
  counts = np.bincount(index, minlength=64)
  p = 1 / 64
  assert np.max(np.abs(counts - num * p)) < 5 * math.sqrt(num * p * (1 - p)), counts

  # The set is a function of the seed: the same seed gives the same set, another seed another.
  np.testing.assert_array_equal(
    points, marginal_fm_lib.finite_data_set(moons, seed=5, num_points=64)
  )
  assert not np.allclose(points, marginal_fm_lib.finite_data_set(moons, seed=6, num_points=64))


def test_pairs_and_field_stay_split_over_a_mesh():
  """On the test session's 8 devices with the batch split over them, the O(B N) field is
  computed in per-device blocks [B / 8, N, D], never whole on each device (the pairs follow
  the loader's sharding)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  objective = _marginal(_context(_mlp_apply))
  batch = {"x": jax.device_put(jnp.zeros((8 * 8, 2)), batch_sharding)}

  def step(params, key, batch):
    return jax.value_and_grad(objective.loss_fn)(params, key, objective.pair_fn(key, batch))

  hlo = (
    jax.jit(step)
    .lower(_init_mlp(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), batch)
    .compile()
    .as_text()
  )
  # Residuals x - alpha x1_i of the N = 16 points: f32[rows,16,2] with 8 rows per device.
  rows = {int(r) for r in re.findall(r"f32\[(\d+),16,2\]", hlo)}
  assert rows == {8}, (len(jax.devices()), rows)


# --------------------------------------------------------------------------------------------
# check(), the context it needs, the table entry.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, fragment",
  [
    (dict(num_points=0), "num_points=0"),
    (dict(num_points=True), "num_points=True"),
    (dict(num_points=2.5), "num_points=2.5"),
    (dict(path="nope"), "objective.path='nope': unknown"),
    (dict(time_sampler="nope"), "objective.time_sampler='nope': unknown"),
    (dict(sigma=-0.1), "must be >= 0"),
    # The kernel width s_1 is 0 at t = 1 for these: the posterior weights are 0 / 0 there.
    (dict(sigma=0.0), "is 0 at t = 1"),
    (dict(path="linear", sigma=0.0), "is 0 at t = 1"),
    (dict(path="brownian_bridge"), "is 0 at t = 1"),
    (dict(path="vp"), "is 0 at t = 1"),
  ],
)
def test_check_rejects(kwargs, fragment):
  problems = marginal_fm_lib.check(**kwargs)
  assert len(problems) == 1 and fragment in problems[0], problems
  # The factory raises on the same problems, before building anything.
  with pytest.raises(ValueError, match=re.escape(fragment)):
    objectives.get_objective("marginal_fm", _context(_mlp_apply), **kwargs)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(path="linear", sigma=1e-3),
    dict(path="cosine"),
    dict(time_sampler="u_shaped"),
    dict(num_points=1),
  ],
)
def test_check_accepts(kwargs):
  assert marginal_fm_lib.check(**kwargs) == []


@pytest.mark.parametrize("name", sorted(paths.PATHS))
@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_check_knows_where_the_kernel_width_vanishes(name, sigma):
  """check() states s_1 = sqrt(sigma_1^2 + gamma_1^2) in closed form (it must not start JAX);
  here against the path's own coefficients at t = 1."""
  path = marginal_fm_lib._path(name, sigma)  # pylint: disable=protected-access
  width = float(path.gaussian_coefficients(jnp.float32(1.0)).sigma)
  rejected = any("is 0 at t = 1" in p for p in marginal_fm_lib.check(path=name, sigma=sigma))
  assert rejected == (width == 0.0), (name, sigma, width)


@pytest.mark.slow
def test_check_starts_no_jax_backend():
  """Validation runs check() before jax.distributed.initialize, which fails once a backend
  exists; so check() must not create an array (a fresh process, every kind of problem)."""
  code = (
    "import jax._src.xla_bridge as xb\n"
    "from diffjax.objectives import marginal_fm as m\n"
    "for kw in [{}, {'path': 'vp'}, {'sigma': 0.0}, {'path': 'nope', 'num_points': 0}]:\n"
    "  m.check(**kw)\n"
    "assert not xb.backends_are_initialized()\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
  "context_kwargs, fragment",
  [
    (dict(target_sampler=None), "data.kind='toy2d'"),
    (dict(source_is_normal=False), "data.source='normal'"),
    (dict(num_classes=3), "data.num_classes=3"),
  ],
)
def test_build_rejects_a_context_it_cannot_serve(context_kwargs, fragment):
  with pytest.raises(ValueError, match=re.escape(fragment)):
    objectives.get_objective("marginal_fm", _context(_mlp_apply, **context_kwargs))


def test_table_entry():
  spec = objectives.OBJECTIVES["marginal_fm"]
  assert spec is marginal_fm_lib.SPEC and spec.build is marginal_fm_lib.marginal_fm
  assert spec.output == "velocity" and spec.samplers == samplers_lib.GAUSSIAN_FLOW_SAMPLERS
  assert spec.default_sampler in spec.samplers
  assert objectives.defaults(spec.build) == dict(
    num_points=1024, path="icfm", sigma=0.1, time_sampler="uniform"
  )
  # The checks run for a config group; a key of another objective is named as such.
  assert objectives.objective_problems(
    {"name": "marginal_fm", "num_points": 0}
  ) == marginal_fm_lib.check(num_points=0)
  problems = objectives.objective_problems({"name": "marginal_fm", "label_dropout": 0.1})
  assert len(problems) == 1 and "does not take it" in problems[0]


# --------------------------------------------------------------------------------------------
# The benchmark script, reduced.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # a script smoke run (about 50 s): with the other scripts' smoke tests
def test_bench_marginal_fm_quick():
  env = dict(os.environ)
  # One CPU device, as a user runs the script (tests/conftest.py forces 8 for the suite).
  env["XLA_FLAGS"] = " ".join(
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  )
  proc = subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "bench_marginal_fm.py"), "--quick"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)  # the script prints only its JSON on stdout
  assert report["benchmark"] == "bench_marginal_fm" and report["protocol"]["quick"]
  assert {"python", "jax_version", "cpu_count", "loadavg_start"} <= set(report["environment"])
  sizes = report["protocol"]["num_points"]
  assert [r["num_points"] for r in report["results"]] == sizes and len(sizes) >= 2
  for result in report["results"]:
    for name in ("marginal_fm", "icfm"):
      row = result[name]
      assert 0 < row["us_per_step_min"] <= row["us_per_step_median"]
      for key in ("w2_vs_finite_set", "w2_vs_target", "final_loss"):
        assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
  # O(N) per example: the largest set costs clearly more per step than the smallest.
  per_step = [r["marginal_fm"]["us_per_step_median"] for r in report["results"]]
  assert per_step[-1] > 2 * per_step[0], per_step
  markdown = subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "bench_marginal_fm.py"), "--render", "-"],
    input=proc.stdout,
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout
  assert markdown.count("\n|") >= len(sizes) + 1
