"""One trainer for every caller: from a config and a mesh to the state creator, the shardings
and the jitted advance function.

:func:`make_trainer` is what ``diffjax train`` (:func:`diffjax.train.loop.train`), the scripts
and the tests build, so each of them runs the same compiled programs. ``advance(state,
num_steps, batch)`` moves the state by ``num_steps`` steps: a fused chunk of on-device data
(``batch`` unused) or one step on a host batch (``num_steps`` is 1).

``train.num_seeds = K > 1`` trains K independent seeds in one process: the state has a leading
seed axis (seed ``k`` is initialised as a run with ``config.seed + k``), every program is
``jax.vmap``-ed over it, and the metrics gain that axis. On-device data is drawn per seed from
each seed's key; a host batch is shared by the seeds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.train import posthoc_ema
from diffjax.train import sharding as sharding_lib
from diffjax.train.experiment import Experiment, build_experiment
from diffjax.train.host_solve import solve_on_host
from diffjax.train.optim import make_optimizer
from diffjax.train.state import PosthocTrainState, TrainState, init_train_state
from diffjax.train.step import (
  finish_fused_steps,
  finish_step,
  fused_train_steps,
  propose_fused_pairs,
  propose_pairs,
  train_step,
)

__all__ = [
  "Trainer",
  "make_trainer",
  "state_shardings_for",
  "make_initial_state",
  "chunk_advancer",
  "step_advancer",
]


class Trainer(NamedTuple):
  """What :func:`make_trainer` builds.

  Attributes:
    experiment: the resolved :class:`~diffjax.train.experiment.Experiment`.
    optimizer: the optax transformation.
    mesh: the device mesh.
    abstract_state: ``jax.eval_shape`` of the train state.
    shardings: the state's shardings (FSDP rule).
    create_state: ``() -> state``, born sharded, from the config's seed.
    advance: ``(state, num_steps, batch) -> (state, metrics)``, or ``None`` when ``host_solve``
      returned ``None`` (a stop requested during a host solve; the state is untouched).
    trace_count: a one-element list counting traces of the update program (none per step).
    num_seeds: the length of the state's leading seed axis (1: no such axis).
  """

  experiment: Experiment
  optimizer: Any
  mesh: Any
  abstract_state: TrainState
  shardings: TrainState
  create_state: Callable[[], TrainState]
  advance: Callable
  trace_count: list
  num_seeds: int = 1


def make_trainer(
  config: ml_collections.ConfigDict, mesh, *, host_solve: Callable | None = None
) -> Trainer:
  """The trainer of ``config`` on ``mesh``.

  Args:
    config: a validated experiment config.
    mesh: from :func:`diffjax.train.sharding.make_mesh`.
    host_solve: ``(solve, problem) -> solution | None`` running a host coupling solve (the
      loop's waits for a signal and is bounded by the watchdog); default: wait until done.
  """
  experiment = build_experiment(config, mesh=mesh)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  num_seeds = config.train.num_seeds
  sigma_rels = tuple(config.train.posthoc_ema.sigma_rels)
  abstract, shardings, create = make_initial_state(
    experiment,
    optimizer,
    seed=config.seed,
    mesh=mesh,
    num_seeds=num_seeds,
    posthoc_profiles=len(sigma_rels),
  )
  trace_count = [0]
  step_kwargs = dict(
    pair_fn=experiment.pair_fn,
    loss_fn=experiment.loss_fn,
    optimizer=optimizer,
    ema_decay=config.train.ema_decay,
    accumulate_steps=config.train.accumulate_steps,
    posthoc_gammas=tuple(float(g) for g in posthoc_ema.gamma_from_sigma_rel(sigma_rels)),
  )
  kwargs = dict(
    step_kwargs=step_kwargs,
    shardings=shardings,
    mesh=mesh,
    trace_count=trace_count,
    host_solve=host_solve,
    num_seeds=num_seeds,
  )
  if experiment.sample_batch is not None:
    chunk = chunk_advancer(experiment, **kwargs)
    advance = lambda state, num_steps, batch=None: chunk(state, num_steps)
  else:
    one = step_advancer(experiment, **kwargs)
    advance = lambda state, num_steps, batch: one(state, batch)
  return Trainer(
    experiment=experiment,
    optimizer=optimizer,
    mesh=mesh,
    abstract_state=abstract,
    shardings=shardings,
    create_state=create,
    advance=advance,
    trace_count=trace_count,
    num_seeds=num_seeds,
  )


def state_shardings_for(abstract_state: TrainState, mesh, logical_axes=None) -> TrainState:
  """Parameters, EMA and optimizer leaves follow the tensor and FSDP rules (``logical_axes``:
  the model's :attr:`~diffjax.models.ModelFns.logical_axes`); counters and the key are
  replicated."""
  replicated = sharding_lib.replicated(mesh)
  fields = dict(
    params=sharding_lib.state_shardings(abstract_state.params, mesh, logical_axes),
    opt_state=sharding_lib.state_shardings(abstract_state.opt_state, mesh, logical_axes),
    ema_params=sharding_lib.state_shardings(abstract_state.ema_params, mesh, logical_axes),
    step=replicated,
    key=replicated,
    nonfinite_streak=replicated,
  )
  if isinstance(abstract_state, PosthocTrainState):
    profiles = tuple(
      sharding_lib.state_shardings(p, mesh, logical_axes) for p in abstract_state.posthoc_ema
    )
    return PosthocTrainState(**fields, posthoc_ema=profiles)
  return TrainState(**fields)


def make_initial_state(
  experiment: Experiment,
  optimizer,
  *,
  seed: int,
  mesh,
  num_seeds: int = 1,
  posthoc_profiles: int = 0,
):
  """Abstract state, its shardings, and a function creating the state born sharded
  (``jax.jit(init, out_shardings=...)``: no device ever holds an unsharded copy); with
  ``num_seeds > 1`` the states of seeds ``seed, seed + 1, ...`` stacked on a leading axis;
  ``posthoc_profiles`` post-hoc EMA profiles (:class:`PosthocTrainState`)."""
  init = functools.partial(
    init_train_state,
    init_params=experiment.model.init,
    optimizer=optimizer,
    posthoc_profiles=posthoc_profiles,
  )
  key = jax.random.PRNGKey(seed)
  per_seed = state_shardings_for(
    jax.eval_shape(lambda k: init(key=k), key), mesh, experiment.model.logical_axes
  )
  if num_seeds > 1:
    key = jnp.stack([jax.random.PRNGKey(seed + k) for k in range(num_seeds)])
    init_one = init
    init = lambda key: jax.vmap(lambda k: init_one(key=k))(key)
    # The seed axis is replicated: each device holds every seed's slice of its shards.
    per_seed = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), per_seed)
  abstract = jax.eval_shape(lambda k: init(key=k), key)
  create = jax.jit(lambda k: init(key=k), out_shardings=per_seed)
  return abstract, per_seed, lambda: create(key)


def _over_seeds(fn: Callable, num_seeds: int, in_axes) -> Callable:
  """``fn`` vmapped over the leading seed axis of the arguments ``in_axes`` marks (0), the
  others shared (None); ``fn`` itself for one seed."""
  return jax.vmap(fn, in_axes=in_axes) if num_seeds > 1 else fn


def _count_convolutions(jaxpr) -> int:
  """Convolutions in ``jaxpr``, those of jaxprs nested in its equations' parameters included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "conv_general_dilated"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_convolutions(inner)
  return count


def _solve_without_stop(solve, problem):
  return solve_on_host(solve, problem, stop_requested=lambda: False)


def _solved_between(
  propose: Callable, finish: Callable, solve: Callable, *, host_solve: Callable, mesh
) -> Callable:
  """``advance(state, *args, **kwargs)``: ``propose(state.key, state.step, ...)`` gives the
  batches and their coupling problems, the host solves them, ``finish`` updates the state with
  the solutions replicated over the mesh; ``None`` when ``host_solve`` returned ``None``."""

  def advance(state, *args, **kwargs):
    batches, problems = propose(state.key, state.step, *args, **kwargs)
    solutions = host_solve(solve, sharding_lib.to_host(problems))
    if solutions is None:
      return None
    return finish(state, batches, sharding_lib.put_replicated(solutions, mesh))

  return advance


def chunk_advancer(
  experiment: Experiment,
  step_kwargs: dict,
  *,
  shardings,
  mesh,
  trace_count: list,
  host_solve=None,
  num_seeds: int = 1,
) -> Callable:
  """``advance(state, num_steps) -> (state, metrics)`` for on-device data: ``num_steps`` fused
  steps, or ``None`` when ``host_solve(solve, problem)`` (default: :func:`solve_on_host` with
  no stop) returned ``None``, a stop requested while the host solved the chunk's couplings
  (the state is then untouched: nothing was donated yet).

  Without a host-solved coupling the chunk is one jitted ``lax.scan``. With one, it is two
  programs and a host solve between them: the chunk's batches and coupling problems
  (:func:`~diffjax.train.step.propose_fused_pairs`), all problems solved in one host call, then
  the pairs finished inside the update program (:func:`~diffjax.train.step.finish_fused_steps`).
  """
  replicated = sharding_lib.replicated(mesh)
  pairing = experiment.host_pairing
  resident = experiment.device_data
  # A data set held on the devices enters each program as an argument (closed over, it would be
  # compiled into the program as a constant).
  arrays = None if resident is None else resident.arrays
  sampler = lambda arrays: (
    experiment.sample_batch if resident is None else lambda key: resident.draw(key, arrays)
  )
  if pairing is None:

    @functools.partial(
      jax.jit, static_argnames="num_steps", donate_argnums=0, out_shardings=(shardings, replicated)
    )
    def run_chunk(state, arrays, num_steps):
      trace_count[0] += 1
      return chunk_of(state, arrays, num_steps)

    def chunk_of(state, arrays, num_steps):
      chunk = lambda s: fused_train_steps(
        s, num_steps=num_steps, sample_batch=sampler(arrays), **step_kwargs
      )
      return _over_seeds(chunk, num_seeds, 0)(state)

    fused = lambda state, num_steps: run_chunk(state, arrays, num_steps=num_steps)
    if not sharding_lib.is_cpu_mesh(mesh):
      return fused
    one_by_one = []

    def advance(state, num_steps):
      # XLA CPU sends convolutions inside a loop body to its naive emitter (see
      # diffjax.train.step._scan_update_steps), ten times slower there for a UNet's backward
      # pass, so a chunk of such a step runs as one-step programs (no loop), the same steps in
      # the same order. A convolution on the data alone (a DiT's patch embedding) appears twice
      # in a step, forward and weight gradient, and its fused chunk is the faster one; any
      # convolution on a hidden state adds an input-gradient convolution, hence "more than two".
      if not one_by_one:
        step = jax.make_jaxpr(chunk_of, static_argnums=2)(state, arrays, 1)
        one_by_one.append(_count_convolutions(step.jaxpr) > 2)
      if num_steps == 1 or not one_by_one[0]:
        return fused(state, num_steps)
      parts = []
      for _ in range(num_steps):
        state, metrics = fused(state, 1)
        parts.append(metrics)
      axis = 1 if num_seeds > 1 else 0  # metrics are [seed, step] with seeds
      return state, jax.tree.map(lambda *m: jnp.concatenate(m, axis=axis), *parts)

    return advance

  host_solve = host_solve or _solve_without_stop
  update_kwargs = {k: v for k, v in step_kwargs.items() if k != "pair_fn"}

  @functools.partial(jax.jit, static_argnames="num_steps")
  def propose(key, first_step, arrays, num_steps):
    one = lambda k, s: propose_fused_pairs(
      k, s, num_steps=num_steps, sample_batch=sampler(arrays), propose=pairing.propose
    )
    return _over_seeds(one, num_seeds, (0, 0))(key, first_step)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, replicated))
  def finish(state, batches, solutions):
    trace_count[0] += 1
    one = lambda s, b, x: finish_fused_steps(s, b, x, finish=pairing.finish, **update_kwargs)
    return _over_seeds(one, num_seeds, 0)(state, batches, solutions)

  advance = _solved_between(propose, finish, pairing.solve, host_solve=host_solve, mesh=mesh)
  return lambda state, num_steps: advance(state, arrays, num_steps=num_steps)


def step_advancer(
  experiment: Experiment,
  step_kwargs: dict,
  *,
  shardings,
  mesh,
  trace_count: list,
  host_solve=None,
  num_seeds: int = 1,
) -> Callable:
  """``advance(state, batch) -> (state, metrics)`` for host data, one step per call (``None``
  when a stop request ended the wait for a host solve), in the two stages of
  :func:`chunk_advancer` when the coupling is solved on the host."""
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  pairing = experiment.host_pairing
  if pairing is None:

    @functools.partial(
      jax.jit,
      donate_argnums=0,
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, replicated),
    )
    def run_step(state, batch):
      trace_count[0] += 1
      one = lambda s, b: train_step(s, b, **step_kwargs)
      return _over_seeds(one, num_seeds, (0, None))(state, batch)

    return run_step

  host_solve = host_solve or _solve_without_stop
  update_kwargs = {k: v for k, v in step_kwargs.items() if k != "pair_fn"}

  @jax.jit
  def propose(key, step, batch):
    one = lambda k, s, b: propose_pairs(k, s, b, propose=pairing.propose)
    return _over_seeds(one, num_seeds, (0, 0, None))(key, step, batch)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, replicated))
  def finish(state, batch, solution):
    trace_count[0] += 1
    one = lambda s, b, x: finish_step(s, b, x, finish=pairing.finish, **update_kwargs)
    return _over_seeds(one, num_seeds, 0)(state, batch, solution)

  return _solved_between(propose, finish, pairing.solve, host_solve=host_solve, mesh=mesh)
