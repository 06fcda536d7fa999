"""The exact mean velocity of a Gaussian-to-Gaussian linear flow, for the MeanFlow and shortcut
tests.

Source ``N(0, I)`` and data ``N(m, c^2 I)`` drawn independently, linear path ``z_t = (1 - t) x0 +
t x1`` (flow time: source at 0, data at 1). Then ``z_t ~ N(t m, s_t^2 I)`` with ``s_t^2 = (1 -
t)^2 + t^2 c^2``. ``(x0, x1, z_t)`` are jointly Gaussian, so the marginal velocity ``E[x1 - x0 |
z_t]`` is affine, ``v(z, t) = m + (s_t' / s_t) (z - t m)`` with ``s_t' = (t c^2 - (1 - t)) / s_t``
(``Cov(x1 - x0, z_t) = t c^2 - (1 - t)``), and its flow keeps the standardised point fixed:
``z_s = s m + (s_s / s_t) (z_t - t m)``. The average velocity is ``u(z, t, s) = (z_s - z) / (s -
t)``; one jump from ``t = 0`` lands on ``m + c z_0``.
"""

from __future__ import annotations

import jax.numpy as jnp

MEAN = (2.0, -1.0)
SCALE = 0.5


def _column(values, z):
  """``[batch]`` times against ``[batch, dim]`` points."""
  return jnp.asarray(values, z.dtype)[:, None]


def std(t):
  return jnp.sqrt((1 - t) ** 2 + t**2 * SCALE**2)


def flow_map(z, t, s):
  """``z_s`` from ``z_t`` along the exact flow; ``t``, ``s`` ``[batch]``."""
  mean = jnp.asarray(MEAN, z.dtype)
  t, s = _column(t, z), _column(s, z)
  return s * mean + std(s) / std(t) * (z - t * mean)


def average_velocity(z, t, s):
  """``u(z, t, s) = (z_s - z) / (s - t)`` for ``s > t``."""
  return (flow_map(z, t, s) - z) / _column(jnp.asarray(s) - jnp.asarray(t), z)


def velocity(z, t):
  """The marginal velocity ``v(z, t) = u(z, t, t)``."""
  mean = jnp.asarray(MEAN, z.dtype)
  t = _column(t, z)
  rate = (t * SCALE**2 - (1 - t)) / std(t) ** 2
  return mean + rate * (z - t * mean)


def data_of_source(x0):
  """Where the exact flow takes source points: ``m + c x0``."""
  return jnp.asarray(MEAN, x0.dtype) + SCALE * x0


def mean_velocity(z, t, s):
  """``u(z, t, s)`` for ``s >= t``: the average velocity where ``s > t``, ``v(z, t)`` where
  ``s = t`` (the unused branch is evaluated at a safe ``s``, so neither it nor its derivatives
  divide by zero)."""
  gap = jnp.asarray(s) > jnp.asarray(t)
  safe = jnp.where(gap, s, jnp.asarray(t) + 1.0)
  return jnp.where(gap[:, None], average_velocity(z, t, safe), velocity(z, t))
