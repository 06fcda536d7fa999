"""Remat policies and logical axis names change no value.

Rematerialisation (Chen et al. 2016, https://arxiv.org/abs/1604.06174) recomputes a block's
activations in the backward pass: the gradient is the same function, evaluated with the same
operations, so policies agree to float32 rounding (tolerances below are a few ulps of the
gradient's scale, for XLA fusing the recomputed ops differently). The logical axis names are
metadata: with them stripped the model is the DiT it was before they existed, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import create_model, dit, num_params

DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=4.0, time_features_dim=32)
UNET = dict(
  ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, num_heads=2
)


def _perturbed(params, seed):
  """Random parameters: adaLN-Zero and zero output layers make a fresh model the identity (its
  output all zeros), which would hide any difference. NumPy draws: ``jax.random.normal`` per
  leaf would compile a kernel for every leaf shape (seconds, for no check)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), params
  )


def _inputs(seed, shape=(8, 8, 1), batch=4):
  rng = np.random.default_rng(seed)  # NumPy: no random kernel to compile
  x = rng.standard_normal((batch, *shape)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(rng.uniform(size=batch).astype(np.float32))


def _loss_and_grads(model, params, x, t, dropout_key=None):
  loss = lambda p: jnp.mean(model.apply(p, x, t, dropout_key=dropout_key) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_dit_parameter_count_is_the_closed_form():
  """``p^2 C D + D`` (patches) + ``F D + D + D^2 + D`` (time MLP) + per block ``D 3D + 3D``
  (qkv) ``+ D^2 + D`` (attention out) ``+ 2 D M + M + D`` (MLP) ``+ 6 D^2 + 6 D`` (adaLN), then
  ``2 D^2 + 2 D`` (final adaLN) ``+ D p^2 C + p^2 C`` (output)."""
  d, f, p, c, depth = 32, 32, 2, 1, 2
  m = 4 * d
  block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * m + m + d) + (6 * d * d + 6 * d)
  expected = (p * p * c * d + d) + (f * d + d + d * d + d) + depth * block
  expected += (2 * d * d + 2 * d) + (d * p * p * c + p * p * c)
  for remat in ("none", "full"):
    model = create_model("dit", data_shape=(8, 8, 1), remat=remat, **DIT)
    assert num_params(jax.eval_shape(model.init, jax.random.PRNGKey(0))) == expected


def test_logical_axis_names_change_no_value(monkeypatch):
  """The DiT with its partitioning metadata and the DiT without (the model before tensor
  parallelism existed): identical parameters and bit-identical outputs."""
  key = jax.random.PRNGKey(0)
  x, t = _inputs(1)
  named = create_model("dit", data_shape=(8, 8, 1), **DIT)
  monkeypatch.setattr(dit, "partitioned", lambda init, names: init)
  plain = create_model("dit", data_shape=(8, 8, 1), **DIT)
  assert plain.logical_axes == ()
  names = dict(named.logical_axes)
  assert names[("blocks", 0, "qkv", "kernel")] == ("embed", "heads")
  assert names[("blocks", 1, "mlp_out", "kernel")] == ("mlp", "embed")
  hash(named)  # still hashable, as before the names
  # jitted: one program each rather than one per initializer op.
  params_named, params_plain = jax.jit(named.init)(key), jax.jit(plain.init)(key)
  for a, b in zip(jax.tree.leaves(params_named), jax.tree.leaves(params_plain), strict=True):
    np.testing.assert_array_equal(a, b)
  params = _perturbed(params_named, 2)
  np.testing.assert_array_equal(
    jax.jit(named.apply)(params, x, t), jax.jit(plain.apply)(params, x, t)
  )


@pytest.mark.parametrize(
  "name, kwargs, dropout",
  [("dit", DIT, False), pytest.param("unet", UNET, True, marks=pytest.mark.slow)],
  ids=["dit", "unet_dropout"],
)
def test_remat_policies_give_the_same_loss_and_gradients(name, kwargs, dropout):
  """none, dots_saveable and full: equal losses and gradients (dropout included: the recomputed
  forward pass draws the same bits from the same key)."""
  x, t = _inputs(1)
  dropout_key = jax.random.PRNGKey(3) if dropout else None
  results, params = {}, None
  for remat in ("none", "dots_saveable", "full"):
    model = create_model(name, data_shape=(8, 8, 1), remat=remat, **kwargs)
    if params is None:  # remat changes apply only: every policy's init is this tree
      params = _perturbed(jax.jit(model.init)(jax.random.PRNGKey(0)), 2)
    assert jax.tree.structure(jax.eval_shape(model.init, jax.random.PRNGKey(0))) == (
      jax.tree.structure(params)
    )
    results[remat] = _loss_and_grads(model, params, x, t, dropout_key)
  loss_ref, grads_ref = results["none"]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_ref))
  assert scale > 0
  for remat in ("dots_saveable", "full"):
    loss, grads = results[remat]
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
      # float32: a few ulps of the largest gradient entry, for reassociated sums.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# slow: differentiates three policies of both models (10 s); equal gradients under remat stay fast
@pytest.mark.slow
def test_remat_wraps_every_block_and_none_wraps_nothing():
  """The policy really reaches the program: one remat region per block in the gradient's jaxpr
  (DiT: ``depth``; UNet: each residual and attention block), none without remat."""
  x, t = _inputs(1)

  def regions(name, kwargs, remat):
    model = create_model(name, data_shape=(8, 8, 1), remat=remat, **kwargs)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    loss = lambda p: jnp.mean(model.apply(p, x, t) ** 2)
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    return text.count("remat") + text.count("checkpoint[")

  assert regions("dit", DIT, "none") == 0
  assert regions("dit", DIT, "full") == DIT["depth"]
  assert regions("dit", DIT, "dots_saveable") == DIT["depth"]
  # UNet (1, 2), one residual block per level on the way down (two up), attention at the 4x4
  # level: down 2 residual + 1 attention, middle 2 + 1, up 4 + 2.
  assert regions("unet", UNET, "none") == 0
  assert regions("unet", UNET, "full") == (2 + 1) + (2 + 1) + (4 + 2)


def test_unknown_remat_policy_is_one_clear_error():
  with pytest.raises(ValueError, match=r"unknown remat policy 'ful'.*'dots_saveable'"):
    create_model("dit", data_shape=(8, 8, 1), remat="ful", **DIT)
