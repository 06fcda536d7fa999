"""A host solve between two programs (exact OT couplings), on a thread the loop can walk away from.

The main thread waits for the solve in short slices, so it still sees a stop request (a signal on
a single-process run) while a slow or stuck solver runs: the run then checkpoints the last
finished step and exits instead of hanging. The solve runs on a daemon thread, so a solver that
never returns cannot keep the process alive either; ``train.step_timeout_s`` bounds how long the
loop waits (the step watchdog).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["solve_on_host"]


def solve_on_host(
  solve: Callable[[Any], Any],
  problem: Any,
  *,
  stop_requested: Callable[[], bool],
  poll_s: float = 0.05,
) -> Any | None:
  """``solve(problem)`` on a daemon thread; the solution, or ``None`` if ``stop_requested()``
  turned true first. An exception in ``solve`` is raised here."""
  outcome: dict[str, Any] = {}

  def run():
    try:
      outcome["value"] = solve(problem)
    except BaseException as e:  # noqa: BLE001 -- re-raised in the waiting thread
      outcome["error"] = e

  thread = threading.Thread(target=run, name="diffjax-host-solve", daemon=True)
  thread.start()
  while thread.is_alive():
    if stop_requested():
      return None
    thread.join(poll_s)
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]
