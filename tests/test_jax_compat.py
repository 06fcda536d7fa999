"""The JAX internals of diffjax._jax_compat exist in the installed JAX and behave as relied on."""

import jax
import jax.numpy as jnp
import pytest

from diffjax import _jax_compat


def test_is_tracer_tells_traced_values_from_concrete_ones():
  seen = []

  @jax.jit
  def inside(x):
    seen.append(_jax_compat.is_tracer(x))
    return x

  inside(jnp.ones(2))
  jax.grad(lambda x: seen.append(_jax_compat.is_tracer(x)) or x)(1.0)
  jax.vmap(lambda x: seen.append(_jax_compat.is_tracer(x)) or x)(jnp.ones(3))
  assert seen == [True, True, True]
  assert not _jax_compat.is_tracer(jnp.ones(2))
  assert not _jax_compat.is_tracer(1.0)


def test_the_distributed_runtime_still_has_the_barrier_the_watchdog_calls():
  # If this fails, JAX moved the coordination client: update _jax_compat.wait_at_barrier.
  from jax._src import distributed
  from jax._src.lib import _jax

  assert hasattr(distributed.global_state, "client")
  assert callable(getattr(_jax.DistributedRuntimeClient, "wait_at_barrier", None))


def test_barrier_without_distributed_runtime_says_what_is_missing():
  with pytest.raises(RuntimeError, match="jax.distributed.initialize"):
    _jax_compat.wait_at_barrier("x", timeout_ms=10)
