"""The shared array conventions of diffjax.shapes: compute dtype, floats, concrete values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import shapes


def test_compute_dtype_is_at_least_float32():
  for dtype, want in [
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
    (jnp.int32, jnp.float32),
    (jnp.float32, jnp.float32),
  ]:
    assert shapes.compute_dtype(jnp.zeros(2, dtype)) == want
  assert shapes.compute_dtype(jnp.zeros(2, jnp.bfloat16), jnp.zeros(2, jnp.float32)) == jnp.float32
  with jax.enable_x64(True):
    assert shapes.compute_dtype(jnp.zeros(2, jnp.float64)) == jnp.float64


def test_in_compute_dtype_and_as_floating():
  assert shapes.in_compute_dtype(jnp.zeros(2, jnp.bfloat16)).dtype == jnp.float32
  assert shapes.in_compute_dtype(3).dtype == jnp.float32
  assert shapes.as_floating(np.arange(3)).dtype == jnp.float32  # integer steps or times
  assert shapes.as_floating(jnp.zeros(2, jnp.bfloat16)).dtype == jnp.bfloat16  # kept


def test_concrete_is_the_value_outside_jit_and_none_inside():
  np.testing.assert_array_equal(shapes.concrete(jnp.arange(3)), [0, 1, 2])
  assert shapes.concrete([1, 2], dtype=np.float64).dtype == np.float64
  seen = []
  jax.jit(lambda x: seen.append(shapes.concrete(x)) or x)(jnp.arange(3))
  assert seen == [None]
