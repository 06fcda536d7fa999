"""The cost of checkpoint digests: save time and peak host memory, digests on against off.

Usage (prints one JSON object; docs/reliability.md records the figures)::

  python scripts/bench_digest.py --saves 3 --out /tmp/bench_digest.json

Each mode runs in a fresh process on 8 simulated CPU devices, with the train state (parameters,
EMA and Adam moments) of a DiT of about 100M parameters sharded by ``mesh.fsdp=8``:

* ``off``: orbax alone (``checkpoint.save`` then ``wait_until_finished``);
* ``on``: what training runs (``checkpoint.save_step``, which copies the shards this process
  holds to the host and hashes them in a background thread while the asynchronous save runs,
  then ``commit_step``, which waits for both, opens the step back and writes the marker with
  the SHA-256 of every file).

Reported per mode: ``blocking_s`` (median time the step loop waits in the save call),
``committed_s`` (median time from the save call to a committed, trusted step), and
``peak_rss_over_start_mib`` over the process's RSS before the first save. In ``on``, also:
``digests_done_s`` and ``orbax_done_s`` (from the save call to the digests being ready and to
orbax having written the step) and ``open_back_s`` (orbax opening the step's metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config():
  import ml_collections  # pylint: disable=import-outside-toplevel

  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config_file(str(ROOT / "configs" / "digits_fm.py"))
  with config.unlocked():
    config.model = ml_collections.ConfigDict(
      dict(name="dit", patch_size=2, hidden_size=768, depth=9, num_heads=12)
    )
  config_lib.apply_overrides(config, ["--config.mesh.fsdp=8", "--config.train.batch_size=8"])
  config_lib.validate(config, num_devices=8)
  return config


def _rss_mib() -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _child(mode: str, saves: int, directory: pathlib.Path) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from diffjax.train import integrity  # pylint: disable=import-outside-toplevel
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.trainer import make_trainer  # pylint: disable=import-outside-toplevel

  config = _config()
  mesh = sharding_lib.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  trainer = make_trainer(config, mesh)
  state = jax.block_until_ready(trainer.create_state())
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  sharded = sum(
    1 for x in jax.tree.leaves(state) if len({str(s.index) for s in x.addressable_shards}) > 1
  )
  manager = ckpt.make_checkpoint_manager(directory, keep=2, async_save=True)
  rss_before = _rss_mib()
  blocking, committed = [], []
  parts = {"digests_done_s": [], "orbax_done_s": [], "open_back_s": []}
  for i in range(1, saves + 1):
    start = time.perf_counter()
    if mode == "off":
      ckpt.save(manager, i, state, {"step": i}, force=True)
      blocking.append(time.perf_counter() - start)
      manager.wait_until_finished()
    else:
      pending = ckpt.save_step(manager, i, state, {"step": i})
      blocking.append(time.perf_counter() - start)
      pending["local"].result()
      parts["digests_done_s"].append(time.perf_counter() - start)
      manager.wait_until_finished()
      parts["orbax_done_s"].append(time.perf_counter() - start)
      ckpt.commit_step(manager, pending, config={}, is_lead=True)
    committed.append(time.perf_counter() - start)
    if mode == "on":
      record, _ = integrity.read_commit(directory / str(i))
      t = time.perf_counter()
      ckpt._check_restorable(directory / str(i), record["arrays"])  # pylint: disable=protected-access
      parts["open_back_s"].append(time.perf_counter() - t)
  manager.close()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out = {
    "mode": mode,
    "params": params,
    "state_mib": round(state_bytes / 2**20, 1),
    "arrays_in_blocks": sharded,
    "arrays": len(jax.tree.leaves(state)),
    "devices": jax.device_count(),
    "blocking_s": round(statistics.median(blocking), 3),
    "committed_s": round(statistics.median(committed), 3),
    "rss_before_saves_mib": round(rss_before, 1),
    "peak_rss_over_start_mib": round(peak - rss_before, 1),
  }
  if mode == "on":
    out |= {k: round(statistics.median(v), 3) for k, v in parts.items()}
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
  parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child, args.saves, pathlib.Path(args.dir))))
    return 0
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
  )
  results = {}
  for mode in ("off", "on"):
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"bench_digest_{mode}_"))
    try:
      proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--saves", str(args.saves)]
        + ["--dir", str(scratch / "checkpoints")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
      )
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  report = {
    "command": "python scripts/bench_digest.py " + " ".join(sys.argv[1:]),
    "date": time.strftime("%Y-%m-%d"),
    "cpus": os.cpu_count(),
    "load_avg_1m": round(os.getloadavg()[0], 1),
    **results,
  }
  text = json.dumps(report, indent=1)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
