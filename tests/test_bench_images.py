"""scripts/bench_images.py's pure parts: the diffusers configurations that mirror our UNet and
DiT, the parameter counts they are matched on, and the docs section it rewrites. The checks that
build diffusers' models run only where torch and diffusers import (the peer environment)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
  spec = importlib.util.spec_from_file_location(
    "bench_images", ROOT / "scripts" / "bench_images.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _bench()
SHAPE = (32, 32, 3)


def _dit_count(*, h: int, depth: int, p: int, c: int, features: int, classes: int) -> int:
  """DiT's parameters written out (Peebles & Xie 2023, adaLN-Zero; biases everywhere)."""
  block = (
    (h * 3 * h + 3 * h)  # qkv
    + (h * h + h)  # attention output
    + (h * 4 * h + 4 * h)  # MLP in
    + (4 * h * h + h)  # MLP out
    + (h * 6 * h + 6 * h)  # adaLN modulation
  )
  return (
    (p * p * c * h + h)  # patch embedding
    + (features * h + h + h * h + h)  # timestep MLP
    + (classes + 1) * h  # labels and the null label
    + depth * block
    + (h * 2 * h + 2 * h)  # final adaLN
    + (h * p * p * c + p * p * c)  # output projection
  )


def test_unet_kwargs_follow_the_cifar10_layout():
  group = bench.model_group("unet")
  kw = bench.diffusers_unet_kwargs(data_shape=SHAPE, **group)
  # cifar10_ddpm.py: ch 128, mult (1, 2, 2, 2), attention at 16x16 (level 1), 4 heads.
  assert kw["block_out_channels"] == (128, 256, 256, 256)
  assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
  assert kw["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  assert kw["attention_head_dim"] == 64 and kw["layers_per_block"] == 2
  assert kw["dropout"] == group["dropout"] == 0.1


def test_unet_kwargs_refuse_attention_levels_of_different_head_widths():
  group = dict(bench.model_group("unet", unet_ch=32), ch_mult=(1, 2, 4), attn_resolutions=(32,))
  with pytest.raises(ValueError, match="attention_head_dim"):
    bench.diffusers_unet_kwargs(data_shape=SHAPE, **group)


def test_dit_kwargs_and_their_limits():
  group = bench.model_group("dit", dit_hidden=64, dit_depth=2, dit_heads=2)
  kw = bench.diffusers_dit_kwargs(data_shape=SHAPE, num_classes=10, **group)
  assert (kw["num_attention_heads"], kw["attention_head_dim"], kw["num_layers"]) == (2, 32, 2)
  assert kw["num_embeds_ada_norm"] == 10 and kw["patch_size"] == 2
  with pytest.raises(ValueError, match="mlp_ratio"):
    bench.diffusers_dit_kwargs(data_shape=SHAPE, num_classes=10, **dict(group, mlp_ratio=2.0))
  with pytest.raises(ValueError, match="num_classes"):
    bench.diffusers_dit_kwargs(data_shape=SHAPE, num_classes=0, **group)


def test_our_dit_count_equals_the_closed_form():
  group = bench.model_group("dit", dit_hidden=64, dit_depth=2, dit_heads=2)
  expected = _dit_count(h=64, depth=2, p=2, c=3, features=256, classes=10)
  assert bench.ours_param_count(group, num_classes=10) == expected


def test_param_match_tolerance():
  assert bench.param_match(1000, 1049)["within"]
  assert not bench.param_match(1000, 1051)["within"]
  assert not bench.param_match(1000, 949)["within"]


class _Param:
  def __init__(self, n):
    self.n = n

  def numel(self):
    return self.n


class _Module:
  """Named parameters shaped like diffusers' DiT (block 0 keeps its embedding)."""

  names = {
    "pos_embed.proj.weight": 5,
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight": 7,
    "transformer_blocks.0.attn1.to_q.weight": 11,
    "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight": 13,
    "transformer_blocks.1.norm1.linear.weight": 17,
    "transformer_blocks.10.norm1.emb.class_embedder.embedding_table.weight": 19,
  }

  def named_parameters(self):
    return [(k, _Param(v)) for k, v in self.names.items()]

  def parameters(self):
    return [p for _, p in self.named_parameters()]


def test_peer_counts_separate_the_per_block_embedding_copies():
  counts = bench.peer_param_counts(_Module())
  assert counts == {"total": 72, "per_block_embedding_copies": 13 + 19}


def test_render_replaces_only_the_generated_block():
  report = {
    "command": "python scripts/bench_images.py",
    "date": "2026-01-01 00:00 UTC",
    "environment": dict(
      jax_version="x", torch_version="y", diffusers_version="z", cpu_count=2, loadavg_start=[1]
    ),
    "protocol": dict(batch=8, segments=5, segment_steps=2),
    "results": {
      "dit": dict(
        model_config=dict(hidden_size=64, depth=2, patch_size=2),
        param_counts=dict(ours=10, peer=11),
        ours=dict(steps_per_s_median=2.0),
        peer=dict(steps_per_s_median=1.0),
        ratio_steps_per_s=2.0,
        ratio_cpu_time=1.5,
        target_met=True,
      )
    },
  }
  block = bench.render_block(report)
  assert "| dit | hidden 64, depth 2, p 2 | 10 | 11 | 2.0 | 1.0 | 2.0 | 1.5 | met |" in block
  doc = "# Scaling\n\n## Memory per device\n\nmemory text\n"
  first = bench.replace_section(doc, block)
  assert first.startswith(doc.rstrip("\n")) and bench.SECTION in first
  prose = first.replace(bench.BEGIN, "Why it is slow.\n\n" + bench.BEGIN)
  again = bench.replace_section(prose, block.replace("2.0 | 1.0", "3.0 | 1.0"))
  assert "Why it is slow." in again and "memory text" in again
  assert again.count(bench.BEGIN) == 1 and "3.0 | 1.0" in again and "2.0 | 1.0" not in again


def _peer():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  peer, note = bench.import_peer()
  if peer is None:
    pytest.skip(note)
  return peer


def test_diffusers_unet_has_our_parameter_count():
  peer = _peer()
  group = bench.model_group("unet", unet_ch=32)
  model = peer["unet"](**bench.diffusers_unet_kwargs(data_shape=SHAPE, **group))
  assert bench.peer_param_counts(model)["total"] == bench.ours_param_count(group)


def test_diffusers_dit_matches_ours_but_for_the_embedding_copies():
  peer = _peer()
  group = bench.model_group("dit", dit_hidden=64, dit_depth=3, dit_heads=2)
  model = peer["dit"](**bench.diffusers_dit_kwargs(data_shape=SHAPE, num_classes=10, **group))
  counts = bench.peer_param_counts(model)
  ours = bench.ours_param_count(group, num_classes=10)
  # Each of blocks 1 and 2 holds a timestep MLP (256 -> 64 -> 64) and an 11-row label table.
  assert counts["per_block_embedding_copies"] == 2 * (256 * 64 + 64 + 64 * 64 + 64 + 11 * 64)
  assert counts["total"] - counts["per_block_embedding_copies"] == ours


def test_scaling_page_holds_the_rendering_of_the_json():
  page, data = ROOT / "docs" / "scaling.md", ROOT / "docs" / "images_bench.json"
  if not (page.exists() and data.exists()):
    pytest.skip("docs/scaling.md or docs/images_bench.json not written yet")
  block = bench.render_block(json.loads(data.read_text()))
  assert block in page.read_text(), (
    "docs/scaling.md is stale: python scripts/bench_images.py --render docs/images_bench.json"
  )
