"""Diffusion Transformer (DiT) with adaLN-Zero conditioning, for NHWC images.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers",
https://arxiv.org/abs/2212.09748 (facebookresearch/DiT ``models.py``):

  patchify: ``p x p`` patches -> linear -> ``hidden_size`` tokens, plus a 2D sin-cos position
    embedding (fixed, or learned and initialised at the sin-cos values);
  conditioning ``c = emb(t) + emb(label)``, with ``emb(t)`` the time MLP on the sinusoidal
    features of ``1000 t`` (DiT's 256 frequencies); a model of several times (``time_inputs >
    1``) gives each its own time MLP and sums them (:func:`summed_time_embedding`);
  ``depth`` blocks, each ``x += g_1 Attn(LN(x) (1 + s_1) + b_1); x += g_2 MLP(LN(x) (1 + s_2)
    + b_2)`` with ``(b_1, s_1, g_1, b_2, s_2, g_2) = W SiLU(c)``, ``W`` zero-initialised
    (adaLN-Zero: every block starts as the identity);
  final layer ``Linear(LN(x) (1 + s) + b)`` (zero-initialised) and unpatchify.

The learned-sigma output channels of the paper are omitted: the output has the input's shape
(``output_heads`` times its channels for an objective that reads several fields).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from diffjax.models.embeddings import (
  LabelEmbedding,
  SinusoidalFeatures,
  TimeEmbedding,
  summed_time_embedding,
)
from diffjax.models.remat import get_remat, partitioned

__all__ = [
  "DiT",
  "DiTBlock",
  "sincos_pos_embed_2d",
  "patchify",
  "unpatchify",
  "check_config",
  "check_tensor_parallel",
]

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def sincos_pos_embed_2d(*, dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2D sin-cos position embedding, ``[grid_h * grid_w, dim]`` (row-major tokens).

  Half the channels embed the row, half the column, each with the 1D embedding
  ``[sin(p w_i), cos(p w_i)]``, ``w_i = 10000^(-i / (dim / 4))`` (Vaswani et al. 2017,
  https://arxiv.org/abs/1706.03762; in 2D as in MAE, He et al. 2021,
  https://arxiv.org/abs/2111.06377, used by DiT). Computed with NumPy: a constant of the shape.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos position embedding needs dim divisible by 4, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

  def embed_1d(pos):
    args = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  rows, cols = np.meshgrid(
    np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
  )
  return np.concatenate([embed_1d(rows), embed_1d(cols)], axis=1).astype(np.float32)


def patchify(x: Array, *, patch_size: int) -> Array:
  """``[B, H, W, C] -> [B, (H/p)(W/p), p p C]``: row-major patches, each flattened (p, q, c)."""
  b, h, w, c = x.shape
  p = patch_size
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, *, patch_size: int, height: int, width: int) -> Array:
  """Inverse of :func:`patchify`: ``[B, (H/p)(W/p), p p C] -> [B, H, W, C]``."""
  b, _, d = tokens.shape
  p = patch_size
  c = d // (p * p)
  x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """``x (1 + scale) + shift`` with per-example ``[B, D]`` modulations over ``[B, N, D]``."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dim: int, *, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # No affine parameters (adaLN supplies scale and shift); computes and returns float32 because
  # the variance of bfloat16 activations is too coarse.
  return nnx.LayerNorm(
    dim,
    epsilon=1e-6,
    use_bias=False,
    use_scale=False,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class DiTBlock(nnx.Module):
  """One adaLN-Zero transformer block (DiT Fig. 3, right); see the module docstring."""

  def __init__(
    self,
    hidden_size: int,
    *,
    num_heads: int,
    mlp_ratio: float,
    dropout: float,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mlp_hidden = int(hidden_size * mlp_ratio)
    self.num_heads = num_heads
    self.norm_1 = _layer_norm(hidden_size, param_dtype=param_dtype, rngs=rngs)
    # Logical axis names (metadata only; train/sharding maps "heads" and "mlp" to the tensor
    # axis): q, k, v and the MLP hidden layer are column-parallel, their output projections
    # row-parallel (Megatron-LM, https://arxiv.org/abs/1909.08053). The qkv columns are stored
    # as (q | k | v) x heads, the layout trained checkpoints hold, so a tensor split of them is
    # head-aligned only after one reshuffle per block, which XLA inserts.
    self.qkv = nnx.Linear(
      hidden_size,
      3 * hidden_size,
      kernel_init=partitioned(_xavier, ("embed", "heads")),
      bias_init=partitioned(_zeros, ("heads",)),
      **kw,
    )
    self.attn_out = nnx.Linear(
      hidden_size, hidden_size, kernel_init=partitioned(_xavier, ("heads", "embed")), **kw
    )
    self.norm_2 = _layer_norm(hidden_size, param_dtype=param_dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(
      hidden_size,
      mlp_hidden,
      kernel_init=partitioned(_xavier, ("embed", "mlp")),
      bias_init=partitioned(_zeros, ("mlp",)),
      **kw,
    )
    self.mlp_out = nnx.Linear(
      mlp_hidden, hidden_size, kernel_init=partitioned(_xavier, ("mlp", "embed")), **kw
    )
    self.dropout = nnx.Dropout(dropout)
    self.ada_ln = nnx.Linear(hidden_size, 6 * hidden_size, kernel_init=_zeros, **kw)

  def __call__(self, x: Array, c: Array, *, rngs: nnx.Rngs | None) -> Array:
    b, n, d = x.shape
    shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = jnp.split(
      self.ada_ln(jax.nn.silu(c)), 6, axis=-1
    )
    h = self.qkv(_modulate(self.norm_1(x), shift_1, scale_1))
    q, k, v = jnp.split(h.reshape(b, n, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
    # Logits and softmax run in float32 inside dot_product_attention for bfloat16 inputs.
    h = self.attn_out(jax.nn.dot_product_attention(q, k, v).reshape(b, n, d))
    h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
    x = x + gate_1[:, None, :] * h
    h = jax.nn.gelu(self.mlp_in(_modulate(self.norm_2(x), shift_2, scale_2)), approximate=True)
    h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
    return x + gate_2[:, None, :] * self.mlp_out(h)


def check_config(
  *, data_shape, patch_size, hidden_size, num_heads, depth, dropout, remat="none", **_
) -> None:
  """Raises a ValueError naming the bad value and the fix; pure Python, run before tracing."""
  get_remat(remat)
  data_shape = tuple(data_shape)
  if len(data_shape) != 3:
    raise ValueError(
      f"DiT needs image data_shape (H, W, C), got {data_shape}; use the 'mlp' model for vector data"
    )
  height, width, _ = data_shape
  if patch_size < 1 or height % patch_size or width % patch_size:
    raise ValueError(
      f"DiT patch_size={patch_size} must divide the image height {height} and "
      f"width {width}; choose a patch_size that divides both"
    )
  if hidden_size % num_heads:
    raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
  if hidden_size % 4:
    raise ValueError(
      f"hidden_size={hidden_size} must be divisible by 4 (2D sin-cos position embedding)"
    )
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


def check_tensor_parallel(*, tensor, num_heads=6, hidden_size=384, mlp_ratio=4.0, **_) -> None:
  """Raises a ValueError unless ``tensor`` devices can split the heads and the MLP hidden layer
  (each device computes ``num_heads / tensor`` heads and ``mlp_ratio hidden / tensor`` units)."""
  mlp_hidden = int(hidden_size * mlp_ratio)
  if num_heads % tensor:
    raise ValueError(
      f"mesh.tensor={tensor} does not divide model.num_heads={num_heads}; choose a mesh.tensor "
      "that divides the number of heads"
    )
  if mlp_hidden % tensor:
    raise ValueError(
      f"mesh.tensor={tensor} does not divide the MLP width {mlp_hidden} (model.hidden_size x "
      "model.mlp_ratio); choose a mesh.tensor that divides it"
    )


class DiT(nnx.Module):
  """Diffusion Transformer; see the module docstring.

  Args:
    data_shape: ``(H, W, C)``, H and W divisible by ``patch_size``.
    num_classes: number of classes (0: unconditional).
    time_inputs: times per example (1: ``t`` is ``[batch]``; more: ``[batch, time_inputs]``,
      each time embedded on its own and the embeddings summed).
    output_heads: blocks of the data's channels in the output (``output_heads * C`` channels;
      1: the output has the input's shape).
    patch_size: side ``p`` of the square patches.
    hidden_size: token width.
    depth: number of transformer blocks.
    num_heads: attention heads (divides ``hidden_size``).
    mlp_ratio: MLP hidden width / ``hidden_size``.
    learn_pos_embed: learn the position embedding (initialised at the sin-cos values) instead
      of keeping it fixed.
    dropout: dropout on the attention output and MLP hidden layer (0 in the paper).
    remat: rematerialisation of each block in the backward pass, a name in
      :data:`diffjax.models.remat.REMAT_POLICIES` ("none", "dots_saveable", "full").
    time_features_dim: size of the sinusoidal time features (256 in the paper).
    dtype: compute dtype; param_dtype: stored parameter dtype.

  Defaults are DiT-S/2 (hidden 384, depth 12, 6 heads, p = 2).
  """

  def __init__(
    self,
    *,
    data_shape: tuple[int, int, int],
    num_classes: int = 0,
    time_inputs: int = 1,
    output_heads: int = 1,
    patch_size: int = 2,
    hidden_size: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    learn_pos_embed: bool = False,
    dropout: float = 0.0,
    time_features_dim: int = 256,
    remat: str = "none",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    data_shape = tuple(data_shape)
    check_config(
      data_shape=data_shape,
      patch_size=patch_size,
      hidden_size=hidden_size,
      num_heads=num_heads,
      depth=depth,
      dropout=dropout,
      remat=remat,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # A block as a function of (block, h, c, rngs), rematerialised as `remat` says.
    self.block_fn = get_remat(remat)(lambda block, h, c, rngs: block(h, c, rngs=rngs))
    height, width, channels = data_shape
    self.data_shape = data_shape
    self.patch_size = patch_size
    self.hidden_size = hidden_size
    # Patch embedding as in DiT: a p x p stride-p conv, Xavier-initialised as the flattened
    # [hidden, p p C] matrix (fan_in = p p C, fan_out = hidden).
    self.patch_embed = nnx.Conv(
      channels,
      hidden_size,
      (patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      kernel_init=nnx.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
      ),
      **kw,
    )
    self.pos_embed = (
      None if not learn_pos_embed else nnx.Param(jnp.asarray(self._fixed_pos_embed(), param_dtype))
    )
    normal = nnx.initializers.normal(0.02)
    time_embed = lambda: TimeEmbedding(
      features=SinusoidalFeatures(dim=time_features_dim),
      features_dim=time_features_dim,
      out_dim=hidden_size,
      kernel_init=normal,
      **kw,
    )
    self.time_embed = time_embed()
    # None for one time input, so its parameters are exactly those of the one-time model.
    self.extra_time_embeds = (
      None if time_inputs == 1 else nnx.List([time_embed() for _ in range(time_inputs - 1)])
    )
    self.label_embed = (
      None
      if num_classes == 0
      else LabelEmbedding(
        num_classes=num_classes, features=hidden_size, embedding_init=normal, **kw
      )
    )
    self.blocks = nnx.List(
      [
        DiTBlock(hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout, **kw)
        for _ in range(depth)
      ]
    )
    self.norm_out = _layer_norm(hidden_size, param_dtype=param_dtype, rngs=rngs)
    self.ada_ln_out = nnx.Linear(hidden_size, 2 * hidden_size, kernel_init=_zeros, **kw)
    # The output projection computes in float32 (the regression target is read at full
    # precision) and starts at zero (adaLN-Zero).
    self.out = nnx.Linear(
      hidden_size,
      patch_size * patch_size * channels * output_heads,
      kernel_init=_zeros,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def _fixed_pos_embed(self) -> np.ndarray:
    height, width, _ = self.data_shape
    return sincos_pos_embed_2d(
      dim=self.hidden_size, grid_h=height // self.patch_size, grid_w=width // self.patch_size
    )

  def __call__(
    self, x: Array, t: Array, cond: Array | None, *, rngs: nnx.Rngs | None = None
  ) -> Array:
    b = x.shape[0]
    height, width, _ = self.data_shape
    tokens = self.patch_embed(x).reshape(b, -1, self.hidden_size)
    pos = self._fixed_pos_embed() if self.pos_embed is None else self.pos_embed[...]
    # Keep the residual stream in the compute dtype (the float32 table would promote it).
    h = (tokens + jnp.asarray(pos)[None]).astype(tokens.dtype)
    c = summed_time_embedding(t, [self.time_embed, *(self.extra_time_embeds or ())])
    if self.label_embed is not None:
      c = c + self.label_embed(cond)
    for block in self.blocks:
      h = self.block_fn(block, h, c, rngs)
    shift, scale = jnp.split(self.ada_ln_out(jax.nn.silu(c)), 2, axis=-1)
    out = self.out(_modulate(self.norm_out(h), shift, scale))
    return unpatchify(out, patch_size=self.patch_size, height=height, width=width)
