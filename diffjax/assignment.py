"""Exact linear assignment inside the JAX graph: Bertsekas's auction with epsilon scaling.

Solves ``min_{sigma in S_n} sum_i C_{i sigma(i)}`` for one ``[n, n]`` cost matrix (vmap for a
stack) with ``lax.while_loop`` only: no host callback, fixed shapes, jittable, vmappable and
shardable, so an exact OT coupling can run on the accelerator inside the training step.
:func:`auction_permutation` is the entry for ``[..., n, n]`` stacks: nested vmaps flatten into
one stack, and on a device mesh each device solves whole problems (no collective inside the
auction's loop).

The auction (Bertsekas 1988, "The auction algorithm: a distributed relaxation method for the
assignment problem", https://doi.org/10.1007/BF02186476; survey: Bertsekas 1992,
https://web.mit.edu/dimitrib/www/Auction_Survey.pdf). Rows are persons, columns objects with
prices ``p_j``; person ``i`` values object ``j`` at ``-(C_ij + p_j)``. An unassigned person bids
for its best object ``j1`` and raises its price to where the second best ``j2`` would be as good,
plus ``eps``::

    p_j1 <- p_j1 + (C_ij2 + p_j2) - (C_ij1 + p_j1) + eps

and the highest bidder takes the object (its previous owner becomes unassigned). Every assigned
pair then satisfies eps-complementary slackness (eps-CS),
``C_{i sigma(i)} + p_{sigma(i)} <= min_j (C_ij + p_j) + eps``. With ``v_j = -p_j`` and
``u_i = min_j (C_ij - v_j)`` (a feasible dual of the assignment LP: ``u_i + v_j <= C_ij``), weak
duality gives the certificate::

    sum_i C_{i sigma(i)} - OPT  <=  sum_i C_{i sigma(i)} - (sum_i u_i + sum_j v_j)  <=  n eps.

Epsilon scaling (Bertsekas & Eckstein 1988, https://doi.org/10.1007/BF01589407) runs phases with
``eps`` falling by ``scaling`` from a fraction of the cost range, each phase keeping the previous
prices and the pairs that still satisfy eps-CS.

Float arithmetic, in two stages. Every bid must raise a price by at least one ulp (else tied rows,
i.e. duplicate points, bid forever), so ``eps`` cannot go below the resolution of the prices,
which span the cost range. Let ``u`` be the unit roundoff (``finfo.eps``: ``2^-23`` in float32).

1. Each row is shifted to a minimum of 0; ``R`` is the largest row range. Prices stay in
   ``[0, 2R + 2 eps_0]`` within a phase (a bid is at most the price of an object nobody has bid
   for yet, plus ``R + eps``) and are shifted to a minimum of 0 between phases, so a phase down to
   ``eps_1 = 8 u R >= 2 ulp(4R)`` terminates, with a certificate ``G_1 <= 2 n eps_1`` (``eps``
   plus the rounding of the values).
2. The reduced costs ``rho_ij = C_ij + p_j - w_i`` at stage 1's prices are formed exactly
   (Knuth's two-sum) and rounded once, so entries near a row's minimum keep float32's *relative*
   precision. An optimal assignment has ``sum_i rho_{i sigma(i)} - sum_i min_j rho_ij <= G_1``,
   so no entry ``rho_ij - min_j rho_ij`` above ``G_1`` is in any optimal assignment: they are
   clipped to ``T = 2 G_1``, and the auction continues from stage 1's assignment on costs of range
   ``T`` down to ``eps = 8 u T``.

The result: ``sum_i C_{i sigma(i)} - OPT <= 3 n eps`` with the returned ``epsilon`` (the
certificate from the returned potentials, checked exactly in float64 by the tests), and a priori
``3 n eps <= 48 n u G_1 <= 768 n^2 u^2 R``. Exactness condition: if every cost is a multiple of
``delta`` (integer costs: ``delta = 1``; float costs scaled to integers), the assignment is
optimal whenever ``3 n eps < delta``; for generic float costs it is optimal unless another
assignment is within ``3 n eps`` of the optimum.

Constraints (label-conditional OT): with ``row_labels`` and ``column_labels`` only pairs of equal
labels are allowed (the cost across classes is infinite). Forbidden pairs are left out of every
maximum rather than penalised by a large number, so the bounds above hold with ``R`` over the
allowed entries. A perfect matching exists iff both label multisets are equal (checked in the
graph); otherwise, or if ``max_rounds`` runs out, ``converged`` is False and the rows left
unassigned read ``n``, an out-of-range index (a gather with it gives NaN, so a training step that
used it fails loudly).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, custom_batching
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.shapes import compute_dtype

__all__ = ["Assignment", "auction_assignment", "auction_permutation"]


class Assignment(NamedTuple):
  """An assignment with its dual certificate.

  Attributes:
    permutation: ``[n]`` int32, row ``i`` is paired with column ``permutation[i]``; ``n`` for a
      row left unassigned (only when ``converged`` is False).
    row_potential: ``[n]`` ``u``, with ``u_i + v_j <= C_ij`` on every allowed pair (up to the
      rounding of one subtraction).
    column_potential: ``[n]`` ``v`` rounded to the dtype.
    column_residual: ``[n]`` what the rounding left: ``v = column_potential + column_residual``
      exactly (the certificate needs ``v`` to better than float32's resolution).
    epsilon: scalar, the final ``eps``: ``sum_i C_{i sigma(i)} - OPT <= 3 n epsilon``.
    converged: scalar bool, every row is assigned.
    rounds: scalar int32, the number of bidding rounds taken (all phases).
  """

  permutation: Array
  row_potential: Array
  column_potential: Array
  column_residual: Array
  epsilon: Array
  converged: Array
  rounds: Array


def _allowed(row_labels, column_labels, rows):
  """``[len(rows), n]`` mask of the allowed pairs of ``rows`` (None: every pair)."""
  if row_labels is None:
    return None
  return row_labels[rows][:, None] == column_labels[None, :]


def _masked(values, allowed, fill):
  return values if allowed is None else jnp.where(allowed, values, fill)


def _best_two(values):
  """Per row: the largest value, its first column, and the largest value of the other columns.

  Three plain reductions: XLA's argmax and top_k are much slower than this inside a while loop on
  CPU.
  """
  columns = jnp.arange(values.shape[-1], dtype=jnp.int32)
  best = jnp.max(values, axis=-1)
  first = jnp.min(jnp.where(values == best[:, None], columns, values.shape[-1]), axis=-1)
  second = jnp.max(jnp.where(columns == first[:, None], -jnp.inf, values), axis=-1)
  return best, jnp.minimum(first, values.shape[-1] - 1), second


def _two_sum(a, b):
  """``a + b = s + e`` exactly, ``s = fl(a + b)`` (Knuth 1969, TAOCP vol. 2, Sec. 4.2.2)."""
  s = a + b
  b_virtual = s - a
  return s, (a - (s - b_virtual)) + (b - b_virtual)


class _Auction(NamedTuple):
  prices: Array
  person: Array
  rounds: Array


def _auction(
  reduced: Array,
  state: _Auction,
  *,
  row_labels,
  column_labels,
  feasible: Array,
  eps_start: Array,
  eps_final: Array,
  num_phases: int,
  scaling: float,
  bidders: int,
  max_rounds: int,
) -> _Auction:
  """Epsilon-scaling phases of the forward auction on ``reduced`` (``>= 0`` where allowed), from a
  partial assignment ``state.person`` (row -> column, ``n`` = none); at each phase's start the
  pairs that violate eps-CS for the phase's ``eps`` are dropped.

  The unassigned rows wait in a ring buffer: a round pops up to ``bidders`` of them, and pushes
  back the bidders that lost and the owners their winners displaced, so a round costs
  ``O(bidders n)`` (the bidders' rows of the cost) and nothing of order ``n^2``.
  """
  n = reduced.shape[0]
  dtype = reduced.dtype
  none = jnp.int32(n)  # "no partner": an out-of-range index
  arange = jnp.arange(n, dtype=jnp.int32)
  slots = jnp.arange(bidders, dtype=jnp.int32)

  def values_of(rows, prices):
    """``-(C_ij + p_j)`` for the given rows, ``-inf`` on forbidden pairs."""
    allowed = _allowed(row_labels, column_labels, rows)
    return _masked(-(reduced[rows] + prices[None, :]), allowed, -jnp.inf)

  def bid_round(carry):
    prices, person, owner, queue, head, count, rounds, eps = carry
    valid = slots < count
    rows = jnp.where(valid, queue[(head + slots) % n], 0)
    best, target, second = _best_two(values_of(rows, prices))
    # A row with a single allowed column (a class of one) meets no competition there.
    increment = jnp.where(second > -jnp.inf, best - second, 0.0)
    bid = prices[target] + increment + eps
    # Bidders for one object: the highest bid wins, ties to the earlier slot.
    rival = valid[None, :] & (target[None, :] == target[:, None])
    beaten = rival & (
      (bid[None, :] > bid[:, None])
      | ((bid[None, :] == bid[:, None]) & (slots[None, :] < slots[:, None]))
    )
    wins = valid & ~jnp.any(beaten, axis=1)
    previous = owner[target]
    displaced = wins & (previous < n)
    won = jnp.where(wins, target, none)
    prices = prices.at[won].set(bid, mode="drop")
    owner = owner.at[won].set(rows, mode="drop")
    person = person.at[jnp.where(displaced, previous, none)].set(none, mode="drop")
    person = person.at[jnp.where(wins, rows, none)].set(target, mode="drop")
    # Pop the bidders; push the losers and the displaced owners at the tail.
    popped = jnp.minimum(count, bidders)
    head, count = (head + popped) % n, count - popped
    pushed = jnp.concatenate(
      [jnp.where(valid & ~wins, rows, -1), jnp.where(displaced, previous, -1)]
    )
    is_pushed = pushed >= 0
    position = (head + count + jnp.cumsum(is_pushed) - 1) % n
    queue = queue.at[jnp.where(is_pushed, position, none)].set(pushed, mode="drop")
    count = count + jnp.sum(is_pushed, dtype=jnp.int32)
    return prices, person, owner, queue, head, count, rounds + 1, eps

  def active(carry):
    count, rounds = carry[5], carry[6]
    return feasible & (count > 0) & (rounds < max_rounds)

  def phase(k, state):
    prices, person, rounds = state
    eps = jnp.maximum(eps_start / jnp.asarray(scaling, dtype) ** k.astype(dtype), eps_final)
    # Prices matter only up to a constant (per class): keep them near 0, where their float
    # resolution is finest.
    if row_labels is None:
      prices = prices - jnp.min(prices)
    else:
      same = column_labels[:, None] == column_labels[None, :]
      prices = prices - jnp.min(jnp.where(same, prices[None, :], jnp.inf), axis=1)
    # Keep the pairs that satisfy eps-CS for the new eps; the others bid again.
    values = values_of(arange, prices)
    held = values[arange, jnp.minimum(person, n - 1)]
    keep = (person < n) & (held >= jnp.max(values, axis=1) - eps)
    person = jnp.where(keep, person, none)
    owner = jnp.full((n,), none).at[jnp.where(keep, person, none)].set(arange, mode="drop")
    queue = jnp.nonzero(~keep, size=n, fill_value=0)[0].astype(jnp.int32)
    count = jnp.sum(~keep, dtype=jnp.int32)
    carry = (prices, person, owner, queue, jnp.int32(0), count, rounds, eps)
    prices, person, _, _, _, _, rounds, _ = jax.lax.while_loop(active, bid_round, carry)
    return _Auction(prices, person, rounds)

  return jax.lax.fori_loop(0, num_phases, phase, state)


def auction_assignment(
  cost: Array,
  *,
  row_labels: Array | None = None,
  column_labels: Array | None = None,
  scaling: float = 8.0,
  initial_epsilon: float = 0.25,
  bidders: int | None = None,
  max_rounds: int | None = None,
) -> Assignment:
  """Optimal assignment of one ``[n, n]`` cost matrix by the auction algorithm (module docstring).

  ``sigma = argmin_{sigma in S_n} sum_i C_{i sigma(i)}`` (with labels: over the ``sigma`` with
  ``column_labels[sigma(i)] == row_labels[i]``), with the certificate of the module docstring:
  ``sum_i C_{i sigma(i)} - OPT <= 3 n epsilon``. Bertsekas (1988),
  https://doi.org/10.1007/BF02186476; epsilon scaling: Bertsekas & Eckstein (1988), "Dual
  coordinate step methods for linear network flow problems", https://doi.org/10.1007/BF01589407.

  Args:
    cost: ``[n, n]`` finite costs (vmap for a stack).
    row_labels: ``[n]`` integer labels of the rows, or None (every pair allowed).
    column_labels: ``[n]`` integer labels of the columns; given iff ``row_labels`` is.
    scaling: factor by which ``eps`` falls between phases (> 1).
    initial_epsilon: first phase's ``eps`` as a fraction of the cost range (> 0).
    bidders: how many unassigned rows bid in one round (any subset of the unassigned rows keeps
      the auction's guarantees; more bidders, fewer but costlier rounds); default ``min(n, 8)``.
    max_rounds: cap on the bidding rounds of all phases together (a safety net; reached, it
      leaves ``converged`` False); default ``1000 n + 10000``.

  Returns:
    :class:`Assignment`.
  """
  cost = jnp.asarray(cost)
  if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] == 0:
    raise ValueError(
      f"auction_assignment needs a square [n, n] cost with n >= 1; got shape {cost.shape} "
      "(vmap the call for a stack of problems)"
    )
  if (row_labels is None) != (column_labels is None):
    raise ValueError("pass both row_labels and column_labels, or neither")
  if not scaling > 1.0 or not initial_epsilon > 0.0:
    raise ValueError(f"scaling={scaling!r} must be > 1 and initial_epsilon={initial_epsilon!r} > 0")
  n = cost.shape[0]
  if row_labels is not None:
    for name, labels in (("row_labels", row_labels), ("column_labels", column_labels)):
      if jnp.shape(labels) != (n,):
        raise ValueError(f"{name} must have shape ({n},); got {jnp.shape(labels)}")
  dtype = compute_dtype(cost)
  cost = jax.lax.stop_gradient(cost).astype(dtype)
  unit = float(jnp.finfo(dtype).eps)
  arange = jnp.arange(n, dtype=jnp.int32)
  allowed = _allowed(row_labels, column_labels, arange)
  labels = dict(row_labels=row_labels, column_labels=column_labels)
  if row_labels is None:
    feasible = jnp.bool_(True)
  else:
    feasible = jnp.all(jnp.sort(row_labels) == jnp.sort(column_labels))
  options = dict(
    feasible=feasible,
    num_phases=max(
      1, math.ceil(math.log(max(initial_epsilon / (8 * unit), 1.0)) / math.log(scaling)) + 1
    ),
    scaling=scaling,
    bidders=min(n, 8) if bidders is None else max(1, min(n, int(bidders))),
    max_rounds=1000 * n + 10_000 if max_rounds is None else int(max_rounds),
  )

  def fold(total_hi, total_lo):
    """``C_ij + P_j - w_i`` (``P = total_hi + total_lo``) formed exactly by two-sums and rounded
    once, with ``w_i`` making each row's allowed minimum 0; and ``w``."""
    shifted, shifted_error = _two_sum(cost, total_hi[None, :])
    offset = jnp.min(_masked(shifted, allowed, jnp.inf), axis=1)
    head, head_error = _two_sum(shifted, -offset[:, None])
    exact = head + ((shifted_error + head_error) + total_lo[None, :])
    exact_min = jnp.min(_masked(exact, allowed, jnp.inf), axis=1)
    reduced = _masked(jnp.maximum(exact - exact_min[:, None], 0.0), allowed, 0.0)
    return reduced, offset + exact_min

  def stage(_, carry):
    """Stage 1 (nothing assigned yet) solves the row-shifted costs; stage 2 the costs reduced at
    stage 1's prices, clipped at twice stage 1's certificate (module docstring)."""
    total_hi, total_lo, person, rounds, _, _ = carry
    reduced, row_offset = fold(total_hi, total_lo)
    held = jnp.where(person < n, reduced[arange, jnp.minimum(person, n - 1)], 0.0)
    floor = 16 * unit * unit * jnp.max(reduced)
    clip = jnp.where(jnp.all(person < n), jnp.maximum(2 * jnp.sum(held), floor), jnp.inf)
    reduced = jnp.minimum(reduced, clip)
    spread = jnp.max(reduced)
    scale = jnp.where(spread > 0, spread, jnp.ones((), dtype))
    result = _auction(
      reduced,
      _Auction(jnp.zeros((n,), dtype), person, rounds),
      eps_start=initial_epsilon * scale,
      eps_final=8 * unit * scale,
      **labels,
      **options,
    )
    total_hi, carried = _two_sum(total_hi, result.prices)
    row_potential = row_offset + jnp.min(
      _masked(reduced + result.prices[None, :], allowed, jnp.inf), axis=1
    )
    return (
      total_hi,
      total_lo + carried,
      result.person,
      result.rounds,
      8 * unit * scale,
      row_potential,
    )

  zeros = jnp.zeros((n,), dtype)
  init = (zeros, zeros, jnp.full((n,), jnp.int32(n)), jnp.int32(0), jnp.zeros((), dtype), zeros)
  total_hi, total_lo, person, rounds, eps, row_potential = jax.lax.fori_loop(0, 2, stage, init)
  return Assignment(
    permutation=person,
    row_potential=row_potential,
    column_potential=-total_hi,
    column_residual=-total_lo,
    epsilon=eps,
    converged=feasible & jnp.all(person < n),
    rounds=rounds,
  )


def _solve_stack(cost: Array, *labels: Array) -> Array:
  """``[m, n, n]`` costs (and ``[m, n]`` row and column labels) to ``[m, n]`` permutations, ``n``
  in every row of a problem left unsolved."""

  def one(cost, *labels):
    result = auction_assignment(cost, **dict(zip(("row_labels", "column_labels"), labels)))
    return jnp.where(result.converged, result.permutation, cost.shape[-1])

  return jax.vmap(one)(cost, *labels)


def _problem_axis(arg_shape) -> tuple:
  sharding = arg_shape.sharding
  if isinstance(sharding, NamedSharding) and len(sharding.spec):
    return (sharding.spec[0],)
  return (None,)


def _whole_problems_per_device(rule: str):
  """:func:`_solve_stack` partitioned so that every device solves whole problems: the arguments
  keep their sharding along the problem axis and are gathered along the others. Left to the
  partitioner, a batch-sharded cost would be split inside the problem and the auction would
  exchange data between devices at every round."""
  solve = custom_partitioning(_solve_stack)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return NamedSharding(mesh, P(*_problem_axis(arg_shapes[0]), None))

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    axis = _problem_axis(arg_shapes[0])
    args = tuple(NamedSharding(mesh, P(*axis, *([None] * (len(a.shape) - 1)))) for a in arg_shapes)
    return mesh, _solve_stack, NamedSharding(mesh, P(*axis, None)), args

  solve.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)
  return solve


_SOLVE_STACK = _whole_problems_per_device("b i j -> b i")
_SOLVE_LABELLED_STACK = _whole_problems_per_device("b i j, b i, b j -> b i")


@custom_batching.custom_vmap
def _permutations(cost: Array, *labels: Array) -> Array:
  batch, n = cost.shape[:-2], cost.shape[-1]
  flat = [jnp.reshape(cost, (-1, n, n))]
  flat += [jnp.reshape(jnp.broadcast_to(x, batch + (n,)), (-1, n)) for x in labels]
  solve = _SOLVE_LABELLED_STACK if labels else _SOLVE_STACK
  return jnp.reshape(solve(*flat), batch + (n,))


@_permutations.def_vmap
def _permutations_vmap(axis_size, in_batched, cost, *labels):
  # A vmapped call is one larger stack: the leading axes are flattened into the problem axis.
  args = [
    x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
    for x, batched in zip((cost, *labels), in_batched)
  ]
  return _permutations(*args), True


def auction_permutation(
  cost: Array, *, row_labels: Array | None = None, column_labels: Array | None = None
) -> Array:
  """The optimal permutations of a ``[..., n, n]`` stack by :func:`auction_assignment`.

  ``sigma = argmin_sigma sum_i C_{i sigma(i)}`` per problem (with labels: among the
  permutations pairing equal labels), to the certified gap of :func:`auction_assignment`. ``n``
  (an out-of-range index) fills every row of a problem without a solution (unbalanced labels).
  Vmapped calls (any depth) solve one flattened stack, and on a device mesh every device solves
  whole problems (their arguments gathered to it): the auction's rounds never wait on other
  devices. A problem whose cost is sharded is therefore solved redundantly on each device it
  spans, which costs no more time than solving it on one.

  Args:
    cost: ``[..., n, n]`` costs.
    row_labels: ``[..., n]`` labels of the rows (broadcast against the stack), or None.
    column_labels: ``[..., n]`` labels of the columns; given iff ``row_labels`` is.

  Returns:
    ``[..., n]`` int32 permutations.
  """
  cost = jax.lax.stop_gradient(jnp.asarray(cost))
  if cost.ndim < 2 or cost.shape[-1] != cost.shape[-2] or cost.shape[-1] == 0:
    raise ValueError(f"auction_permutation needs [..., n, n] costs, n >= 1; got {cost.shape}")
  if (row_labels is None) != (column_labels is None):
    raise ValueError("pass both row_labels and column_labels, or neither")
  labels = () if row_labels is None else (jnp.asarray(row_labels), jnp.asarray(column_labels))
  for name, x in zip(("row_labels", "column_labels"), labels):
    if x.shape[-1:] != cost.shape[-1:] or x.ndim > cost.ndim - 1:
      raise ValueError(f"{name} of shape {x.shape} must be [..., {cost.shape[-1]}]")
  return _permutations(cost, *labels)
