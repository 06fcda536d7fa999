"""Time and class-label embeddings shared by the diffjax models.

Time ``t`` is a float in ``[0, 1]`` (diffusion time or flow time: the models do not care which).
Each feature map rescales it internally by ``time_scale``: the sinusoidal embedding sees
``1000 t`` by default, so its frequencies cover the same range as for DDPM's integer steps
``0 .. 999`` (Ho et al. 2020); the Gaussian Fourier features see ``t`` itself, their bandwidth is
set by ``scale`` (Song et al. 2021).

Class labels are ints in ``[0, num_classes]``; index ``num_classes`` is the "null" label of
classifier-free guidance (Ho & Salimans 2022), and :func:`drop_labels` is the pure helper the
training code uses to drop labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from diffjax._lookup import lookup

__all__ = [
  "sinusoidal_embedding",
  "fourier_features",
  "gaussian_fourier_frequencies",
  "SinusoidalFeatures",
  "FourierFeatures",
  "TIME_FEATURES",
  "get_time_features",
  "TimeEmbedding",
  "summed_time_embedding",
  "LabelEmbedding",
  "drop_labels",
]


def sinusoidal_embedding(t: Array, *, dim: int, max_period: float = 10000.0) -> Array:
  """Transformer sinusoidal embedding of a scalar per example.

  ``emb(t) = [sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ..., cos(t w_{h-1})]`` with
  ``h = dim // 2`` and ``w_i = max_period^(-i / h)`` (Vaswani et al. 2017,
  https://arxiv.org/abs/1706.03762, Sec. 3.5; used for diffusion steps by Ho et al. 2020,
  https://arxiv.org/abs/2006.11239, who divide by ``h - 1`` instead of ``h``). An odd ``dim``
  gets one trailing zero.

  Args:
    t: ``[batch]`` positions (already scaled, e.g. ``1000 t``).
    dim: embedding size.
    max_period: the longest wavelength, ``2 pi max_period``.

  Returns:
    ``[batch, dim]`` float32 embedding.
  """
  # float32 at least: 1000 t times a frequency near 1 needs more than bfloat16's 8 bits.
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


def gaussian_fourier_frequencies(
  *, num_frequencies: int, scale: float, seed: int = 0
) -> np.ndarray:
  """Fixed random frequencies ``b_i ~ N(0, scale^2)``, drawn from ``seed`` with NumPy.

  They are a constant of the architecture, not a parameter: derived from the seed at trace time,
  they never enter the params pytree, so no optimizer (or weight decay) can move them, and a
  checkpoint plus the model config reproduce them exactly.
  """
  return np.random.default_rng(seed).standard_normal(num_frequencies) * scale


def fourier_features(t: Array, *, frequencies: Array) -> Array:
  """Random Fourier features ``gamma(t) = [sin(2 pi b t), cos(2 pi b t)]``.

  Tancik et al. 2020, https://arxiv.org/abs/2006.10739 (Gaussian ``b``); as a noise-level
  embedding in Song et al. 2021, https://arxiv.org/abs/2011.13456 (NCSN++).

  Args:
    t: ``[batch]`` inputs.
    frequencies: ``[n]`` frequencies ``b``.

  Returns:
    ``[batch, 2 n]`` float32 features.
  """
  t = jnp.asarray(t, jnp.float32)
  args = 2.0 * jnp.pi * t[..., None] * jnp.asarray(frequencies, jnp.float32)
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class SinusoidalFeatures(nnx.Module):
  """``sinusoidal_embedding(time_scale * t)``; no parameters."""

  def __init__(self, *, dim: int, time_scale: float = 1000.0, max_period: float = 10000.0):
    if dim < 2:
      raise ValueError(f"sinusoidal time features need dim >= 2, got dim={dim}")
    self.dim = dim
    self.time_scale = float(time_scale)
    self.max_period = float(max_period)

  def __call__(self, t: Array) -> Array:
    t = jnp.asarray(t, jnp.float32) * self.time_scale
    return sinusoidal_embedding(t, dim=self.dim, max_period=self.max_period)


class FourierFeatures(nnx.Module):
  """``fourier_features(time_scale * t)`` with ``dim // 2`` frequencies ``~ N(0, scale^2)``.

  The frequencies are derived from ``seed`` (see :func:`gaussian_fourier_frequencies`), so the
  module holds no state: ``init``/``apply`` carry everything. Default ``scale=16`` follows
  score_sde's ``fourier_scale``.
  """

  def __init__(self, *, dim: int, scale: float = 16.0, time_scale: float = 1.0, seed: int = 0):
    if dim < 2 or dim % 2:
      raise ValueError(f"Fourier time features need an even dim >= 2, got dim={dim}")
    self.dim = dim
    self.scale = float(scale)
    self.time_scale = float(time_scale)
    self.seed = int(seed)

  def __call__(self, t: Array) -> Array:
    freqs = gaussian_fourier_frequencies(
      num_frequencies=self.dim // 2, scale=self.scale, seed=self.seed
    )
    return fourier_features(jnp.asarray(t, jnp.float32) * self.time_scale, frequencies=freqs)


TIME_FEATURES: dict[str, Callable[..., nnx.Module]] = {
  "sinusoidal": SinusoidalFeatures,
  "fourier": FourierFeatures,
}


def get_time_features(name: str, **kwargs) -> nnx.Module:
  """Resolves a time feature map by name (once, at construction); ``kwargs`` go to its class."""
  return lookup(TIME_FEATURES, name, "time features")(**kwargs)


class TimeEmbedding(nnx.Module):
  """``emb(t) = W_2 SiLU(W_1 features(t) + b_1) + b_2``, the DDPM/ADM/DiT time MLP.

  Ho et al. 2020 (https://arxiv.org/abs/2006.11239) and Peebles & Xie 2023
  (https://arxiv.org/abs/2212.09748) project the sinusoidal embedding with this two-layer MLP.
  """

  def __init__(
    self,
    *,
    features: nnx.Module,
    features_dim: int,
    out_dim: int,
    kernel_init: Callable = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.features = features
    self.dense_1 = nnx.Linear(
      features_dim,
      out_dim,
      kernel_init=kernel_init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.dense_2 = nnx.Linear(
      out_dim, out_dim, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, t: Array) -> Array:
    return self.dense_2(jax.nn.silu(self.dense_1(self.features(t))))


def summed_time_embedding(t: Array, embeddings: Sequence[Callable[[Array], Array]]) -> Array:
  """``emb(t_1, ..., t_k) = sum_i emb_i(t_i)``: each time input through its own embedding.

  MeanFlow conditions its network on two times, ``(t, t - r)``, each with its own positional
  embedding, summed (Geng et al. 2025, the ablation of the time conditioning in Table 1,
  https://arxiv.org/abs/2505.13447); shortcut models embed the time and the step size the same
  way (Frans et al. 2024, https://arxiv.org/abs/2410.12557).

  Args:
    t: ``[batch]`` with one embedding, ``[batch, k]`` with ``k``.
    embeddings: one ``[batch] -> [batch, dim]`` map per time input.

  Returns:
    ``[batch, dim]``.
  """
  if t.ndim == 1:
    (embed,) = embeddings
    return embed(t)
  if t.shape[1] != len(embeddings):
    raise ValueError(f"{t.shape[1]} time inputs for {len(embeddings)} time embeddings")
  out = embeddings[0](t[:, 0])
  for i, embed in enumerate(embeddings[1:], start=1):
    out = out + embed(t[:, i])
  return out


class LabelEmbedding(nnx.Module):
  """A table of ``num_classes + 1`` learned vectors; row ``num_classes`` is the null label.

  The extra row is the unconditional model of classifier-free guidance (Ho & Salimans 2022,
  https://arxiv.org/abs/2207.12598): one network, conditional for labels ``< num_classes`` and
  unconditional for ``num_classes``.
  """

  def __init__(
    self,
    *,
    num_classes: int,
    features: int,
    embedding_init: Callable = nnx.initializers.normal(1.0),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.num_classes = num_classes
    self.embed = nnx.Embed(
      num_classes + 1,
      features,
      embedding_init=embedding_init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, labels: Array) -> Array:
    return self.embed(labels)


def drop_labels(key: Array, labels: Array, *, num_classes: int, drop_prob: float) -> Array:
  """Replaces each label by the null label ``num_classes`` with probability ``drop_prob``.

  ``c' = num_classes if u < drop_prob else c``, ``u ~ U[0, 1)`` per example: the label dropout of
  classifier-free guidance training (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598,
  Algorithm 1, ``p_uncond``).

  Args:
    key: PRNG key.
    labels: ``[batch]`` int labels in ``[0, num_classes)``.
    num_classes: number of real classes; the null label is ``num_classes``.
    drop_prob: probability of dropping each label.

  Returns:
    ``[batch]`` labels, same dtype.
  """
  if isinstance(drop_prob, (int, float)) and not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
  labels = jnp.asarray(labels)
  drop = jax.random.bernoulli(key, drop_prob, labels.shape)
  return jnp.where(drop, jnp.asarray(num_classes, labels.dtype), labels)
