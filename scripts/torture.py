"""Kill `diffjax train` anywhere and check every resumed run ends bit-equal to an uninterrupted one.

Usage (prints one JSON report; docs/reliability.md records the figures)::

  python scripts/torture.py --kills 50 --signals 10 --devices 1 --out /tmp/torture.json

A *chain* trains one workdir to ``train.steps`` through many processes: each is started with the
same command, receives SIGKILL (or SIGTERM / SIGINT) at a random step plus a random delay (so
some land inside a checkpoint save, some during start-up or compilation), and the next one
resumes. The checkpoint mode alternates between synchronous and asynchronous saves (a key that
may change on resume). At the end the final checkpoint's digest of every array (parameters, EMA,
optimizer state, key, step, skip counter) and every logged loss must equal those of one
uninterrupted run, with ``==``. After SIGTERM/SIGINT the process must exit 0 and the next run
must resume at exactly the step it checkpointed.

This file is also the experiment config the chains train (``--config scripts/torture.py:digits``
or ``:toy``): 8x8 digits through grain (an epoch is 28 steps of 64, so kills fall mid-epoch and
two resumes fall within one epoch) with a small MLP, or a 2D toy with fused steps.

``--concurrency N``: N trials of a second trainer started on the workdir of a running one (it
must exit 2 in one line naming the holder), a reader (`evaluate`) beside it, then a SIGKILL or
SIGTERM of the first and a resume through the lock file it left. ``--side-files N``: N resumes of
a workdir whose metrics.jsonl, its ``.tmp`` or tensorboard/ were damaged, replaced by a link, a
folder or a file (tolerated, or one line and exit 2), plus metrics.jsonl and tensorboard/ deleted
during a run (recreated, one warning).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffjax.train.config import (  # noqa: E402  (after the path setup)
  base_config,
  objective_group,
)

__all__ = ["get_config", "Chain", "run_chain", "uninterrupted"]


def get_config(variant: str = "digits") -> ml_collections.ConfigDict:
  """The tiny experiments the chains train (variant ``digits`` or ``toy``)."""
  config = base_config()
  config.seed = 3
  config.model = ml_collections.ConfigDict(dict(name="mlp", width=32, depth=2, activation="selu"))
  config.objective = objective_group("icfm")
  config.optimizer.learning_rate = 1e-3
  config.train.batch_size = 64
  config.train.steps = 40
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 3
  config.train.progress_bar = False
  config.train.ema_decay = 0.9
  config.sample.num = 16
  config.sample.steps = 2
  if variant == "digits":
    config.data.kind = "images"
    config.data.target = "digits"
    config.data.shape = (8, 8, 1)
    config.data.device_resident = "off"  # these chains test grain's iterator state
    config.objective.sigma = 0.0
  elif variant == "toy":
    config.train.steps = 60
    config.train.fused_steps = 2
  else:
    raise ValueError(f"unknown variant {variant!r}; choose digits or toy")
  return config


def _env(devices: int, cache: pathlib.Path | None) -> dict:
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
  )
  if cache is not None:  # compiled programs are reused across the chain's processes
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def _command(workdir: pathlib.Path, variant: str, extra: list[str]) -> list[str]:
  return [
    sys.executable,
    "-m",
    "diffjax.cli",
    "train",
    "--config",
    f"{ROOT / 'scripts' / 'torture.py'}:{variant}",
    "--workdir",
    str(workdir),
    *extra,
  ]


def _last_step(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [0]
  for line in path.read_text(errors="replace").splitlines():
    match = re.match(r'\{"step": (\d+)', line)
    if match:
      steps.append(int(match.group(1)))
  return max(steps)


def _final_record(workdir: pathlib.Path, steps: int) -> dict:
  marker = workdir / "checkpoints" / str(steps) / "diffjax_commit.json"
  record = json.loads(marker.read_text())
  losses = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["step"] in losses:
      raise AssertionError(f"step {row['step']} logged twice")
    losses[row["step"]] = row["loss"]
  return {"arrays": record["arrays"], "losses": losses}


def uninterrupted(
  workdir: pathlib.Path,
  *,
  variant: str,
  devices: int,
  extra: list[str],
  cache: pathlib.Path | None,
  timeout: float = 600,
) -> dict:
  """One run from scratch to the end; its final digests and losses."""
  proc = subprocess.run(
    _command(workdir, variant, extra),
    env=_env(devices, cache),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"reference run failed ({proc.returncode}): {proc.stderr[-2000:]}")
  return _final_record(workdir, get_config(variant).train.steps)


class Chain:
  """Interruptions of one workdir; ``plan`` is a list of signal names."""

  def __init__(self, workdir, *, variant, devices, extra, cache, seed, plan, timeout=600):
    self.workdir = pathlib.Path(workdir)
    self.variant, self.devices, self.extra, self.cache = variant, devices, extra, cache
    self.rng = random.Random(seed)
    self.plan = list(plan)
    self.timeout = timeout
    self.steps = get_config(variant).train.steps
    self.events = []

  def _start(self, index: int, log_path: pathlib.Path):
    mode = "true" if index % 2 else "false"  # alternate sync and async checkpoints
    extra = [*self.extra, f"--config.train.async_checkpoint={mode}"]
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(
      _command(self.workdir, self.variant, extra),
      env=_env(self.devices, self.cache),
      cwd=ROOT,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    return proc, log, mode == "true"

  def run(self) -> dict:
    """Runs the plan, then a final uninterrupted resume; returns the chain's report."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    expected_resume = None
    for index, name in enumerate(self.plan + [None]):
      log_path = self.workdir.parent / f"{self.workdir.name}.run{index}.log"
      proc, log, async_save = self._start(index, log_path)
      started = time.monotonic()
      event = {"run": index, "signal": name, "async_checkpoint": async_save}
      if name is not None:
        # A target beyond every step logged so far, so the signal reaches a process that has
        # resumed and trained; the steps left are shared among the interruptions left, each
        # getting a window [low, end) that its signal must not overshoot.
        low = _last_step(self.workdir) + 1
        left = len(self.plan) - index
        end = low + max(1, (self.steps - 1 - low) // left)
        target = low + self.rng.randrange(end - low)
        delay = self.rng.uniform(0.0, 0.4)
        early = name == "SIGKILL" and self.rng.random() < 0.2
        if early:  # some kills land in start-up, restore or compilation instead
          event.update(early_delay_s=round(self.rng.uniform(0.5, 4.0), 3))
        else:
          event.update(target_step=target, delay_s=round(delay, 3))
        while proc.poll() is None and (
          time.monotonic() - started < event["early_delay_s"]
          if early
          else _last_step(self.workdir) < target
        ):
          if time.monotonic() - started > self.timeout:
            break
          time.sleep(0.005)
        if not early:
          # The delay moves the signal inside a step or a save; on a fast machine it could also
          # carry the run past its window (and the windows left to the next signals, or the
          # last step), so the signal goes at once at the window's end.
          deadline = time.monotonic() + delay
          while (
            proc.poll() is None
            and time.monotonic() < deadline
            and _last_step(self.workdir) < min(end, self.steps - 2)
          ):
            time.sleep(0.002)
        if proc.poll() is None and target < self.steps:
          os.kill(proc.pid, getattr(signal, name))
          event["sent_at_step"] = _last_step(self.workdir)
      try:
        proc.wait(timeout=self.timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        event["hung"] = True
      log.close()
      text = log_path.read_text(errors="replace")
      event["returncode"] = proc.returncode
      event["seconds"] = round(time.monotonic() - started, 2)
      resumed = re.search(r"resumed from step (\d+)", text)
      event["resumed_from"] = int(resumed.group(1)) if resumed else 0
      if expected_resume is not None and resumed:
        event["resume_exact"] = event["resumed_from"] == expected_resume
        expected_resume = None
      ckdir = self.workdir / "checkpoints"
      event["left_mid_save"] = bool(
        ckdir.exists()
        and any(
          "orbax-checkpoint-tmp" in p.name
          or (p.name.isdigit() and not (p / "diffjax_commit.json").exists())
          for p in ckdir.iterdir()
        )
      )
      preempted = re.search(r"(SIGTERM|SIGINT): checkpointed step (\d+)", text)
      if preempted:
        expected_resume = int(preempted.group(2))
        event["checkpointed_step"] = expected_resume
      if name in ("SIGTERM", "SIGINT"):
        # A signal that arrives after the last step (during the final plot) has nothing to save.
        event["ok"] = proc.returncode == 0 and (
          preempted is not None
          or "sent_at_step" not in event
          or event["sent_at_step"] >= self.steps
        )
      elif name == "SIGKILL":
        event["ok"] = proc.returncode in (-9, 0)
      else:
        event["ok"] = proc.returncode == 0
      if not event["ok"]:
        event["log_tail"] = text[-1500:]
      self.events.append(event)
    final = _final_record(self.workdir, self.steps)
    return {"events": self.events, "final": final}


def run_chain(workdir, reference: dict, **kwargs) -> dict:
  """A :class:`Chain` plus the comparison with ``reference`` (from :func:`uninterrupted`)."""
  report = Chain(workdir, **kwargs).run()
  final = report.pop("final")
  report["arrays_equal"] = final["arrays"] == reference["arrays"]
  report["losses_equal"] = final["losses"] == reference["losses"]
  report["all_steps_logged_once"] = sorted(final["losses"]) == sorted(reference["losses"])
  report["events_ok"] = all(
    e["ok"] and e.get("resume_exact", True) and not e.get("hung") for e in report["events"]
  )
  return report


# ---- checkpoint fuzzing (in process) -----------------------------------------------------------


def _mutations(rng: random.Random):
  """Each mutation ``(name, fn(ckdir, steps) -> damaged step or None)`` changes the directory;
  it returns the step whose bytes it damaged (None: it added a stray entry)."""

  def files_of(ckdir, step):
    return sorted(p for p in (ckdir / str(step)).rglob("*") if p.is_file())

  def pick(ckdir, steps):
    step = rng.choice(steps)
    files = files_of(ckdir, step)
    return step, (rng.choice(files) if files else None)

  def flip(ckdir, steps):
    step, f = pick(ckdir, steps)
    data = bytearray(f.read_bytes())
    if not data:
      f.write_bytes(b"\x00")
      return step
    for _ in range(rng.randint(1, 64)):
      data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    f.write_bytes(bytes(data))
    return step

  def truncate(ckdir, steps):
    step, f = pick(ckdir, steps)
    data = f.read_bytes()
    f.write_bytes(data[: rng.randrange(len(data))] if data else b"x")
    return step

  def delete(ckdir, steps):
    step, f = pick(ckdir, steps)
    f.unlink()
    return step

  def zero(ckdir, steps):
    step, f = pick(ckdir, steps)
    f.write_bytes(b"" if f.stat().st_size else b"\x00")
    return step

  def append(ckdir, steps):
    step, f = pick(ckdir, steps)
    f.write_bytes(f.read_bytes() + rng.randbytes(rng.randint(1, 100)))
    return step

  def extra_file(ckdir, steps):
    step = rng.choice(steps)
    (ckdir / str(step) / "state" / f"junk{rng.randrange(1000)}").write_bytes(b"junk")
    return step

  def garbage_marker(ckdir, steps):
    step = rng.choice(steps)
    (ckdir / str(step) / "diffjax_commit.json").write_bytes(rng.randbytes(rng.randint(0, 200)))
    return step

  def marker_config(ckdir, steps):
    step = rng.choice(steps)
    path = ckdir / str(step) / "diffjax_commit.json"
    record = json.loads(path.read_text())
    record["config"]["seed"] = -1
    path.write_text(json.dumps(record))
    return step

  def newer(ckdir):
    taken = [int(p.name.split(".")[0]) for p in ckdir.iterdir() if p.name.split(".")[0].isdigit()]
    return max(taken) + rng.randint(1, 50)

  def stray_dir(ckdir, steps):
    (ckdir / str(newer(ckdir))).mkdir()

  def stray_file(ckdir, steps):
    (ckdir / str(newer(ckdir))).write_bytes(rng.randbytes(10))

  def tmp_dir(ckdir, steps):
    (ckdir / f"{newer(ckdir)}.orbax-checkpoint-tmp-{rng.randrange(10**6)}").mkdir()

  def copy_as_newer(ckdir, steps):
    import shutil  # pylint: disable=import-outside-toplevel

    shutil.copytree(ckdir / str(rng.choice(steps)), ckdir / str(newer(ckdir)))

  return [
    flip,
    truncate,
    delete,
    zero,
    append,
    extra_file,
    garbage_marker,
    marker_config,
    stray_dir,
    stray_file,
    tmp_dir,
    copy_as_newer,
  ]


def _intact(original: pathlib.Path, copy: pathlib.Path) -> bool:
  if not copy.is_dir():
    return False
  files = lambda d: {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()}
  a, b = files(original), files(copy)
  if set(a) != set(b):
    return False
  for name, path in a.items():
    if name == "diffjax_commit.json":
      try:
        if json.loads(b[name].read_bytes()) != json.loads(path.read_bytes()):
          return False
      except ValueError:
        return False
    elif path.read_bytes() != b[name].read_bytes():
      return False
  return True


def fuzz_checkpoints(
  workdir: pathlib.Path, config, *, trials: int, seed: int, scratch: pathlib.Path, restore
) -> dict:
  """``trials`` random damages (1 to 3 mutations each) of copies of ``workdir/checkpoints``;
  ``restore(copy_workdir)`` must return the newest undamaged step with arrays equal to its
  recorded digests, or ``None`` when every step is damaged, within 60 s, never raising anything
  but a clear ``ValueError``."""
  import shutil  # pylint: disable=import-outside-toplevel

  from diffjax.train import integrity  # pylint: disable=import-outside-toplevel

  rng = random.Random(seed)
  ckdir = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  recorded = {
    s: json.loads((ckdir / str(s) / "diffjax_commit.json").read_text())["arrays"] for s in steps
  }
  mutations = _mutations(rng)
  counts = {
    "trials": 0,
    "fell_back": 0,
    "newest_kept": 0,
    "no_valid_step": 0,
    "clear_errors": 0,
    "wrong": 0,
    "max_seconds": 0.0,
  }
  failures = []
  for trial in range(trials):
    copy = scratch / f"t{trial}"
    shutil.copytree(ckdir, copy / "checkpoints")
    damaged = set()
    names = []
    for _ in range(rng.randint(1, 3)):
      mutation = rng.choice(mutations)
      names.append(mutation.__name__)
      hit = mutation(copy / "checkpoints", [s for s in steps if s not in damaged] or steps)
      if hit is not None:
        damaged.add(hit)
    # What counts as damaged is decided from the bytes, not from the mutation's intent (a
    # flipped byte may leave a marker's JSON meaning unchanged).
    damaged = {s for s in steps if not _intact(ckdir / str(s), copy / "checkpoints" / str(s))}
    valid = [s for s in steps if s not in damaged]
    expected = max(valid) if valid else None
    start = time.monotonic()
    try:
      result = restore(copy)
    except ValueError as e:
      counts["clear_errors"] += 1
      result = ("error", str(e).splitlines()[0][:200])
    seconds = time.monotonic() - start
    counts["max_seconds"] = max(counts["max_seconds"], round(seconds, 3))
    counts["trials"] += 1
    got = None if result is None else result[0]
    ok = (
      got == expected
      and seconds < 60
      and (result is None or integrity.array_digests(result[1]) == recorded[got])
    )
    if ok:
      counts[
        "no_valid_step" if got is None else "newest_kept" if got == steps[-1] else "fell_back"
      ] += 1
    else:
      counts["wrong"] += 1
      failures.append(
        {
          "trial": trial,
          "mutations": names,
          "damaged": sorted(damaged),
          "expected": expected,
          "got": got if got != "error" else result,
        }
      )
    shutil.rmtree(copy, ignore_errors=True)
  return {"counts": counts, "failures": failures[:10]}


def _fuzz_main(args) -> int:
  """Trains the toy variant for 12 steps (checkpoints 4, 8, 12) in this process, then fuzzes."""
  import logging  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from diffjax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train import loop  # pylint: disable=import-outside-toplevel
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.trainer import make_trainer  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(args.root)
  shutil.rmtree(root, ignore_errors=True)
  config = get_config("toy")
  with config.unlocked():
    config.train.steps, config.train.checkpoint_every, config.train.keep_checkpoints = 12, 4, 5
    config.train.async_checkpoint = False
  config.lock()
  config_lib.validate(config, num_devices=1)
  loop.train(config, root / "run", devices=jax.devices()[:1])
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  trainer = make_trainer(config, mesh)
  target = ckpt.abstract_with_shardings(trainer.abstract_state, trainer.shardings)

  def restore(copy):
    manager = ckpt.make_checkpoint_manager(copy / "checkpoints", keep=100, async_save=False)
    try:
      ckpt.prepare_directory(copy / "checkpoints")
      return ckpt.restore_verified(
        manager,
        target,
        config=config_lib.resume_fingerprint(config),
        move_bad=True,
        config_differences=config_lib.fingerprint_differences,
      )
    finally:
      manager.close()

  logging.getLogger("diffjax").setLevel(logging.ERROR)
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  started = time.monotonic()
  report = fuzz_checkpoints(
    root / "run",
    config,
    trials=args.fuzz,
    seed=args.seed,
    scratch=root / "scratch",
    restore=restore,
  )
  report["seconds"] = round(time.monotonic() - started, 1)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  print(json.dumps(report["counts"] | {"seconds": report["seconds"]}))
  return 0 if report["counts"]["wrong"] == 0 else 1


# ---- concurrent trainers and readers (processes) ------------------------------------------------

_TOY_LONG = [  # a toy run that trains until it is stopped, logging and saving often
  "--config.train.steps=1000000",
  "--config.train.fused_steps=20",
  "--config.train.log_every=20",
  "--config.train.checkpoint_every=100",
]


def _popen(workdir, extra, log_path, cache, *, command=None):
  log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 -- closed by the caller
  proc = subprocess.Popen(
    command or _command(workdir, "toy", extra),
    env=_env(1, cache),
    cwd=ROOT,
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  return proc, log


def _wait_for_step(proc, workdir: pathlib.Path, step: int, timeout: float = 300) -> bool:
  deadline = time.monotonic() + timeout
  while proc.poll() is None and time.monotonic() < deadline:
    if _last_step(workdir) >= step:
      return True
    time.sleep(0.05)
  return False


def _error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("diffjax: error:")]


def concurrency_trial(workdir: pathlib.Path, *, index: int, cache, rng: random.Random) -> dict:
  """A trainer A runs; a second trainer on the workdir (same config, or another model) must exit
  2 at once in one line, without disturbing A; a reader (`evaluate`) runs beside A; A is then
  killed (SIGKILL) or preempted (SIGTERM) and the same command must resume from its last
  checkpoint, the lock file left behind notwithstanding."""
  trial = {"trial": index, "second": "same config" if index % 2 == 0 else "other model"}
  logs = workdir.parent / f"{workdir.name}.logs"
  logs.mkdir(parents=True, exist_ok=True)
  first, first_log = _popen(workdir, _TOY_LONG, logs / "a.log", cache)
  try:
    trial["a_started"] = _wait_for_step(first, workdir, 120)
    extra = _TOY_LONG if index % 2 == 0 else [*_TOY_LONG, "--config.model.width=48"]
    started = time.monotonic()
    second = subprocess.run(
      _command(workdir, "toy", extra),
      env=_env(1, cache),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    trial["b_seconds"] = round(time.monotonic() - started, 2)
    lines = _error_lines(second.stderr)
    trial["b_refused"] = second.returncode == 2 and len(lines) == 1
    trial["b_no_traceback"] = "Traceback" not in second.stderr
    trial["b_named_holder"] = bool(lines) and f"pid {first.pid}," in lines[0]
    trial["b_line"] = lines[0][:300] if lines else second.stderr[-300:]
    reader = subprocess.run(
      [sys.executable, "-m", "diffjax.cli", "evaluate", "--workdir", str(workdir), "--num", "64"],
      env=_env(1, cache),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    trial["reader_ok"] = reader.returncode == 0
    if reader.returncode:
      trial["reader_tail"] = reader.stderr[-500:]
    trial["a_alive_after"] = first.poll() is None
    stop = "SIGKILL" if rng.random() < 0.5 else "SIGTERM"
    trial["stop"] = stop
    if first.poll() is None:
      os.kill(first.pid, getattr(signal, stop))
  finally:
    if first.poll() is None:
      try:
        first.wait(timeout=120)
      except subprocess.TimeoutExpired:
        first.kill()
        first.wait()
    first_log.close()
  trial["a_returncode"] = first.returncode
  ckdir = workdir / "checkpoints"
  committed = [
    int(p.name)
    for p in ckdir.iterdir()
    if p.name.isdigit() and (p / "diffjax_commit.json").exists()
  ]
  last = max(committed, default=0)
  resumed = subprocess.run(
    _command(workdir, "toy", [*_TOY_LONG[1:], f"--config.train.steps={last + 40}"]),
    env=_env(1, cache),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  match = re.search(r"resumed from step (\d+)", resumed.stderr)
  trial["resumed_from"] = int(match.group(1)) if match else None
  trial["resume_ok"] = resumed.returncode == 0 and trial["resumed_from"] == last and last > 0
  if not trial["resume_ok"]:
    trial["resume_tail"] = resumed.stderr[-800:]
  trial["ok"] = (
    trial["a_started"]
    and trial["b_refused"]
    and trial["b_no_traceback"]
    and (trial["b_named_holder"] or trial["second"] == "other model")
    and trial["a_alive_after"]
    and trial["a_returncode"] in ((0,) if stop == "SIGTERM" else (-9,))
    and trial["resume_ok"]
  )
  return trial


def _concurrency_main(args) -> int:
  import shutil  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(args.root)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  rng = random.Random(args.seed)
  started = time.monotonic()
  trials = [
    concurrency_trial(root / f"wd{i}", index=i, cache=root / "jax_cache", rng=rng)
    for i in range(args.concurrency)
  ]
  summary = {
    "trials": len(trials),
    "second_trainers_refused": sum(t["b_refused"] and t["b_no_traceback"] for t in trials),
    "refusals_naming_the_holder": sum(t["b_named_holder"] for t in trials),
    "slowest_refusal_s": max(t["b_seconds"] for t in trials),
    "readers_ok": sum(t["reader_ok"] for t in trials),
    "first_trainer_undisturbed": sum(t["a_alive_after"] for t in trials),
    "resumed_after_kill_or_sigterm": sum(t["resume_ok"] for t in trials),
    "all_ok": all(t["ok"] and t["reader_ok"] for t in trials),
    "seconds": round(time.monotonic() - started, 1),
  }
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))
  print(json.dumps(summary))
  return 0 if summary["all_ok"] else 1


# ---- damaged, vanished and misplaced side files (processes) ----------------------------------


def _plant_outside(root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  outside = root / "outside.txt"
  outside.write_text("not diffjax's\n")
  return outside


def _damage_line(path: pathlib.Path, rng: random.Random, bad: bytes) -> None:
  lines = path.read_bytes().split(b"\n")
  lines[rng.randrange(len(lines) - 1)] = bad
  path.write_bytes(b"\n".join(lines))


# name -> (damage(workdir, outside, rng), expected outcome: "resume" or "refuse"); the helpers
# they call are defined below, before any of them runs.
_SIDE_DAMAGE = {
  "non_utf8_byte": (
    lambda w, o, r: _damage_line(w / "metrics.jsonl", r, b'{"step": 3, "loss": \xff}'),
    "resume",
  ),
  "garbage_line": (
    lambda w, o, r: _damage_line(w / "metrics.jsonl", r, b"\x00\x01garbage{{"),
    "resume",
  ),
  "binary_appended": (
    lambda w, o, r: _append(w / "metrics.jsonl", bytes(r.randrange(256) for _ in range(64))),
    "resume",
  ),
  "empty_file": (lambda w, o, r: (w / "metrics.jsonl").write_bytes(b""), "resume"),
  "not_a_row": (lambda w, o, r: _damage_line(w / "metrics.jsonl", r, b'[{"step": 2}]'), "resume"),
  "tmp_symlink": (lambda w, o, r: (w / "metrics.jsonl.tmp").symlink_to(o), "resume"),
  "tmp_stale_file": (lambda w, o, r: (w / "metrics.jsonl.tmp").write_text("stale"), "resume"),
  "metrics_symlink": (
    lambda w, o, r: ((w / "metrics.jsonl").unlink(), (w / "metrics.jsonl").symlink_to(o)),
    "resume",
  ),
  "metrics_deleted": (lambda w, o, r: (w / "metrics.jsonl").unlink(), "resume"),
  "metrics_is_a_directory": (
    lambda w, o, r: ((w / "metrics.jsonl").unlink(), (w / "metrics.jsonl").mkdir()),
    "refuse",
  ),
  "tensorboard_is_a_file": (
    lambda w, o, r: (_rmtree(w / "tensorboard"), (w / "tensorboard").write_text("x")),
    "refuse",
  ),
}


def _rmtree(path) -> None:
  import shutil  # pylint: disable=import-outside-toplevel

  shutil.rmtree(path)


def _append(path: pathlib.Path, data: bytes) -> None:
  with open(path, "ab") as f:
    f.write(data)


def side_file_trial(base: pathlib.Path, root: pathlib.Path, name: str, *, cache, rng) -> dict:
  """Copies the 8-step base workdir, applies damage ``name``, resumes to step 12: a damage to
  tolerate must resume (exit 0, the undamaged rows kept, steps 9 to 12 appended, nothing outside
  the workdir written), one to refuse must exit 2 with one line and no traceback."""
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = root / name
  shutil.copytree(base, workdir, symlinks=True)
  outside = _plant_outside(root / f"{name}.outside")
  before_rows = {row["step"] for row in _rows_of(workdir / "metrics.jsonl")}
  damage, expected = _SIDE_DAMAGE[name]
  damage(workdir, outside, rng)
  survivors = {row["step"] for row in _rows_of(workdir / "metrics.jsonl")} & before_rows
  proc = subprocess.run(
    _command(workdir, "toy", ["--config.train.steps=12"]),
    env=_env(1, cache),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  trial = {"damage": name, "expected": expected, "returncode": proc.returncode}
  trial["outside_untouched"] = outside.read_text() == "not diffjax's\n"
  if expected == "refuse":
    lines = _error_lines(proc.stderr)
    trial["line"] = lines[0][:300] if lines else None
    trial["ok"] = proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
  else:
    steps = [row["step"] for row in _rows_of(workdir / "metrics.jsonl")]
    trial["ok"] = (
      proc.returncode == 0
      and steps == sorted(set(steps))
      and survivors <= set(steps)
      and set(range(9, 13)) <= set(steps)
      and not list(workdir.glob("metrics.jsonl*.tmp"))
    )
  trial["ok"] = trial["ok"] and trial["outside_untouched"]
  if not trial["ok"]:
    trial["stderr_tail"] = proc.stderr[-800:]
  return trial


def _rows_of(path: pathlib.Path) -> list[dict]:
  """The rows diffjax's own reader keeps (never through a symlink, never a directory)."""
  if path.is_symlink() or not path.is_file():
    return []
  from diffjax.train.metrics_log import read_metrics  # pylint: disable=import-outside-toplevel

  return read_metrics(path)


def vanish_trial(root: pathlib.Path, what: str, *, cache) -> dict:
  """metrics.jsonl or tensorboard/ deleted while a run trains: the run recreates it, says so,
  keeps logging, and a SIGTERM still ends it with exit 0."""
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = root / f"vanish_{what}"
  proc, log = _popen(workdir, _TOY_LONG, root / f"vanish_{what}.log", cache)
  trial = {"damage": f"{what}_deleted_mid_run"}
  try:
    trial["started"] = _wait_for_step(proc, workdir, 100)
    deleted_at = _last_step(workdir)
    if what == "metrics":
      (workdir / "metrics.jsonl").unlink()
    else:
      shutil.rmtree(workdir / "tensorboard")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
      rows = _rows_of(workdir / "metrics.jsonl")
      tb = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
      if rows and rows[-1]["step"] >= deleted_at + 100 and (what == "metrics" or tb):
        break
      time.sleep(0.1)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
  text = (root / f"vanish_{what}.log").read_text(errors="replace")
  rows = _rows_of(workdir / "metrics.jsonl")
  trial["returncode"] = proc.returncode
  trial["warned"] = text.count("vanished during the run") == 1
  trial["logging_went_on"] = bool(rows) and rows[-1]["step"] >= deleted_at + 100
  trial["recreated"] = (workdir / "metrics.jsonl").is_file() and bool(
    list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  )
  trial["ok"] = (
    trial["started"]
    and proc.returncode == 0
    and trial["warned"]
    and trial["logging_went_on"]
    and trial["recreated"]
  )
  if not trial["ok"]:
    trial["log_tail"] = text[-800:]
  return trial


def _side_files_main(args) -> int:
  import logging  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel

  logging.getLogger("diffjax").setLevel(logging.ERROR)  # damaged rows read back by this script
  root = pathlib.Path(args.root)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  cache = root / "jax_cache"
  started = time.monotonic()
  base = root / "base"
  subprocess.run(
    _command(base, "toy", ["--config.train.steps=8", "--config.train.checkpoint_every=4"]),
    env=_env(1, cache),
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=600,
  )
  rng = random.Random(args.seed)
  names = sorted(_SIDE_DAMAGE)
  trials = [
    side_file_trial(base, root / f"round{i}", names[i % len(names)], cache=cache, rng=rng)
    for i in range(args.side_files)
  ]
  trials += [vanish_trial(root, what, cache=cache) for what in ("metrics", "tensorboard")]
  summary = {
    "trials": len(trials),
    "kinds": len(names) + 2,
    "tolerated": sum(t["ok"] for t in trials if t.get("expected") != "refuse"),
    "refused_in_one_line": sum(t["ok"] for t in trials if t.get("expected") == "refuse"),
    "failed": [t["damage"] for t in trials if not t["ok"]],
    "all_ok": all(t["ok"] for t in trials),
    "seconds": round(time.monotonic() - started, 1),
  }
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))
  print(json.dumps(summary))
  return 0 if summary["all_ok"] else 1


# Workdir name characters tried by --paths (issue 19.1): each either saves and restores, or is
# refused before training with one line.
PATH_CHARACTERS = [" ", "[", "]", "[x]", "\\", "*", "?", "%", "%20", "#", "=", ",", "é", "日本"]
PATH_CHARACTERS += ["'", '"', ":", ";", "&", "$", "!", "{}", "~", "@", "+", "^", "|", "\t", ".."]


def path_trial(root: pathlib.Path, chars: str) -> dict:
  """A workdir named with ``chars``: refused in one line, or a step saved, committed and
  restored bit-equal (through the library's save, commit and verified restore)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel

  directory = root / f"w{chars}x" / "checkpoints"
  try:
    ckpt.check_directory(directory)
  except ckpt.CheckpointPathError as e:
    return {"chars": chars, "result": "refused", "one_line": "\n" not in str(e)}
  state = {"w": jnp.arange(12.0).reshape(4, 3), "k": jnp.arange(3, dtype=jnp.uint32)}
  target = {k: jax_shape(v) for k, v in state.items()}
  manager = ckpt.make_checkpoint_manager(directory, keep=2, async_save=True)
  try:
    pending = ckpt.save_step(manager, 1, state, {"step": 1})
    ckpt.commit_step(manager, pending, config={}, is_lead=True)
    restored = ckpt.restore_verified(
      manager, target, config={}, move_bad=False, config_differences=lambda a, b: []
    )
  except Exception as e:  # noqa: BLE001 -- reported as a failure of this character
    return {"chars": chars, "result": f"failed: {type(e).__name__}: {str(e)[:120]}"}
  finally:
    manager.close()
  ok = restored is not None and all(np.array_equal(restored[1][k], state[k]) for k in state)
  return {"chars": chars, "result": "restored" if ok else "not restored"}


def jax_shape(x):
  import jax  # pylint: disable=import-outside-toplevel

  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _paths_main(args) -> int:
  import logging  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel

  logging.getLogger("absl").setLevel(logging.CRITICAL)
  root = pathlib.Path(args.root) / "paths"
  shutil.rmtree(root, ignore_errors=True)
  trials = [path_trial(root, c) for c in PATH_CHARACTERS]
  report = {
    "tried": len(trials),
    "restored": [t["chars"] for t in trials if t["result"] == "restored"],
    "refused_in_one_line": [t["chars"] for t in trials if t.get("one_line")],
    "failed": [t for t in trials if t["result"] not in ("restored", "refused")],
  }
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False))
  print(json.dumps(report, ensure_ascii=False))
  return 0 if not report["failed"] else 1


def symlink_trials(root: pathlib.Path) -> list[dict]:
  """Links planted where diffjax writes or moves checkpoint files (issue 19.7); each must be
  refused in one line or ignored, and the file outside the workdir must stay unchanged."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from diffjax.train import atomic_write, integrity  # pylint: disable=import-outside-toplevel
  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel

  state = {"w": jnp.arange(6.0)}
  results = []

  def fresh(name):
    workdir = root / name
    victim = root / f"{name}.victim"
    victim.write_text("outside")
    outside = root / f"{name}.outside"
    outside.mkdir()
    manager = ckpt.make_checkpoint_manager(workdir / "checkpoints", keep=5, async_save=False)
    pending = ckpt.save_step(manager, 1, state, {"step": 1})
    ckpt.commit_step(manager, pending, config={}, is_lead=True)
    return workdir, victim, outside, manager

  def intact(victim, outside):
    return victim.read_text() == "outside" and not any(outside.iterdir())

  def attempt(name, plant, act):
    workdir, victim, outside, manager = fresh(name)
    try:
      plant(workdir, victim, outside)
      try:
        act(workdir, manager)
        outcome = "ignored"
      except (ckpt.CheckpointPathError, OSError) as e:
        outcome = "refused" if "\n" not in str(e) else "refused, several lines"
    finally:
      manager.close()
    results.append({"plant": name, "outcome": outcome, "outside_intact": intact(victim, outside)})

  def prepare(workdir, manager):
    del manager
    ckpt.prepare_directory(workdir / "checkpoints", config={}, config_differences=None)

  attempt(
    "step_named_link",
    lambda w, v, o: (w / "checkpoints" / "9").symlink_to(o),
    prepare,
  )
  attempt(
    "tmp_named_link",
    lambda w, v, o: (w / "checkpoints" / "9.orbax-checkpoint-tmp-1").symlink_to(o),
    prepare,
  )

  def quarantine_link(w, v, o):
    (w / ckpt.QUARANTINE).symlink_to(o)
    (w / "checkpoints" / "1" / integrity.COMMIT_FILE).unlink()  # a step to move aside

  attempt("quarantine_link", quarantine_link, prepare)
  attempt(
    "commit_tmp_link",
    lambda w, v, o: (w / "checkpoints" / "1" / (integrity.COMMIT_FILE + ".tmp")).symlink_to(v),
    lambda w, m: integrity.write_commit(w / "checkpoints" / "1", step=1, arrays={}, config={}),
  )
  attempt(
    "config_json_tmp_link",
    lambda w, v, o: (w / "config.json.tmp").symlink_to(v),
    lambda w, m: atomic_write.write_atomic(w / "config.json", "{}"),
  )
  attempt(
    "link_inside_step",
    lambda w, v, o: (w / "checkpoints" / "1" / "state" / "extra").symlink_to(v),
    prepare,
  )
  return results


def _symlinks_main(args) -> int:
  import logging  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel

  logging.getLogger("absl").setLevel(logging.CRITICAL)
  logging.getLogger("diffjax").setLevel(logging.ERROR)
  root = pathlib.Path(args.root) / "symlinks"
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  trials = symlink_trials(root)
  report = {
    "planted": len(trials),
    "outside_intact": sum(t["outside_intact"] for t in trials),
    "refused_in_one_line": sum(t["outcome"] == "refused" for t in trials),
    "trials": trials,
  }
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  print(json.dumps(report))
  return 0 if report["outside_intact"] == len(trials) else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=50, help="SIGKILLs in all")
  parser.add_argument("--signals", type=int, default=10, help="SIGTERM/SIGINT in all")
  parser.add_argument("--per-chain", type=int, default=10, help="interruptions per workdir")
  parser.add_argument("--variant", default="digits", choices=["digits", "toy"])
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default="/tmp/diffjax_torture")
  parser.add_argument("--out", default=None)
  parser.add_argument(
    "--fuzz", type=int, default=0, help="instead of kills: this many fuzzed checkpoint directories"
  )
  parser.add_argument(
    "--concurrency",
    type=int,
    default=0,
    help="instead of kills: this many trials of a second trainer and a reader beside a running "
    "trainer, then a kill and a resume",
  )
  parser.add_argument(
    "--side-files",
    type=int,
    default=0,
    help="instead of kills: this many damaged side-file resumes (plus two deleted mid-run)",
  )
  parser.add_argument(
    "--paths",
    action="store_true",
    help="instead of kills: save and restore in workdirs named with PATH_CHARACTERS",
  )
  parser.add_argument(
    "--symlinks",
    action="store_true",
    help="instead of kills: plant symbolic links where checkpoints are written or moved",
  )
  args = parser.parse_args()
  if args.paths:
    return _paths_main(args)
  if args.symlinks:
    return _symlinks_main(args)
  if args.fuzz:
    return _fuzz_main(args)
  if args.concurrency:
    return _concurrency_main(args)
  if args.side_files:
    return _side_files_main(args)

  root = pathlib.Path(args.root)
  if root.exists():
    import shutil  # pylint: disable=import-outside-toplevel

    shutil.rmtree(root)
  root.mkdir(parents=True)
  cache = root / "jax_cache"
  started = time.monotonic()
  reference = uninterrupted(
    root / "reference", variant=args.variant, devices=args.devices, extra=[], cache=cache
  )
  plan = (
    ["SIGKILL"] * args.kills
    + ["SIGTERM", "SIGINT"] * (args.signals // 2)
    + (["SIGTERM"] * (args.signals % 2))
  )
  random.Random(args.seed).shuffle(plan)
  chains = []
  for c, i in enumerate(range(0, len(plan), args.per_chain)):
    chains.append(
      run_chain(
        root / f"chain{c}",
        reference,
        variant=args.variant,
        devices=args.devices,
        extra=[],
        cache=cache,
        seed=args.seed + c,
        plan=plan[i : i + args.per_chain],
      )
    )
    summary = _summary(args, chains, started)
    if args.out:  # after every chain, so a long run reports what it has done so far
      pathlib.Path(args.out).write_text(
        json.dumps({"summary": summary, "chains": chains}, indent=1)
      )
  summary = _summary(args, chains, started)
  report = {"summary": summary, "chains": chains}
  text = json.dumps(report, indent=1)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  print(json.dumps(summary))
  ok = summary["all_events_ok"] and summary["chains_bit_equal"] == len(chains)
  return 0 if ok else 1


def _summary(args, chains, started) -> dict:
  events = [e for ch in chains for e in ch["events"]]
  return {
    "variant": args.variant,
    "devices": args.devices,
    "kills_sent": sum(1 for e in events if e["signal"] == "SIGKILL" and "sent_at_step" in e),
    "signals_sent": sum(
      1 for e in events if e["signal"] in ("SIGTERM", "SIGINT") and "sent_at_step" in e
    ),
    "kills_that_left_a_partial_save": sum(
      1 for e in events if e["signal"] == "SIGKILL" and e["left_mid_save"]
    ),
    "async_runs": sum(1 for e in events if e["async_checkpoint"]),
    "preemptions_resumed_exactly": sum(1 for e in events if e.get("resume_exact")),
    "chains": len(chains),
    "chains_bit_equal": sum(1 for ch in chains if ch["arrays_equal"] and ch["losses_equal"]),
    "all_events_ok": all(ch["events_ok"] for ch in chains),
    "seconds": round(time.monotonic() - started, 1),
  }


if __name__ == "__main__":
  sys.exit(main())
