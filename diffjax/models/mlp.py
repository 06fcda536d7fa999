"""A plain MLP for low-dimensional data; the default is TorchCFM's 2D network.

TorchCFM (Tong et al. 2024, https://arxiv.org/abs/2302.00482; torchcfm/models/models.py ``MLP``)
trains its 2D flows with::

  Linear(dim + 1, 64) SELU Linear(64, 64) SELU Linear(64, 64) SELU Linear(64, dim)

on ``concat(x, t)``. ``MLP(data_shape=(2,))`` is exactly that network (8,706 parameters), with
PyTorch's default ``nn.Linear`` initialisation. Data of any shape is flattened to a vector. A model
of several times (``time_inputs > 1``, e.g. MeanFlow's ``u(z, t, s)``) takes them the same way,
``concat(x, t, s)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from diffjax._lookup import lookup
from diffjax.models.embeddings import TIME_FEATURES, LabelEmbedding, get_time_features

__all__ = ["MLP", "ACTIVATIONS", "get_activation", "check_config"]


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "selu": jax.nn.selu,
  "silu": jax.nn.silu,
  "relu": jax.nn.relu,
  "gelu": jax.nn.gelu,
  "elu": jax.nn.elu,
  "tanh": jnp.tanh,
  "softplus": jax.nn.softplus,
  "leaky_relu": jax.nn.leaky_relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Resolves an activation by name (once, at construction)."""
  return lookup(ACTIVATIONS, name, "activation")


def _torch_linear_init(fan_in: int) -> tuple[Callable, Callable]:
  """PyTorch's ``nn.Linear`` default: kernel and bias ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  ``kaiming_uniform_(a=sqrt(5))`` has bound ``sqrt(6 / ((1 + a^2) fan_in)) = 1/sqrt(fan_in)``,
  i.e. a variance scaling of ``1/3`` (https://github.com/pytorch/pytorch/issues/57109).
  """
  bound = 1.0 / math.sqrt(fan_in)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


def check_config(
  *, width, depth, activation, time_varying, time_features, dropout, time_inputs=1, **_
) -> None:
  """Raises a ValueError naming the bad value and the fix; pure Python, run before tracing."""
  if time_inputs > 1 and not time_varying:
    raise ValueError(
      f"time_varying=False, but the objective gives the model {time_inputs} times per "
      "example (time_inputs); set time_varying=True"
    )
  if width < 1 or depth < 1:
    raise ValueError(f"MLP needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
  get_activation(activation)
  if time_features is not None:
    lookup(TIME_FEATURES, time_features, "time features", hint=" or None (raw t)")
    if not time_varying:
      raise ValueError(
        f"time_features={time_features!r} needs time_varying=True; set "
        "time_varying=True or time_features=None"
      )
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


class MLP(nnx.Module):
  """``f(x, t, c) = W_L a(... a(W_1 [x, tfeat(t), e(c)] + b_1) ...) + b_L``.

  Inputs are concatenated: the flattened data, then the time (``t`` itself when
  ``time_features`` is None, as TorchCFM's ``time_varying=True``; else ``time_features(t)``; with
  ``time_inputs > 1`` each time in turn, ``t`` being ``[batch, time_inputs]``), then a learned
  class embedding when ``num_classes > 0``. ``depth`` hidden layers of ``width``
  units, each followed by ``activation`` and dropout, then a linear output layer.

  Args:
    data_shape: shape of one example (flattened internally).
    num_classes: number of classes; 0 for an unconditional model.
    time_inputs: times per example (1: ``t`` is ``[batch]``; more: ``[batch, time_inputs]``).
    output_heads: blocks of the data's channels in the output (its last axis is
      ``output_heads * C``, e.g. SF2M's velocity and score; 1: the output has the input's shape).
    width: hidden width (TorchCFM ``w``).
    depth: number of hidden layers.
    activation: a name in :data:`ACTIVATIONS`.
    time_varying: whether ``t`` is an input at all (TorchCFM's flag).
    time_features: None (raw ``t``) or a name in ``TIME_FEATURES`` ("sinusoidal": of ``1000 t``;
      "fourier": Gaussian Fourier features of ``t``).
    time_features_dim: size of the time features when ``time_features`` is set.
    class_embed_dim: size of the class embedding concatenated to the input.
    dropout: dropout rate after each hidden activation.
    torch_init: PyTorch ``nn.Linear`` initialisation (True) or LeCun normal (flax default).
    dtype: compute dtype; param_dtype: stored parameter dtype.
  """

  def __init__(
    self,
    *,
    data_shape: tuple[int, ...],
    num_classes: int = 0,
    time_inputs: int = 1,
    output_heads: int = 1,
    width: int = 64,
    depth: int = 3,
    activation: str = "selu",
    time_varying: bool = True,
    time_features: str | None = None,
    time_features_dim: int = 32,
    class_embed_dim: int = 16,
    dropout: float = 0.0,
    torch_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_config(
      width=width,
      depth=depth,
      activation=activation,
      time_varying=time_varying,
      time_features=time_features,
      dropout=dropout,
      time_inputs=time_inputs,
    )
    self.data_shape = tuple(data_shape)
    self.activation = get_activation(activation)
    self.time_varying = time_varying
    self.num_classes = num_classes
    self.output_heads = output_heads
    data_dim = math.prod(self.data_shape)

    in_dim = data_dim
    if time_varying:
      in_dim += time_inputs * (1 if time_features is None else time_features_dim)
    self.time_features = (
      None
      if time_features is None or not time_varying
      else get_time_features(time_features, dim=time_features_dim)
    )
    self.label_embed = (
      None
      if num_classes == 0
      else LabelEmbedding(
        num_classes=num_classes,
        features=class_embed_dim,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
    )
    if num_classes > 0:
      in_dim += class_embed_dim

    sizes = [in_dim] + [width] * depth + [data_dim * output_heads]
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      inits = {}
      if torch_init:
        inits["kernel_init"], inits["bias_init"] = _torch_linear_init(fan_in)
      # The output layer computes in float32: its output is the regression target (noise,
      # velocity), which bfloat16's 8-bit mantissa would round to ~0.4%.
      last = i == len(sizes) - 2
      layers.append(
        nnx.Linear(
          fan_in,
          fan_out,
          dtype=jnp.float32 if last else dtype,
          param_dtype=param_dtype,
          rngs=rngs,
          **inits,
        )
      )
    self.layers = nnx.List(layers)
    self.dropout = nnx.Dropout(dropout)

  def __call__(
    self, x: Array, t: Array, cond: Array | None, *, rngs: nnx.Rngs | None = None
  ) -> Array:
    batch = x.shape[0]
    h = [x.reshape(batch, -1)]
    if self.time_varying:
      # [batch] for one time input, [batch, k] for k: one column per time either way.
      times = t.reshape(batch, -1)
      for i in range(times.shape[1]):
        column = times[:, i]
        if self.time_features is None:
          h.append(column[:, None].astype(x.dtype))
        else:
          h.append(self.time_features(column).astype(x.dtype))
    if self.label_embed is not None:
      h.append(self.label_embed(cond).astype(x.dtype))
    h = jnp.concatenate(h, axis=-1)
    for layer in self.layers[:-1]:
      h = self.dropout(self.activation(layer(h)), deterministic=rngs is None, rngs=rngs)
    return self.layers[-1](h).reshape(*x.shape[:-1], x.shape[-1] * self.output_heads)
