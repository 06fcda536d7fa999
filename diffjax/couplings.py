"""Minibatch couplings: which data point each source (noise) point is paired with.

Flow matching regresses on pairs ``(x0, x1)`` drawn from a coupling ``pi(x0, x1)`` of the source
(noise, ``t = 0``) and data (``t = 1``) distributions. The independent coupling gives I-CFM;
replacing it, per minibatch, by an optimal-transport plan of the batch gives straighter paths
(OT-CFM, Tong et al. 2024, https://arxiv.org/abs/2302.00482; Pooladian et al. 2023,
https://arxiv.org/abs/2304.14772) and, with an entropic plan of regularisation ``2 sigma^2``,
the Schrodinger-bridge coupling (SB-CFM, Tong et al. 2024, Sec. 3.4).

Every coupling here has the one signature

    coupling(key, x0, x1, labels=None) -> (x0, x1, labels)

``x0`` (``[B, ...]``, source) comes back unchanged; ``x1`` (``[B, ...]``, data) and its
``labels`` (an array or pytree of arrays with leading axis ``B``, or ``None``) are gathered with
the same indices, so a label stays attached to its data point. The cost between ``x0[i]`` and
``x1[j]`` is the squared Euclidean distance of the flattened points. All couplings are pure and
jittable. The exact solvers "emd" and "lsa" run on the host (:class:`HostSolvedCoupling`: through
:func:`jax.pure_callback` when called, or between two programs in a trainer); "jax"
(:func:`diffjax.assignment.auction_assignment`) solves in the graph, so an exact coupling with it
is an ordinary in-graph coupling that a trainer fuses into its step.

Differences from TorchCFM (``torchcfm.optimal_transport.OTPlanSampler``): TorchCFM solves the
exact plan with POT and then *samples* ``B`` pairs from it with replacement, so some points are
duplicated and others dropped. :func:`exact_ot_coupling` returns the optimal *permutation*
instead: every source and every data point is used exactly once. Only the entropic coupling in
``"sample"`` mode samples pairs (each source row draws its partner from its conditional), because
that is what a Schrodinger-bridge coupling is.

Sharding: called inside ``jax.jit`` on globally sharded arrays (e.g. ``NamedSharding(mesh,
P("data"))``), a coupling solves the problem on the *global* batch: the callback receives the
gathered cost matrix and Sinkhorn's reductions are global. :func:`blockwise_coupling` pairs within
equal blocks of the batch instead (one block per device: ``diffjax.train.sharding`` knows how
many).

Names resolve to couplings once, at the edge, through :func:`get_coupling`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import threading
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from scipy.optimize import linear_sum_assignment

from diffjax._lookup import lookup
from diffjax.assignment import auction_permutation
from diffjax.shapes import compute_dtype

__all__ = [
  "Coupling",
  "squared_euclidean_cost",
  "exact_ot_permutation",
  "label_exact_ot_permutation",
  "sinkhorn_log_plan",
  "sample_plan_rows",
  "greedy_plan_permutation",
  "independent_coupling",
  "exact_ot_coupling",
  "label_exact_ot_coupling",
  "sinkhorn_coupling",
  "HostSolvedCoupling",
  "exact_ot_stages",
  "label_exact_ot_stages",
  "blockwise_coupling",
  "SINKHORN_ROUNDINGS",
  "OT_SOLVERS",
  "IN_GRAPH_OT_SOLVERS",
  "COUPLINGS",
  "get_coupling",
]

# (key, x0, x1, labels) -> (x0, x1, labels); labels may be None or a pytree with leading axis B.
Coupling = Callable[..., tuple]


def _check_batches(x0, x1) -> None:
  """Static shape checks, before tracing: a coupling pairs two batches of the same points."""
  x0_shape, x1_shape = jnp.shape(x0), jnp.shape(x1)
  if len(x0_shape) < 1 or len(x1_shape) < 1:
    raise ValueError(
      f"couplings need batched inputs [B, ...]; got x0 of shape {x0_shape} and "
      f"x1 of shape {x1_shape}"
    )
  if x0_shape != x1_shape:
    raise ValueError(
      f"x0 of shape {x0_shape} and x1 of shape {x1_shape} must have the same "
      "shape: a coupling pairs B source points with B data points of one space; "
      "draw as many source points as data points"
    )


def _gather(tree, index: Array):
  """``tree[index]`` along the leading axis of every leaf (labels may be a pytree or None)."""
  return jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=0), tree)


def squared_euclidean_cost(x0: Array, x1: Array) -> Array:
  """``C_ij = ||x0_i - x1_j||^2`` of the flattened points, ``[B0, B1]``.

  Computed as ``||x0_i||^2 + ||x1_j||^2 - 2 <x0_i, x1_j>`` (one matmul, no ``[B0, B1, D]``
  intermediate; D is 3072 for CIFAR) in at least float32 at ``HIGHEST`` matmul precision, because
  TF32/bf16 matmuls on accelerators would perturb near-tied entries and so the optimal pairing;
  clipped at 0 against the rounding of the cancellation.

  Args:
    x0: ``[B0, ...]`` source points.
    x1: ``[B1, ...]`` data points with the same event shape.

  Returns:
    ``[B0, B1]`` float32 (or wider) cost matrix.
  """
  dtype = compute_dtype(x0, x1)
  a = jnp.reshape(x0, (x0.shape[0], -1)).astype(dtype)
  b = jnp.reshape(x1, (x1.shape[0], -1)).astype(dtype)
  cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  cost = jnp.sum(a * a, axis=-1)[:, None] + jnp.sum(b * b, axis=-1)[None, :] - 2.0 * cross
  return jnp.maximum(cost, 0.0)


# --------------------------------------------------------------------------------------------
# Exact assignment on the host.
# --------------------------------------------------------------------------------------------

# Two exact host solvers (and one in the graph, "jax", below); with uniform weights and equal
# batch sizes the optimal plans include a permutation matrix (a Birkhoff-von Neumann vertex), so
# each returns an optimal permutation.
# The network simplex's time hardly depends on the geometry; the augmenting-path solver is
# fastest on isotropic or high-dimensional clouds (images) and slowest on structured 2D targets
# (``scripts/bench_train.py``'s ``host_solvers_ms`` times both on the protocol's problems).
# "emd" is the default (TorchCFM's solver, predictable); image configs choose "lsa".


def _assign_lsa(matrix: np.ndarray) -> np.ndarray:
  rows, cols = linear_sum_assignment(matrix)
  perm = np.empty(matrix.shape[0], dtype=np.int32)
  perm[rows] = cols
  return perm


def _assign_emd(matrix: np.ndarray) -> np.ndarray:
  import ot  # pylint: disable=import-outside-toplevel  (POT is imported where it runs)

  size = matrix.shape[0]
  uniform = np.full(size, 1.0 / size)
  plan, log = ot.emd(uniform, uniform, matrix, numItermax=max(100_000, 50 * size * size), log=True)
  perm = np.argmax(plan, axis=1).astype(np.int32)
  # An optimal simplex vertex is a permutation matrix / B. Should the simplex stop short of
  # optimality (its iteration cap), its plan may be a worse vertex or no permutation at all:
  # solve exactly by the other method instead.
  if log["result_code"] != 1 or not np.array_equal(np.sort(perm), np.arange(size)):
    return _assign_lsa(matrix)
  return perm


def _assign_jax(matrix: np.ndarray) -> np.ndarray:
  return np.asarray(auction_permutation(jnp.asarray(matrix, compute_dtype(matrix))))


OT_SOLVERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "emd": _assign_emd,
  "lsa": _assign_lsa,
  # In the graph; this host form (one jitted solve) serves comparisons between the solvers.
  "jax": _assign_jax,
}

# The solvers that run inside the traced program: no host round trip, so no HostSolvedCoupling.
IN_GRAPH_OT_SOLVERS = ("jax",)


def _check_solver(solver: str) -> None:
  lookup(
    OT_SOLVERS,
    solver,
    "exact OT solver",
    hint=(
      " ('emd': POT's network simplex, 'lsa': scipy's linear_sum_assignment, both on the host; "
      "'jax': the auction algorithm in the graph)"
    ),
  )


def _map_on_daemon_threads(fn: Callable, items) -> list:
  """``[fn(item) for item in items]`` on up to ``min(8, cores)`` threads.

  Both solvers release the GIL, so a stack of problems (the K fused steps of a chunk, or a
  vmapped call) is solved on all cores. The threads are daemons and are not kept in a pool: a
  trainer that stops waiting for a stuck solve (a signal, a watchdog) can still exit, whereas
  ``concurrent.futures`` joins its workers at interpreter exit.
  """
  items = list(items)
  if len(items) <= 1:
    return [fn(item) for item in items]
  results: list = [None] * len(items)
  errors: list[BaseException] = []
  indices = iter(range(len(items)))
  lock = threading.Lock()

  def work():
    while not errors:
      with lock:
        i = next(indices, None)
      if i is None:
        return
      try:
        results[i] = fn(items[i])
      except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
        errors.append(e)

  threads = [
    threading.Thread(target=work, name="diffjax-ot", daemon=True)
    for _ in range(min(8, os.cpu_count() or 1, len(items)))
  ]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if errors:
    raise errors[0]
  return results


def _assignment_host(cost: np.ndarray, *, solver: str = "emd") -> np.ndarray:
  """Row -> column optimal assignment of each ``[B, B]`` matrix in a (possibly batched) stack."""
  cost = np.asarray(cost, dtype=np.float64)
  stack = cost.reshape((-1,) + cost.shape[-2:])
  perms = _map_on_daemon_threads(OT_SOLVERS[solver], stack)
  return np.stack(perms).reshape(cost.shape[:-1])


def exact_ot_permutation(cost: Array, *, solver: str = "emd") -> Array:
  """The optimal assignment ``sigma = argmin_{sigma in S_B} sum_i C_{i, sigma(i)}``.

  For two uniform empirical measures of ``B`` points each, this permutation is an exact optimal
  transport plan (the optimum of the linear program is attained at a vertex of the Birkhoff
  polytope, i.e. a permutation matrix; Peyre & Cuturi 2019, "Computational Optimal Transport",
  Prop. 2.1, https://arxiv.org/abs/1803.00567). Solved on the host through
  :func:`jax.pure_callback` by POT's network simplex ``ot.emd`` (``solver="emd"``; Bonneel et al.
  2011) or :func:`scipy.optimize.linear_sum_assignment` (``"lsa"``; Crouse 2016, shortest
  augmenting paths). Batched (vmapped) calls are solved in one callback, on a thread pool.
  ``solver="jax"`` solves in the graph instead, by the auction algorithm
  (:func:`diffjax.assignment.auction_permutation`; optimal to a certified gap of ``3 B eps``;
  a problem the auction cannot solve, i.e. unbalanced labels, reads ``B`` in every row).

  Args:
    cost: ``[B, B]`` cost matrix (no gradient flows through the assignment).
    solver: ``"emd"``, ``"lsa"`` or ``"jax"`` (same optimum; see the timings above
      ``OT_SOLVERS``).

  Returns:
    ``[B]`` int32 permutation: row ``i`` is paired with column ``sigma[i]``.
  """
  _check_solver(solver)
  cost = jax.lax.stop_gradient(cost)
  if solver in IN_GRAPH_OT_SOLVERS:
    return auction_permutation(cost)
  result = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  # "broadcast_all": under vmap the host function gets the whole stack at once (one callback).
  return jax.pure_callback(
    functools.partial(_assignment_host, solver=solver), result, cost, vmap_method="broadcast_all"
  )


def _label_assignment_host(
  cost: np.ndarray, source_labels: np.ndarray, target_labels: np.ndarray, *, solver: str = "emd"
) -> np.ndarray:
  """Per-class optimal assignment; the blocks of a label-respecting assignment are independent."""
  cost = np.asarray(cost, dtype=np.float64)
  batch_shape, size = cost.shape[:-2], cost.shape[-1]
  stack = cost.reshape((-1, size, size))
  sources = np.broadcast_to(source_labels, batch_shape + (size,)).reshape((-1, size))
  targets = np.broadcast_to(target_labels, batch_shape + (size,)).reshape((-1, size))

  def assign(problem):
    matrix, source, target = problem
    perm = np.empty(size, dtype=np.int32)
    for label in np.union1d(source, target):
      rows, cols = np.flatnonzero(source == label), np.flatnonzero(target == label)
      if rows.size != cols.size:
        raise ValueError(
          f"label-conditional OT: class {label} has {rows.size} source points but "
          f"{cols.size} data points; every class needs as many source as data points (leave "
          "x0_labels=None to assign source labels as a random permutation of the data labels)"
        )
      perm[rows] = cols[OT_SOLVERS[solver](matrix[np.ix_(rows, cols)])]
    return perm

  perms = _map_on_daemon_threads(assign, zip(stack, sources, targets))
  return np.stack(perms).reshape(batch_shape + (size,))


def label_exact_ot_permutation(
  cost: Array, *, source_labels: Array, target_labels: Array, solver: str = "emd"
) -> Array:
  """The optimal assignment among those that pair equal labels only.

  ``sigma = argmin { sum_i C_{i, sigma(i)} : sigma in S_B, target_labels[sigma(i)] =
  source_labels[i] for all i }``: exact OT on the cost ``C_ij + inf [y0_i != y1_j]``, which splits
  into one independent assignment per class. This is the ``beta -> inf`` limit of the conditional
  Wasserstein coupling of Chemseddine et al. (2024), "Conditional Wasserstein Distances with
  Applications in Bayesian OT Flow Matching", https://arxiv.org/abs/2403.18705. Solved per class
  on the host with ``solver`` (as :func:`exact_ot_permutation`).

  Every class must hold as many source as target points (the problem is infeasible otherwise);
  that is data-dependent, so it is checked in the callback, whose ``ValueError`` then surfaces
  from the jitted call. ``solver="jax"`` solves in the graph (forbidden pairs left out of the
  auction, not penalised), where no error can be raised: an infeasible problem's permutation
  reads ``B`` (out of range) in every row, and gathering with it gives NaN.

  Args:
    cost: ``[B, B]`` cost matrix.
    source_labels: ``[B]`` integer labels of the rows.
    target_labels: ``[B]`` integer labels of the columns.
    solver: ``"emd"``, ``"lsa"`` or ``"jax"``.

  Returns:
    ``[B]`` int32 permutation respecting the labels.
  """
  _check_solver(solver)
  cost = jax.lax.stop_gradient(cost)
  if solver in IN_GRAPH_OT_SOLVERS:
    return auction_permutation(cost, row_labels=source_labels, column_labels=target_labels)
  result = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(
    functools.partial(_label_assignment_host, solver=solver),
    result,
    cost,
    source_labels,
    target_labels,
    vmap_method="broadcast_all",
  )


# --------------------------------------------------------------------------------------------
# Entropic OT in-graph (ott-jax) and two ways to turn its plan into pairs.
# --------------------------------------------------------------------------------------------


def sinkhorn_log_plan(
  cost: Array,
  *,
  epsilon: float,
  relative_epsilon: Literal["mean", "std"] | None = None,
  threshold: float = 1e-3,
  max_iterations: int = 2000,
) -> Array:
  """Log of the entropic OT plan between two uniform measures, by Sinkhorn's algorithm.

  ``P_eps = argmin_{P in U(1/B0, 1/B1)} <P, C> - eps H(P)`` has the form ``P_ij = exp((f_i + g_j
  - C_ij) / eps)``; ``log P_ij = (f_i + g_j - C_ij) / eps`` is returned from the dual potentials,
  so it stays finite where ``P_ij`` underflows. Cuturi (2013), "Sinkhorn Distances",
  https://arxiv.org/abs/1306.0895; solved with ott-jax (Cuturi et al. 2022,
  https://arxiv.org/abs/2201.12324) in log-sum-exp mode, in-graph, so it jits, vmaps and shards.

  ``epsilon`` is absolute when ``relative_epsilon`` is None (``eps = epsilon``, TorchCFM's
  ``reg``; SB-CFM uses ``eps = 2 sigma^2``), else relative: ``eps = epsilon * mean(C)`` (``"mean"``)
  or ``epsilon * std(C)`` (``"std"``), which makes one setting work across data scales and
  dimensions. The geometry is built from :func:`squared_euclidean_cost`'s matrix (not ott's
  ``PointCloud``) so entropic and exact couplings see the same, full-precision costs.

  Args:
    cost: ``[B0, B1]`` cost matrix.
    epsilon: entropic regularisation, absolute or relative (see above); > 0.
    relative_epsilon: None, "mean" or "std".
    threshold: Sinkhorn stops when the marginal error (L1) falls below it.
    max_iterations: cap on Sinkhorn iterations.

  Returns:
    ``[B0, B1]`` log transport plan; ``exp`` of it has row sums ``1/B0``, column sums ``1/B1``
    (to ``threshold``).
  """
  cost = jax.lax.stop_gradient(cost)
  # ott-jax is imported here, not at module level: it takes seconds to import, and every
  # `diffjax` command (a config error included) imports this module through diffjax.losses.
  from ott.geometry import geometry  # pylint: disable=import-outside-toplevel
  from ott.problems.linear import linear_problem  # pylint: disable=import-outside-toplevel
  from ott.solvers.linear import sinkhorn  # pylint: disable=import-outside-toplevel

  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon, relative_epsilon=relative_epsilon)
  solver = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations)
  out = solver(linear_problem.LinearProblem(geom))
  return (out.f[:, None] + out.g[None, :] - geom.cost_matrix) / geom.epsilon


def sample_plan_rows(key: Array, log_plan: Array) -> Array:
  """Draws, for each row ``i``, a partner ``j ~ P(j | i) = B0 P_ij``.

  With ``x0_i`` uniform over rows, the pair ``(i, j)`` is then an exact sample from the plan ``P``
  (each ``x0`` used once, ``x1`` drawn with replacement: a "proper plan" sample, which is what an
  entropic / Schrodinger-bridge coupling means). TorchCFM's ``OTPlanSampler`` (Tong et al. 2024,
  https://arxiv.org/abs/2302.00482) draws all ``B`` pairs from the flattened plan instead, so
  ``x0`` is resampled too; both give pairs distributed as ``P``.

  Args:
    key: PRNG key.
    log_plan: ``[B0, B1]`` log plan (unnormalised rows are fine).

  Returns:
    ``[B0]`` int32 column indices (duplicates possible).
  """
  return jax.random.categorical(key, log_plan, axis=-1).astype(jnp.int32)


def greedy_plan_permutation(key: Array, log_plan: Array) -> Array:
  """Rounds a plan to a permutation greedily: repeatedly pair the free row and column with the
  largest remaining plan entry.

  ``(i, j) = argmax_{i free, j free} P_ij`` for ``B`` steps (a ``fori_loop``; ``O(B^3)`` in-graph
  work and no host round trip, so it runs inside ``shard_map`` or on TPU). As ``eps -> 0`` the plan
  concentrates on the optimal permutation and the rounding returns it; for ``eps > 0`` it is a
  heuristic (Hungarian on ``-log P`` would only return the exact OT permutation again, since the
  potentials shift rows and columns by constants). ``key`` is unused (uniform signature).

  Args:
    key: unused.
    log_plan: ``[B, B]`` log plan.

  Returns:
    ``[B]`` int32 permutation.
  """
  del key
  size = log_plan.shape[-1]
  if log_plan.shape[-2] != size:
    raise ValueError(f"rounding to a permutation needs a square plan; got {log_plan.shape}")
  # Finite floor: a free pair must always beat the -inf of a used one, even where P underflows.
  scores = jnp.maximum(log_plan, jnp.finfo(log_plan.dtype).min)

  def step(_, state):
    perm, row_free, col_free = state
    masked = jnp.where(row_free[:, None] & col_free[None, :], scores, -jnp.inf)
    row, col = jnp.divmod(jnp.argmax(masked), size)
    return perm.at[row].set(col), row_free.at[row].set(False), col_free.at[col].set(False)

  init = (jnp.zeros(size, jnp.int32), jnp.ones(size, bool), jnp.ones(size, bool))
  return jax.lax.fori_loop(0, size, step, init)[0].astype(jnp.int32)


SINKHORN_ROUNDINGS: dict[str, Callable[[Array, Array], Array]] = {
  "sample": sample_plan_rows,
  "permutation": greedy_plan_permutation,
}


# --------------------------------------------------------------------------------------------
# Couplings: (key, x0, x1, labels=None) -> (x0, x1, labels).
# --------------------------------------------------------------------------------------------


def independent_coupling(
  key: Array, x0: Array, x1: Array, labels=None, *, shuffle: bool = False
) -> tuple:
  """The independent coupling ``pi = q0 x q1`` (I-CFM): ``(x0_i, x1_i)`` as drawn.

  Two independent batches already form a sample of the product measure; ``shuffle=True`` applies
  one random permutation to ``x1`` (and its labels), which changes nothing in distribution but
  breaks any accidental pairing in how the batches were produced. Tong et al. (2024), I-CFM,
  https://arxiv.org/abs/2302.00482; Lipman et al. (2023), https://arxiv.org/abs/2210.02747.

  Args:
    key: PRNG key (used only when shuffling).
    x0: ``[B, ...]`` source batch.
    x1: ``[B, ...]`` data batch.
    labels: labels of ``x1`` (array or pytree, leading axis ``B``) or None.
    shuffle: permute ``x1`` at random.

  Returns:
    ``(x0, x1, labels)``.
  """
  _check_batches(x0, x1)
  if not shuffle:
    return x0, x1, labels
  perm = jax.random.permutation(key, x1.shape[0])
  return x0, _gather(x1, perm), _gather(labels, perm)


def _apply_index(index: Array, x0: Array, x1: Array, labels=None) -> tuple:
  return x0, _gather(x1, index), _gather(labels, index)


@dataclasses.dataclass(frozen=True)
class HostSolvedCoupling:
  """A coupling whose assignment is solved on the host, in three stages.

  * ``problem(key, x0, x1, labels, **kw) -> tuple of arrays`` (in graph): the cost matrix first,
    then whatever constrains the assignment (class labels);
  * ``solve(problem) -> [..., B] int32`` (host, NumPy): one assignment per problem of a stack with
    any leading axes, solved on threads;
  * ``apply(index, x0, x1, labels) -> (x0, x1[index], labels[index])`` (in graph).

  Calling the coupling runs all three in one program, the solve through
  :func:`jax.pure_callback`; that is the right thing on one device. A trainer on a mesh runs
  ``solve`` between two programs instead: ``pure_callback`` hands its operands to the host
  function as arrays on the first CPU device, and inside an SPMD program over CPU devices that
  copy waits for a thread of the pool whose threads are blocked in the program's collectives,
  so the program deadlocks. Between programs, a solve is also plain Python that a signal or a
  watchdog can interrupt.
  """

  problem: Callable[..., tuple]
  solve: Callable[[tuple], np.ndarray]
  apply: Callable[..., tuple] = _apply_index

  def __call__(self, key: Array, x0: Array, x1: Array, labels=None, **problem_kwargs) -> tuple:
    problem = self.problem(key, x0, x1, labels, **problem_kwargs)
    result = jax.ShapeDtypeStruct(jnp.shape(problem[0])[:-1], jnp.int32)
    # "broadcast_all": under vmap the host function gets the whole stack at once (one callback).
    index = jax.pure_callback(self.solve, result, problem, vmap_method="broadcast_all")
    return self.apply(index, x0, x1, labels)


def _solve_exact(problem: tuple, *, solver: str) -> np.ndarray:
  (cost,) = problem
  return _assignment_host(cost, solver=solver)


def _solve_label_exact(problem: tuple, *, solver: str) -> np.ndarray:
  cost, source_labels, target_labels = problem
  return _label_assignment_host(cost, source_labels, target_labels, solver=solver)


def _exact_problem(key: Array, x0: Array, x1: Array, labels=None) -> tuple:
  del key, labels
  _check_batches(x0, x1)
  return (jax.lax.stop_gradient(squared_euclidean_cost(x0, x1)),)


def _label_exact_problem(
  key: Array, x0: Array, x1: Array, labels: Array, *, x0_labels: Array | None = None
) -> tuple:
  _check_batches(x0, x1)
  if labels is None or jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != jnp.shape(x1)[0]:
    raise ValueError(
      f"label-conditional OT needs integer labels of shape [{jnp.shape(x1)[0]}] "
      f"for x1; got {None if labels is None else jnp.shape(labels)}"
    )
  if x0_labels is None:
    x0_labels = jax.random.permutation(key, labels)
  elif jnp.shape(x0_labels) != jnp.shape(labels):
    raise ValueError(
      f"x0_labels of shape {jnp.shape(x0_labels)} must match labels of shape {jnp.shape(labels)}"
    )
  cost = jax.lax.stop_gradient(squared_euclidean_cost(x0, x1))
  return cost, x0_labels, labels


def _check_host_solver(solver: str) -> None:
  _check_solver(solver)
  if solver in IN_GRAPH_OT_SOLVERS:
    raise ValueError(
      f"solver {solver!r} solves in the graph, not on the host: use exact_ot_coupling or "
      "label_exact_ot_coupling (get_coupling returns them) instead of the host stages"
    )


def exact_ot_stages(*, solver: str = "emd") -> HostSolvedCoupling:
  """:func:`exact_ot_coupling` as a :class:`HostSolvedCoupling` (the form :func:`get_coupling`
  returns for a host solver)."""
  _check_host_solver(solver)
  return HostSolvedCoupling(
    problem=_exact_problem, solve=functools.partial(_solve_exact, solver=solver)
  )


def label_exact_ot_stages(*, solver: str = "emd") -> HostSolvedCoupling:
  """:func:`label_exact_ot_coupling` as a :class:`HostSolvedCoupling`."""
  _check_host_solver(solver)
  return HostSolvedCoupling(
    problem=_label_exact_problem, solve=functools.partial(_solve_label_exact, solver=solver)
  )


def exact_ot_coupling(
  key: Array, x0: Array, x1: Array, labels=None, *, solver: str = "emd"
) -> tuple:
  """Minibatch exact OT (OT-CFM) as a permutation: ``x1 <- x1[sigma]`` with
  ``sigma = argmin_sigma sum_i ||x0_i - x1_sigma(i)||^2``.

  Tong et al. (2024), OT-CFM, https://arxiv.org/abs/2302.00482; Pooladian et al. (2023),
  "Multisample Flow Matching", https://arxiv.org/abs/2304.14772. Unlike TorchCFM, which samples
  ``B`` pairs with replacement from the plan, every point is used exactly once. See
  :func:`exact_ot_permutation` for the solver and :class:`HostSolvedCoupling` for the stages.

  Args:
    key: unused (uniform signature).
    x0: ``[B, ...]`` source batch.
    x1: ``[B, ...]`` data batch.
    labels: labels of ``x1`` (array or pytree, leading axis ``B``) or None.
    solver: exact solver, ``"emd"`` or ``"lsa"`` (host) or ``"jax"`` (in the graph).

  Returns:
    ``(x0, x1[sigma], labels[sigma])``.
  """
  if solver in IN_GRAPH_OT_SOLVERS:
    (cost,) = _exact_problem(key, x0, x1, labels)
    return _apply_index(exact_ot_permutation(cost, solver=solver), x0, x1, labels)
  return exact_ot_stages(solver=solver)(key, x0, x1, labels)


def label_exact_ot_coupling(
  key: Array,
  x0: Array,
  x1: Array,
  labels: Array,
  *,
  x0_labels: Array | None = None,
  solver: str = "emd",
) -> tuple:
  """Exact OT restricted to pairs of equal labels (class-conditional OT-CFM).

  ``sigma = argmin { sum_i ||x0_i - x1_sigma(i)||^2 : labels[sigma(i)] = x0_labels[i] }``; see
  :func:`label_exact_ot_permutation` (Chemseddine et al. 2024, https://arxiv.org/abs/2403.18705).

  Why: a model of ``p(x1 | y)`` is sampled from ``x0 ~ N(0, I)`` *independently of* ``y``. Class-
  agnostic OT gives each class the region of noise space nearest to it, so during training the
  noise paired with class ``y`` is not ``N(0, I)``: the learned conditional flows start from the
  wrong source. Pairing within classes keeps every class's source distribution intact.

  Source labels: pass ``x0_labels`` when the source points carry labels (e.g. generated for target
  labels). For a noise source (``x0_labels=None``) the labels are a class-balanced assignment
  drawn independently of the noise values: a random permutation of ``labels``. So each class gets
  exactly as many noise points as it has data points, and those noise points remain i.i.d.
  ``N(0, I)`` given the class. The returned labels equal the (given or drawn) ``x0_labels``.

  Args:
    key: PRNG key (used to draw ``x0_labels`` when it is None).
    x0: ``[B, ...]`` source batch.
    x1: ``[B, ...]`` data batch.
    labels: ``[B]`` integer labels of ``x1``.
    x0_labels: ``[B]`` integer labels of ``x0``, or None for a noise source.
    solver: exact solver, ``"emd"`` or ``"lsa"`` (host) or ``"jax"`` (in the graph).

  Returns:
    ``(x0, x1[sigma], labels[sigma])`` with ``labels[sigma] == x0_labels``.
  """
  if solver in IN_GRAPH_OT_SOLVERS:
    cost, source, target = _label_exact_problem(key, x0, x1, labels, x0_labels=x0_labels)
    index = label_exact_ot_permutation(
      cost, source_labels=source, target_labels=target, solver=solver
    )
    return _apply_index(index, x0, x1, labels)
  return label_exact_ot_stages(solver=solver)(key, x0, x1, labels, x0_labels=x0_labels)


def _blocks(tree, num_blocks: int):
  return jax.tree.map(
    lambda x: x.reshape((num_blocks, x.shape[0] // num_blocks) + x.shape[1:]), tree
  )


def _unblock(tree):
  return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def blockwise_coupling(coupling: Coupling, *, num_blocks: int) -> Coupling:
  """Couples within each of ``num_blocks`` consecutive, equal blocks of the batch only.

  ``x1`` rows ``[k b, (k + 1) b)`` (``b = B / num_blocks``) are paired with ``x0`` rows of the
  same block, by ``coupling`` applied to each block with its own key (``split(key,
  num_blocks)[k]``). With one block per device of a batch-sharded mesh this is TorchCFM's
  behaviour under DDP (each process pairs its own shard): cheaper, a worse plan. A
  :class:`HostSolvedCoupling` stays one (its stages are vmapped over the blocks), so a trainer
  still solves it between programs.
  """

  def blocks(*trees):
    size = jnp.shape(trees[0])[0]
    if size % num_blocks:
      raise ValueError(
        f"a batch of {size} does not split into {num_blocks} equal coupling "
        "blocks; make the batch a multiple of the number of devices"
      )
    return _blocks(trees, num_blocks)

  if isinstance(coupling, HostSolvedCoupling):

    def problem(key, x0, x1, labels=None, **kwargs):
      per_block = lambda k, a, b, c, kw: coupling.problem(k, a, b, c, **kw)
      keys = jax.random.split(key, num_blocks)
      return jax.vmap(per_block)(keys, *blocks(x0, x1, labels, kwargs))

    def apply(index, x0, x1, labels=None):
      return _unblock(jax.vmap(coupling.apply)(index, *blocks(x0, x1, labels)))

    return HostSolvedCoupling(problem=problem, solve=coupling.solve, apply=apply)

  def blockwise(key, x0, x1, labels=None):
    keys = jax.random.split(key, num_blocks)
    return _unblock(jax.vmap(coupling)(keys, *blocks(x0, x1, labels)))

  return blockwise


def sinkhorn_coupling(
  key: Array,
  x0: Array,
  x1: Array,
  labels=None,
  *,
  epsilon: float = 0.05,
  relative_epsilon: Literal["mean", "std"] | None = "mean",
  rounding: Callable[[Array, Array], Array] = sample_plan_rows,
  threshold: float = 1e-3,
  max_iterations: int = 2000,
) -> tuple:
  """Entropic minibatch OT: pairs from the Sinkhorn plan ``P_eps`` of the squared Euclidean cost.

  ``P_eps = argmin_{P in U} <P, C> - eps H(P)`` (:func:`sinkhorn_log_plan`), then
  ``x1 <- x1[rounding(key, log P_eps)]``:

  * :func:`sample_plan_rows` (``mode="sample"`` in :func:`get_coupling`): each ``x0_i`` draws
    its partner from ``P(. | i)``; pairs are an exact sample of the plan, with possible duplicate
    ``x1``. With absolute ``epsilon = 2 sigma^2`` this is the SB-CFM coupling (Tong et al. 2024,
    Sec. 3.4, https://arxiv.org/abs/2302.00482, TorchCFM's ``reg = 2 sigma^2``).
  * :func:`greedy_plan_permutation` (``mode="permutation"``): a permutation close to the plan,
    with no duplicates; in-graph, so it needs no host callback.

  Args:
    key: PRNG key for the rounding.
    x0: ``[B, ...]`` source batch.
    x1: ``[B, ...]`` data batch.
    labels: labels of ``x1`` (array or pytree, leading axis ``B``) or None.
    epsilon: regularisation; absolute if ``relative_epsilon`` is None, else a multiple of the
      mean ("mean") or std ("std") of the cost matrix.
    relative_epsilon: None, "mean" or "std".
    rounding: ``(key, log_plan) -> [B] indices``.
    threshold: Sinkhorn's marginal-error tolerance.
    max_iterations: Sinkhorn's iteration cap.

  Returns:
    ``(x0, x1[idx], labels[idx])``.
  """
  _check_batches(x0, x1)
  log_plan = sinkhorn_log_plan(
    squared_euclidean_cost(x0, x1),
    epsilon=epsilon,
    relative_epsilon=relative_epsilon,
    threshold=threshold,
    max_iterations=max_iterations,
  )
  index = rounding(key, log_plan)
  return x0, _gather(x1, index), _gather(labels, index)


COUPLINGS: dict[str, Coupling] = {
  "independent": independent_coupling,
  "exact_ot": exact_ot_coupling,
  "sinkhorn": sinkhorn_coupling,
  "label_exact_ot": label_exact_ot_coupling,
}


# The couplings whose assignment is solved on the host, by the factory of their stages.
_HOST_SOLVED: dict[str, Callable[..., HostSolvedCoupling]] = {
  "exact_ot": exact_ot_stages,
  "label_exact_ot": label_exact_ot_stages,
}


def get_coupling(name: str, **kwargs) -> Coupling:
  """Resolves a coupling by name, once, at the edge; binds its keyword options.

  Names: "independent" (I-CFM; ``shuffle``), "exact_ot" (OT-CFM, exact permutation; ``solver``
  in ``OT_SOLVERS``),
  "sinkhorn" (entropic OT; ``epsilon``, ``relative_epsilon``, ``mode`` in ``SINKHORN_ROUNDINGS``:
  "sample" (default; SB-CFM with ``epsilon=2 sigma^2, relative_epsilon=None``) or
  "permutation", ``threshold``, ``max_iterations``), "label_exact_ot" (exact OT within classes;
  ``solver``; pass ``x0_labels=`` at call time when the source is labelled).

  Returns:
    ``coupling(key, x0, x1, labels=None) -> (x0, x1, labels)``; the exact couplings with a host
    solver come as a :class:`HostSolvedCoupling`, callable the same way; with ``solver="jax"``
    they are plain in-graph couplings.

  Raises:
    ValueError: unknown name, mode, option, or an invalid option value.
  """
  fn = lookup(COUPLINGS, name, "coupling")
  if name == "sinkhorn":
    kwargs["rounding"] = lookup(SINKHORN_ROUNDINGS, kwargs.pop("mode", "sample"), "sinkhorn mode")
    if not kwargs.get("epsilon", 1.0) > 0:
      raise ValueError(f"sinkhorn epsilon must be > 0; got {kwargs['epsilon']!r}")
    if kwargs.get("relative_epsilon", "mean") not in ("mean", "std", None):
      raise ValueError(
        f"relative_epsilon must be 'mean', 'std' or None; got {kwargs['relative_epsilon']!r}"
      )
  if "solver" in kwargs:
    _check_solver(kwargs["solver"])
  options = {
    p.name
    for p in inspect.signature(fn).parameters.values()
    if p.kind == inspect.Parameter.KEYWORD_ONLY
  }
  unknown = sorted(set(kwargs) - options)
  if unknown:
    raise ValueError(
      f"unknown option(s) {unknown} for coupling {name!r}; valid options: "
      f"{sorted(options | ({'mode'} if name == 'sinkhorn' else set()))}"
    )
  if name in _HOST_SOLVED and kwargs.get("solver", "emd") not in IN_GRAPH_OT_SOLVERS:
    return _HOST_SOLVED[name](**kwargs)
  return functools.partial(fn, **kwargs)
