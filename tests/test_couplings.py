"""Minibatch couplings checked against brute force over all permutations and against each other."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import couplings


def _np_cost(x0, x1) -> np.ndarray:
  """Independent float64 reference: ||x0_i - x1_j||^2 by explicit differences."""
  a = np.asarray(x0, np.float64).reshape(len(x0), -1)
  b = np.asarray(x1, np.float64).reshape(len(x1), -1)
  return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _brute_force(cost: np.ndarray, allowed=None) -> tuple[float, tuple[int, ...]]:
  """min over all permutations of sum_i C[i, sigma(i)] (optionally only allowed pairs)."""
  n = len(cost)
  perms = np.array(list(itertools.permutations(range(n))))
  if allowed is not None:
    perms = perms[allowed[np.arange(n), perms].all(axis=1)]
  totals = cost[np.arange(n), perms].sum(axis=1)
  best = int(np.argmin(totals))
  return float(totals[best]), tuple(perms[best])


def _pair_cost(x0, x1) -> np.ndarray:
  """Per-batch total cost sum_i ||x0_i - x1_i||^2 of the pairs as given ([batches, n, ...])."""
  diff = np.asarray(x0, np.float64) - np.asarray(x1, np.float64)
  return (diff**2).reshape(len(diff), -1).sum(-1)


def _sorted_rows(x) -> np.ndarray:
  flat = np.asarray(x).reshape(len(x), -1)
  return flat[np.lexsort(flat.T[::-1])]


def _exact_batched(key, x0, x1, labels, solver="emd"):
  coupling = functools.partial(couplings.exact_ot_coupling, solver=solver)
  return jax.vmap(coupling)(jax.random.split(key, x0.shape[0]), x0, x1, labels)


_EXACT_BATCHED = jax.jit(_exact_batched, static_argnames="solver")


# The in-graph solver ('jax') compiles one program per size: sizes 2, 3 and 5 run in the slow
# suite. Fast, [7-jax] keeps this coupling wrapper on the solver, and test_assignment's
# test_cost_equals_pot_emd_and_the_certificate_holds[2, 3, 7, 64] keeps the solver's exactness at
# those sizes; the host solvers stay fast at every size.
@pytest.mark.parametrize(
  "n, solver",
  [
    pytest.param(n, solver, marks=pytest.mark.slow) if solver == "jax" and n < 7 else (n, solver)
    for solver in sorted(couplings.OT_SOLVERS)
    for n in (2, 3, 5, 7)
  ],
)
def test_exact_ot_equals_brute_force(n, solver):
  # Event shape [2, 3]: the coupling must flatten non-batch dims for the cost.
  batches = 4
  rng = np.random.default_rng(n)
  x0 = rng.standard_normal((batches, n, 2, 3)).astype(np.float32)
  x1 = rng.standard_normal((batches, n, 2, 3)).astype(np.float32) + 0.5
  labels = np.tile(np.arange(n), (batches, 1))
  out0, out1, out_labels = map(
    np.asarray, _EXACT_BATCHED(jax.random.key(0), x0, x1, labels, solver=solver)
  )
  np.testing.assert_array_equal(out0, x0)
  for b in range(batches):
    cost = _np_cost(x0[b], x1[b])
    best_cost, best_perm = _brute_force(cost)
    perm = out_labels[b]  # labels were arange(n): they read back the permutation
    np.testing.assert_array_equal(perm, best_perm)
    np.testing.assert_array_equal(out1[b], x1[b][perm])
    assert cost[np.arange(n), perm].sum() == pytest.approx(best_cost, rel=1e-6)


def test_exact_ot_never_costs_more_than_random_or_identity():
  batches, n = 200, 16
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((batches, n, 2)).astype(np.float32)
  x1 = rng.uniform(-1.0, 1.0, (batches, n, 2)).astype(np.float32)
  _, paired, _ = _EXACT_BATCHED(jax.random.key(0), x0, x1, np.zeros((batches, n), np.int32))
  shuffled = rng.permuted(x1, axis=1)
  exact, identity, random = (_pair_cost(x0, y) for y in (paired, x1, shuffled))
  # float32 cost matrix vs float64 re-evaluation: allow 1e-5 relative slack.
  assert np.all(exact <= random * (1 + 1e-5))
  assert np.all(exact <= identity * (1 + 1e-5))
  assert np.mean(exact) < 0.8 * np.mean(random)  # and not by a hair: OT is much cheaper


def _coupling_outputs():
  key = jax.random.key(2)
  rng = np.random.default_rng(2)
  x0 = rng.standard_normal((12, 3)).astype(np.float32)
  x1 = rng.standard_normal((12, 3)).astype(np.float32) + 1.0
  index = np.arange(12)
  labels = {"index": index, "class": index % 3}
  outs = {}
  for name, kwargs in [
    ("independent", dict(shuffle=True)),
    ("exact_ot", {}),
    ("sinkhorn", dict(mode="permutation")),
    ("sinkhorn", dict(mode="sample")),
    ("label_exact_ot", {}),
  ]:
    fn = jax.jit(couplings.get_coupling(name, **kwargs))
    call_labels = labels["class"] if name == "label_exact_ot" else labels
    outs[(name, kwargs.get("mode"))] = jax.tree.map(np.asarray, fn(key, x0, x1, call_labels))
  return x0, x1, labels, outs


@pytest.fixture(scope="module")
def coupling_outputs():
  return _coupling_outputs()


@pytest.mark.parametrize(
  "which",
  [
    ("independent", None),
    ("exact_ot", None),
    ("sinkhorn", "permutation"),
    ("label_exact_ot", None),
  ],
)
def test_permutation_couplings_keep_every_point_once_with_its_label(coupling_outputs, which):
  x0, x1, labels, outs = coupling_outputs
  out0, out1, out_labels = outs[which]
  np.testing.assert_array_equal(out0, x0)
  np.testing.assert_array_equal(_sorted_rows(out1), _sorted_rows(x1))
  if which[0] == "label_exact_ot":
    # Returned class labels travel with their points: each output row is a row of x1 whose
    # class is the returned label.
    source = np.asarray(x1)
    rows = [int(np.flatnonzero((source == r).all(1))[0]) for r in np.asarray(out1)]
    np.testing.assert_array_equal(np.asarray(labels["class"])[rows], out_labels)
  else:
    np.testing.assert_array_equal(np.sort(out_labels["index"]), np.arange(len(x1)))
    np.testing.assert_array_equal(out1, np.asarray(x1)[np.asarray(out_labels["index"])])
    np.testing.assert_array_equal(out_labels["class"], np.asarray(out_labels["index"]) % 3)


def test_sinkhorn_sample_keeps_labels_aligned(coupling_outputs):
  x0, x1, _, outs = coupling_outputs
  out0, out1, out_labels = outs[("sinkhorn", "sample")]
  np.testing.assert_array_equal(out0, x0)
  np.testing.assert_array_equal(out1, np.asarray(x1)[np.asarray(out_labels["index"])])
  np.testing.assert_array_equal(out_labels["class"], np.asarray(out_labels["index"]) % 3)


def test_independent_without_shuffle_is_identity():
  x0, x1 = jnp.ones((4, 2)), jnp.arange(8.0).reshape(4, 2)
  out = couplings.independent_coupling(jax.random.key(0), x0, x1, jnp.arange(4))
  for a, b in zip(out, (x0, x1, jnp.arange(4))):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def sinkhorn_problem():
  rng = np.random.default_rng(4)
  x0 = rng.standard_normal((32, 2)).astype(np.float32)
  x1 = 0.5 * rng.standard_normal((32, 2)).astype(np.float32) + 1.0
  cost = np.asarray(jax.jit(couplings.squared_euclidean_cost)(x0, x1))
  solve = jax.jit(
    lambda c, eps: couplings.sinkhorn_log_plan(
      c, epsilon=eps, relative_epsilon="mean", threshold=1e-5, max_iterations=20000
    )
  )
  perm = np.asarray(couplings.exact_ot_permutation(cost))
  exact = float(np.asarray(cost)[np.arange(32), perm].mean())
  return cost, solve, exact, perm


def test_squared_euclidean_cost_matches_differences():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((5, 2, 3)).astype(np.float32)
  y = rng.standard_normal((4, 2, 3)).astype(np.float32) + 3.0
  got = jax.jit(couplings.squared_euclidean_cost)(x, y)
  np.testing.assert_allclose(got, _np_cost(x, y), rtol=1e-5, atol=1e-5)


def test_sinkhorn_cost_decreases_to_exact_as_epsilon_vanishes(sinkhorn_problem):
  cost, solve, exact, perm = sinkhorn_problem
  epsilons = [0.3, 0.1, 0.03, 0.01, 0.001]
  costs, plans = [], []
  for eps in epsilons:
    log_plan = solve(cost, eps)
    plan = np.exp(np.asarray(log_plan, np.float64))
    plans.append(log_plan)
    # Transport cost <P, C> per unit mass (plan mass is 1): comparable to the exact mean cost.
    costs.append(float((plan * np.asarray(cost)).sum()))
    # Marginals of a proper plan are uniform, 1/B each. Sinkhorn stops at an L1 marginal error of
    # 1e-5; at the smallest eps float32 exp/log-sum-exp rounding floors it near 1e-4 (measured
    # 8.6e-5), so allow 2e-4 of the unit mass in L1, for both marginals.
    assert np.abs(plan.sum(1) - 1 / 32).sum() < 2e-4
    assert np.abs(plan.sum(0) - 1 / 32).sum() < 2e-4
  # <P_eps, C> is non-decreasing in eps and bounded below by the exact OT cost.
  assert all(a > b for a, b in zip(costs, costs[1:])), costs
  assert min(costs) >= exact * (1 - 1e-4)
  assert costs[-1] == pytest.approx(exact, rel=2e-3)
  assert costs[0] > exact * 1.05  # large eps really is blurrier: the check can fail
  # Rounding the sharpest plan greedily recovers the optimal permutation.
  greedy = np.asarray(couplings.greedy_plan_permutation(None, plans[-1]))
  np.testing.assert_array_equal(np.sort(greedy), np.arange(32))
  greedy_cost = np.asarray(cost)[np.arange(32), greedy].mean()
  assert greedy_cost == pytest.approx(exact, rel=1e-4)


def test_sample_plan_rows_draws_from_row_conditionals():
  # Any log plan will do (rows need not be normalised); a spread-out one makes every cell count.
  log_plan = np.random.default_rng(7).normal(size=(6, 6)).astype(np.float32)
  draws = 20000
  keys = jax.random.split(jax.random.key(8), draws)
  samples = np.asarray(jax.jit(jax.vmap(couplings.sample_plan_rows, (0, None)))(keys, log_plan))
  conditional = np.exp(np.asarray(log_plan, np.float64))
  conditional /= conditional.sum(1, keepdims=True)
  freq = np.stack([(samples == j).mean(0) for j in range(6)], axis=1)  # [row, column]
  # Each frequency is a mean of n Bernoulli(p) draws: s.e. sqrt(p (1 - p) / n); allow 5 s.e.
  # (36 cells: two-sided 5-s.e. tail 5.7e-7 each). The plan must not be degenerate (then the test
  # would compare 0 with 0), hence the spread check.
  assert conditional.max() < 0.95 and (conditional > 0.02).sum() > 12
  se = np.sqrt(conditional * (1 - conditional) / draws)
  assert np.all(np.abs(freq - conditional) <= 5 * se + 1e-12)


def _protocol_problems():
  """Three 256-point problems: 2D structured, 2D isotropic, 64-D."""
  rng = np.random.default_rng(5)
  moons = np.stack([np.cos(np.linspace(0, np.pi, 256)), np.sin(np.linspace(0, np.pi, 256))], 1)
  return [
    (rng.standard_normal((256, 2)), moons + 0.05 * rng.standard_normal((256, 2))),
    (rng.standard_normal((256, 2)), rng.standard_normal((256, 2))),
    (rng.standard_normal((256, 64)), rng.standard_normal((256, 64))),
  ]


# The in-graph auction takes about a second per 256-point problem (running, not compiling): its
# permutations here are in the slow suite. Fast, test_assignment's
# test_cost_equals_pot_emd_and_the_certificate_holds[64] checks that solver against POT with a
# certificate, and its slow [256, 512] at these sizes.
@pytest.mark.slow
def test_in_graph_solver_gives_permutations_on_protocol_sized_problems():
  for a, b in _protocol_problems():
    perm = couplings.OT_SOLVERS["jax"](_np_cost(a, b))
    np.testing.assert_array_equal(np.sort(perm), np.arange(256))


def test_solvers_agree_on_protocol_sized_problems_and_emd_falls_back(monkeypatch):
  """emd and lsa reach the same optimal cost on 256-point problems of three geometries (2D
  structured, 2D isotropic, 64-D); distinct random costs have a unique optimum, so the same
  permutation. If POT's simplex stops at its iteration cap (a plan that is no permutation),
  the emd solver answers with the exact lsa permutation instead of a wrong one."""
  host_solvers = {name: couplings.OT_SOLVERS[name] for name in ("emd", "lsa")}
  assert set(couplings.OT_SOLVERS) - set(host_solvers) == set(couplings.IN_GRAPH_OT_SOLVERS)
  for a, b in _protocol_problems():
    cost = _np_cost(a, b)
    perms = {name: solve(cost) for name, solve in host_solvers.items()}
    for perm in perms.values():
      np.testing.assert_array_equal(np.sort(perm), np.arange(256))
    np.testing.assert_array_equal(perms["emd"], perms["lsa"])
  import ot

  # Stopped at the iteration cap: once on a plan that is no permutation, once on a permutation
  # vertex that is not optimal (the identity); both times the answer is the optimum.
  stopped = {"result_code": 3, "warning": "numItermax reached before optimality"}
  for plan in (np.full(cost.shape, 1.0 / cost.size), np.eye(len(cost)) / len(cost)):
    monkeypatch.setattr(ot, "emd", lambda a, b, m, plan=plan, **kw: (plan, stopped))
    np.testing.assert_array_equal(couplings.OT_SOLVERS["emd"](cost), perms["lsa"])


@pytest.mark.parametrize("solver", sorted(couplings.OT_SOLVERS))
def test_label_exact_ot_pairs_within_classes_optimally(solver):
  n = 7
  rng = np.random.default_rng(9)
  x0 = rng.standard_normal((n, 2)).astype(np.float32)
  x1 = rng.standard_normal((n, 2)).astype(np.float32) + 0.3
  labels = np.array([0, 1, 2, 0, 1, 0, 2], np.int32)
  x0_labels = rng.permutation(labels)
  key = jax.random.key(9)
  fn = jax.jit(functools.partial(couplings.label_exact_ot_coupling, solver=solver))
  cost = _np_cost(x0, x1)
  allowed = np.asarray(x0_labels)[:, None] == np.asarray(labels)[None, :]
  best_cost, best_perm = _brute_force(cost, allowed)
  out0, out1, out_labels = fn(key, x0, x1, labels, x0_labels=x0_labels)
  np.testing.assert_array_equal(out0, x0)
  np.testing.assert_array_equal(out_labels, x0_labels)  # never pairs different classes
  np.testing.assert_array_equal(out1, np.asarray(x1)[list(best_perm)])
  # Noise source: labels drawn as a random permutation, so every class keeps its count, and the
  # result is the brute-force optimum for the drawn labels.
  out0, out1, out_labels = fn(key, x0, x1, labels)
  np.testing.assert_array_equal(np.sort(out_labels), np.sort(labels))
  rows = [int(np.flatnonzero((np.asarray(x1) == r).all(1))[0]) for r in np.asarray(out1)]
  np.testing.assert_array_equal(np.asarray(labels)[rows], out_labels)
  allowed = np.asarray(out_labels)[:, None] == np.asarray(labels)[None, :]
  best_cost, _ = _brute_force(cost, allowed)
  assert cost[np.arange(n), rows].sum() == pytest.approx(best_cost, rel=1e-6)


def test_label_exact_ot_rejects_unbalanced_classes():
  fn = jax.jit(couplings.label_exact_ot_coupling)
  x = jnp.zeros((4, 2))
  with pytest.raises(Exception, match="class 0 has 4 source points but 2 data points"):
    jax.block_until_ready(
      fn(jax.random.key(0), x, x, jnp.array([0, 0, 1, 1]), x0_labels=jnp.zeros(4, jnp.int32))
    )


def test_global_coupling_on_sharded_batch_equals_unsharded():
  devices = np.array(jax.devices())
  assert len(devices) == 8, "conftest should provide 8 simulated CPU devices"
  mesh = Mesh(devices, ("data",))
  sharded = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(10)
  x0 = rng.standard_normal((16, 2, 2)).astype(np.float32)
  x1 = rng.standard_normal((16, 2, 2)).astype(np.float32) + 1.0
  labels = np.arange(16, dtype=np.int32)
  key = jax.random.key(0)
  reference = jax.jit(couplings.exact_ot_coupling)(key, x0, x1, labels)
  fn = jax.jit(couplings.exact_ot_coupling, in_shardings=(None, sharded, sharded, sharded))
  args = [jax.device_put(a, sharded) for a in (x0, x1, labels)]
  assert args[0].sharding.spec == P("data") and len(args[0].sharding.device_set) == 8
  out = fn(key, *args)
  for got, want in zip(out, reference):
    np.testing.assert_array_equal(got, want)
  # The sharded solution is the global optimum, not eight per-shard ones: it pairs across shards.
  perm = np.asarray(out[2])
  assert np.any(perm // 2 != np.arange(16) // 2)

  # Sinkhorn in-graph on the sharded batch: XLA's reductions are global, so the plan is the
  # unsharded one up to float32 summation order.
  def log_plan(a, b):
    return couplings.sinkhorn_log_plan(
      couplings.squared_euclidean_cost(a, b), epsilon=0.1, relative_epsilon="mean", threshold=1e-5
    )

  want = jax.jit(log_plan)(x0, x1)
  got = jax.jit(log_plan, in_shardings=(sharded, sharded))(*args[:2])
  np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-4, atol=1e-7)


def test_vmapped_exact_coupling_equals_one_by_one():
  rng = np.random.default_rng(12)
  x0 = rng.standard_normal((3, 6, 2)).astype(np.float32)
  x1 = rng.standard_normal((3, 6, 2)).astype(np.float32)
  batched = _EXACT_BATCHED(jax.random.key(0), x0, x1, np.tile(np.arange(6), (3, 1)))[2]
  single = jax.jit(
    lambda a, b: couplings.exact_ot_permutation(couplings.squared_euclidean_cost(a, b))
  )
  for b in range(3):
    np.testing.assert_array_equal(batched[b], single(x0[b], x1[b]))


def test_get_coupling_rejects_bad_names_and_options():
  with pytest.raises(ValueError, match="unknown coupling 'ot'.*exact_ot"):
    couplings.get_coupling("ot")
  with pytest.raises(ValueError, match="unknown sinkhorn mode 'round'"):
    couplings.get_coupling("sinkhorn", mode="round")
  with pytest.raises(ValueError, match="unknown option.*'eps'"):
    couplings.get_coupling("sinkhorn", eps=0.1)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    couplings.get_coupling("sinkhorn", epsilon=0.0)
  with pytest.raises(ValueError, match="relative_epsilon"):
    couplings.get_coupling("sinkhorn", relative_epsilon="median")
  with pytest.raises(ValueError, match="unknown exact OT solver 'hungarian'.*'emd', 'jax', 'lsa'"):
    couplings.get_coupling("exact_ot", solver="hungarian")
  with pytest.raises(ValueError, match="same shape"):
    couplings.get_coupling("exact_ot")(jax.random.key(0), jnp.zeros((4, 2)), jnp.zeros((5, 2)))
  with pytest.raises(ValueError, match="integer labels of shape"):
    couplings.get_coupling("label_exact_ot")(
      jax.random.key(0), jnp.zeros((4, 2)), jnp.zeros((4, 2)), None
    )
