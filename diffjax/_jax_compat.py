"""The two JAX internals diffjax relies on that have no public form, isolated here.

Everything else in diffjax uses JAX's public API. tests/test_jax_compat.py checks both against
the installed JAX, so a release that moves one fails that test by name instead of a multi-host
run or a sampler at run time.
"""

from __future__ import annotations

import jax

__all__ = ["is_tracer", "wait_at_barrier"]


def is_tracer(x) -> bool:
  """Whether ``x`` is an abstract value of an enclosing trace (``jit``, ``grad``, ``vmap``).

  ``isinstance(x, jax.Array)`` is true of tracers too, and no public predicate tells the two
  apart without converting the value.
  """
  return isinstance(x, jax.core.Tracer)


def wait_at_barrier(name: str, *, timeout_ms: int) -> None:
  """Blocks until every process of ``jax.distributed`` reaches ``name``, or raises after
  ``timeout_ms`` with the runtime's message naming the processes that did not arrive.

  The public ``multihost_utils.sync_global_devices`` is a device collective with no timeout; a
  process that never arrives would hang the others, which is what this barrier reports.
  """
  from jax._src import distributed  # pylint: disable=import-outside-toplevel

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
      f"barrier {name!r} needs jax.distributed.initialize() to have run in this process"
    )
  client.wait_at_barrier(name, timeout_ms)
