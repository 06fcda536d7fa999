"""A step watchdog and barriers with timeouts: a stuck process never hangs a run.

``jax.distributed`` notices a dead peer through its heartbeat, but a peer that is alive and stuck
(a deadlock, a hung filesystem, a collective another process never joins) blocks the others
forever. :class:`StepWatchdog` is armed once the first step has compiled; if no step finishes
within ``timeout_s`` (``train.step_timeout_s``; a checkpoint save gets ``train.save_timeout_s``)
it dumps every thread's stack to stderr and ends the process with :data:`EXIT_CODE`. Every
process runs one, so all of them exit within ``timeout_s`` plus the watchdog's polling interval.
The last committed checkpoint is untouched (its marker is written
only after the save completes), so a restart of all processes resumes from it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

__all__ = ["StepWatchdog", "EXIT_CODE", "barrier"]

log = logging.getLogger("diffjax")

EXIT_CODE = 75  # EX_TEMPFAIL: the run can be restarted from its last checkpoint


class StepWatchdog:
  """``beat(step)`` after each finished step or chunk; a context manager owning the thread."""

  def __init__(self, timeout_s: float, *, poll_s: float | None = None):
    self.timeout_s = float(timeout_s)
    self._poll = poll_s if poll_s is not None else min(1.0, max(self.timeout_s / 10, 0.05))
    self._last = None
    self._step = None
    self._stop = threading.Event()
    self._allowance = None  # (limit_s, what, setting) while a longer phase (a checkpoint save) runs
    self._thread = None

  def beat(self, step: int) -> None:
    self._last, self._step = time.monotonic(), int(step)

  def allow(self, limit_s: float, what: str, *, setting: str):
    """A context in which the limit is ``limit_s`` instead of ``timeout_s``: a checkpoint save
    may legitimately outlast a step, but a process stuck inside one (a hung filesystem, a peer
    that never joins orbax's barrier) is still caught. The clock restarts on entry and exit, and
    runs inside the context even before the first beat (a host solve of the first chunk is
    bounded too; compilation, which precedes it, is not). ``what`` and ``setting`` (the config
    key of ``limit_s``) name the phase in the error."""
    watchdog = self

    class _Allow:
      def __enter__(self):
        self.armed = watchdog._last is not None
        watchdog._allowance = (float(limit_s), what, setting)
        watchdog._last = time.monotonic()

      def __exit__(self, *exc):
        watchdog._allowance = None
        watchdog._last = time.monotonic() if self.armed else None

    return _Allow()

  def _run(self) -> None:
    while not self._stop.wait(self._poll):
      last, allowance = self._last, self._allowance
      if last is None:
        continue
      limit, what, setting = allowance or (self.timeout_s, "train step", "train.step_timeout_s")
      waited = time.monotonic() - last
      after = "the start" if self._step is None else f"step {self._step}"
      if waited > limit:
        message = (
          f"diffjax: error: no {what} finished for {waited:.0f} s after "
          f"{after} ({setting}={limit:g}); a process is "
          "stuck. Stacks follow; the last committed checkpoint is kept, restart all "
          "processes to resume"
        )
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_CODE)  # pylint: disable=protected-access -- a stuck main thread

  def __enter__(self) -> StepWatchdog:
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._run, name="diffjax-watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)


def barrier(name: str, *, timeout_s: float) -> None:
  """Waits until every process reaches ``name``; after ``timeout_s`` raises one error naming
  the processes that did not arrive (a no-op with one process)."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_count() == 1:
    return
  from diffjax._jax_compat import wait_at_barrier  # pylint: disable=import-outside-toplevel

  try:
    wait_at_barrier(name, timeout_ms=int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 -- the runtime's error names the missing tasks
    first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
    raise RuntimeError(
      f"barrier {name!r}: not every process arrived within {timeout_s:g} s "
      f"(distributed.barrier_timeout_s); this is process {jax.process_index()} of "
      f"{jax.process_count()}; runtime says: {first}"
    ) from None
