"""Tests of diffjax.models: the pure (init, apply) contract, architectures, precision, embeddings.

Budget. XLA's CPU compile time, not arithmetic, dominates: it grows with the number of layers,
and every random initializer or dropout mask compiles its own threefry kernel (~0.2 s each). So
the models are tiny, each model's variants (other t, other labels, gradients, receptive field)
share one batch in one jitted probe, and checks run in NumPy on the fetched results. The full
contract of the U-Net (whose init and probe compile for ~30 s) runs in the slow suite; the fast
suite checks its forward/backward, conditioning, receptive field and bf16 jaxpr.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import models
from diffjax.models import dit as dit_lib

NUM_CLASSES = 3
BATCH = 4  # labels 0..3 cover every row of the (num_classes + 1)-row label table

_DIGITS_UNET = dict(
  ch=16, ch_mult=(1, 2), attn_resolutions=(4,), num_res_blocks=1, dropout=0.2, num_heads=2
)
_FULL = dict(init=True, dropout=True, bf16=True)
# (model, data shape, constructor keywords, which parts of the contract run).
CASES = {
  "mlp-2": ("mlp", (2,), dict(dropout=0.2), _FULL),
  "mlp-8x8x1": (
    "mlp",
    (8, 8, 1),
    dict(dropout=0.2, time_features="sinusoidal"),
    dict(init=False, dropout=True, bf16=True),
  ),
  "mlp-16x16x3": (
    "mlp",
    (16, 16, 3),
    dict(dropout=0.2, time_features="fourier", width=32, depth=2, activation="silu"),
    dict(init=False, dropout=True, bf16=True),
  ),
  "unet-8x8x1": ("unet", (8, 8, 1), _DIGITS_UNET, dict(init=False, dropout=False, bf16=False)),
  "dit-8x8x1": (
    "dit",
    (8, 8, 1),
    dict(hidden_size=32, depth=1, num_heads=2, patch_size=2, dropout=0.2, time_features_dim=32),
    _FULL,
  ),
}
SLOW_CASES = {
  "unet-8x8x1": ("unet", (8, 8, 1), _DIGITS_UNET, _FULL),
  "unet-16x16x3": (
    "unet",
    (16, 16, 3),
    dict(
      ch=16,
      ch_mult=(1, 2),
      attn_resolutions=(8,),
      num_res_blocks=1,
      dropout=0.2,
      scale_shift_norm=True,
      resample_with_conv=False,
    ),
    _FULL,
  ),
  "dit-16x16x3": (
    "dit",
    (16, 16, 3),
    dict(
      hidden_size=32,
      depth=2,
      num_heads=4,
      patch_size=4,
      dropout=0.2,
      learn_pos_embed=True,
      time_features_dim=32,
    ),
    _FULL,
  ),
}
# The output layer of each family: zero-initialised in the UNet and DiT.
FINAL_LAYER = {"unet": "['conv_out']", "dit": "['out']"}


def _flat(tree) -> dict[str, np.ndarray]:
  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _perturb(params, seed, scale=0.05):
  """Adds N(0, scale^2) to every leaf, so zero-initialised layers pass gradients and signal.

  NumPy draws: one jax.random call per leaf shape would compile a kernel per leaf.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape).astype(p.dtype), params
  )


def _relative_error(a, b) -> float:
  return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _differs(a, b) -> bool:
  return float(np.abs(a - b).max()) > 1e-4 * float(np.abs(b).max())


def _dtypes_of(jaxpr, primitives) -> list:
  """Input dtypes of the given primitives anywhere in a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in primitives:
      found.append(eqn.invars[0].aval.dtype)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _dtypes_of(sub, primitives)
  return found


def _check_model(name, shape, kwargs, parts):
  """The contract of one model, with one jitted probe for all of its variants."""
  fns = models.create_model(name, data_shape=shape, num_classes=NUM_CLASSES, **kwargs)
  fns16 = models.create_model(
    name,
    data_shape=shape,
    num_classes=NUM_CLASSES,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    **kwargs,
  )
  abstract = jax.eval_shape(fns.init, jax.random.key(0))
  abstract16 = jax.eval_shape(fns16.init, jax.random.key(0))
  # bf16 compute keeps float32 master weights: same tree, float32 leaves.
  assert jax.tree.structure(abstract) == jax.tree.structure(abstract16)
  for a, a16 in zip(jax.tree.leaves(abstract), jax.tree.leaves(abstract16)):
    assert a.dtype == a16.dtype == jnp.float32 and a.shape == a16.shape

  if parts["init"]:
    # init: pure, deterministic in the key, matching its abstract evaluation.
    init = jax.jit(fns.init)
    params = init(jax.random.key(0))
    again, other = init(jax.random.key(0)), init(jax.random.key(3))
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    changed = 0
    for (path, p), q, o, a in zip(
      _flat(params).items(),
      jax.tree.leaves(again),
      jax.tree.leaves(other),
      jax.tree.leaves(abstract),
    ):
      assert (p.shape, p.dtype) == (a.shape, a.dtype), path
      np.testing.assert_array_equal(np.asarray(q), p, err_msg=path)
      changed += not np.array_equal(np.asarray(o), p)
    assert changed >= 3  # randomly initialised leaves depend on the key
    live = _perturb(params, 1)
  else:
    params = None
    rng = np.random.default_rng(1)
    live = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(a.dtype), abstract)

  rng = np.random.default_rng(2)
  x = rng.standard_normal((BATCH,) + shape).astype(np.float32)
  t = rng.uniform(size=BATCH).astype(np.float32)
  labels = np.arange(BATCH) % (NUM_CLASSES + 1)
  other_labels = (labels + 1) % NUM_CLASSES
  # Gradients of sum(w * output). For images w selects the centre pixel: its input gradient is
  # the receptive field, and every parameter still feeds that pixel.
  weights = rng.standard_normal((BATCH,) + shape).astype(np.float32)
  if len(shape) == 3:
    weights = np.zeros_like(weights)
    weights[:, shape[0] // 2, shape[1] // 2] = 1.0

  def objective(p, xx, tt, ll, w):
    out = fns.apply(p, xx, tt, ll)
    return jnp.sum(w * out), out

  value_and_grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)

  @jax.jit
  def probe(params, live):
    # One batch of three variants: (x, t, labels), (x, 1 - t, labels), (x, t, other labels);
    # only the first contributes to the objective. Examples are independent (GroupNorm,
    # LayerNorm and attention act per example), so this equals three separate calls.
    (_, outs), grads = value_and_grad(
      live,
      np.concatenate([x, x, x]),
      np.concatenate([t, 1.0 - t, t]),
      np.concatenate([labels, labels, other_labels]),
      np.concatenate([weights, 0 * weights, 0 * weights]),
    )
    r = dict(outs=outs, grads=grads)
    if parts["init"]:
      (_, r["init_out"]), r["init_grads"] = value_and_grad(params, x, t, labels, weights)
    if parts["dropout"]:
      keys = jnp.stack([jax.random.key(10), jax.random.key(11)])
      r["dropout"] = jax.vmap(lambda k: fns.apply(live, x, t, labels, dropout_key=k))(keys)
    if parts["bf16"]:
      r["bf16"] = fns16.apply(live, x, t, labels)
    return r

  r = jax.tree.map(np.asarray, probe(params, live))
  out, other_t, other_l = np.split(r["outs"], 3)
  assert out.shape == (BATCH,) + shape
  for key, value in r.items():
    if key in ("init_out", "dropout", "bf16"):
      assert value.dtype == np.float32 and value.shape[-len(shape) :] == shape, key
  assert r["outs"].dtype == np.float32 and np.all(np.isfinite(r["outs"]))

  assert _differs(other_t, out), "output does not depend on t"
  assert _differs(other_l, out), "output does not depend on the class label"

  # Away from init every parameter gets a finite non-zero gradient: one SGD step moves all.
  param_grads, input_grads = r["grads"]
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, live, param_grads)
  for (path, g), p, s in zip(
    _flat(param_grads).items(), jax.tree.leaves(live), jax.tree.leaves(stepped)
  ):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
    assert not np.array_equal(p, s), path
  if len(shape) == 3:
    # Receptive field: the centre output pixel depends on every input pixel, corners included
    # (attention at the lowest UNet resolution and in every DiT block makes it global).
    assert np.all(np.abs(input_grads[:BATCH]).sum(axis=(0, 3)) > 0)
    assert np.all(input_grads[BATCH:] == 0)

  if parts["init"]:
    if name == "mlp":
      assert np.abs(r["init_out"]).max() > 0
    else:
      # The output layer starts at zero (DDPM init_scale=0, DiT adaLN-Zero): the output is 0,
      assert np.abs(r["init_out"]).max() == 0.0
    # and the output layer receives gradients (for UNet and DiT it is the only one that does:
    # zero-initialised, it blocks the signal to everything below it).
    final_layer = FINAL_LAYER.get(name, f"['layers'][{kwargs.get('depth', 3)}]")
    init_grads = _flat(r["init_grads"][0])
    final = [g for path, g in init_grads.items() if path.startswith(final_layer)]
    assert len(final) == 2 and all(np.abs(g).max() > 0 for g in final)

  if parts["dropout"]:
    drop_a, drop_b = r["dropout"]
    assert _differs(drop_a, out), "dropout_key does not switch dropout on"
    assert _differs(drop_a, drop_b), "the dropout mask does not depend on the key"
    np.testing.assert_array_equal(np.asarray(probe(params, live)["dropout"]), r["dropout"])

  if parts["bf16"]:
    # bfloat16 keeps 8 significand bits (relative rounding 2^-9 ~ 0.2% per op); a few dozen ops
    # compound to well under 5%.
    assert _relative_error(r["bf16"], out) < 5e-2
  jaxpr = jax.make_jaxpr(fns16.apply)(live, x, t, labels).jaxpr
  dtypes = _dtypes_of(jaxpr, ("dot_general", "conv_general_dilated"))
  num_bf16 = sum(d == jnp.bfloat16 for d in dtypes)
  # Only the output projection computes in float32: every other matmul and convolution
  # (attention logits included: bf16 inputs, f32 accumulation) reads bfloat16.
  assert num_bf16 >= 2 and len(dtypes) - num_bf16 == 1, dtypes


@pytest.mark.parametrize("case", CASES)
def test_model_contract(case):
  _check_model(*CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_model_contract_slow(case):
  _check_model(*SLOW_CASES[case])


def test_image_models_on_16x16x3_shapes():
  # Output shape and dtype without compiling (the full contract runs in the slow suite).
  for name, (_, _, kwargs, _) in [
    ("unet", SLOW_CASES["unet-16x16x3"]),
    ("dit", SLOW_CASES["dit-16x16x3"]),
  ]:
    fns = models.create_model(name, data_shape=(16, 16, 3), num_classes=NUM_CLASSES, **kwargs)
    params = jax.eval_shape(fns.init, jax.random.key(0))
    out = jax.eval_shape(
      fns.apply,
      params,
      jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32),
      jax.ShapeDtypeStruct((2,), jnp.float32),
      jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    assert (out.shape, out.dtype) == ((2, 16, 16, 3), jnp.float32)


def test_mlp_default_is_torchcfm():
  """TorchCFM's MLP(dim=2, w=64, time_varying=True): Linear(3,64) SELU Linear(64,64) SELU
  Linear(64,64) SELU Linear(64,2)."""
  fns = models.create_model("mlp", data_shape=(2,))
  params = jax.jit(fns.init)(jax.random.key(0))
  w, dim = 64, 2
  assert models.num_params(params) == (dim + 1) * w + w + 2 * (w * w + w) + (w * dim + dim)
  assert models.num_params(params) == 8706
  layers = [params["layers"][i] for i in range(4)]
  assert [l["kernel"].shape for l in layers] == [(3, 64), (64, 64), (64, 64), (64, 2)]
  # Independent forward pass in NumPy float64 on concat(x, t).
  x = np.random.default_rng(0).normal(size=(5, 2))
  t = np.linspace(0.0, 1.0, 5)
  h = np.concatenate([x, t[:, None]], axis=1)
  selu = lambda z: 1.0507009873554805 * np.where(z > 0, z, 1.6732632423543772 * np.expm1(z))
  for i, layer in enumerate(layers):
    h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    h = selu(h) if i < 3 else h
  np.testing.assert_allclose(np.asarray(jax.jit(fns.apply)(params, x, t)), h, rtol=1e-4, atol=1e-5)
  # PyTorch's nn.Linear init: U(-b, b), b = 1/sqrt(fan_in). E[w^2] = b^2/3 and
  # Var[w^2] = b^4/5 - b^4/9 = 4 b^4/45, so the mean of n = 4096 squares has s.e.
  # sqrt(4/45) b^2 / 64 ~= 0.0047 b^2; allow 5 s.e.
  kernel = np.asarray(layers[1]["kernel"])
  bound = 1.0 / math.sqrt(64)
  assert np.abs(kernel).max() <= bound
  assert abs(np.mean(kernel**2) / bound**2 - 1.0 / 3.0) < 5 * math.sqrt(4 / 45) / 64
  assert np.abs(np.asarray(layers[0]["bias"])).max() <= 1.0 / math.sqrt(3)


def test_apply_conventions():
  fns = models.create_model("mlp", data_shape=(2,), num_classes=2)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: rng.standard_normal(a.shape).astype(a.dtype),
    jax.eval_shape(fns.init, jax.random.key(0)),
  )
  apply = jax.jit(fns.apply)
  x = rng.standard_normal((3, 2)).astype(np.float32)
  labels = np.array([0, 1, 1])
  batched = np.asarray(apply(params, x, np.full((3,), 0.3, np.float32), labels))
  # A scalar t is broadcast to the batch.
  np.testing.assert_allclose(apply(params, x, 0.3, labels), batched, rtol=1e-6)
  # One unbatched example gives the same answer as its row of the batch.
  one = apply(params, x[1], 0.3, 1)
  assert one.shape == (2,)
  np.testing.assert_allclose(one, batched[1], rtol=1e-5, atol=1e-6)
  # vmap over single examples (the unbatched path) reproduces the batch (jitted: one program,
  # not one per operation).
  np.testing.assert_allclose(
    jax.jit(jax.vmap(fns.apply, in_axes=(None, 0, None, 0)))(params, x, 0.3, labels),
    batched,
    rtol=1e-5,
    atol=1e-6,
  )
  # cond=None is the null label num_classes: the unconditional model of CFG.
  unconditional = np.asarray(apply(params, x, 0.3, None))
  np.testing.assert_array_equal(unconditional, apply(params, x, 0.3, np.full((3,), 2)))
  assert np.abs(unconditional - batched).max() > 0


# slow: traces the 35.7M-parameter UNet (10 s), as the DiT count below; the fast contract covers
# the UNet's code at 8x8
@pytest.mark.slow
def test_published_unet_parameter_count():
  # DDPM's CIFAR-10 model has 35.7M parameters (Ho et al. 2020, Sec. 4 / App. B).
  unet = models.create_model(
    "unet",
    data_shape=(32, 32, 3),
    ch=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
  )
  abstract = jax.eval_shape(unet.init, jax.random.key(0))
  assert round(models.num_params(abstract) / 1e5) == 357
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(unet.apply, abstract, x, jax.ShapeDtypeStruct((2,), jnp.float32))
  assert (out.shape, out.dtype) == ((2, 32, 32, 3), jnp.float32)


@pytest.mark.slow
def test_published_dit_parameter_count():
  # DiT-S/2 on ImageNet-256 latents (32x32x4, 1000 classes) has 33M parameters (Peebles & Xie
  # 2023, Table 1); the paper's model also predicts sigma: 4 more output channels per pixel,
  # i.e. hidden * p^2 * 4 + p^2 * 4 more parameters in the final linear layer.
  dit = models.create_model(
    "dit",
    data_shape=(32, 32, 4),
    num_classes=1000,
    hidden_size=384,
    depth=12,
    num_heads=6,
    patch_size=2,
  )
  count = models.num_params(jax.eval_shape(dit.init, jax.random.key(0)))
  assert round((count + 384 * 4 * 4 + 4 * 4) / 1e6) == 33


def test_clear_errors():
  with pytest.raises(ValueError, match=r"patch_size=3 must divide the image height 8"):
    models.create_model("dit", data_shape=(8, 8, 1), patch_size=3)
  with pytest.raises(ValueError, match=r"unknown model 'vit'.*'dit', 'mlp', 'unet'"):
    models.create_model("vit", data_shape=(2,))
  with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['channels'\].*'ch'"):
    models.create_model("unet", data_shape=(8, 8, 1), channels=32)
  with pytest.raises(ValueError, match=r"UNet needs image data_shape \(H, W, C\), got \(2,\)"):
    models.create_model("unet", data_shape=(2,))
  with pytest.raises(ValueError, match=r"divisible by 4; got data_shape=\(6, 6, 1\)"):
    models.create_model("unet", data_shape=(6, 6, 1), ch=8, ch_mult=(1, 1, 1))
  with pytest.raises(ValueError, match=r"attn_resolutions \[16\] never occur"):
    models.create_model("unet", data_shape=(8, 8, 1), ch=8, ch_mult=(1, 2), attn_resolutions=(16,))
  with pytest.raises(ValueError, match=r"unknown time features 'fourrier'"):
    models.create_model("mlp", data_shape=(2,), time_features="fourrier")
  with pytest.raises(ValueError, match=r"num_heads=3 must divide hidden_size=32"):
    models.create_model("dit", data_shape=(8, 8, 1), hidden_size=32, num_heads=3)
  with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
    models.create_model("mlp", data_shape=(2,), activation="swish")
  with pytest.raises(ValueError, match=r"dtype='int8' must be a floating dtype"):
    models.create_model("mlp", data_shape=(2,), dtype="int8")
  fns = models.create_model("mlp", data_shape=(2,))
  params = jax.eval_shape(fns.init, jax.random.key(0))  # apply checks inputs before using them
  with pytest.raises(ValueError, match=r"x_t has shape \(4, 3\).*data_shape=\(2,\)"):
    fns.apply(params, jnp.zeros((4, 3)), jnp.zeros(4))
  with pytest.raises(ValueError, match=r"t has shape \(3,\).*shape \(4,\)"):
    fns.apply(params, jnp.zeros((4, 2)), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"model is unconditional"):
    fns.apply(params, jnp.zeros((4, 2)), jnp.zeros(4), jnp.zeros(4, jnp.int32))


def test_functionalize_rejects_state_outside_params():
  class Stateful(nnx.Module):
    """Keeps its dropout RNG stream inside the module: state that params would not carry."""

    def __init__(self, *, rngs):
      self.dense = nnx.Linear(2, 2, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

  with pytest.raises(TypeError, match=r"non-parameter state at \['dropout\.rngs"):
    models.functionalize(Stateful, data_shape=(2,))


def test_sinusoidal_embedding_inner_product_is_translation_invariant():
  # [sin a, cos a] . [sin b, cos b] = cos(a - b): the embedding's inner product depends on
  # t - t' only, sum_i cos((t - t') w_i), w_i = 10000^(-i/h) (Vaswani et al. 2017).
  t = jnp.array([0.0, 3.5, 250.0, 999.0])
  emb = models.sinusoidal_embedding(t, dim=64)
  assert emb.shape == (4, 64)
  w = 10000.0 ** (-np.arange(32) / 32)
  diff = np.asarray(t)[:, None] - np.asarray(t)[None]
  expected = np.cos(diff[..., None] * w).sum(-1)
  np.testing.assert_allclose(np.asarray(emb @ emb.T), expected, atol=2e-3)
  np.testing.assert_allclose(np.asarray(emb[:, 0]), np.sin(np.asarray(t)), atol=1e-4)


def test_fourier_features_are_fixed_constants_outside_params():
  feats = models.FourierFeatures(dim=4096, scale=16.0, seed=0)
  t = jnp.array([0.1, 0.35])
  a, b = feats(t), models.FourierFeatures(dim=4096, scale=16.0, seed=0)(t)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # derived from the seed
  # Frequencies b ~ N(0, 16^2): the sample variance of n = 2048 draws has relative s.e.
  # sqrt(2/n) = 3.1%; allow 5 s.e.
  freqs = models.embeddings.gaussian_fourier_frequencies(num_frequencies=2048, scale=16.0)
  assert abs(np.var(freqs) / 256.0 - 1.0) < 5 * math.sqrt(2 / 2048)
  # gamma(t) . gamma(t') = sum_i cos(2 pi b_i (t - t')).
  expected = np.cos(2 * np.pi * freqs * (0.1 - 0.35)).sum()
  np.testing.assert_allclose(float(a[0] @ a[1]), expected, rtol=1e-3, atol=1e-2)
  # An MLP with Fourier time features has only the layers and no frequency table in params.
  fns = models.create_model("mlp", data_shape=(2,), time_features="fourier", time_features_dim=16)
  params = jax.eval_shape(fns.init, jax.random.key(0))
  assert set(params) == {"layers"}
  assert params["layers"][0]["kernel"].shape == (2 + 16, 64)


def test_drop_labels_rate():
  # n = 20000 Bernoulli(0.1) drops: the fraction has s.e. sqrt(0.1 * 0.9 / n) = 0.0021; 5 s.e.
  n, p = 20000, 0.1
  labels = jnp.arange(n) % 10
  dropped = models.drop_labels(jax.random.key(0), labels, num_classes=10, drop_prob=p)
  is_null = np.asarray(dropped == 10)
  assert abs(is_null.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
  assert dropped.dtype == labels.dtype
  with pytest.raises(ValueError, match="drop_prob must lie in"):
    models.drop_labels(jax.random.key(0), labels, num_classes=10, drop_prob=1.5)


def test_patchify_and_sincos_position_embedding():
  x = np.random.default_rng(0).standard_normal((2, 4, 6, 3))
  tokens = dit_lib.patchify(x, patch_size=2)  # array-library agnostic: NumPy in, NumPy out
  # Brute force: token (i, j) of a 2 x 3 grid is the flattened patch x[2i:2i+2, 2j:2j+2, :].
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(
        tokens[:, 3 * i + j], x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, -1)
      )
  back = dit_lib.unpatchify(tokens, patch_size=2, height=4, width=6)
  np.testing.assert_array_equal(back, x)
  # Inner products of the 2D sin-cos embedding depend only on the (row, col) offset:
  # e(r, c) . e(r', c') = sum_i cos((r - r') w_i) + sum_i cos((c - c') w_i), w_i = 10000^(-i/8).
  pos = dit_lib.sincos_pos_embed_2d(dim=32, grid_h=3, grid_w=4)
  rows, cols = np.divmod(np.arange(12), 4)
  w = 10000.0 ** (-np.arange(8) / 8)
  dr = (rows[:, None] - rows[None])[..., None] * w
  dc = (cols[:, None] - cols[None])[..., None] * w
  np.testing.assert_allclose(pos @ pos.T, np.cos(dr).sum(-1) + np.cos(dc).sum(-1), atol=1e-5)


# ---- models of several times (MeanFlow's u(z, t, s), the shortcut model's s(x, t, d)) ----------

_TWO_TIME_CASES = [
  ("mlp", (2,), {}),
  ("mlp", (8, 8, 1), dict(time_features="sinusoidal", time_features_dim=8, width=16, depth=1)),
  pytest.param("unet", (8, 8, 1), _DIGITS_UNET, marks=pytest.mark.slow),  # ~10 s to trace
  ("dit", (8, 8, 1), CASES["dit-8x8x1"][2]),
]


def _time_embedding_params(features_dim: int, out_dim: int) -> int:
  """Two dense layers: ``features -> out -> out``, with biases."""
  return features_dim * out_dim + out_dim + out_dim * out_dim + out_dim


@pytest.mark.parametrize("name,shape,kwargs", _TWO_TIME_CASES)
def test_time_inputs_shapes_and_parameter_counts(name, shape, kwargs):
  """time_inputs=1 is the one-time model, tree and count; each further time adds exactly one
  input column per time feature (MLP) or one time embedding (UNet, DiT); t is [batch, k]."""
  default = models.create_model(name, data_shape=shape, **kwargs)
  counts, trees = {}, {}
  for k in (1, 2, 3):
    fns = models.create_model(name, data_shape=shape, time_inputs=k, **kwargs)
    params = jax.eval_shape(fns.init, jax.random.key(0))
    counts[k], trees[k] = models.num_params(params), jax.tree.structure(params)
    t = jax.ShapeDtypeStruct((3,) if k == 1 else (3, k), jnp.float32)
    out = jax.eval_shape(fns.apply, params, jax.ShapeDtypeStruct((3,) + shape, jnp.float32), t)
    assert (out.shape, out.dtype) == ((3,) + shape, jnp.float32)
  assert trees[1] == jax.tree.structure(jax.eval_shape(default.init, jax.random.key(0)))
  if name == "mlp":
    per_time = kwargs.get("time_features_dim", 1) if "time_features" in kwargs else 1
    expected = per_time * kwargs.get("width", 64)  # one more input row of the first kernel
  elif name == "unet":
    expected = _time_embedding_params(kwargs["ch"], 4 * kwargs["ch"])
  else:
    expected = _time_embedding_params(kwargs["time_features_dim"], kwargs["hidden_size"])
  assert counts[2] - counts[1] == counts[3] - counts[2] == expected
  if name == "mlp" and shape == (2,):
    assert counts[1] == 8706  # TorchCFM's network, unchanged


def test_mlp_of_two_times_is_concat_x_t_s():
  """The 2D MLP of two times is TorchCFM's network on concat(x, t, s): an independent NumPy
  forward pass in float64."""
  fns = models.create_model("mlp", data_shape=(2,), time_inputs=2)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: 0.3 * rng.standard_normal(a.shape).astype(a.dtype),
    jax.eval_shape(fns.init, jax.random.key(0)),
  )
  layers = [params["layers"][i] for i in range(4)]
  assert layers[0]["kernel"].shape == (4, 64)
  x, ts = rng.normal(size=(5, 2)), rng.uniform(size=(5, 2))
  h = np.concatenate([x, ts], axis=1)
  selu = lambda z: 1.0507009873554805 * np.where(z > 0, z, 1.6732632423543772 * np.expm1(z))
  for i, layer in enumerate(layers):
    h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    h = selu(h) if i < 3 else h
  apply = jax.jit(fns.apply)
  np.testing.assert_allclose(np.asarray(apply(params, x, ts)), h, rtol=1e-4, atol=1e-5)
  # One unbatched example takes its [2] times.
  np.testing.assert_allclose(np.asarray(apply(params, x[0], ts[0])), h[0], rtol=1e-4, atol=1e-5)


def test_dit_sums_one_embedding_per_time():
  """With the second time embedding's output layer zeroed, the two-time DiT is the one-time DiT
  with the same parameters: the embeddings add, the first one being the one-time model's."""
  kwargs = CASES["dit-8x8x1"][2]
  one = models.create_model("dit", data_shape=(8, 8, 1), **kwargs)
  two = models.create_model("dit", data_shape=(8, 8, 1), time_inputs=2, **kwargs)
  rng = np.random.default_rng(0)
  live = jax.tree.map(
    lambda a: 0.2 * rng.standard_normal(a.shape).astype(a.dtype),
    jax.eval_shape(two.init, jax.random.key(0)),
  )
  extra = live.pop("extra_time_embeds")
  silent = jax.tree.map(np.zeros_like, extra[0]["dense_2"])
  x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
  ts = rng.uniform(size=(3, 2)).astype(np.float32)

  @jax.jit
  def probe(live, extra):
    muted = {0: {**extra[0], "dense_2": silent}}
    return (
      one.apply(live, x, ts[:, 0]),
      two.apply({**live, "extra_time_embeds": muted}, x, ts),
      two.apply({**live, "extra_time_embeds": extra}, x, ts),
    )

  base, muted, full = map(np.asarray, probe(live, extra))
  np.testing.assert_allclose(muted, base, rtol=1e-5, atol=1e-6)
  assert _differs(full, base), "the second time does not reach the output"


def test_time_inputs_errors():
  fns = models.create_model("mlp", data_shape=(2,), time_inputs=2)
  params = jax.eval_shape(fns.init, jax.random.key(0))
  with pytest.raises(ValueError, match=r"t has shape \(4,\) but the model takes 2 times.*\(4, 2\)"):
    fns.apply(params, jnp.zeros((4, 2)), jnp.zeros(4))
  with pytest.raises(ValueError, match=r"t has shape \(4, 3\)"):
    fns.apply(params, jnp.zeros((4, 2)), jnp.zeros((4, 3)))
  one = models.create_model("mlp", data_shape=(2,))
  with pytest.raises(ValueError, match=r"t has shape \(4, 2\); pass a scalar or one time"):
    one.apply(jax.eval_shape(one.init, jax.random.key(0)), jnp.zeros((4, 2)), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"time_inputs must be an int >= 1, got 0"):
    models.create_model("mlp", data_shape=(2,), time_inputs=0)
  with pytest.raises(ValueError, match=r"time_varying=False.*2 times.*set time_varying=True"):
    models.create_model("mlp", data_shape=(2,), time_inputs=2, time_varying=False)
  with pytest.raises(ValueError, match=r"time_inputs must be an int >= 1, got 'two'"):
    models.create_model("mlp", data_shape=(2,), time_inputs="two")
