"""The in-graph auction solver against POT's network simplex, with its dual certificate.

References are independent of the solver: POT's ``ot.emd`` (and scipy's ``linear_sum_assignment``
for the label-constrained optimum) on the very float32 cost matrix the solver sees, in float64;
the certificate is recomputed here in float64 from the returned potentials alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from scipy.optimize import linear_sum_assignment
from tiny import tiny_config

from diffjax import assignment, couplings
from diffjax.train import sharding as sharding_lib
from diffjax.train.experiment import build_experiment
from diffjax.train.optim import make_optimizer
from diffjax.train.step import fused_train_steps
from diffjax.train.trainer import make_initial_state

_SOLVE = jax.jit(jax.vmap(assignment.auction_assignment))
_SOLVE_LABELS = jax.jit(
  jax.vmap(lambda c, a, b: assignment.auction_assignment(c, row_labels=a, column_labels=b))
)


def _cost64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``||a_i - b_j||^2`` in float64 (norm expansion; exact differences would need [n, n, D])."""
  a = a.reshape(len(a), -1).astype(np.float64)
  b = b.reshape(len(b), -1).astype(np.float64)
  cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(cost, 0.0)


def _problems(n: int, dims: tuple[int, ...], per_dim: int, seed: int) -> np.ndarray:
  """``[len(dims) * per_dim, n, n]`` float32 squared-Euclidean costs: Gaussian sources against
  shifted, squeezed or uniform targets, ``D`` in ``dims`` (2: clouds, 64, 3072: image-sized)."""
  rng = np.random.default_rng(seed)
  costs = []
  for dim in dims:
    for k in range(per_dim):
      source = rng.standard_normal((n, dim))
      if k % 2:
        target = rng.uniform(-1.0, 1.0, (n, dim)) + 0.5
      else:
        target = 0.5 * rng.standard_normal((n, dim)) + 1.0
      costs.append(_cost64(source, target))
  return np.stack(costs).astype(np.float32)


def _emd_cost(cost: np.ndarray) -> float:
  """POT's exact OT cost of the uniform problem on ``cost``, scaled to a sum over ``n`` pairs."""
  n = len(cost)
  uniform = np.full(n, 1.0 / n)
  plan = ot.emd(uniform, uniform, cost, numItermax=10_000_000)
  return float((plan * cost).sum() * n)


def _certificate(cost: np.ndarray, result, k: int, allowed=None) -> float:
  """``sum_i C_{i sigma(i)} - (sum_i u_i + sum_j v_j)`` in float64 with ``u_i = min_j (C_ij -
  v_j)`` over the allowed ``j``: a feasible dual, so this bounds the gap to the optimum."""
  v = np.asarray(result.column_potential[k], np.float64) + np.asarray(
    result.column_residual[k], np.float64
  )
  reduced = cost - v[None, :]
  if allowed is not None:
    reduced = np.where(allowed, reduced, np.inf)
  u = reduced.min(axis=1)
  perm = np.asarray(result.permutation[k])
  return float(cost[np.arange(len(cost)), perm].sum() - (u.sum() + v.sum()))


def _check_against_emd(costs: np.ndarray) -> None:
  result = _SOLVE(costs)
  n = costs.shape[-1]
  assert np.all(np.asarray(result.converged))
  for k, cost32 in enumerate(costs):
    cost = cost32.astype(np.float64)
    perm = np.asarray(result.permutation[k])
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    best = _emd_cost(cost)
    got = cost[np.arange(n), perm].sum()
    assert abs(got - best) <= 1e-6 * best, (k, got, best)
    # The certificate: a valid lower bound (>= 0 up to float64 rounding of the sums) within the
    # documented 3 n eps; the row potentials are dual feasible up to float32 rounding.
    gap = _certificate(cost, result, k)
    eps = float(result.epsilon[k])
    assert -1e-12 * abs(got) <= gap <= 3 * n * eps, (k, gap, eps)
    u = np.asarray(result.row_potential[k], np.float64)
    v = np.asarray(result.column_potential[k], np.float64)
    assert np.all(u[:, None] + v[None, :] <= cost + 4e-7 * (np.abs(cost) + np.abs(v)).max())


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_cost_equals_pot_emd_and_the_certificate_holds(n):
  """2D clouds, 64-D and image-sized (3072-D) squared Euclidean costs: a permutation whose cost
  equals POT's optimum to 1e-6 relative, with a float64 duality gap in [0, 3 n eps]."""
  _check_against_emd(_problems(n, (2, 64, 3072), per_dim=2, seed=n))


@pytest.mark.slow
@pytest.mark.parametrize("n", [256, 512])
def test_cost_equals_pot_emd_at_protocol_sizes(n):
  _check_against_emd(_problems(n, (2, 64, 3072), per_dim=2, seed=n))


def test_certificate_can_fail():
  """The control: a permutation that is not optimal (two optimal pairs swapped) has a float64
  certificate far above ``3 n eps``, so the bound in the test above is not vacuous."""
  costs = _problems(7, (2, 64, 3072), per_dim=2, seed=7)
  result = _SOLVE(costs)
  perm = np.asarray(result.permutation).copy()
  perm[0, [0, 1]] = perm[0, [1, 0]]
  gap = _certificate(costs[0].astype(np.float64), result._replace(permutation=perm), 0)
  assert gap > 1e3 * 3 * 7 * float(result.epsilon[0])


def test_ties_and_duplicates_are_solved_exactly():
  """Duplicated points (tied rows and columns), small integer costs full of ties, a constant
  matrix: every result is a permutation with the optimal cost; integer costs exactly, since
  3 n eps < 1 makes the auction exact there."""
  n = 64
  rng = np.random.default_rng(3)
  repeated = np.concatenate([rng.standard_normal((8, 2))] * 8)  # 8 points, each eight times
  cases = [
    _cost64(repeated, rng.standard_normal((n, 2))),
    _cost64(repeated, repeated[rng.permutation(n)] + 0.25),
    _cost64(repeated, repeated[rng.permutation(n)]),
    rng.integers(0, 4, (n, n)).astype(np.float64),
    rng.integers(0, 1000, (n, n)).astype(np.float64),
    np.full((n, n), 3.0),
  ]
  costs = np.stack(cases).astype(np.float32)
  result = _SOLVE(costs)
  assert np.all(np.asarray(result.converged))
  for k, cost in enumerate(costs.astype(np.float64)):
    perm = np.asarray(result.permutation[k])
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    rows, cols = linear_sum_assignment(cost)
    best = cost[rows, cols].sum()
    got = cost[np.arange(n), perm].sum()
    if k >= 3:  # integer costs
      assert 3 * n * float(result.epsilon[k]) < 1 and got == best
    else:
      assert got == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_label_conditional_pairs_within_classes_optimally():
  """Pairs only within classes (infinite cost across them): the cost equals scipy's optimum of
  the masked problem, every pair is within its class, and the certificate over the allowed
  pairs holds; classes of one point included. Unbalanced classes (no label-respecting
  permutation exists) are reported: ``converged`` False and every row reads ``n``."""
  n, problems = 24, 4
  rng = np.random.default_rng(4)
  target_labels = np.stack([rng.integers(0, 4, n) for _ in range(problems + 1)])
  target_labels[0, :3] = [7, 8, 9]  # singleton classes
  source_labels = np.stack([rng.permutation(labels) for labels in target_labels])
  source_labels[problems, 0] = 5  # one source point of a class with no data point
  costs = np.stack(
    [_cost64(rng.standard_normal((n, 2)), rng.standard_normal((n, 2))) for _ in range(problems + 1)]
  ).astype(np.float32)
  result = _SOLVE_LABELS(costs, source_labels, target_labels)
  np.testing.assert_array_equal(result.converged, [True] * problems + [False])
  np.testing.assert_array_equal(result.permutation[problems], np.full(n, n))
  for k in range(problems):
    cost = costs[k].astype(np.float64)
    allowed = source_labels[k][:, None] == target_labels[k][None, :]
    perm = np.asarray(result.permutation[k])
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    np.testing.assert_array_equal(target_labels[k][perm], source_labels[k])
    rows, cols = linear_sum_assignment(np.where(allowed, cost, 1e9))
    best = cost[rows, cols].sum()
    assert cost[np.arange(n), perm].sum() == pytest.approx(best, rel=1e-6)
    gap = _certificate(cost, result, k, allowed)
    assert -1e-12 <= gap <= 3 * n * float(result.epsilon[k])


def test_unbalanced_classes_give_nan_pairs_not_wrong_ones():
  """The label coupling on unbalanced classes returns NaN data: a loud failure downstream."""
  labels = np.array([0, 0, 1, 1])
  source = np.array([0, 0, 0, 1])
  x = jnp.arange(8.0).reshape(4, 2)
  coupling = jax.jit(functools.partial(couplings.label_exact_ot_coupling, solver="jax"))
  _, paired, _ = coupling(jax.random.key(0), x, x, jnp.asarray(labels), x0_labels=source)
  assert np.all(np.isnan(np.asarray(paired)))


def test_jit_vmap_and_no_host_callback():
  """A vmapped solve equals the one-by-one solves, traces once for new values, and the in-graph
  exact couplings hold no callback (the host solver's do: the check can fail)."""
  costs = _problems(7, (2, 64, 3072), per_dim=2, seed=6)
  traces = [0]

  @jax.jit
  def solve_one(cost):
    traces[0] += 1
    return assignment.auction_assignment(cost).permutation

  batched = np.asarray(_SOLVE(costs).permutation)
  for k in range(len(costs)):
    np.testing.assert_array_equal(batched[k], solve_one(costs[k]))
  assert traces[0] == 1
  x = jnp.zeros((12, 2))
  labels = jnp.arange(12) % 3
  for name, args in [("exact_ot", (x, x)), ("label_exact_ot", (x, x, labels))]:
    texts = {
      solver: str(
        jax.make_jaxpr(couplings.get_coupling(name, solver=solver))(jax.random.key(0), *args)
      )
      for solver in ("jax", "emd")
    }
    assert "callback" not in texts["jax"] and "while" in texts["jax"]
    assert "callback" in texts["emd"]
  assert not isinstance(
    couplings.get_coupling("exact_ot", solver="jax"), couplings.HostSolvedCoupling
  )


def test_bad_inputs_raise_before_tracing():
  with pytest.raises(ValueError, match=r"square \[n, n\] cost"):
    assignment.auction_assignment(jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match=r"square \[n, n\] cost"):
    assignment.auction_assignment(jnp.zeros((2, 3, 3)))
  with pytest.raises(ValueError, match="both row_labels and column_labels"):
    assignment.auction_assignment(jnp.zeros((3, 3)), row_labels=jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"column_labels must have shape \(3,\)"):
    assignment.auction_assignment(
      jnp.zeros((3, 3)), row_labels=jnp.zeros(3, jnp.int32), column_labels=jnp.zeros(4, jnp.int32)
    )
  with pytest.raises(ValueError, match="scaling=1.0 must be > 1"):
    assignment.auction_assignment(jnp.zeros((3, 3)), scaling=1.0)
  with pytest.raises(ValueError, match="solves in the graph"):
    couplings.exact_ot_stages(solver="jax")


def _callback_ops(text: str) -> int:
  return text.count("xla_python_cpu_callback") + text.count("xla_ffi_python_cpu_callback")


def _global_otcfm(mesh):
  config = tiny_config(
    "--config.objective.name=otcfm",
    "--config.objective.ot_solver=jax",
    "--config.objective.coupling_scope=global",
    "--config.train.batch_size=64",
  )
  experiment = build_experiment(config, mesh=mesh)
  assert experiment.host_pairing is None  # an ordinary in-graph pairing, fused with the step
  return config, experiment


def _collectives_outside_entry(hlo: str) -> list[str]:
  """The collectives of a compiled HLO module that are not in its ENTRY computation (in a while
  body, say)."""
  found, computation = [], ""
  for line in hlo.splitlines():
    if line and not line[0].isspace():
      computation = line
    ops = ("all-reduce(", "all-gather(", "collective-permute(", "all-to-all(", "reduce-scatter(")
    if any(op in line for op in ops) and not computation.startswith("ENTRY"):
      found.append(computation[:80])
  return found


def _eight_device_mesh():
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1)
  assert mesh.devices.size == 8, "conftest should provide 8 simulated CPU devices"
  return mesh


# slow: an 8-device trainer program (9 s); the solver's exactness and jit/vmap stay fast
@pytest.mark.slow
def test_global_batch_on_eight_devices_is_paired_in_graph_as_emd_pairs_it():
  """OT-CFM with ``ot_solver=jax`` and the global scope on 8 simulated devices: the trainer's
  pairing program (the batch drawn sharded over the 8 devices, its source draws and coupling)
  compiles without a host callback or a collective inside the auction's loop, and pairs the
  global batch exactly as POT's emd pairs the same cost matrix."""
  _, experiment = _global_otcfm(_eight_device_mesh())

  @jax.jit
  def paired(data_key, pair_key):
    batch = experiment.sample_batch(data_key)
    pairs = experiment.pair_fn(pair_key, batch)
    return batch["x"], pairs, couplings.squared_euclidean_cost(pairs["x0"], batch["x"])

  keys = jax.random.split(jax.random.key(11))
  compiled = paired.lower(*keys).compile()
  text = compiled.as_text()
  assert _callback_ops(text) == 0 and "while" in text
  # Every device solves the whole problem: the batch is gathered once, and no collective sits in
  # a loop (the auction would wait on the other devices at every round).
  assert _collectives_outside_entry(text) == []
  x1, pairs, cost = compiled(*keys)
  assert len(x1.sharding.device_set) == 8  # the batch lives on all 8 devices
  perm = couplings.OT_SOLVERS["emd"](np.asarray(cost, np.float64))
  np.testing.assert_array_equal(pairs["x"], np.asarray(x1)[perm])
  # The pairs cross the shards: a per-device coupling would keep rows within blocks of 8.
  assert np.any(perm // 8 != np.arange(64) // 8)


@pytest.mark.slow
def test_global_scope_chunk_on_eight_devices_holds_no_callback_and_trains():
  """The whole fused chunk (draws, in-graph pairing, updates) as the trainer compiles it for 8
  devices: no host callback, finite losses."""
  mesh = _eight_device_mesh()
  config, experiment = _global_otcfm(mesh)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  _, _, create = make_initial_state(experiment, optimizer, seed=config.seed, mesh=mesh)
  chunk = jax.jit(
    lambda s: fused_train_steps(
      s,
      num_steps=2,
      sample_batch=experiment.sample_batch,
      pair_fn=experiment.pair_fn,
      loss_fn=experiment.loss_fn,
      optimizer=optimizer,
      ema_decay=0.9,
    )
  )
  state = create()
  compiled = chunk.lower(state).compile()
  assert _callback_ops(compiled.as_text()) == 0
  _, metrics = compiled(state)
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))
