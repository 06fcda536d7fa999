"""Compiled memory per device of the train step, by mesh and remat policy (JSON), and the
``## Memory per device`` section of docs/scaling.md rendered from that JSON.

The step is the trainer's own (:func:`diffjax.train.trainer.make_trainer` on a host batch, one
optimizer update), lowered for abstract inputs laid out as the trainer lays them out and compiled,
never run: ``jit(...).lower(...).compile().memory_analysis()`` gives, for one device's program,
the bytes of its arguments (state shard and batch shard), outputs, and temporaries (activations
and everything else XLA keeps live). Models: the CIFAR-10 UNet of configs/cifar10_ddpm.py and a
DiT-S/2 (depth 12, hidden 384, 6 heads, patch 2; Peebles & Xie 2023,
https://arxiv.org/abs/2212.09748) on the same 32x32x3 data, global batch 128.

Meshes on N simulated CPU devices: ``data`` (data=N), ``fsdp`` (fsdp=N), ``fsdp+tensor``
(tensor=2, fsdp=N/2; the DiT only: the UNet has no tensor-parallel layers).

Usage::

  python scripts/bench_memory.py --out docs/memory_bench.json   # compile the grid
  python scripts/bench_memory.py --quick                        # two cells, JSON on stdout
  python scripts/bench_memory.py --render                       # docs/scaling.md section
  python scripts/bench_memory.py --clip-study --out docs/memory_bench.json
      # add the DiT's remat cells with global-norm clipping off, and the same comparison on a
      # 12-block residual MLP in plain JAX + optax (no diffjax), to the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

# XLA's CPU backend schedules for concurrency by default, which runs a rematerialised block's
# recomputation as early as its inputs allow (right after the forward pass) and so keeps the
# memory remat frees; GPU and TPU schedulers are memory-aware. The memory-minimising CPU
# scheduler shows what a remat policy saves.
XLA_FLAGS = (
  "--xla_force_host_platform_device_count=8",
  "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)

if __name__ == "__main__":  # before JAX is imported: the simulated devices and the scheduler
  for flag in XLA_FLAGS:
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
JSON_PATH = DOCS / "memory_bench.json"
PAGE = DOCS / "scaling.md"
SECTION = "## Memory per device"

BATCH = 128
DIT_S2 = dict(
  name="dit", patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0, remat="none"
)
REMATS = ("none", "dots_saveable", "full")


def _config(model: str, *, data_path: str, mesh: dict, remat: str, grad_clip: float | None):
  """configs/cifar10_ddpm.py (its UNet, or DiT-S/2 in its place) reading a 32x32x3 npz from
  the host (one update per program), on the given mesh; ``grad_clip`` replaces the config's
  global-norm clipping threshold when given (0: off)."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config_file(str(ROOT / "configs" / "cifar10_ddpm.py"))
  config.unlock()
  if model == "dit":
    config.model = ml_collections.ConfigDict(DIT_S2)
  config.model.remat = remat
  config.data.kind = "npz"
  config.data.target = "npz"
  config.data.path = data_path
  config.data.device_resident = "off"
  config.data.augment_flip = False
  config.train.batch_size = BATCH
  if grad_clip is not None:
    config.optimizer.grad_clip_norm = grad_clip
  for key, value in mesh.items():
    config.mesh[key] = value
  config.lock()
  return config


def _write_data(folder: pathlib.Path) -> str:
  path = folder / "images.npz"
  rng = np.random.default_rng(0)
  np.savez(path, image=rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8))
  return str(path)


def _state_bytes_per_device(abstract_state, shardings) -> dict:
  """Bytes of params, EMA and optimizer state on one device (from the shardings' shard shapes)
  and in total."""
  import jax  # pylint: disable=import-outside-toplevel

  def both(tree, tree_shardings):
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(tree_shardings)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    local = sum(
      math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards)
    )
    return total, local

  out = {}
  for name in ("params", "ema_params", "opt_state"):
    total, local = both(getattr(abstract_state, name), getattr(shardings, name))
    out[f"{name}_total"], out[f"{name}_per_device"] = total, local
  return out


def measure(
  model: str, *, devices: int, mesh_name: str, remat: str, data_path: str, grad_clip=None
) -> dict:
  """Compiles one train step and returns its memory analysis and the state's layout."""
  import jax  # pylint: disable=import-outside-toplevel

  from diffjax.models import num_params  # pylint: disable=import-outside-toplevel
  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.trainer import make_trainer  # pylint: disable=import-outside-toplevel

  tensor = 2 if mesh_name == "fsdp+tensor" else 1
  mesh_kw = {
    "data": dict(data=devices, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=devices, tensor=1),
    "fsdp+tensor": dict(data=1, fsdp=devices // tensor, tensor=tensor),
  }[mesh_name]
  config = _config(model, data_path=data_path, mesh=mesh_kw, remat=remat, grad_clip=grad_clip)
  config_lib.validate(config, num_devices=devices)
  mesh = sharding_lib.make_mesh(devices=jax.devices()[:devices], **mesh_kw)
  trainer = make_trainer(config, mesh)
  state_in = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    trainer.abstract_state,
    trainer.shardings,
  )
  batch = {
    "x": jax.ShapeDtypeStruct(
      (BATCH, 32, 32, 3), np.float32, sharding=sharding_lib.batch_sharding(mesh)
    )
  }
  # The trainer's advance, whose jitted step carries the shardings and donates the state; the
  # outer jit only makes it lowerable, and donates as the step does.
  step = jax.jit(lambda state, b: trainer.advance(state, 1, b), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state_in, batch).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  row = dict(
    model=model,
    devices=devices,
    mesh=mesh_name,
    mesh_shape=mesh_kw,
    remat=remat,
    grad_clip_norm=float(config.optimizer.grad_clip_norm),
    num_params=num_params(trainer.abstract_state.params),
    argument_bytes=int(analysis.argument_size_in_bytes),
    output_bytes=int(analysis.output_size_in_bytes),
    alias_bytes=int(analysis.alias_size_in_bytes),
    temp_bytes=int(analysis.temp_size_in_bytes),
    compile_s=round(compile_s, 2),
    **_state_bytes_per_device(trainer.abstract_state, trainer.shardings),
  )
  state_total = row["params_total"] + row["opt_state_total"]
  state_local = row["params_per_device"] + row["opt_state_per_device"]
  shards = mesh_kw["fsdp"] * mesh_kw["tensor"]
  row["params_opt_per_device_over_ideal"] = round(state_local / (state_total / shards), 4)
  return row


def grid(quick: bool) -> list[tuple[str, int, str, str]]:
  """(model, devices, mesh, remat) cells: every device count and mesh with remat none, and
  every remat policy on 8 devices (the UNet's on its fsdp mesh: remat does not depend on the
  mesh, and each UNet compile takes minutes on a loaded CPU)."""
  if quick:
    return [("dit", 8, "fsdp", "none"), ("dit", 8, "fsdp", "full")]
  cells = []
  for devices in (8, 4, 2, 1):  # the cells of the goals first
    for model in ("dit", "unet"):
      meshes = ("data", "fsdp", "fsdp+tensor") if model == "dit" else ("data", "fsdp")
      for mesh in meshes:
        if mesh == "fsdp+tensor" and devices < 2:
          continue
        if devices == 1 and mesh == "fsdp":
          continue  # the same program as data=1
        every = devices == 8 and (model == "dit" or mesh == "fsdp")
        remats = REMATS if every else ("none",)
        cells += [(model, devices, mesh, remat) for remat in remats]
  return cells


def run(quick: bool, out: pathlib.Path | None = None) -> dict:
  """The grid's rows; with ``out``, the JSON so far is rewritten there after each cell
  (``complete`` says whether every cell ran)."""
  rows, cells = [], grid(quick)
  with tempfile.TemporaryDirectory() as folder:
    data_path = _write_data(pathlib.Path(folder))
    for model, devices, mesh, remat in cells:
      row = measure(model, devices=devices, mesh_name=mesh, remat=remat, data_path=data_path)
      print(json.dumps(row), file=sys.stderr, flush=True)
      rows.append(row)
      if out is not None:
        out.write_text(json.dumps(_report(rows, quick, len(rows) == len(cells)), indent=1) + "\n")
  return _report(rows, quick, True)


CLIP_STUDY_CELLS = [("dit", 8, "data", remat, 0.0) for remat in ("none", "full")]


def residual_mlp_temps(*, remat: bool, reduction: str) -> int:
  """Temporary bytes of one SGD step of a 12-block residual MLP (width 256, hidden 1024, batch
  2048) in plain JAX + optax, each block under ``jax.checkpoint(nothing_saveable)`` if
  ``remat``, with a reduction over all gradients that every update waits for: ``"none"``,
  ``"clip"`` (``optax.clip_by_global_norm(1.0)``) or ``"guard"`` (the update applied only if the
  gradients' norm is finite, as diffjax's train step does): the interaction of remat with such
  a reduction, without anything of diffjax in the program."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  width, hidden, batch, depth = 256, 1024, 2048, 12

  def block(p, x):
    h = jax.nn.gelu(x @ p["w1"])
    h = jax.nn.gelu(h @ p["w2"])
    return x + h @ p["w3"]

  if remat:
    block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)

  def loss(params, x):
    for p in params:
      x = block(p, x)
    return jnp.mean(x**2)

  head = [optax.clip_by_global_norm(1.0)] if reduction == "clip" else []
  optimizer = optax.chain(*head, optax.sgd(1e-3))

  def step(params, x):
    grads = jax.grad(loss)(params, x)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    if reduction == "guard":
      finite = jnp.isfinite(optax.tree.norm(grads))
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, params)
    return new

  shapes = dict(w1=(width, hidden), w2=(hidden, hidden), w3=(hidden, width))
  params = [{k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}] * depth
  x = jax.ShapeDtypeStruct((batch, width), np.float32)
  compiled = jax.jit(step, donate_argnums=0).lower(params, x).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def clip_study(out: pathlib.Path) -> dict:
  """Adds :data:`CLIP_STUDY_CELLS` and the residual-MLP comparison to the JSON at ``out``; a
  cell already there is kept (delete its row to measure it again)."""
  data = json.loads(out.read_text())
  with tempfile.TemporaryDirectory() as folder:
    data_path = _write_data(pathlib.Path(folder))
    for model, devices, mesh, remat, clip in CLIP_STUDY_CELLS:
      if _find(
        data["rows"], model=model, devices=devices, mesh=mesh, remat=remat, grad_clip_norm=clip
      ):
        continue  # measured already: the residual MLP is the quick part to re-run
      row = measure(
        model, devices=devices, mesh_name=mesh, remat=remat, data_path=data_path, grad_clip=clip
      )
      print(json.dumps(row), file=sys.stderr, flush=True)
      data["rows"].append(row)
  data["residual_mlp"] = [
    dict(remat=remat, reduction=r, temp_bytes=residual_mlp_temps(remat=remat, reduction=r))
    for r in ("none", "clip", "guard")
    for remat in (False, True)
  ]
  data["clip_study"] = dict(
    command=f"python scripts/bench_memory.py --clip-study --out {JSON_PATH.relative_to(ROOT)}",
    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    loadavg=list(os.getloadavg()),
  )
  out.write_text(json.dumps(data, indent=1) + "\n")
  return data


def _report(rows: list, quick: bool, complete: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  return dict(
    command="python scripts/bench_memory.py"
    + (" --quick" if quick else "")
    + " --out "
    + str(JSON_PATH.relative_to(ROOT)),
    complete=complete,
    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    jax_version=jax.__version__,
    backend=f"{jax.default_backend()} ({len(jax.devices())} simulated devices)",
    loadavg=list(os.getloadavg()),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    batch=BATCH,
    data_shape=[32, 32, 3],
    note=(
      "compile only (nothing run); bytes per device from XLA's memory_analysis of the CPU "
      "program; compile_s measured on a loaded 2-core CPU"
    ),
    rows=rows,
  )


# ---- rendering ---------------------------------------------------------------------------------


def _mib(x: float) -> str:
  return f"{x / 2**20:.1f}"


def _find(rows, **keys):
  for row in rows:
    if all(row[k] == v for k, v in keys.items()):
      return row
  return None


def _clip_lines(data: dict) -> list[str]:
  """Why the DiT's remat goal falls short, from the clipping-off cells and the residual MLP."""
  rows = data["rows"]
  none = _find(rows, model="dit", devices=8, mesh="data", remat="none", grad_clip_norm=0.0)
  full = _find(rows, model="dit", devices=8, mesh="data", remat="full", grad_clip_norm=0.0)
  mlp = {(r["remat"], r.get("reduction")): r["temp_bytes"] for r in data.get("residual_mlp", [])}
  if not (none and full and len(mlp) == 6):
    return ["  Why short: not measured (`python scripts/bench_memory.py --clip-study`)."]
  pair = lambda r: f"{_mib(mlp[(False, r)])} -> {_mib(mlp[(True, r)])} MiB"
  study = data["clip_study"]
  return [
    "  Why short: a reduction over all gradients that every parameter's update waits for. The "
    "step has two: the optimizer's global-norm clipping (`optimizer.grad_clip_norm`, 1.0 in the "
    "configs) and the train step's non-finite guard (the update is applied only if the loss and "
    "the gradients' norm are finite). With either, XLA's CPU memory-minimising scheduler keeps "
    "most of the activations remat would free. Clipping off alone does not help while the "
    f"guard stays (DiT, 8 devices, data, clipping off: {_mib(none['temp_bytes'])} -> "
    f"{_mib(full['temp_bytes'])} MiB). The same happens without diffjax: a 12-block residual "
    "MLP in plain JAX + optax (one SGD step, remat none -> full) compiles to "
    f"{pair('none')} of temporaries with no such reduction, {pair('clip')} with "
    f"`optax.clip_by_global_norm`, {pair('guard')} with the guard. Made by "
    f"`{study['command']}`, {study['date']}. Scanning the blocks (`nnx.scan` over stacked "
    "layers) would bound the backward pass's memory by the loop structure rather than by the "
    "scheduler; not built.",
  ]


def render(data: dict) -> str:
  """The ``## Memory per device`` section (markdown) from the JSON."""
  rows = data["rows"]
  lines = [
    SECTION,
    "",
    f"Made by `{data['command']}` then "
    f"`python scripts/bench_memory.py --render`, {data['date']}; jax {data['jax_version']}, "
    f"{data['backend']}. Global batch {data['batch']} of 32x32x3; compiled, not run. "
    "MiB per device from `jit(step).lower(...).compile().memory_analysis()`: arguments "
    "(state shard + batch shard), outputs, temporaries. *P+O / ideal*: the parameters plus "
    "optimizer state one device holds, over their total divided by fsdp x tensor (goal: "
    "within 10%, i.e. <= 1.10).",
    "",
    f"XLA flags: `{data.get('xla_flags', '')}`. XLA's CPU backend schedules for concurrency by "
    "default, which runs a rematerialised block's recomputation as soon as its inputs exist "
    "(during the forward pass) and so keeps the memory remat would free; the memory-minimising "
    "scheduler (`--xla_cpu_enable_concurrency_optimized_scheduler=false`) is what GPU and TPU "
    "schedulers approximate, so the remat columns use it. The `fsdp+tensor` mesh splits the "
    "batch over fsdp only (N/2 shards), so its temporaries per device hold twice the examples "
    "of the `fsdp` mesh's, less the heads and MLP units the tensor axis splits.",
    "",
    "| model | devices | mesh | remat | grad clip | params | args MiB | outputs MiB | temps MiB "
    "| P+O per device MiB | P+O / ideal |",
    "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    po = r["params_per_device"] + r["opt_state_per_device"]
    clip = f"{r['grad_clip_norm']:g}" if r["grad_clip_norm"] else "off"
    lines.append(
      f"| {r['model']} | {r['devices']} | {r['mesh']} | {r['remat']} | {clip} "
      f"| {r['num_params'] / 1e6:.1f}M | {_mib(r['argument_bytes'])} "
      f"| {_mib(r['output_bytes'])} | {_mib(r['temp_bytes'])} | {_mib(po)} "
      f"| {r['params_opt_per_device_over_ideal']:.3f} |"
    )
  if not data.get("complete", True):
    lines += ["", "The grid was not finished: the rows above are the cells that ran."]
  lines += ["", "Goals:", ""]
  sharded = [r for r in rows if r["mesh"] != "data"]
  if sharded:
    worst = max(sharded, key=lambda r: r["params_opt_per_device_over_ideal"])
    ok = worst["params_opt_per_device_over_ideal"] <= 1.10
    lines.append(
      f"- parameters + optimizer state per device within 10% of total / (fsdp x tensor): "
      f"{'met' if ok else 'NOT met'}; worst {worst['params_opt_per_device_over_ideal']:.3f} "
      f"({worst['model']}, {worst['devices']} devices, {worst['mesh']}). The excess: leaves "
      "with no axis that the shard count divides stay replicated (a bias of odd width, step "
      "counters)."
    )
  clipped = [r for r in rows if r["grad_clip_norm"]]  # the configs' recipe: clipping at 1
  for mesh in ("data", "fsdp", "fsdp+tensor"):
    none = _find(clipped, model="dit", devices=8, mesh=mesh, remat="none")
    full = _find(clipped, model="dit", devices=8, mesh=mesh, remat="full")
    dots = _find(clipped, model="dit", devices=8, mesh=mesh, remat="dots_saveable")
    if none and full:
      cut = 1 - full["temp_bytes"] / none["temp_bytes"]
      dots_text = ""
      if dots:
        dots_text = f"; dots_saveable {dots['temp_bytes'] / none['temp_bytes'] - 1:+.0%}"
      lines.append(
        f"- `full` remat cuts the 12-layer DiT's temporaries by >= 40% (8 devices, {mesh}): "
        f"{'met' if cut >= 0.40 else 'NOT met'}, {_mib(none['temp_bytes'])} -> "
        f"{_mib(full['temp_bytes'])} MiB ({-cut:+.0%}{dots_text})."
      )
  if any("NOT met" in line and "remat" in line for line in lines):
    lines += _clip_lines(data)
  unet_none = _find(clipped, model="unet", devices=8, mesh="fsdp", remat="none")
  unet_full = _find(clipped, model="unet", devices=8, mesh="fsdp", remat="full")
  if unet_none and unet_full:
    lines.append(
      f"- UNet, 8 devices, fsdp: temporaries {_mib(unet_none['temp_bytes'])} -> "
      f"{_mib(unet_full['temp_bytes'])} MiB with `full` remat "
      f"({unet_full['temp_bytes'] / unet_none['temp_bytes'] - 1:+.0%})."
    )
  lines.append("")
  return "\n".join(lines)


def write_section(section: str, page: pathlib.Path = PAGE) -> None:
  """Replaces the ``## Memory per device`` section of ``page`` (up to the next ``## ``), or
  appends it; other sections are left as they are."""
  text = page.read_text() if page.exists() else "# Scaling\n\n"
  start = text.find(SECTION)
  if start == -1:
    text = text.rstrip("\n") + "\n\n" + section
  else:
    end = text.find("\n## ", start + len(SECTION))
    text = text[:start] + section + ("" if end == -1 else text[end:])
  page.write_text(text.rstrip("\n") + "\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="two cells only")
  parser.add_argument("--render", action="store_true", help="docs/scaling.md from the JSON")
  parser.add_argument("--out", type=pathlib.Path, help="rewrite this JSON after each cell")
  parser.add_argument(
    "--clip-study", action="store_true", help="add the clipping-off cells to --out's JSON"
  )
  args = parser.parse_args(argv)
  if args.clip_study:
    clip_study(args.out or JSON_PATH)
    return 0
  if args.render:
    write_section(render(json.loads(JSON_PATH.read_text())))
    return 0
  print(json.dumps(run(args.quick, args.out), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
