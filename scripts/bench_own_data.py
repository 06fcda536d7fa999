"""Training speed on a user's own small npz: the data set held on the devices against grain.

The protocol is README.md's "Train on your own data" example, read from the README (its Python
writes spiral.npz, its ``diffjax train`` line gives the config and overrides): I-CFM on 5,000 2D
points with configs/toy2d_icfm.py's model, batch and optimizer. It runs through
:func:`diffjax.train.loop.train` (checkpoints, metrics, the final plot), once per mode per
repetition, the modes alternating so they see the same machine load:

* ``data.device_resident=on``: batches drawn inside fused chunks of ``train.fused_steps``;
* ``data.device_resident=off``: grain's host pipeline, one step per batch;
* the generated 2D toy of configs/toy2d_icfm.py, for reference (the speed to match).

A run's steps/s is the loop's own figure over its logging intervals after the first one (which
holds the compilation): steps after the first log over the seconds they took. Each mode first
runs once untimed (warm-up); the figure is the median over ``--reps`` runs. Prints JSON::

  python scripts/bench_own_data.py > docs/own_data_bench.json
  python scripts/bench_own_data.py --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import tempfile

import jax

from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train.metrics_log import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Train on your own data"


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps-on", type=int, default=3000, help="steps of a device-held run")
  parser.add_argument("--steps-off", type=int, default=300, help="steps of a grain run")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.reps, args.steps_on, args.steps_off = 1, 600, 200
  return args


def _readme_example(folder: pathlib.Path) -> tuple[str, list[str]]:
  """Runs the section's Python in ``folder`` (it writes spiral.npz) and returns the train
  command's config file and ``--config.*`` overrides, the data path made absolute."""
  section = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
  (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  (commands,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
  train = next(shlex.split(c) for c in commands.splitlines() if c.startswith("diffjax train"))
  cwd = os.getcwd()
  os.chdir(folder)
  try:
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 -- our README
  finally:
    os.chdir(cwd)
  overrides = [a for a in train if a.startswith("--config.")]
  overrides = [
    f"--config.data.path={folder / a.split('=', 1)[1]}"
    if a.startswith("--config.data.path=")
    else a
    for a in overrides
  ]
  return train[train.index("--config") + 1], overrides


def _config(config_file: str, overrides: list[str], *, steps: int):
  config = config_lib.load_config_file(str(ROOT / config_file))
  config_lib.apply_overrides(
    config, [*overrides, f"--config.train.steps={steps}", "--config.train.progress_bar=false"]
  )
  config_lib.validate(config, num_devices=1)
  return config


def _steps_per_second(workdir: pathlib.Path) -> float:
  """Steps after the first logging step over the seconds the loop reported for them."""
  rows = read_metrics(workdir / "metrics.jsonl")
  steps = [rows[i]["step"] - rows[i - 1]["step"] for i in range(1, len(rows))]
  seconds = [n / rows[i + 1]["steps_per_second"] for i, n in enumerate(steps)]
  return sum(steps) / sum(seconds)


def _run(config, folder: pathlib.Path) -> float:
  workdir = pathlib.Path(tempfile.mkdtemp(dir=folder))
  loop.train(config, workdir, devices=jax.devices()[:1])
  return _steps_per_second(workdir)


def main():
  args = _parse()
  folder = pathlib.Path(tempfile.mkdtemp(prefix="bench_own_data_"))
  config_file, overrides = _readme_example(folder)
  modes = {
    "device_resident_on": _config(
      config_file, [*overrides, "--config.data.device_resident=on"], steps=args.steps_on
    ),
    "device_resident_off": _config(
      config_file, [*overrides, "--config.data.device_resident=off"], steps=args.steps_off
    ),
    "toy2d_reference": _config(config_file, [], steps=args.steps_on),
  }
  for config in modes.values():  # warm-up
    _run(config, folder)
  rates = {name: [] for name in modes}
  for _ in range(args.reps):
    for name, config in modes.items():
      rates[name].append(_run(config, folder))
      print(f"{name}: {rates[name][-1]:.1f} steps/s", file=sys.stderr)
  median = {name: statistics.median(values) for name, values in rates.items()}
  report = {
    "benchmark": "bench_own_data",
    "date": datetime.date.today().isoformat(),
    "command": "python scripts/bench_own_data.py" + (" --quick" if args.quick else ""),
    "protocol": {
      "what": "README 'Train on your own data': I-CFM on spiral.npz (5,000 2D points)",
      "config": config_file,
      "overrides": overrides,
      "batch_size": modes["device_resident_on"].train.batch_size,
      "fused_steps": modes["device_resident_on"].train.fused_steps,
      "log_every": modes["device_resident_on"].train.log_every,
      "steps": {"device_resident_on": args.steps_on, "device_resident_off": args.steps_off},
      "reps": args.reps,
      "measure": "loop.train steps/s after the first logging interval, median over reps",
    },
    "environment": {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": 1,
      "cpu_count": os.cpu_count(),
      "loadavg": [round(x, 2) for x in os.getloadavg()],
    },
    "steps_per_second": {name: [round(x, 1) for x in values] for name, values in rates.items()},
    "median_steps_per_second": {name: round(x, 1) for name, x in median.items()},
    "speedup_on_over_off": round(median["device_resident_on"] / median["device_resident_off"], 1),
    "on_over_toy2d": round(median["device_resident_on"] / median["toy2d_reference"], 2),
  }
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
