"""Flax NNX models, handed to the rest of diffjax as pure ``(init, apply)`` pairs.

``create_model(name, data_shape=..., **kwargs)`` -> :class:`ModelFns`; ``params = init(key)``,
``apply(params, x_t, t, cond=None, *, dropout_key=None)``. Models: "mlp" (TorchCFM's 2D MLP),
"unet" (DDPM/ADM), "dit" (Peebles & Xie 2023).
"""

from __future__ import annotations

from diffjax.models.dit import DiT
from diffjax.models.embeddings import (
  FourierFeatures,
  LabelEmbedding,
  SinusoidalFeatures,
  TimeEmbedding,
  drop_labels,
  fourier_features,
  get_time_features,
  sinusoidal_embedding,
)
from diffjax.models.factory import MODELS, create_model, model_kwargs, tensor_parallel_problem
from diffjax.models.mlp import MLP, get_activation
from diffjax.models.pure import ModelFns, functionalize, num_params
from diffjax.models.unet import UNet

__all__ = [
  "MODELS",
  "create_model",
  "model_kwargs",
  "tensor_parallel_problem",
  "ModelFns",
  "functionalize",
  "num_params",
  "drop_labels",
  "MLP",
  "UNet",
  "DiT",
  "get_activation",
  "sinusoidal_embedding",
  "fourier_features",
  "get_time_features",
  "SinusoidalFeatures",
  "FourierFeatures",
  "TimeEmbedding",
  "LabelEmbedding",
]
