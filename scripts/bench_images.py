"""Image-model training throughput: diffjax's UNet and DiT against diffusers' in torch, same run.

Protocol. Each model trains DDPM's objective (Ho et al. 2020, https://arxiv.org/abs/2006.11239):
linear betas 1e-4 to 0.02 over 1000 steps, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``,
the loss ``mean (eps_theta(x_t, t) - eps)^2``, on 32x32x3 images with random horizontal flips,
float32, with configs/cifar10_ddpm.py's optimizer on both sides: Adam (lr 2e-4, linear warm-up),
gradient clipping at global norm 1.0, EMA 0.9999.

* ``unet``: configs/cifar10_ddpm.py's UNet (Ho et al. 2020; channel multipliers (1, 2, 2, 2),
  2 residual blocks, attention at 16x16, 4 heads, dropout 0.1) against diffusers'
  ``UNet2DModel`` configured to the same layout by :func:`diffusers_unet_kwargs`.
* ``dit``: a class-conditional DiT (Peebles & Xie 2023, https://arxiv.org/abs/2212.09748),
  DiT-S/2 by default (hidden 384, depth 12, 6 heads, patch 2), 10 classes with 10% label
  dropout, against diffusers' ``DiTTransformer2DModel`` (:func:`diffusers_dit_kwargs`).
  diffusers gives every block its own timestep and label embedding where DiT has one shared
  embedding; :func:`peer_param_counts` counts those copies apart, and the rest matches exactly.

Data: ``--num-images`` random uint8 images and labels written to a temporary ``.npz``; ours reads
it through ``data.target=npz`` held on the device (the resident path ``diffjax train`` takes for
a data set this size), the peer indexes the same array as a torch tensor.

Ours runs through :func:`diffjax.train.trainer.make_trainer` on a 1-device mesh: the jitted,
donated chunk of ``train.fused_steps`` steps that :func:`diffjax.train.loop.train` runs. The
peer is a plain torch loop (``torch.optim.Adam``, ``clip_grad_norm_``, ``torch._foreach_lerp_``
for the EMA), at the torch thread count that trained faster in a probe (1 or torch's default).

Timing: after warm-up (ours compiles there) the models train ``--reps`` segments of
``--segment`` steps alternately (ours, peer, ours, ...) so both see the same machine load. A
figure is the median over segments of steps per wall second; ``cpu_ms_per_step`` is process CPU
time per step. ``profile`` times, on one fixed batch, the loss forward, the forward and
backward, and the whole step on both sides; ``xla_flag_trials`` re-runs ours in subprocesses
under other public XLA CPU flags.

Usage::

  python scripts/bench_images.py --out docs/images_bench.json      # the default sizes
  python scripts/bench_images.py --quick                           # smoke run, tiny models
  python scripts/bench_images.py --render docs/images_bench.json   # rewrite docs/scaling.md's
                                                                   # image section from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOCOL_CONFIG = str(ROOT / "configs" / "cifar10_ddpm.py")
DATA_SHAPE = (32, 32, 3)
DIT_NUM_CLASSES = 10
DIT_LABEL_DROPOUT = 0.1  # diffusers' CombinedTimestepLabelEmbeddings drops 10% of labels
DIT_TIME_FEATURES = 256  # diffusers' DiT embeds the timestep in 256 sinusoidal features
PARAM_TOLERANCE = 0.05
TARGET_RATIO = 1.0
NUM_TRAIN_TIMESTEPS = 1000
XLA_FLAG_TRIALS = (
  "",  # the baseline, under the same load as the trials
  "--xla_cpu_multi_thread_eigen=false",
  "--xla_cpu_use_onednn=true",
  "--xla_cpu_use_xnnpack=true",
)
SECTION = "## Image-model throughput"

__all__ = [
  "PARAM_TOLERANCE",
  "diffusers_dit_kwargs",
  "diffusers_unet_kwargs",
  "main",
  "model_group",
  "make_config",
  "ours_param_count",
  "param_match",
  "peer_param_counts",
  "render_block",
  "replace_section",
]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--models", default="unet,dit", help="subset of unet,dit")
  p.add_argument("--batch", type=int, default=8, help="global batch (both sides)")
  p.add_argument("--segment", type=int, default=2, help="steps per timed segment")
  p.add_argument("--reps", type=int, default=5, help="timed segments per side")
  p.add_argument("--unet-ch", type=int, default=0, help="UNet base channels (0: the config's)")
  p.add_argument("--dit-hidden", type=int, default=384)
  p.add_argument("--dit-depth", type=int, default=12)
  p.add_argument("--dit-heads", type=int, default=6)
  p.add_argument("--num-images", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-peer", action="store_true", help="skip the torch peer")
  p.add_argument("--no-profile", action="store_true")
  p.add_argument("--no-flag-trials", action="store_true")
  p.add_argument("--out", default="", help="also write the JSON here")
  p.add_argument(
    "--flags",
    default=";".join(XLA_FLAG_TRIALS),
    help="XLA flag trials, separated by ';' (an empty item: the baseline)",
  )
  p.add_argument(
    "--trials-into",
    default="",
    help="JSON file of an earlier run: run only the flag trials (its sizes: pass the same "
    "size options) and store them there",
  )
  p.add_argument("--render", default="", help="JSON file: rewrite docs/scaling.md's section only")
  p.add_argument("--quick", action="store_true", help="tiny models, 2 segments of 1 step")
  args = p.parse_args(argv)
  if args.quick:
    args.unet_ch, args.dit_hidden, args.dit_depth, args.dit_heads = 32, 64, 2, 2
    args.segment, args.reps, args.batch, args.num_images = 1, 2, 4, 16
  args.models = [m for m in args.models.split(",") if m]
  if set(args.models) - {"unet", "dit"}:
    p.error(f"--models: choose from unet,dit; got {args.models}")
  for name in ("batch", "segment", "reps", "num_images"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


# ---- configurations (pure) ---------------------------------------------------------------------


def model_group(
  model: str, *, unet_ch: int = 0, dit_hidden: int = 384, dit_depth: int = 12, dit_heads: int = 6
) -> dict:
  """Our model's config group: configs/cifar10_ddpm.py's UNet (``unet_ch`` > 0 replaces its base
  width, nothing else), or a DiT-S/2-shaped DiT."""
  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  if model == "unet":
    group = config_lib.load_config_file(PROTOCOL_CONFIG).model.to_dict()
    if unet_ch:
      group["ch"] = unet_ch
    return group
  if model == "dit":
    return dict(
      name="dit",
      patch_size=2,
      hidden_size=dit_hidden,
      depth=dit_depth,
      num_heads=dit_heads,
      mlp_ratio=4.0,
      dropout=0.0,
      time_features_dim=DIT_TIME_FEATURES,
    )
  raise ValueError(f"model={model!r}: choose 'unet' or 'dit'")


def make_config(group: dict, *, data_path: str, batch: int, chunk: int, seed: int):
  """configs/cifar10_ddpm.py (objective, optimizer, EMA, flips) with ``group`` as the model, the
  npz at ``data_path`` held on the device, ``batch`` and ``chunk`` fused steps; validated."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config_file(PROTOCOL_CONFIG)
  with config.unlocked():
    config.model = ml_collections.ConfigDict(group)
  config.seed = seed
  config.data.target = "npz"
  config.data.path = data_path
  config.data.device_resident = "on"
  config.data.label_key = "label" if group["name"] == "dit" else ""
  if group["name"] == "dit":
    config.data.num_classes = DIT_NUM_CLASSES
    config.objective.label_dropout = DIT_LABEL_DROPOUT
  config.train.batch_size = batch
  config.train.fused_steps = chunk
  config.train.progress_bar = False
  config_lib.validate(config, num_devices=1)
  return config


def diffusers_unet_kwargs(
  *,
  data_shape: tuple[int, int, int],
  ch: int,
  ch_mult: tuple[int, ...],
  num_res_blocks: int,
  attn_resolutions: tuple[int, ...],
  num_heads: int,
  dropout: float,
  scale_shift_norm: bool = False,
  resample_with_conv: bool = True,
  **_,
) -> dict:
  """``UNet2DModel`` keywords for our UNet's layout (diffusers names, same shapes).

  Level ``l`` has ``ch m_l`` channels and is an ``Attn{Down,Up}Block2D`` where its resolution
  ``H / 2^l`` is in ``attn_resolutions``; diffusers' one ``attention_head_dim`` must equal every
  attention level's ``ch m_l / num_heads``. The middle block has attention in both.
  """
  height = data_shape[0]
  widths = tuple(ch * m for m in ch_mult)
  attn = [height // 2**level in attn_resolutions for level in range(len(ch_mult))]
  head_dims = {widths[level] // num_heads for level in range(len(ch_mult)) if attn[level]}
  head_dims.add(widths[-1] // num_heads)  # the middle attention
  if len(head_dims) != 1:
    raise ValueError(
      f"diffusers' UNet2DModel takes one attention_head_dim, but channels/num_heads differ "
      f"across attention levels ({sorted(head_dims)}); use attention at levels of one width"
    )
  if not resample_with_conv:
    raise ValueError("resample_with_conv=False has no UNet2DModel equivalent here; use True")
  return dict(
    sample_size=height,
    in_channels=data_shape[-1],
    out_channels=data_shape[-1],
    block_out_channels=widths,
    layers_per_block=num_res_blocks,
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
    attention_head_dim=head_dims.pop(),
    dropout=dropout,
    resnet_time_scale_shift="scale_shift" if scale_shift_norm else "default",
    norm_num_groups=32 if ch % 32 == 0 else ch // 2,
    add_attention=True,
  )


def diffusers_dit_kwargs(
  *,
  data_shape: tuple[int, int, int],
  num_classes: int,
  patch_size: int,
  hidden_size: int,
  depth: int,
  num_heads: int,
  mlp_ratio: float = 4.0,
  dropout: float = 0.0,
  learn_pos_embed: bool = False,
  time_features_dim: int = DIT_TIME_FEATURES,
  **_,
) -> dict:
  """``DiTTransformer2DModel`` keywords for our DiT (adaLN-Zero, fixed sin-cos positions)."""
  if mlp_ratio != 4.0 or learn_pos_embed or time_features_dim != DIT_TIME_FEATURES:
    raise ValueError(
      f"diffusers' DiT has mlp_ratio 4, fixed positions and {DIT_TIME_FEATURES} time features; "
      f"got mlp_ratio={mlp_ratio}, learn_pos_embed={learn_pos_embed}, "
      f"time_features_dim={time_features_dim}: use those values"
    )
  if num_classes < 1:
    raise ValueError("diffusers' DiT is class-conditional: num_classes must be >= 1, got 0; set it")
  return dict(
    num_attention_heads=num_heads,
    attention_head_dim=hidden_size // num_heads,
    in_channels=data_shape[-1],
    out_channels=data_shape[-1],
    num_layers=depth,
    dropout=dropout,
    sample_size=data_shape[0],
    patch_size=patch_size,
    num_embeds_ada_norm=num_classes,
  )


def ours_param_count(group: dict, *, num_classes: int = 0) -> int:
  """Parameters of our model (``jax.eval_shape``: nothing is allocated)."""
  import jax  # pylint: disable=import-outside-toplevel

  from diffjax.models import create_model  # pylint: disable=import-outside-toplevel

  kwargs = {k: v for k, v in group.items() if k != "name"}
  fns = create_model(group["name"], data_shape=DATA_SHAPE, num_classes=num_classes, **kwargs)
  shapes = jax.eval_shape(fns.init, jax.random.PRNGKey(0))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def peer_param_counts(module) -> dict:
  """``total`` parameters of a torch module and ``per_block_embedding_copies``: those of the
  timestep/label embeddings that diffusers' DiT blocks 1.. hold besides block 0's (0 else)."""
  total = sum(p.numel() for p in module.parameters())
  copies = sum(
    p.numel()
    for name, p in module.named_parameters()
    if re.match(r"transformer_blocks\.([1-9]\d*)\.norm1\.emb\.", name)
  )
  return {"total": int(total), "per_block_embedding_copies": int(copies)}


def param_match(ours: int, peer: int, *, tolerance: float = PARAM_TOLERANCE) -> dict:
  """``|peer - ours| / ours`` and whether it is within ``tolerance``."""
  rel = abs(peer - ours) / ours
  return {
    "ours": ours,
    "peer": peer,
    "relative_difference": round(rel, 5),
    "within": rel <= tolerance,
  }


# ---- timing helpers ---------------------------------------------------------------------------


class Clock:
  """Wall and process-CPU seconds of one block."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu


def _summary(segments: list[dict]) -> dict:
  rates = [s["steps"] / s["wall_s"] for s in segments]
  return {
    "steps_per_s_median": round(statistics.median(rates), 4),
    "steps_per_s_max": round(max(rates), 4),
    "cpu_ms_per_step_median": round(
      statistics.median(s["cpu_s"] / s["steps"] * 1e3 for s in segments), 1
    ),
    "segments": segments,
  }


def _time_ms(fn: Callable[[], Any], reps: int) -> dict:
  fn()  # warm-up (and compile)
  walls, cpus = [], []
  for _ in range(reps):
    with Clock() as c:
      fn()
    walls.append(c.wall * 1e3)
    cpus.append(c.cpu * 1e3)
  return {
    "wall_ms_median": round(statistics.median(walls), 1),
    "cpu_ms_median": round(statistics.median(cpus), 1),
  }


def write_images(path: pathlib.Path, *, num: int, seed: int) -> dict:
  """``num`` random uint8 images and labels in an npz; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = dict(
    image=rng.integers(0, 256, size=(num, *DATA_SHAPE), dtype=np.uint8),
    label=rng.integers(0, DIT_NUM_CLASSES, size=(num,), dtype=np.int32),
  )
  np.savez(path, **arrays)
  return arrays


# ---- ours -------------------------------------------------------------------------------------


class Ours:
  """The trainer's jitted chunk (what ``diffjax train`` runs) on a 1-device mesh."""

  def __init__(self, config):
    import jax  # pylint: disable=import-outside-toplevel

    from diffjax.train import sharding  # pylint: disable=import-outside-toplevel
    from diffjax.train.trainer import make_trainer  # pylint: disable=import-outside-toplevel

    self.jax = jax
    mesh = sharding.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
    self.config = config
    self.trainer = make_trainer(config, mesh)
    self.state = self.trainer.create_state()
    self.chunk = config.train.fused_steps

  def train(self, steps: int) -> None:
    done = 0
    while done < steps:
      n = min(self.chunk, steps - done)
      self.state, metrics = self.trainer.advance(self.state, n)
      np.asarray(metrics["loss"])  # loop.train's per-chunk finite check reads the loss
      done += n

  def profile(self, reps: int) -> dict:
    """Forward loss, forward + backward, and one whole train step on one fixed batch (ms)."""
    import jax  # pylint: disable=import-outside-toplevel

    from diffjax.train.step import train_step  # pylint: disable=import-outside-toplevel

    exp, cfg = self.trainer.experiment, self.config
    batch = (
      exp.sample_batch(jax.random.PRNGKey(1))
      if exp.device_data is None
      else (exp.device_data.draw(jax.random.PRNGKey(1), exp.device_data.arrays))
    )
    key = jax.random.PRNGKey(2)
    if exp.pair_fn is not None:
      batch = exp.pair_fn(key, batch)
    params = self.state.params
    forward = jax.jit(lambda p: exp.loss_fn(p, key, batch))
    grad = jax.jit(jax.grad(lambda p: exp.loss_fn(p, key, batch)))
    step = jax.jit(
      lambda s: train_step(
        s,
        batch,
        pair_fn=None,
        loss_fn=exp.loss_fn,
        optimizer=self.trainer.optimizer,
        ema_decay=cfg.train.ema_decay,
        accumulate_steps=cfg.train.accumulate_steps,
      )[0]
    )
    state = self.state
    return {
      "loss forward": _time_ms(lambda: jax.block_until_ready(forward(params)), reps),
      "forward + backward": _time_ms(lambda: jax.block_until_ready(grad(params)), reps),
      "train step (+ clip, Adam, EMA)": _time_ms(lambda: jax.block_until_ready(step(state)), reps),
    }


# ---- the peer (diffusers in torch) ------------------------------------------------------------


def import_peer() -> tuple[dict | None, str]:
  """torch and diffusers' two models, or None and why not."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"peer skipped: torch not importable in {sys.executable} ({e})"
  note = "diffusers in torch, same process and run"
  try:
    import torchvision  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except Exception as e:  # noqa: BLE001 -- a torchvision built for another torch
    # diffusers imports torchvision only for models these benchmarks do not build.
    import diffusers.utils.import_utils as import_utils  # pylint: disable=import-outside-toplevel

    import_utils._torchvision_available = False  # pylint: disable=protected-access
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
    note += f"; torchvision does not load ({type(e).__name__}), so diffusers runs without it"
  try:
    import diffusers  # pylint: disable=import-outside-toplevel
    from diffusers import DiTTransformer2DModel, UNet2DModel  # pylint: disable=import-outside-toplevel
  except Exception as e:  # noqa: BLE001 -- any import failure skips the peer
    return None, f"peer skipped: diffusers not importable in {sys.executable} ({e})"
  return dict(
    torch=torch,
    unet=UNet2DModel,
    dit=DiTTransformer2DModel,
    version=diffusers.__version__,
    default_threads=torch.get_num_threads(),
  ), note


def linear_alphas_cumprod(num: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """DDPM's ``abar_t = prod_{s <= t} (1 - beta_s)``, betas linear from 1e-4 to 0.02."""
  return np.cumprod(1.0 - np.linspace(1e-4, 0.02, num, dtype=np.float64))


class Peer:
  """A torch DDPM training loop around a diffusers model, configured as ours."""

  def __init__(self, peer: dict, model: str, kwargs: dict, images: dict, config, *, seed: int):
    torch = self.torch = peer["torch"]
    torch.manual_seed(seed)
    self.model_name = model
    self.model = peer[model](**kwargs)
    self.model.train()
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    opt = config.optimizer
    self.optimizer = torch.optim.Adam(
      self.params, lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps
    )
    warmup = max(opt.warmup_steps, 1)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
      self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    self.clip = opt.grad_clip_norm
    self.ema_decay = config.train.ema_decay
    self.flip = config.data.augment_flip
    self.batch = config.train.batch_size
    self.images = torch.from_numpy(images["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    self.labels = torch.from_numpy(images["label"]).long()
    self.abar = torch.from_numpy(linear_alphas_cumprod()).float()
    self.default_threads = peer["default_threads"]
    self.loss = float("nan")

  def draw(self) -> tuple:
    torch = self.torch
    idx = torch.randint(0, self.images.shape[0], (self.batch,))
    x0, labels = self.images[idx], self.labels[idx]
    if self.flip:
      flip = torch.rand(self.batch) < 0.5
      x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (self.batch,))
    noise = torch.randn_like(x0)
    a = self.abar[t][:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, labels, noise

  def loss_of(self, x_t, t, labels, noise):
    if self.model_name == "dit":
      out = self.model(x_t, timestep=t, class_labels=labels).sample
    else:
      out = self.model(x_t, t).sample
    return ((out - noise) ** 2).mean()

  def step(self, batch=None) -> None:
    torch = self.torch
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss_of(*(batch or self.draw()))
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.optimizer.step()
    self.scheduler.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    self.loss = loss.detach()

  def train(self, steps: int) -> None:
    for _ in range(steps):
      self.step()
    float(self.loss)

  def choose_threads(self, steps: int) -> dict:
    """Probes torch's thread counts (1 and its default) and keeps the faster one; on a loaded
    machine fewer threads can win, so the comparison is against the peer at its best here."""
    rates = {}
    for threads in sorted({1, self.default_threads}):
      self.torch.set_num_threads(threads)
      self.train(1)
      with Clock() as c:
        self.train(steps)
      rates[threads] = steps / c.wall
    best = max(rates, key=rates.get)
    self.torch.set_num_threads(best)
    return {
      "torch_threads_default": self.default_threads,
      "torch_threads_used": best,
      "threads_probe_steps_per_s": {str(k): round(v, 4) for k, v in rates.items()},
    }

  def profile(self, reps: int) -> dict:
    batch = self.draw()
    params = self.params

    def forward():
      with self.torch.no_grad():
        self.loss_of(*batch).item()

    def forward_train():
      self.loss_of(*batch).item()

    def forward_backward():
      for p in params:
        p.grad = None
      self.loss_of(*batch).backward()

    return {
      "loss forward (no_grad)": _time_ms(forward, reps),
      "loss forward (recording autograd)": _time_ms(forward_train, reps),
      "forward + backward": _time_ms(forward_backward, reps),
      "train step (+ clip, Adam, EMA)": _time_ms(lambda: self.step(batch), reps),
    }


# ---- one model --------------------------------------------------------------------------------


def _progress(message: str) -> None:
  print(f"[bench_images {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_model(model: str, args, peer: dict | None, data_path: str, images: dict) -> dict:
  group = model_group(
    model,
    unet_ch=args.unet_ch,
    dit_hidden=args.dit_hidden,
    dit_depth=args.dit_depth,
    dit_heads=args.dit_heads,
  )
  config = make_config(
    group, data_path=data_path, batch=args.batch, chunk=args.segment, seed=args.seed
  )
  num_classes = config.data.num_classes
  result: dict[str, Any] = {"model_config": group, "num_classes": num_classes}
  counts = {"ours": ours_param_count(group, num_classes=num_classes)}
  _progress(f"{model}: building ours and compiling its chunk")
  ours = Ours(config)
  with Clock() as c:
    ours.train(args.segment)
  ours_info: dict[str, Any] = {"compile_and_first_chunk_s": round(c.wall, 2)}
  theirs = None
  if peer:
    kwargs_fn = diffusers_unet_kwargs if model == "unet" else diffusers_dit_kwargs
    kwargs = kwargs_fn(data_shape=DATA_SHAPE, num_classes=num_classes, **group)
    result["peer_kwargs"] = kwargs
    theirs = Peer(peer, model, kwargs, images, config, seed=args.seed)
    peer_counts = peer_param_counts(theirs.model)
    counts["peer"] = peer_counts["total"]
    counts["peer_per_block_embedding_copies"] = peer_counts["per_block_embedding_copies"]
    counts["match"] = param_match(counts["ours"], peer_counts["total"])
    counts["match_without_embedding_copies"] = param_match(
      counts["ours"], peer_counts["total"] - peer_counts["per_block_embedding_copies"]
    )
    _progress(f"{model}: peer thread probe")
    probe = theirs.choose_threads(args.segment)
  result["param_counts"] = counts
  _progress(f"{model}: timed segments")
  ours_segments, peer_segments = [], []
  for _ in range(args.reps):
    with Clock() as c:
      ours.train(args.segment)
    ours_segments.append(
      {"steps": args.segment, "wall_s": round(c.wall, 4), "cpu_s": round(c.cpu, 4)}
    )
    if theirs:
      with Clock() as c:
        theirs.train(args.segment)
      peer_segments.append(
        {"steps": args.segment, "wall_s": round(c.wall, 4), "cpu_s": round(c.cpu, 4)}
      )
  ours_info.update(_summary(ours_segments))
  result["ours"] = ours_info
  result["peer"] = None
  result["ratio_steps_per_s"] = None
  if theirs:
    result["peer"] = {**_summary(peer_segments), **probe}
    result["ratio_steps_per_s"] = round(
      ours_info["steps_per_s_median"] / result["peer"]["steps_per_s_median"], 3
    )
    result["ratio_cpu_time"] = round(
      result["peer"]["cpu_ms_per_step_median"] / ours_info["cpu_ms_per_step_median"], 3
    )
    result["target_met"] = bool(result["ratio_steps_per_s"] >= TARGET_RATIO)
  if not args.no_profile:
    _progress(f"{model}: profile")
    reps = 3
    result["profile_ms"] = {
      "ours": ours.profile(reps),
      "peer": theirs.profile(reps) if theirs else None,
    }
  return result


# ---- XLA flag trials (subprocesses: XLA reads its flags once per process) ----------------------


def flag_trials(args) -> dict:
  """Ours alone in one subprocess per ``--flags`` item (steps/s medians and the load)."""
  out = {}
  for flags in args.flags.split(";"):
    cmd = [
      sys.executable,
      __file__,
      "--no-peer",
      "--no-profile",
      "--no-flag-trials",
      f"--models={','.join(args.models)}",
      *_size_argv(args),
    ]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
      out[flags or "(none)"] = {
        "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
      }
      continue
    report = json.loads(proc.stdout)
    out[flags] = {m: report["results"][m]["ours"]["steps_per_s_median"] for m in report["results"]}
    out[flags]["loadavg"] = report["environment"]["loadavg_start"]
  return out


def _size_argv(args) -> list[str]:
  return [
    f"--batch={args.batch}",
    f"--segment={args.segment}",
    f"--reps={args.reps}",
    f"--unet-ch={args.unet_ch}",
    f"--dit-hidden={args.dit_hidden}",
    f"--dit-depth={args.dit_depth}",
    f"--dit-heads={args.dit_heads}",
    f"--num-images={args.num_images}",
    f"--seed={args.seed}",
  ]


# ---- main -------------------------------------------------------------------------------------


def _environment(peer: dict | None) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  return {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "jax_version": jax.__version__,
    "jax_backend": jax.default_backend(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    "torch_version": peer["torch"].__version__ if peer else None,
    "diffusers_version": peer["version"] if peer else None,
  }


def run_benchmark(args, argv) -> dict:
  peer, note = (None, "peer skipped: --no-peer") if args.no_peer else import_peer()
  report: dict[str, Any] = {
    "benchmark": "bench_images",
    "command": " ".join(["python", "scripts/bench_images.py", *argv]),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "protocol": {
      "data": f"{args.num_images} random uint8 images {DATA_SHAPE}, random flips",
      "objective": "DDPM eps-MSE, linear betas 1e-4..0.02, 1000 steps",
      "optimizer": "Adam, linear warm-up, clip 1.0, EMA (configs/cifar10_ddpm.py)",
      "batch": args.batch,
      "dtype": "float32",
      "segment_steps": args.segment,
      "segments": args.reps,
      "quick": args.quick,
    },
    "environment": _environment(peer),
    "peer_note": note,
    "notes": [
      "ours: the trainer's jitted chunk of train.fused_steps = segment steps (data on device)",
      "peer: a torch loop, one step per iteration, data indexed from an in-memory tensor",
      "measured on a shared, loaded 2-core CPU: see environment.loadavg_*",
    ],
    "results": {},
  }
  with tempfile.TemporaryDirectory() as tmp:
    data_path = str(pathlib.Path(tmp) / "images.npz")
    images = write_images(pathlib.Path(data_path), num=args.num_images, seed=args.seed)
    for model in args.models:
      report["results"][model] = run_model(model, args, peer, data_path, images)
  report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  report["xla_flag_trials"] = None
  return report


# ---- docs/scaling.md ---------------------------------------------------------------------------


BEGIN = "<!-- bench_images: generated from docs/images_bench.json by `--render`; edit there -->"
END = "<!-- /bench_images -->"


def render_block(report: dict) -> str:
  """The generated part of docs/scaling.md's image section (tables only), from a report."""
  env = report["environment"]
  lines = [
    BEGIN,
    f"Made by `{report['command']}` on {report['date']} (jax {env['jax_version']}, torch "
    f"{env['torch_version']}, diffusers {env['diffusers_version']}; a {env['cpu_count']}-core "
    f"CPU shared with other jobs, load average {env['loadavg_start']} at the start and "
    f"{env.get('loadavg_end')} at the end). Batch {report['protocol']['batch']}, float32, "
    f"{report['protocol']['segments']} alternating segments of "
    f"{report['protocol']['segment_steps']} steps; medians.",
    "",
    "| model | size | params ours | params diffusers | steps/s ours | steps/s diffusers "
    "| ratio | CPU-time ratio | goal 1.0x |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in report["results"].items():
    counts, peer, group = r["param_counts"], r["peer"] or {}, r["model_config"]
    size = (
      f"ch {group['ch']}, mult {tuple(group['ch_mult'])}"
      if name == "unet"
      else f"hidden {group['hidden_size']}, depth {group['depth']}, p {group['patch_size']}"
    )
    met = r.get("target_met")
    lines.append(
      f"| {name} | {size} | {counts['ours']:,} | {counts.get('peer', 0):,} "
      f"| {r['ours']['steps_per_s_median']} | {peer.get('steps_per_s_median', '-')} "
      f"| {r['ratio_steps_per_s']} | {r.get('ratio_cpu_time', '-')} "
      f"| {'-' if met is None else ('met' if met else 'not met')} |"
    )
  profiles = [(n, r["profile_ms"]) for n, r in report["results"].items() if r.get("profile_ms")]
  if profiles:
    lines += ["", "Profile, wall and CPU ms on one fixed batch (median of 3):", ""]
    lines += ["| model | side | part | wall ms | CPU ms |", "|---|---|---|---|---|"]
    for name, prof in profiles:
      for side in ("ours", "peer"):
        for part, t in (prof.get(side) or {}).items():
          lines.append(
            f"| {name} | {side} | {part} | {t['wall_ms_median']} | {t['cpu_ms_median']} |"
          )
  trials = report.get("xla_flag_trials")
  if trials:
    lines += [
      "",
      "Ours under other XLA CPU flags (steps/s; one process each, no peer; by "
      f"`{report.get('xla_flag_trials_command', report['command'])}`):",
      "",
    ]
    lines += ["| XLA_FLAGS | " + " | ".join(report["results"]) + " | load average |"]
    lines += ["|---|" + "---|" * (len(report["results"]) + 1)]
    for flags, row in trials.items():
      cells = [str(row.get(m, row.get("error", "-"))) for m in report["results"]]
      cells.append(str(row.get("loadavg", "-")))
      lines.append(f"| `{flags}` | " + " | ".join(cells) + " |")
  followups = [(name, _load_doc(name)) for name in report.get("followups", [])]
  if followups:
    lines += ["", "Follow-up runs of ours alone (their own JSON in docs/):", ""]
    lines += ["| JSON | command | model | steps/s | CPU ms/step |", "|---|---|---|---|---|"]
    for name, data in followups:
      for model, r in data["results"].items():
        lines.append(
          f"| {name} | `{data['command']}` | {model} | {r['ours']['steps_per_s_median']} "
          f"| {r['ours']['cpu_ms_per_step_median']} |"
        )
  lines.append(END)
  return "\n".join(lines) + "\n"


def _load_doc(name: str) -> dict:
  return json.loads((ROOT / "docs" / name).read_text())


def replace_section(text: str, block: str) -> str:
  """``text`` with the generated block replaced (between its markers), or, without markers,
  appended under the section heading (which is added when absent)."""
  start, end = text.find(BEGIN), text.find(END)
  if start >= 0 and end > start:
    return text[:start] + block + text[end + len(END) + 1 :]
  if SECTION not in text:
    return text.rstrip("\n") + f"\n\n{SECTION}\n\n" + block
  head = text.find(SECTION) + len(SECTION)
  nxt = text.find("\n## ", head)
  cut = len(text) if nxt < 0 else nxt + 1
  return text[:cut].rstrip("\n") + "\n\n" + block + ("\n" + text[cut:] if nxt >= 0 else "")


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.render:
    report = json.loads(pathlib.Path(args.render).read_text())
    doc = ROOT / "docs" / "scaling.md"
    text = doc.read_text() if doc.exists() else "# Scaling\n"
    doc.write_text(replace_section(text, render_block(report)))
    return
  if args.trials_into:
    path = pathlib.Path(args.trials_into)
    report = json.loads(path.read_text())
    _progress("XLA flag trials")
    report["xla_flag_trials"] = flag_trials(args)
    report["xla_flag_trials_command"] = " ".join(["python", "scripts/bench_images.py", *argv])
    report["xla_flag_trials_date"] = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC"
    )
    path.write_text(json.dumps(report, indent=2) + "\n")
    return
  report = run_benchmark(args, argv)
  if args.out:  # written now too: the flag trials take as long again
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  if not args.no_flag_trials:
    _progress("XLA flag trials")
    report["xla_flag_trials"] = flag_trials(args)
  text = json.dumps(report, indent=2) + "\n"
  if args.out:
    pathlib.Path(args.out).write_text(text)
  sys.stdout.write(text)


if __name__ == "__main__":
  main()
