"""The training loop: resume, step, log, checkpoint, plot.

Two ways to feed the step, chosen by where the data comes from:

* data generated on device (2D toys): ``train.fused_steps`` steps run in one jitted
  ``lax.scan`` and the host only wakes up between chunks;
* data from a grain loader (images): one jitted step per batch, the next batch fetched and put
  on the devices while the current step runs (JAX's asynchronous dispatch).

Everything stateful sits here; the math it calls is pure.

Reliability (docs/reliability.md): a resume refuses a workdir trained with another config,
restores the newest checkpoint whose digests verify (moving bad ones aside), a streak of more
than ``train.max_nonfinite_steps`` non-finite steps halts the run without saving, SIGTERM/SIGINT
checkpoint at one step agreed by all processes and return, and a step watchdog ends a stuck run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax.train import checkpoint as ckpt
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train import watchdog as watchdog_lib
from diffjax.train.preemption import PreemptionWatcher
from diffjax.train.experiment import Experiment, build_experiment
from diffjax.train.metrics_log import MetricsWriter
from diffjax.train.optim import make_optimizer
from diffjax.train.state import TrainState, init_train_state
from diffjax.train.host_solve import solve_on_host
from diffjax.train.step import (finish_fused_steps, finish_step, fused_train_steps,
                                propose_fused_pairs, propose_pairs, train_step)

__all__ = ["TrainResult", "train", "state_shardings_for", "make_initial_state", "chunk_advancer",
           "step_advancer",
           "NonFiniteLossError", "first_nonfinite_excess"]

log = logging.getLogger("diffjax")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient stayed non-finite; the last good checkpoint is kept."""


class TrainResult(dict):
  """What :func:`train` returns: final ``state``, ``losses`` per logged step, ``trace_count``,
  ``start_step`` and ``preempted`` (the signal's name when a signal stopped the run)."""


def first_nonfinite_excess(streaks, losses, *, first_step: int, max_steps: int,
                           last_step: int | None = None) -> tuple[int, float, int] | None:
  """``(step, loss, streak)`` of the first step whose consecutive non-finite count exceeds
  ``max_steps`` among steps ``first_step, first_step + 1, ...``; ``None`` when none does.

  The run's ``last_step`` also counts when its streak covers every step since initialisation
  (``streak == step``): a run no longer than ``max_steps`` whose every step was non-finite
  never exceeds the limit, and would otherwise end as a success that trained nothing.
  """
  streaks = np.atleast_1d(np.asarray(streaks))
  steps = first_step + np.arange(streaks.size)
  untrained = (steps == last_step) & (streaks >= steps) if last_step is not None else False
  over = np.flatnonzero((streaks > max_steps) | untrained)
  if over.size == 0:
    return None
  i = int(over[0])
  return first_step + i, float(np.atleast_1d(np.asarray(losses))[i]), int(streaks[i])


def state_shardings_for(abstract_state: TrainState, mesh) -> TrainState:
  """Parameters, EMA and optimizer leaves follow the FSDP rule; counters and the key are
  replicated."""
  replicated = sharding_lib.replicated(mesh)
  return TrainState(
      params=sharding_lib.state_shardings(abstract_state.params, mesh),
      opt_state=sharding_lib.state_shardings(abstract_state.opt_state, mesh),
      ema_params=sharding_lib.state_shardings(abstract_state.ema_params, mesh),
      step=replicated, key=replicated, nonfinite_streak=replicated)


def make_initial_state(experiment: Experiment, optimizer, *, seed: int, mesh):
  """Abstract state, its shardings, and a function creating the state born sharded
  (``jax.jit(init, out_shardings=...)``: no device ever holds an unsharded copy)."""
  init = functools.partial(init_train_state, init_params=experiment.model.init,
                           optimizer=optimizer)
  key = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(lambda k: init(key=k), key)
  shardings = state_shardings_for(abstract, mesh)
  create = jax.jit(lambda k: init(key=k), out_shardings=shardings)
  return abstract, shardings, lambda: create(key)


def _write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json, written atomically; ``sample`` and ``evaluate`` read it."""
  path = workdir / "config.json"
  tmp = workdir / "config.json.tmp"
  tmp.write_text(config_lib.config_to_json(config))
  os.replace(tmp, path)


def _solve_without_stop(solve, problem):
  return solve_on_host(solve, problem, stop_requested=lambda: False)


def chunk_advancer(experiment: Experiment, step_kwargs: dict, *, shardings, mesh,
                   trace_count: list, host_solve=None) -> Callable:
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
  if pairing is None:
    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnums=0,
                       out_shardings=(shardings, replicated))
    def run_chunk(state, num_steps):
      trace_count[0] += 1
      return fused_train_steps(state, num_steps=num_steps, sample_batch=experiment.sample_batch,
                               **step_kwargs)

    return lambda state, num_steps: run_chunk(state, num_steps=num_steps)

  host_solve = host_solve or _solve_without_stop
  update_kwargs = {k: v for k, v in step_kwargs.items() if k != "pair_fn"}
  propose = jax.jit(functools.partial(propose_fused_pairs, sample_batch=experiment.sample_batch,
                                      propose=pairing.propose), static_argnames="num_steps")

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, replicated))
  def finish(state, batches, solutions):
    trace_count[0] += 1
    return finish_fused_steps(state, batches, solutions, finish=pairing.finish, **update_kwargs)

  def advance(state, num_steps):
    batches, problems = propose(state.key, state.step, num_steps=num_steps)
    solutions = host_solve(pairing.solve, sharding_lib.to_host(problems))
    if solutions is None:
      return None
    return finish(state, batches, sharding_lib.put_replicated(solutions, mesh))

  return advance


def step_advancer(experiment: Experiment, step_kwargs: dict, *, shardings, mesh,
                  trace_count: list, host_solve=None) -> Callable:
  """``advance(state, batch) -> (state, metrics)`` for host data, one step per call (``None``
  when a stop request ended the wait for a host solve), in the two stages of
  :func:`chunk_advancer` when the coupling is solved on the host."""
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  pairing = experiment.host_pairing
  if pairing is None:
    @functools.partial(jax.jit, donate_argnums=0, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, replicated))
    def run_step(state, batch):
      trace_count[0] += 1
      return train_step(state, batch, **step_kwargs)

    return run_step

  host_solve = host_solve or _solve_without_stop
  update_kwargs = {k: v for k, v in step_kwargs.items() if k != "pair_fn"}
  propose = jax.jit(functools.partial(propose_pairs, propose=pairing.propose))

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, replicated))
  def finish(state, batch, solution):
    trace_count[0] += 1
    return finish_step(state, batch, solution, finish=pairing.finish, **update_kwargs)

  def advance(state, batch):
    batch, problem = propose(state.key, state.step, batch)
    solution = host_solve(pairing.solve, sharding_lib.to_host(problem))
    if solution is None:
      return None
    return finish(state, batch, sharding_lib.put_replicated(solution, mesh))

  return advance


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          devices=None) -> TrainResult:
  """Trains (or resumes) the experiment ``config`` in ``workdir``.

  Args:
    config: a validated experiment config.
    workdir: output folder: checkpoints/, metrics.jsonl, tensorboard/, config.json, samples.png.
    devices: the devices of the mesh (default: all).

  Returns:
    A :class:`TrainResult` with the final state, the logged losses and the step's trace count.
  """
  workdir = pathlib.Path(workdir)
  is_lead = jax.process_index() == 0
  config_lib.check_resume_config(workdir, config)  # before anything is written
  devices = jax.devices() if devices is None else devices
  mesh = sharding_lib.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices)
  experiment = build_experiment(config, mesh=mesh)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  fingerprint = config_lib.resume_fingerprint(config)
  barrier_s = config.distributed.barrier_timeout_s

  abstract, shardings, create_state = make_initial_state(
      experiment, optimizer, seed=config.seed, mesh=mesh)
  checkpoints = workdir / "checkpoints"
  if is_lead:
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(workdir, config)
    ckpt.prepare_directory(checkpoints, config=fingerprint,
                           config_differences=config_lib.fingerprint_differences)
  watchdog_lib.barrier("diffjax_prepare_workdir", timeout_s=barrier_s)
  manager = ckpt.make_checkpoint_manager(checkpoints, keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoint)
  try:
    restored = ckpt.restore_verified(
        manager, ckpt.abstract_with_shardings(abstract, shardings), config=fingerprint,
        move_bad=is_lead and jax.process_count() == 1,
        config_differences=config_lib.fingerprint_differences)
  except BaseException:
    manager.close()
    raise
  if restored is None:
    state, data_state = create_state(), {}
    start = 0
  else:
    start, state, data_state = restored
    log.info("resumed from step %d in %s", start, workdir)

  trace_count = [0]
  step_kwargs = dict(pair_fn=experiment.pair_fn, loss_fn=experiment.loss_fn, optimizer=optimizer,
                     ema_decay=config.train.ema_decay,
                     accumulate_steps=config.train.accumulate_steps)

  metrics_writer = MetricsWriter(workdir, resume_step=start, enabled=is_lead)
  total = config.train.steps
  losses: list[tuple[int, float]] = []
  progress = _progress_bar(config, start, total, is_lead)
  step = start
  last_time, last_step = time.perf_counter(), start
  pending = None  # the save whose digest marker is still to be written
  preempted = None

  def record(step_now, metrics):
    nonlocal last_time, last_step
    loss = float(np.mean(np.asarray(metrics["loss"])))
    now = time.perf_counter()
    rate = (step_now - last_step) / max(now - last_time, 1e-9)
    last_time, last_step = now, step_now
    losses.append((step_now, loss))
    metrics_writer.write(step_now, {"loss": loss,
                                    "grad_norm": float(np.mean(np.asarray(metrics["grad_norm"]))),
                                    "steps_per_second": rate})
    if progress is not None:
      progress.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.0f}")

  def check_finite(metrics, first_step):
    excess = first_nonfinite_excess(metrics["nonfinite_streak"], metrics["loss"],
                                    first_step=first_step,
                                    max_steps=config.train.max_nonfinite_steps,
                                    last_step=total)
    if excess is None:
      return
    bad_step, loss, streak = excess
    if streak >= bad_step:  # not one finite step since initialisation: data or config
      raise NonFiniteLossError(
          f"loss or gradient non-finite at every step of the run, 1 to {bad_step} (loss {loss}):"
          " nothing was trained; check the data and the config (NaN pixels, labels >= "
          "data.num_classes, optimizer.learning_rate)")
    raise NonFiniteLossError(
        f"loss or gradient non-finite for {streak} consecutive steps up to step {bad_step} "
        f"(loss {loss}; train.max_nonfinite_steps={config.train.max_nonfinite_steps}); lower "
        "optimizer.learning_rate or set optimizer.grad_clip_norm; the last good checkpoint "
        f"in {checkpoints} is kept")

  saved_step = start if restored is not None else None

  def save(step_now, state_now, data_state_now):
    nonlocal pending, saved_step
    if step_now == saved_step:
      return  # a stop right after a save (or a resume) has nothing new to write
    with watchdog.allow(config.train.save_timeout_s, "checkpoint save",
                        setting="train.save_timeout_s"):
      ckpt.commit_step(manager, pending, config=fingerprint, is_lead=is_lead)
      pending = ckpt.save_step(manager, step_now, state_now, data_state_now)
      pending = ckpt.commit_if_done(manager, pending, config=fingerprint, is_lead=is_lead)
    saved_step = step_now

  watchdog = watchdog_lib.StepWatchdog(config.train.step_timeout_s)
  # Installed until the function returns: a signal during the final plot finishes the plot.
  preemption = PreemptionWatcher().__enter__()

  def host_solve(solve, problem):
    # Bounded by train.step_timeout_s from the first chunk on (compilation is not inside).
    with watchdog.allow(config.train.step_timeout_s, "host coupling solve",
                        setting="train.step_timeout_s"):
      return solve_on_host(solve, problem, stop_requested=preemption.stop_requested_here)

  advancers = dict(step_kwargs=step_kwargs, shardings=shardings, mesh=mesh,
                   trace_count=trace_count, host_solve=host_solve)
  try:
    with watchdog:
      if experiment.sample_batch is not None:
        # On-device data: fused chunks. A chunk ends early on a log or checkpoint step only at
        # the end of training, so at most two chunk lengths are compiled.
        advance = chunk_advancer(experiment, **advancers)
        while step < total:
          chunk = min(config.train.fused_steps, total - step)
          advanced = advance(state, chunk)
          if advanced is None:  # a signal while the host solved this chunk's couplings
            preempted = preemption.signal_name
            save(step, state, {"step": step})
            break
          state, metrics = advanced
          check_finite(metrics, step + 1)
          step += chunk
          watchdog.beat(step)
          pending = ckpt.commit_if_done(manager, pending, config=fingerprint, is_lead=is_lead)
          if progress is not None:
            progress.update(chunk)
          if step % config.train.log_every < chunk or step == total:
            record(step, metrics)
          stop = step < total and preemption.should_stop(step)
          if stop or step % config.train.checkpoint_every < chunk or step == total:
            save(step, state, {"step": step})
          if stop:
            preempted = preemption.signal_name
            break
      else:
        advance = step_advancer(experiment, **advancers)
        iterator = experiment.make_iterator(data_state)
        # The iterator state before each batch is read: what a checkpoint of the step before
        # that batch must hold (a stop during a host solve saves the unfinished step's start).
        data_state_before = experiment.iterator_state(iterator)
        next_batch = experiment.next_batch(iterator)
        while step < total:
          batch, next_batch = next_batch, None
          advanced = advance(state, batch)  # dispatched asynchronously
          if advanced is None:  # a signal while the host solved this step's coupling
            preempted = preemption.signal_name
            save(step, state, data_state_before)
            break
          state, metrics = advanced
          step += 1
          stop = step < total and preemption.should_stop(step)
          save_now = stop or step % config.train.checkpoint_every == 0 or step == total
          # The iterator has produced exactly the batches of steps 1..step here: its state is
          # taken before the next batch is read, so a resume replays no batch and skips none.
          data_state_before = experiment.iterator_state(iterator)
          if step < total and not stop:
            next_batch = experiment.next_batch(iterator)  # host work overlaps the step
          check_finite(metrics, step)  # waits for this step; the next batch is already read
          watchdog.beat(step)
          pending = ckpt.commit_if_done(manager, pending, config=fingerprint, is_lead=is_lead)
          if progress is not None:
            progress.update(1)
          if step % config.train.log_every == 0 or step == total:
            record(step, metrics)
          if save_now:
            save(step, state, data_state_before)
          if stop:
            preempted = preemption.signal_name
            break
      with watchdog.allow(config.train.save_timeout_s, "checkpoint save",
                          setting="train.save_timeout_s"):
        ckpt.commit_step(manager, pending, config=fingerprint, is_lead=is_lead)
        pending = None
  except BaseException:
    preemption.__exit__(None, None, None)
    raise
  finally:
    if pending is not None:
      # An exception after a save started: let it finish (its marker is written only if the
      # save itself completed), so a committed step is never left half-trusted.
      try:
        ckpt.commit_step(manager, pending, config=fingerprint, is_lead=is_lead)
      except Exception:  # noqa: BLE001 -- the original error matters more
        log.exception("could not finish the checkpoint of step %d", pending["step"])
    manager.close()
    metrics_writer.close()
    if progress is not None:
      progress.close()

  try:
    if preempted:
      log.warning("%s: checkpointed step %d in %s; run the same command to resume", preempted,
                  step, checkpoints)
    elif is_lead and experiment.plot is not None:
      experiment.plot(state, workdir)
  finally:
    preemption.__exit__(None, None, None)
  return TrainResult(state=state, losses=losses, trace_count=trace_count[0], mesh=mesh,
                     experiment=experiment, start_step=start, preempted=preempted)


def _progress_bar(config, start, total, enabled):
  if not (enabled and config.train.progress_bar):
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
