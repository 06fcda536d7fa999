"""The training loop: resume, step, log, checkpoint, plot.

Two ways to feed the step, chosen by where the data comes from:

* data generated on device (2D toys) or held there (a small in-memory data set,
  :mod:`diffjax.train.device_data`): up to ``train.fused_steps`` steps run in one jitted
  ``lax.scan`` and the host only wakes up between chunks, which end exactly on every logging,
  checkpoint and plot step (:class:`ChunkPlan`);
* data from a grain loader (images, larger data sets): one jitted step per batch, the next batch
  fetched and put on the devices while the current step runs (JAX's asynchronous dispatch).

Everything stateful sits here; the math it calls is pure.

What the run reports (process 0): each logging step a metrics.jsonl row and TensorBoard scalars
(loss, gradient norm, steps/s, learning rate) and, without a live progress bar (stderr not a
terminal, or ``train.progress_bar=false``), one plain progress line on the ``diffjax`` logger;
every ``train.plot_every`` steps WORKDIR/plots/step_XXXXXX.png and its TensorBoard image; the
config as TensorBoard text at the start; WORKDIR/samples.png at the end.
:meth:`TrainResult.summary` is the block ``diffjax train`` prints when the run ends.

Reliability (docs/reliability.md): a resume refuses a workdir trained with another config,
restores the newest checkpoint whose digests verify (moving bad ones aside), a streak of more
than ``train.max_nonfinite_steps`` non-finite steps halts the run without saving, SIGTERM/SIGINT
checkpoint at one step agreed by all processes and return, and a step watchdog ends a stuck run.
One trainer at a time per workdir (:class:`~diffjax.train.workdir_lock.WorkdirLock`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from diffjax.train import checkpoint as ckpt
from diffjax.train import config as config_lib
from diffjax.train import posthoc_ema
from diffjax.train import sharding as sharding_lib
from diffjax.train import watchdog as watchdog_lib
from diffjax.train.atomic_write import write_atomic
from diffjax.train.experiment import Experiment
from diffjax.train.host_solve import solve_on_host
from diffjax.train.metrics_log import PLOTS_DIR, MetricsWriter, check_side_files
from diffjax.train.optim import learning_rate_schedule
from diffjax.train.preemption import PreemptionWatcher
from diffjax.train.summary import format_summary, progress_line
from diffjax.train.trainer import Trainer, make_trainer
from diffjax.train.workdir_lock import WorkdirLock

__all__ = ["TrainResult", "train", "NonFiniteLossError", "first_nonfinite_excess", "ChunkPlan"]

log = logging.getLogger("diffjax")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient stayed non-finite; the last good checkpoint is kept."""


class TrainResult(dict):
  """What :func:`train` returns: final ``state``, ``losses`` per logged step, ``trace_count``,
  ``start_step``, ``preempted`` (the signal's name when a signal stopped the run), and for the
  summary ``workdir``, ``step`` (reached), ``total``, ``wall_s``, ``final_losses`` (per seed at
  ``logged_step``, the last logged step) and ``plot_files`` (the pictures written)."""

  def summary(self, *, program: str = "diffjax") -> str:
    """The end-of-run block (:func:`~diffjax.train.summary.format_summary`), paths absolute."""
    workdir, files = os.path.abspath(self["workdir"]), self["plot_files"]
    return format_summary(
      workdir=workdir,
      step=self["step"],
      total=self["total"],
      start_step=self["start_step"],
      wall_s=self["wall_s"],
      final_losses=self["final_losses"],
      logged_step=self["logged_step"],
      preempted=self["preempted"],
      samples=os.path.join(workdir, "samples.png") if "samples.png" in files else None,
      plots=[os.path.join(workdir, f) for f in files if f.startswith(f"{PLOTS_DIR}/")],
      program=program,
    )


def first_nonfinite_excess(
  streaks, losses, *, first_step: int, max_steps: int, last_step: int | None = None
) -> tuple[int, float, int] | None:
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


def _write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json, written atomically; ``sample`` and ``evaluate`` read it."""
  write_atomic(workdir / "config.json", config_lib.config_to_json(config))


# Distinct chunk remainders a schedule may compile as they are (see ChunkPlan).
_MAX_REMAINDERS = 8
# Above this many logging/checkpoint steps per period, the remainders are not enumerated.
_MAX_ENUMERATED = 100_000


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def _periodic_remainders(fused: int, *periods: int) -> set[int] | None:
  """``d % fused`` for every gap ``d`` between consecutive multiples of any of ``periods`` (the
  logging, checkpoint and plot periods; one period, their ``lcm``, covers them all); ``None``
  when that period holds more than ``_MAX_ENUMERATED`` of them."""
  period = math.lcm(*periods)
  if sum(period // every for every in periods) > _MAX_ENUMERATED:
    return None
  ends = sorted(set().union(*(range(0, period + 1, every) for every in periods)))
  return {(b - a) % fused for a, b in zip(ends, ends[1:])} - {0}


class ChunkPlan:
  """Where the fused chunks of on-device data end: on every multiple of ``log_every``, of
  ``checkpoint_every``, of ``plot_every`` (0: no plots) and of ``snapshot_every`` (post-hoc EMA;
  0: none of its own) and at ``total``, at most ``fused`` steps apart.

  Each chunk length is a program of its own (the scan length is static). Between two such steps
  ``d`` apart the run takes chunks of ``fused`` steps, then one of ``d % fused``. When the
  settings make more than ``_MAX_REMAINDERS`` distinct remainders (``log_every=13`` with
  ``checkpoint_every=1000`` makes thirteen), each remainder is cut into powers of two instead,
  so no setting compiles more than ``2 + log2(fused)`` programs. The length is a function of
  the settings and the step alone: a resumed run cuts its chunks where the uninterrupted run
  did.
  """

  def __init__(
    self,
    *,
    fused: int,
    log_every: int,
    checkpoint_every: int,
    total: int,
    plot_every: int = 0,
    snapshot_every: int = 0,
  ):
    self.fused, self.log_every, self.checkpoint_every = fused, log_every, checkpoint_every
    self.plot_every, self.total = plot_every, total
    periods = (log_every, checkpoint_every, plot_every, snapshot_every)
    self._periods = tuple(p for p in periods if p > 0)
    remainders = _periodic_remainders(fused, *self._periods)
    self.powers_of_two = remainders is None or len(remainders) > _MAX_REMAINDERS

  def length(self, step: int) -> int:
    """The steps of the chunk that starts after ``step``."""
    end = min(min(_next_multiple(step, every) for every in self._periods), self.total)
    distance = end - step
    if distance >= self.fused or not self.powers_of_two:
      return min(distance, self.fused)
    return 1 << (distance.bit_length() - 1)  # the largest power of two <= distance


class _DeviceData:
  """On-device data (2D toys, resident data sets): chunks of the :class:`ChunkPlan`'s lengths,
  the batches drawn inside the step from the step's key, so the data state is the step alone."""

  def __init__(self, plan: ChunkPlan):
    self._plan = plan

  def take(self, step: int) -> tuple[int, None]:
    return self._plan.length(step), None

  def advanced(self, step: int, *, more: bool, keep_state: bool) -> None:
    del step, more, keep_state

  def state(self, step: int) -> dict:
    return {"step": step}


class _HostData:
  """Host data (grain): one step per batch; the next batch is read while the step runs
  (JAX's asynchronous dispatch), after the iterator state of the steps so far is taken, so a
  checkpoint replays no batch and skips none. The state is kept after every step only where a
  step can be abandoned before it finishes (a host solve), else on the steps that save."""

  def __init__(self, experiment: Experiment, data_state: dict):
    self._experiment = experiment
    self._keep_every_state = experiment.host_pairing is not None
    self._iterator = experiment.make_iterator(data_state)
    self._state = experiment.iterator_state(self._iterator)
    self._next = experiment.next_batch(self._iterator)

  def take(self, step: int) -> tuple[int, Any]:
    del step
    batch, self._next = self._next, None
    return 1, batch

  def advanced(self, step: int, *, more: bool, keep_state: bool) -> None:
    del step
    if keep_state or self._keep_every_state:
      self._state = self._experiment.iterator_state(self._iterator)
    if more:
      self._next = self._experiment.next_batch(self._iterator)

  def state(self, step: int) -> dict:
    del step
    return self._state


def train(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, devices=None
) -> TrainResult:
  """Trains (or resumes) the experiment ``config`` in ``workdir``.

  Args:
    config: a validated experiment config.
    workdir: output folder: checkpoints/, metrics.jsonl, tensorboard/, config.json, samples.png,
      plots/ (with ``train.plot_every``).
    devices: the devices of the mesh (default: all).

  Returns:
    A :class:`TrainResult` with the final state, the logged losses, the step's trace count and
    what :meth:`TrainResult.summary` reports.

  Raises:
    WorkdirError: another live run holds ``workdir`` (its lock names host, pid and start).
  """
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  config_lib.check_resume_config(workdir, config)  # before anything is written
  ckpt.check_directory(workdir / "checkpoints")  # a path orbax cannot restore from, links
  # Held until the run returns; the kernel drops it when a killed run's process ends.
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    result = _train_locked(config, workdir, devices=devices)
  result["wall_s"] = time.perf_counter() - started
  return result


def _train_locked(config, workdir: pathlib.Path, *, devices) -> TrainResult:
  is_lead = jax.process_index() == 0
  if is_lead:
    # A folder named metrics.jsonl, a file named plots: fails here, before any compile.
    check_side_files(workdir, plots=config.train.plot_every > 0)
  devices = jax.devices() if devices is None else devices
  mesh = sharding_lib.make_mesh(
    data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor, devices=devices
  )
  watchdog = watchdog_lib.StepWatchdog(config.train.step_timeout_s)
  preemption = PreemptionWatcher()

  def host_solve(solve, problem):
    # Bounded by train.step_timeout_s from the first chunk on (compilation is not inside).
    with watchdog.allow(
      config.train.step_timeout_s, "host coupling solve", setting="train.step_timeout_s"
    ):
      return solve_on_host(solve, problem, stop_requested=preemption.stop_requested_here)

  trainer = make_trainer(config, mesh, host_solve=host_solve)
  fingerprint = config_lib.resume_fingerprint(config)
  checkpoints = workdir / "checkpoints"
  if is_lead:
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(workdir, config)
    ckpt.prepare_directory(
      checkpoints, config=fingerprint, config_differences=config_lib.fingerprint_differences
    )
  watchdog_lib.barrier("diffjax_prepare_workdir", timeout_s=config.distributed.barrier_timeout_s)

  with contextlib.ExitStack() as stack:
    # Installed until the function returns: a signal during the final plot finishes the plot.
    stack.enter_context(preemption)
    manager = ckpt.make_checkpoint_manager(
      checkpoints, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint
    )
    with contextlib.closing(manager):
      restored = ckpt.restore_verified(
        manager,
        ckpt.abstract_with_shardings(trainer.abstract_state, trainer.shardings),
        config=fingerprint,
        move_bad=is_lead and jax.process_count() == 1,
        config_differences=config_lib.fingerprint_differences,
      )
      if restored is None:
        start, state, data_state = 0, trainer.create_state(), {}
      else:
        start, state, data_state = restored
        log.info("resumed from step %d in %s", start, workdir)
      if is_lead and config.train.posthoc_ema.sigma_rels:
        # Snapshots past the restored step are retraced, and written again, from here.
        posthoc_ema.prune_snapshots(workdir, after=start)
      run = _Run(
        config,
        trainer,
        manager,
        watchdog,
        preemption,
        checkpoints=checkpoints,
        fingerprint=fingerprint,
        is_lead=is_lead,
        start=start,
        resumed=restored is not None,
      )
      with run:
        state = run.loop(state, data_state)
        if not run.preempted:
          run.plot(state, final=True)
    if run.preempted:
      log.warning(
        "%s: checkpointed step %d in %s; run the same command to resume",
        run.preempted,
        run.step,
        checkpoints,
      )
  return TrainResult(
    state=state,
    losses=run.losses,
    trace_count=trainer.trace_count[0],
    mesh=mesh,
    experiment=trainer.experiment,
    start_step=start,
    preempted=run.preempted,
    workdir=str(workdir),
    step=run.step,
    total=config.train.steps,
    final_losses=run.final_losses,
    logged_step=run.logged_step,
    plot_files=run.plot_files,
  )


class _Run:
  """The state of one training run between resume and return: the step, the pending save, the
  logs; :meth:`loop` is the training loop, one body for both kinds of data."""

  def __init__(
    self,
    config,
    trainer: Trainer,
    manager,
    watchdog,
    preemption,
    *,
    checkpoints,
    fingerprint,
    is_lead: bool,
    start: int,
    resumed: bool,
  ):
    self.config, self.trainer, self.manager = config, trainer, manager
    self.watchdog, self.preemption = watchdog, preemption
    self.checkpoints, self.fingerprint, self.is_lead = checkpoints, fingerprint, is_lead
    self.step = start
    self.saved_step = start if resumed else None
    self.pending = None  # the save whose digest marker is still to be written
    self.snapshot_step = start if resumed else None
    sigma_rels = tuple(config.train.posthoc_ema.sigma_rels)
    self.posthoc_gammas = tuple(float(g) for g in posthoc_ema.gamma_from_sigma_rel(sigma_rels))
    self.preempted = None
    self.losses: list[tuple[int, float]] = []
    self.final_losses: list[float] | None = None  # per seed, at logged_step
    self.logged_step: int | None = None
    self.plot_files: list[str] = []  # relative to the workdir, in the order written
    self._learning_rate = None  # the optax schedule, jitted at the first logged step
    self._stack = contextlib.ExitStack()
    self._last_time, self._last_step = time.perf_counter(), start

  def __enter__(self):
    workdir = self.checkpoints.parent
    self.metrics = self._stack.enter_context(
      contextlib.closing(MetricsWriter(workdir, resume_step=self.step, enabled=self.is_lead))
    )
    self.metrics.write_text("config", _config_text(self.config), self.step)
    self.progress = _progress_bar(self.config, self.step, self.config.train.steps, self.is_lead)
    if self.progress is not None:
      self._stack.enter_context(contextlib.closing(self.progress))
    self._stack.callback(self._finish_pending)
    self._stack.enter_context(self.watchdog)
    return self

  def __exit__(self, *exc):
    return self._stack.__exit__(*exc)

  def loop(self, state, data_state):
    train = self.config.train
    total = train.steps
    data = (
      _DeviceData(
        ChunkPlan(
          fused=train.fused_steps,
          log_every=train.log_every,
          checkpoint_every=train.checkpoint_every,
          total=total,
          plot_every=train.plot_every,
          snapshot_every=train.posthoc_ema.snapshot_every if self.posthoc_gammas else 0,
        )
      )
      if self.trainer.experiment.sample_batch is not None
      else _HostData(self.trainer.experiment, data_state)
    )
    if isinstance(data, _DeviceData) and data_state.get("grain"):
      log.warning(
        "the checkpoint of step %d read its data through grain; this run draws its batches on "
        "the devices (data.device_resident=%r), so they differ from here on from an "
        "uninterrupted grain run; resume with --config.data.device_resident=off to continue "
        "the grain stream",
        self.step,
        self.config.data.device_resident,
      )
    while self.step < total:
      num_steps, batch = data.take(self.step)
      advanced = self.trainer.advance(state, num_steps, batch)  # dispatched asynchronously
      if advanced is None:  # a signal while the host solved this chunk's couplings
        self.preempted = self.preemption.signal_name
        self._snapshot(state, at_save=True, at_end=True)
        self._save(state, data.state(self.step))
        break
      state, metrics = advanced
      self.step += num_steps
      stop = self.step < total and self.preemption.should_stop(self.step)
      # Chunks end on every checkpoint, logging and plot step (ChunkPlan); host data goes one
      # by one.
      save = stop or self.step % train.checkpoint_every == 0 or self.step == total
      # Overlaps the step: the next batch is read while the device computes.
      data.advanced(self.step, more=self.step < total and not stop, keep_state=save)
      self._check_finite(metrics, self.step - num_steps + 1)  # waits for the step
      self.watchdog.beat(self.step)
      self.pending = ckpt.commit_if_done(
        self.manager, self.pending, config=self.fingerprint, is_lead=self.is_lead
      )
      if self.progress is not None:
        self.progress.update(num_steps)
      if self.step % train.log_every == 0 or self.step == total:
        self._record(metrics)
      # Before the checkpoint: a kill between the two leaves a snapshot newer than the
      # checkpoint (dropped and written again on resume), never a checkpoint without its snapshot.
      self._snapshot(state, at_save=save, at_end=stop or self.step == total)
      if save:
        self._save(state, data.state(self.step))
      if stop:
        self.preempted = self.preemption.signal_name
        break
      if train.plot_every and self.step % train.plot_every == 0 and self.step < total:
        self.plot(state)  # the last step's picture is the final one, after the loop
    with self._save_allowance():
      ckpt.commit_step(self.manager, self.pending, config=self.fingerprint, is_lead=self.is_lead)
      self.pending = None
    return state

  def _save_allowance(self):
    return self.watchdog.allow(
      self.config.train.save_timeout_s, "checkpoint save", setting="train.save_timeout_s"
    )

  def _save(self, state, data_state) -> None:
    if self.step == self.saved_step:
      return  # a stop right after a save (or a resume) has nothing new to write
    with self._save_allowance():
      ckpt.commit_step(self.manager, self.pending, config=self.fingerprint, is_lead=self.is_lead)
      self.pending = ckpt.save_step(self.manager, self.step, state, data_state)
      self.pending = ckpt.commit_if_done(
        self.manager, self.pending, config=self.fingerprint, is_lead=self.is_lead
      )
    self.saved_step = self.step

  def _snapshot(self, state, *, at_save: bool, at_end: bool) -> None:
    """Stores the post-hoc EMA profiles of this step (:mod:`diffjax.train.posthoc_ema`): at every
    checkpoint (``at_save``), or every ``train.posthoc_ema.snapshot_every`` steps and at the
    run's end or stop (``at_end``). Every process takes part (the gather); the lead writes."""
    if not self.posthoc_gammas:
      return
    every = self.config.train.posthoc_ema.snapshot_every
    due = (self.step % every == 0 or at_end) if every else at_save
    if not due or self.step == self.snapshot_step:
      return
    with self._save_allowance():
      posthoc_ema.write_snapshot(
        self.checkpoints.parent,
        step=self.step,
        profiles=state.posthoc_ema,
        sigma_rels=self.config.train.posthoc_ema.sigma_rels,
        gammas=self.posthoc_gammas,
        is_lead=self.is_lead,
      )
    self.snapshot_step = self.step

  def _finish_pending(self) -> None:
    """After an exception during a save: let it finish (its marker is written only if the save
    itself completed), so a committed step is never left half-trusted."""
    if self.pending is None:
      return
    try:
      ckpt.commit_step(self.manager, self.pending, config=self.fingerprint, is_lead=self.is_lead)
    except Exception:  # noqa: BLE001 -- the original error matters more
      log.exception("could not finish the checkpoint of step %d", self.pending["step"])

  def plot(self, state, *, final: bool = False) -> None:
    """The picture of ``state`` (its first seed): WORKDIR/plots/step_XXXXXX.png, or at the end
    WORKDIR/samples.png (with ``train.plot_every``, also copied to end the series in plots/),
    and a TensorBoard image. Process 0 draws it, under the watchdog's save allowance; with
    several processes the others wait for it at a barrier rather than in the next step, where
    ``train.step_timeout_s`` would end them."""
    experiment = self.trainer.experiment
    if experiment.plot is None:
      return
    every = self.config.train.plot_every
    workdir = self.checkpoints.parent
    name = f"{PLOTS_DIR}/step_{self.step:06d}.png"
    with self.watchdog.allow(
      self.config.train.save_timeout_s, "plot", setting="train.save_timeout_s"
    ):
      first = state if self.trainer.num_seeds == 1 else jax.tree.map(lambda x: x[0], state)
      if jax.process_count() > 1:
        # FSDP may shard the parameters across processes, and a program that gathers them needs
        # every process: all gather them here (a collective), then process 0 samples from its
        # own copy while the others wait.
        first = first.replace(ema_params=sharding_lib.to_host(first.ema_params))
      if self.is_lead:
        if final:
          experiment.plot(first, workdir)
          png = (workdir / "samples.png").read_bytes()
          self.plot_files.append("samples.png")
        else:
          png = _draw_png(experiment.plot, first, workdir / PLOTS_DIR)
        if not final or every:  # the series in plots/ ends with the final picture
          (workdir / PLOTS_DIR).mkdir(exist_ok=True)
          write_atomic(workdir / name, png)
          self.plot_files.append(name)
        self.metrics.write_image("samples", png, self.step)
      if not final:
        watchdog_lib.barrier(
          f"diffjax_plot_{self.step}", timeout_s=self.config.distributed.barrier_timeout_s
        )

  def _learning_rate_at(self, step: int) -> float:
    """The rate of the update that made step ``step`` (optax counts updates from 0); a step
    skipped as non-finite does not advance optax's count, so after one this reads ahead."""
    if self._learning_rate is None:
      optimizer = self.config.optimizer
      self._learning_rate = jax.jit(
        learning_rate_schedule(
          learning_rate=optimizer.learning_rate,
          warmup_steps=optimizer.warmup_steps,
          decay=optimizer.decay,
          total_steps=self.config.train.steps,
        )
      )
    return float(self._learning_rate(max(step - 1, 0)))

  def _per_seed(self, values) -> np.ndarray:
    """``[seeds, steps]`` from a metric of the last chunk (``[steps]`` or ``[seeds, steps]``)."""
    return np.asarray(values).reshape(self.trainer.num_seeds, -1)

  def _record(self, metrics) -> None:
    per_seed = self._per_seed(metrics["loss"]).mean(axis=1)
    loss = float(per_seed.mean())
    now = time.perf_counter()
    rate = (self.step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, self.step
    self.losses.append((self.step, loss))
    self.final_losses, self.logged_step = [float(x) for x in per_seed], self.step
    row = {
      "loss": loss,
      "grad_norm": float(np.mean(np.asarray(metrics["grad_norm"]))),
      "steps_per_second": rate,
      "learning_rate": self._learning_rate_at(self.step),
    }
    if self.trainer.num_seeds > 1:
      row["loss_per_seed"] = [float(x) for x in per_seed]
    self.metrics.write(self.step, row)
    if self.progress is not None:
      self.progress.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.0f}")
    elif self.is_lead:
      total = self.config.train.steps
      log.info(progress_line(step=self.step, total=total, loss=loss, steps_per_second=rate))

  def _check_finite(self, metrics, first_step: int) -> None:
    limit = self.config.train.max_nonfinite_steps
    # With several seeds, the seed with the longest streak at each step decides.
    streaks = self._per_seed(metrics["nonfinite_streak"])
    worst = np.argmax(streaks, axis=0)
    losses = np.take_along_axis(self._per_seed(metrics["loss"]), worst[None], axis=0)[0]
    excess = first_nonfinite_excess(
      streaks.max(axis=0),
      losses,
      first_step=first_step,
      max_steps=limit,
      last_step=self.config.train.steps,
    )
    if excess is None:
      return
    bad_step, loss, streak = excess
    if streak >= bad_step:  # not one finite step since initialisation: data or config
      raise NonFiniteLossError(
        f"loss or gradient non-finite at every step of the run, 1 to {bad_step} (loss {loss}):"
        " nothing was trained; check the data and the config (NaN pixels, labels >= "
        "data.num_classes, optimizer.learning_rate)"
      )
    raise NonFiniteLossError(
      f"loss or gradient non-finite for {streak} consecutive steps up to step {bad_step} "
      f"(loss {loss}; train.max_nonfinite_steps={limit}); lower optimizer.learning_rate or "
      f"set optimizer.grad_clip_norm; the last good checkpoint in {self.checkpoints} is kept"
    )


def _draw_png(plot, state, folder: pathlib.Path) -> bytes:
  """The PNG ``plot(state, somewhere)`` draws as ``somewhere/samples.png``, drawn in a fresh
  hidden folder inside ``folder`` (removed after), so WORKDIR/samples.png is left alone."""
  folder.mkdir(exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=".plot-", dir=folder))
  try:
    plot(state, scratch)
    return (scratch / "samples.png").read_bytes()
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _config_text(config) -> str:
  """The config as TensorBoard text: its JSON as a Markdown code block (indented 4 spaces)."""
  json_text = config_lib.config_to_json(config)
  return "\n".join("    " + line for line in json_text.splitlines())


def _live_bar_possible(stream) -> bool:
  """Whether a live progress bar can be drawn on ``stream``: a terminal, or a notebook where
  tqdm.auto chose its widget. A log file or a cluster job's output gets plain lines instead."""
  try:
    if stream.isatty():
      return True
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto in a notebook only
  return notebook is not None and issubclass(tqdm, notebook.tqdm)


def _progress_bar(config, start, total, enabled):
  if not (enabled and config.train.progress_bar and _live_bar_possible(sys.stderr)):
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
