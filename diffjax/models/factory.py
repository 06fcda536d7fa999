"""``create_model``: a model name and its constructor keywords -> pure ``(init, apply)``.

A config's model sub-dict is exactly these keywords (STYLE habit 3)::

  model = dict(name="unet", ch=32, ch_mult=(1, 2), attn_resolutions=(4,))
  fns = create_model(**model, data_shape=(8, 8, 1))
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from diffjax._lookup import lookup
from diffjax.models import dit, mlp, unet
from diffjax.models.pure import ModelFns, functionalize

__all__ = ["MODELS", "create_model", "model_kwargs", "tensor_parallel_problem"]

MODELS: dict[str, type[nnx.Module]] = {
  "mlp": mlp.MLP,
  "unet": unet.UNet,
  "dit": dit.DiT,
}

# Each model's configuration check: pure Python, so a bad config fails before any tracing.
_CHECKS: dict[str, Callable[..., None]] = {
  "mlp": mlp.check_config,
  "unet": unet.check_config,
  "dit": dit.check_config,
}

# Models whose parameters carry tensor-parallel axis names, and the check of a tensor size.
_TENSOR_CHECKS: dict[str, Callable[..., None]] = {
  "dit": dit.check_tensor_parallel,
}


def tensor_parallel_problem(model: dict, *, tensor: int) -> str | None:
  """One line when the model group ``model`` (``config.model``) cannot be split over ``tensor``
  devices, else None; pure Python, run before tracing."""
  if tensor == 1 or model.get("name") not in MODELS:
    return None
  check = _TENSOR_CHECKS.get(model["name"])
  if check is None:
    return (
      f"mesh.tensor={tensor} but model {model['name']!r} has no tensor-parallel layers (only "
      f"{sorted(_TENSOR_CHECKS)} do); set mesh.tensor=1 and use mesh.fsdp to split its parameters"
    )
  try:
    check(tensor=tensor, **{k: v for k, v in model.items() if k != "name"})
  except ValueError as e:
    return str(e)
  return None


# Set by create_model itself, never through **kwargs.
_RESERVED = (
  "data_shape",
  "num_classes",
  "time_inputs",
  "output_heads",
  "dtype",
  "param_dtype",
  "rngs",
)


def model_kwargs(name: str) -> dict[str, object]:
  """The keywords (and defaults) a model accepts through ``create_model(name, **kwargs)``."""
  _check_name(name)
  params = inspect.signature(MODELS[name].__init__).parameters
  return {
    k: p.default
    for k, p in params.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _RESERVED
  }


def _check_name(name: str) -> None:
  lookup(MODELS, name, "model")


def _float_dtype(value, what: str):
  try:
    dtype = jnp.dtype(value)
  except TypeError as err:
    raise ValueError(f"{what}={value!r} is not a dtype; use e.g. 'float32' or 'bfloat16'") from err
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{what}={value!r} must be a floating dtype, e.g. 'float32' or 'bfloat16'")
  return dtype


def create_model(
  name: str,
  *,
  data_shape: tuple[int, ...],
  num_classes: int = 0,
  time_inputs: int = 1,
  output_heads: int = 1,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  **kwargs,
) -> ModelFns:
  """Builds the named model and returns it as pure functions (:class:`ModelFns`).

  The name is resolved once, here, through :data:`MODELS`; the configuration is validated
  before anything is traced, and the module's static structure is computed once, abstractly.

  Args:
    name: one of :data:`MODELS` ("mlp", "unet", "dit").
    data_shape: shape of one example, without the batch axis: ``(2,)`` for 2D toys,
      ``(H, W, C)`` for images (NHWC).
    num_classes: number of classes (0: unconditional). A conditional model embeds
      ``num_classes + 1`` labels; label ``num_classes`` is the null label of classifier-free
      guidance (see :func:`diffjax.models.drop_labels`).
    time_inputs: times per example (1: ``t`` is ``[batch]``; more: ``t`` is ``[batch,
      time_inputs]``, as the objective that needs them says, e.g. MeanFlow's two times).
    output_heads: blocks of the data's channels in the output: its last axis is
      ``output_heads * C`` (``C = data_shape[-1]``), as the objective that reads several
      fields from one network says (SF2M's velocity and score); 1: the input's shape.
    dtype: compute dtype (e.g. ``jnp.bfloat16`` for mixed precision); the output is float32.
    param_dtype: stored parameter dtype (float32 master weights).
    **kwargs: the model's constructor keywords (:func:`model_kwargs` lists them).

  Returns:
    ``ModelFns(init, apply)``.
  """
  _check_name(name)
  valid = model_kwargs(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(
      f"unknown keyword(s) {unknown} for model {name!r}; valid keywords: {sorted(valid)}"
    )
  try:
    data_shape = tuple(int(d) for d in data_shape)
  except TypeError as err:
    raise ValueError(f"data_shape must be a tuple of ints, got {data_shape!r}") from err
  if not data_shape or min(data_shape) < 1:
    raise ValueError(f"data_shape must be a non-empty tuple of positive ints, got {data_shape}")
  if int(num_classes) != num_classes or num_classes < 0:
    raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
  if (
    isinstance(time_inputs, bool)
    or not isinstance(time_inputs, numbers.Integral)
    or time_inputs < 1
  ):
    raise ValueError(f"time_inputs must be an int >= 1, got {time_inputs!r}")
  time_inputs = int(time_inputs)
  if (
    isinstance(output_heads, bool)
    or not isinstance(output_heads, numbers.Integral)
    or output_heads < 1
  ):
    raise ValueError(f"output_heads must be an int >= 1, got {output_heads!r}")
  output_heads = int(output_heads)
  _CHECKS[name](**{**valid, **kwargs, "data_shape": data_shape, "time_inputs": time_inputs})
  build = functools.partial(
    MODELS[name],
    data_shape=data_shape,
    num_classes=int(num_classes),
    time_inputs=time_inputs,
    output_heads=output_heads,
    dtype=_float_dtype(dtype, "dtype"),
    param_dtype=_float_dtype(param_dtype, "param_dtype"),
    **kwargs,
  )
  return functionalize(
    build, data_shape=data_shape, num_classes=int(num_classes), time_inputs=time_inputs
  )
