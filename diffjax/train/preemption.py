"""Preemption: SIGTERM or SIGINT on any process makes every process stop at one agreed step.

One process: a signal handler sets a flag the loop reads between steps. Several processes:
JAX's preemption sync manager (started by ``jax.distributed.initialize``) catches SIGTERM and
agrees with the others on a step; :func:`jax.experimental.multihost_utils.
reached_preemption_sync_point` turns true at that step on every process. SIGINT (Ctrl-C) is
forwarded to the process as SIGTERM so it takes the same path. The loop then writes a checkpoint
at that step and returns; the command exits 0 and the next run resumes at exactly that step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

__all__ = ["PreemptionWatcher"]

log = logging.getLogger("diffjax")


class PreemptionWatcher:
  """Installs the handlers on :meth:`__enter__` and restores the previous ones on exit.

  ``should_stop(step)`` must be called by every process with the same sequence of steps.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._signal = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    self._calls = 0

  def _handle(self, signum, frame):
    del frame
    self._signal = signal.Signals(signum).name
    if self._multi:
      # Route Ctrl-C into JAX's preemption notifier (it listens for SIGTERM only).
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag.set()

  def __enter__(self) -> PreemptionWatcher:
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    names = [signal.SIGINT] + ([] if self._multi else [signal.SIGTERM])
    for signum in names:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  @property
  def signal_name(self) -> str | None:
    return self._signal or ("SIGTERM" if self._multi else None)

  def stop_requested_here(self) -> bool:
    """Whether a signal reached this single-process run (checked while the loop waits on the
    host; with several processes the stop step is agreed in :meth:`should_stop` only)."""
    return not self._multi and self._flag.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint at ``step`` and stop (agreed by every process)."""
    del step  # the sync point counts calls: every process makes the same calls in order
    if not self._multi:
      return self._flag.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    # The agreed point is (largest id any process has reported) + 1, so ids must go up by one
    # per call; train steps go up by the fused chunk length and would never meet it.
    self._calls += 1
    return multihost_utils.reached_preemption_sync_point(self._calls)
