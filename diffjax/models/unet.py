"""The DDPM / ADM U-Net for NHWC images.

Ho et al. 2020 (DDPM, https://arxiv.org/abs/2006.11239, App. B; diffusion/models/unet.py) with
the options of Dhariwal & Nichol 2021 (ADM, https://arxiv.org/abs/2105.05233): multi-head
attention, adaptive GroupNorm ("scale-shift norm"), class embedding added to the time embedding.

Layout, for ``ch_mult = (m_0, ..., m_{L-1})`` and input resolution ``R``::

  conv_in 3x3 -> ch
  level l (resolution R / 2^l): num_res_blocks x [ResBlock -> ch m_l (+ attention if the
    resolution is in attn_resolutions)], then a stride-2 downsample except at the last level
  middle: ResBlock, attention, ResBlock
  level l reversed: (num_res_blocks + 1) x [concat skip, ResBlock -> ch m_l (+ attention)],
    then a nearest-neighbour x2 upsample + conv except at level 0
  GroupNorm, SiLU, conv 3x3 -> C (zero-initialised)

The time embedding is ``TimeEmbedding`` of the sinusoidal features of ``1000 t`` (so a time in
``[0, 1]`` is read like DDPM's step index in ``[0, 1000)``), width ``4 ch``; a model of several
times (``time_inputs > 1``) gives each its own and sums them (:func:`summed_time_embedding`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from diffjax.models.embeddings import (
  LabelEmbedding,
  SinusoidalFeatures,
  TimeEmbedding,
  summed_time_embedding,
)
from diffjax.models.remat import get_remat

__all__ = ["UNet", "ResBlock", "AttentionBlock", "num_groups", "check_config"]

# DDPM's default_init(scale=1): variance scaling, fan_avg, uniform (= Glorot uniform).
_default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zeros = nnx.initializers.zeros_init()


def num_groups(channels: int) -> int:
  """GroupNorm groups: ``gcd(32, channels // 2)``: 32 for DDPM's widths, >= 2 channels a group.

  Wu & He 2018 (https://arxiv.org/abs/1803.08494) and DDPM use 32 groups (128 channels: 4 per
  group). Narrow U-Nets need fewer: with one channel per group GroupNorm becomes InstanceNorm,
  which removes any per-channel constant, so the time and class embedding that DDPM's ResBlock
  adds just before its second norm would be cancelled exactly and the output would not depend on
  ``t``. Two or more channels per group keep it (as differences within a group).
  """
  return math.gcd(32, max(channels // 2, 1))


def _group_norm(channels: int, *, param_dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Normalisation computes and returns float32: the mean/variance of bfloat16 activations lose
  # most of their mantissa, and the next conv casts back to the compute dtype anyway.
  return nnx.GroupNorm(
    channels,
    num_groups=num_groups(channels),
    epsilon=1e-6,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    rngs=rngs,
  )


class ResBlock(nnx.Module):
  """``x + conv2(drop(SiLU(GN(conv1(SiLU(GN(x))) + W e))))`` with ``e = SiLU(emb)``.

  DDPM's ``resnet_block``; with ``scale_shift_norm`` the embedding modulates the second norm
  instead, ``GN(h) (1 + s) + b`` with ``(s, b) = W e`` (ADM, Sec. 3; FiLM). The skip is a 1x1
  conv when the channel count changes; ``conv2`` starts at zero, so the block starts as the
  identity (DDPM ``init_scale=0``).
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    *,
    emb_dim: int,
    dropout: float,
    scale_shift_norm: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.scale_shift_norm = scale_shift_norm
    self.norm_1 = _group_norm(in_ch, param_dtype=param_dtype, rngs=rngs)
    self.conv_1 = nnx.Conv(in_ch, out_ch, (3, 3), kernel_init=_default_init, **kw)
    self.emb_proj = nnx.Linear(
      emb_dim, out_ch * (2 if scale_shift_norm else 1), kernel_init=_default_init, **kw
    )
    self.norm_2 = _group_norm(out_ch, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv_2 = nnx.Conv(out_ch, out_ch, (3, 3), kernel_init=_zeros, **kw)
    self.skip = (
      None if in_ch == out_ch else nnx.Conv(in_ch, out_ch, (1, 1), kernel_init=_default_init, **kw)
    )

  def __call__(self, x: Array, emb: Array, *, rngs: nnx.Rngs | None) -> Array:
    h = self.conv_1(jax.nn.silu(self.norm_1(x)))
    e = self.emb_proj(jax.nn.silu(emb))[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self.norm_2(h) * (1 + scale) + shift
    else:
      h = self.norm_2(h + e)
    h = self.dropout(jax.nn.silu(h), deterministic=rngs is None, rngs=rngs)
    h = self.conv_2(h)
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class AttentionBlock(nnx.Module):
  """``x + W_o MHA(GN(x))``: multi-head self-attention over all ``H W`` positions.

  ``softmax(q k^T / sqrt(d_head)) v`` per head (Vaswani et al. 2017,
  https://arxiv.org/abs/1706.03762); DDPM's ``attn_block`` is the one-head case. ``W_o`` starts
  at zero (DDPM ``init_scale=0``).
  """

  def __init__(self, channels: int, *, num_heads: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.norm = _group_norm(channels, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(channels, 3 * channels, kernel_init=_default_init, **kw)
    self.out = nnx.Linear(channels, channels, kernel_init=_zeros, **kw)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    qkv = self.qkv(self.norm(x).reshape(b, h * w, c))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * self.num_heads, c // self.num_heads), 3, axis=2)
    # Logits and softmax run in float32 inside dot_product_attention for bfloat16 inputs.
    o = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
    return x + self.out(o).reshape(b, h, w, c)


class _Downsample(nnx.Module):
  """Halves the resolution: 3x3 conv with stride 2 (DDPM), or 2x2 average pooling."""

  def __init__(self, channels: int, *, with_conv: bool, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = (
      None
      if not with_conv
      else nnx.Conv(
        channels,
        channels,
        (3, 3),
        strides=(2, 2),
        kernel_init=_default_init,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
    )

  def __call__(self, x: Array) -> Array:
    if self.conv is not None:
      return self.conv(x)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class _Upsample(nnx.Module):
  """Doubles the resolution: nearest neighbour, then a 3x3 conv (DDPM)."""

  def __init__(self, channels: int, *, with_conv: bool, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = (
      None
      if not with_conv
      else nnx.Conv(
        channels,
        channels,
        (3, 3),
        kernel_init=_default_init,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
    )

  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x if self.conv is None else self.conv(x)


class _Level(nnx.Module):
  """One resolution of the U: residual blocks, optional attention after each, optional resample."""

  def __init__(self, blocks: list, attentions: list, resample: nnx.Module | None):
    self.blocks = nnx.List(blocks)
    self.attentions = nnx.List(attentions)
    self.resample = resample


def check_config(
  *,
  data_shape,
  ch,
  ch_mult,
  num_res_blocks,
  attn_resolutions,
  num_heads,
  dropout,
  remat="none",
  **_,
) -> None:
  """Raises a ValueError naming the bad value and the fix; pure Python, run before tracing."""
  get_remat(remat)
  data_shape, ch_mult = tuple(data_shape), tuple(ch_mult)
  attn_resolutions = tuple(attn_resolutions)
  if len(data_shape) != 3:
    raise ValueError(
      f"UNet needs image data_shape (H, W, C), got {data_shape}; use the 'mlp' "
      "model for vector data"
    )
  height, width, _ = data_shape
  factor = 2 ** (len(ch_mult) - 1)
  if not ch_mult or height % factor or width % factor:
    raise ValueError(
      f"UNet with ch_mult={ch_mult} downsamples {len(ch_mult) - 1} times, so H "
      f"and W must be divisible by {factor}; got data_shape={data_shape}. Use "
      "fewer levels or pad the images"
    )
  resolutions = [height // 2**i for i in range(len(ch_mult))]
  unused = sorted(set(attn_resolutions) - set(resolutions))
  if unused:
    raise ValueError(
      f"attn_resolutions {unused} never occur; this UNet's resolutions are {resolutions}"
    )
  for level, mult in enumerate(ch_mult):
    channels = ch * mult
    if resolutions[level] in attn_resolutions and channels % num_heads:
      raise ValueError(
        f"num_heads={num_heads} does not divide the {channels} channels at "
        f"resolution {resolutions[level]}; choose a divisor"
      )
  if num_res_blocks < 1:
    raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


class UNet(nnx.Module):
  """DDPM/ADM U-Net ``eps_theta(x_t, t, c)``; see the module docstring for the layout.

  Args:
    data_shape: ``(H, W, C)``; H and W divisible by ``2 ** (len(ch_mult) - 1)``.
    num_classes: number of classes (0: unconditional); the label embedding is added to the time
      embedding (ADM).
    time_inputs: times per example (1: ``t`` is ``[batch]``; more: ``[batch, time_inputs]``,
      each time embedded on its own and the embeddings summed).
    output_heads: blocks of the data's channels in the output (``output_heads * C`` channels;
      1: the output has the input's shape).
    ch: base channel count.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: spatial sizes (height) at which attention follows each block.
    dropout: dropout rate inside residual blocks (DDPM uses 0.1 on CIFAR-10).
    num_heads: attention heads.
    scale_shift_norm: ADM's adaptive GroupNorm instead of adding the embedding.
    resample_with_conv: convolutions in down/up-sampling (DDPM) or plain pooling/repeat.
    remat: rematerialisation of each residual and attention block in the backward pass, a name
      in :data:`diffjax.models.remat.REMAT_POLICIES` ("none", "dots_saveable", "full").
    dtype: compute dtype; param_dtype: stored parameter dtype.

  Digits (8x8x1): ``ch=32, ch_mult=(1, 2), attn_resolutions=(4,)``. CIFAR-10 (DDPM):
  ``ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1`` (35.7M parameters).
  """

  def __init__(
    self,
    *,
    data_shape: tuple[int, int, int],
    num_classes: int = 0,
    time_inputs: int = 1,
    output_heads: int = 1,
    ch: int = 128,
    ch_mult: tuple[int, ...] = (1, 2, 2, 2),
    num_res_blocks: int = 2,
    attn_resolutions: tuple[int, ...] = (16,),
    dropout: float = 0.1,
    num_heads: int = 1,
    scale_shift_norm: bool = False,
    resample_with_conv: bool = True,
    remat: str = "none",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    data_shape, ch_mult = tuple(data_shape), tuple(ch_mult)
    attn_resolutions = tuple(attn_resolutions)
    check_config(
      data_shape=data_shape,
      ch=ch,
      ch_mult=ch_mult,
      num_res_blocks=num_res_blocks,
      attn_resolutions=attn_resolutions,
      num_heads=num_heads,
      dropout=dropout,
      remat=remat,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The blocks as functions of (block, inputs), rematerialised as `remat` says.
    wrap = get_remat(remat)
    self.res_fn = wrap(lambda block, h, emb, rngs: block(h, emb, rngs=rngs))
    self.attn_fn = wrap(lambda attention, h: attention(h))
    emb_dim = 4 * ch
    block_kw = dict(emb_dim=emb_dim, dropout=dropout, scale_shift_norm=scale_shift_norm, **kw)
    attn_kw = dict(num_heads=num_heads, **kw)
    resample_kw = dict(with_conv=resample_with_conv, **kw)

    time_embed = lambda: TimeEmbedding(
      features=SinusoidalFeatures(dim=ch), features_dim=ch, out_dim=emb_dim, **kw
    )
    self.time_embed = time_embed()
    # None for one time input, so its parameters are exactly those of the one-time model.
    self.extra_time_embeds = (
      None if time_inputs == 1 else nnx.List([time_embed() for _ in range(time_inputs - 1)])
    )
    self.label_embed = (
      None if num_classes == 0 else LabelEmbedding(num_classes=num_classes, features=emb_dim, **kw)
    )
    self.conv_in = nnx.Conv(data_shape[-1], ch, (3, 3), kernel_init=_default_init, **kw)

    resolution, in_ch, skip_chs = data_shape[0], ch, [ch]
    down = []
    for level, mult in enumerate(ch_mult):
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(in_ch, ch * mult, **block_kw))
        in_ch = ch * mult
        if resolution in attn_resolutions:
          attns.append(AttentionBlock(in_ch, **attn_kw))
        skip_chs.append(in_ch)
      resample = None
      if level != len(ch_mult) - 1:
        resample = _Downsample(in_ch, **resample_kw)
        skip_chs.append(in_ch)
        resolution //= 2
      down.append(_Level(blocks, attns, resample))
    self.down = nnx.List(down)

    self.mid_block_1 = ResBlock(in_ch, in_ch, **block_kw)
    self.mid_attn = AttentionBlock(in_ch, **attn_kw)
    self.mid_block_2 = ResBlock(in_ch, in_ch, **block_kw)

    up = []
    for level, mult in reversed(list(enumerate(ch_mult))):
      blocks, attns = [], []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResBlock(in_ch + skip_chs.pop(), ch * mult, **block_kw))
        in_ch = ch * mult
        if resolution in attn_resolutions:
          attns.append(AttentionBlock(in_ch, **attn_kw))
      resample = None
      if level != 0:
        resample = _Upsample(in_ch, **resample_kw)
        resolution *= 2
      up.append(_Level(blocks, attns, resample))
    self.up = nnx.List(up)

    self.norm_out = _group_norm(in_ch, param_dtype=param_dtype, rngs=rngs)
    # The output conv computes in float32 (the regression target is read at full precision)
    # and starts at zero, so the initial prediction is 0 (DDPM init_scale=0).
    self.conv_out = nnx.Conv(
      in_ch,
      data_shape[-1] * output_heads,
      (3, 3),
      kernel_init=_zeros,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(
    self, x: Array, t: Array, cond: Array | None, *, rngs: nnx.Rngs | None = None
  ) -> Array:
    emb = summed_time_embedding(t, [self.time_embed, *(self.extra_time_embeds or ())])
    if self.label_embed is not None:
      emb = emb + self.label_embed(cond)
    h = self.conv_in(x)
    skips = [h]
    for level in self.down:
      for i, block in enumerate(level.blocks):
        h = self.res_fn(block, h, emb, rngs)
        if len(level.attentions):
          h = self.attn_fn(level.attentions[i], h)
        skips.append(h)
      if level.resample is not None:
        h = level.resample(h)
        skips.append(h)
    h = self.res_fn(self.mid_block_1, h, emb, rngs)
    h = self.res_fn(self.mid_block_2, self.attn_fn(self.mid_attn, h), emb, rngs)
    for level in self.up:
      for i, block in enumerate(level.blocks):
        h = self.res_fn(
          block, jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1), emb, rngs
        )
        if len(level.attentions):
          h = self.attn_fn(level.attentions[i], h)
      if level.resample is not None:
        h = level.resample(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))
