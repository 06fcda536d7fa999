"""What a training run reports: the end-of-run summary, plots every ``train.plot_every`` steps,
TensorBoard (learning rate, sample images, the config), strict-JSON metrics and plain progress
lines when stderr is not a terminal.

One tiny run on one device (shared by the fast tests) with a NaN batch forced at one step; the
checks read its files back independently (event-file records parsed here, JSON parsed strictly,
the warm-up schedule in closed form). The slow test runs the ``diffjax train`` command itself.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import shlex
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny  # pylint: disable=wrong-import-order

from diffjax import cli
from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train import trainer as trainer_lib
from diffjax.train.metrics_log import MetricsWriter, read_metrics
from diffjax.train.step import step_keys
from diffjax.train.summary import format_duration, format_summary, progress_line

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEARNING_RATE, WARMUP = 1e-3, 8
# 12 steps in fused chunks of at most 4 that must also end on the plot step 6 (chunks 4, 2, 2,
# 4): logs at 4, 8, 12, checkpoints at 4, 8, 12 (tiny.TINY), plots at 6 and 12.
OVERRIDES = [
  "--config.train.steps=12",
  "--config.train.fused_steps=4",
  "--config.train.log_every=4",
  "--config.train.plot_every=6",
  f"--config.optimizer.learning_rate={LEARNING_RATE}",
  f"--config.optimizer.warmup_steps={WARMUP}",
]
NAN_STEP = 2  # 1-based: its batch is NaN, so the row of step 4 averages a NaN loss


def _strict_json(line: str):
  """``json.loads`` that refuses NaN and Infinity, as strict (RFC 8259) readers do."""

  def refuse(token):
    raise ValueError(f"non-standard JSON constant {token}")

  return json.loads(line, parse_constant=refuse)


def _nan_data_at(step: int, seed: int):
  """``build_experiment`` whose batch of (1-based) ``step`` is all NaN: the step's data key is
  ``step_keys(base, step - 1)[0]``, with ``base`` the second half of ``split(PRNGKey(seed))``
  (``init_train_state``), so the batch is aimed at by its key (as in test_reliability.py)."""
  original = trainer_lib.build_experiment
  base = jax.random.split(jax.random.PRNGKey(seed))[1]
  bad_key = step_keys(base, jnp.int32(step - 1))[0]

  def build(config, *, mesh):
    experiment = original(config, mesh=mesh)
    sample_batch = experiment.sample_batch

    def poisoned(key):
      batch = sample_batch(key)
      return {**batch, "x": jnp.where(jnp.all(key == bad_key), jnp.nan, batch["x"])}

    return experiment._replace(sample_batch=poisoned)

  return build


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines: list[str] = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
  """The tiny run on one device (``diffjax train`` prints ``result.summary()``; the slow test
  below runs the command itself): workdir, result, summary and the diffjax log lines."""
  workdir = tmp_path_factory.mktemp("reports") / "wd"
  config = tiny.tiny_config(*OVERRIDES)
  config_lib.validate(config, num_devices=1)
  records = _Records()
  logger = logging.getLogger("diffjax")
  level = logger.level
  logger.addHandler(records)
  logger.setLevel(logging.INFO)  # as the CLI sets it
  original = trainer_lib.build_experiment
  trainer_lib.build_experiment = _nan_data_at(NAN_STEP, seed=config.seed)
  try:
    result = loop.train(config, workdir, devices=jax.devices()[:1])
  finally:
    trainer_lib.build_experiment = original
    logger.removeHandler(records)
    logger.setLevel(level)
  return types.SimpleNamespace(
    workdir=workdir, result=result, summary=result.summary(), log=records.lines
  )


def _summary_rows(text: str) -> dict[str, str]:
  """``{name: value}`` of the summary's indented ``name  value`` lines."""
  rows = {}
  for line in text.splitlines()[1:]:
    name, _, value = line.strip().partition("  ")
    rows[name] = value.strip()
  return rows


# ---- the summary ---------------------------------------------------------------------------------


def test_summary_names_the_run_and_its_printed_sample_command_works(reported, capsys):
  lines = reported.summary.splitlines()
  assert lines[0].startswith("diffjax train: done, step 12 of 12, ")
  assert "resumed" not in lines[0]
  rows = _summary_rows(reported.summary)
  workdir = os.path.abspath(reported.workdir)
  last = read_metrics(reported.workdir / "metrics.jsonl")[-1]
  assert rows["final loss"] == f"{last['loss']:.6g} (step 12)"
  assert rows["samples"] == f"{workdir}/samples.png"
  assert rows["plots"] == f"{workdir}/plots/step_000006.png .. step_000012.png (2 pictures)"
  for name in ("checkpoints", "metrics"):
    assert rows[name].startswith(workdir) and os.path.exists(rows[name]), name
  assert rows["tensorboard"] == f"tensorboard --logdir {workdir}/tensorboard"
  assert os.path.isdir(rows["tensorboard"].split()[-1])
  assert os.path.isfile(rows["samples"])
  # The printed command, executed as printed (the `diffjax` program is cli.main).
  argv = shlex.split(rows["sample"])
  assert argv[:2] == ["diffjax", "sample"]
  out = argv[argv.index("--out") + 1]
  assert cli.main(argv[1:]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["step"] == 12 and report["out"] == out
  with np.load(out) as saved:
    assert saved["samples"].shape == (1000, 2) and np.isfinite(saved["samples"]).all()
  assert shlex.split(rows["evaluate"]) == ["diffjax", "evaluate", "--workdir", workdir]


def test_format_summary_seeds_resume_and_preemption():
  """Mean and range over seeds (the range of the finite ones, the non-finite counted), the
  resumed-from step, a preemption's resume hint, quoting of a path with a space."""
  text = format_summary(
    workdir="/runs/my run",
    step=500,
    total=1000,
    start_step=200,
    wall_s=3725.2,
    final_losses=[0.5, 0.75, 1.0],
    logged_step=500,
    preempted="SIGTERM",
    samples=None,
    plots=[],
  )
  head, rows = text.splitlines()[0], _summary_rows(text)
  assert head == (
    "diffjax train: stopped by SIGTERM at step 500 of 1000 (resumed from step 200), "
    "1:02:06 (3725.2 s); run the same command to resume"
  )
  assert rows["final loss"] == "mean 0.75 over 3 seeds, range 0.5 .. 1 (step 500)"
  assert rows["samples"] == "none drawn by this run" and "plots" not in rows
  assert shlex.split(rows["evaluate"]) == ["diffjax", "evaluate", "--workdir", "/runs/my run"]
  assert shlex.split(rows["sample"])[-1] == "/runs/my run/generated.npz"
  nan_seed = _summary_rows(
    format_summary(
      workdir="/w",
      step=4,
      total=4,
      start_step=0,
      wall_s=1.0,
      final_losses=[0.5, math.nan],
      logged_step=4,
      preempted=None,
      samples="/w/samples.png",
      plots=["/w/plots/step_000004.png"],
    )
  )
  assert nan_seed["final loss"] == "mean nan over 2 seeds, range 0.5 .. 0.5 (1 non-finite) (step 4)"
  assert nan_seed["plots"] == "/w/plots/step_000004.png"


# ---- plot_every ----------------------------------------------------------------------------------


def test_plot_every_writes_the_step_pictures(reported):
  """Plots at 6 (inside a fused run of chunks of 4: the chunks end there) and 12 (the final
  picture, also samples.png), valid PNGs, no scratch folder left behind."""
  plots = reported.workdir / "plots"
  assert sorted(p.name for p in plots.iterdir()) == ["step_000006.png", "step_000012.png"]
  for path in [*plots.iterdir(), reported.workdir / "samples.png"]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
  final = (plots / "step_000012.png").read_bytes()
  assert final == (reported.workdir / "samples.png").read_bytes()
  assert (plots / "step_000006.png").read_bytes() != final  # another step's model


@pytest.mark.parametrize(
  "fused, log_every, checkpoint_every, plot_every, total",
  [(4, 4, 4, 6, 12), (100, 100, 1000, 250, 3000), (64, 3, 5, 7, 210), (10, 10, 10, 10, 95)],
)
def test_chunks_end_on_every_plot_step(fused, log_every, checkpoint_every, plot_every, total):
  plan = loop.ChunkPlan(
    fused=fused,
    log_every=log_every,
    checkpoint_every=checkpoint_every,
    total=total,
    plot_every=plot_every,
  )
  ends, step = [], 0
  while step < total:
    length = plan.length(step)
    assert 1 <= length <= fused
    step += length
    ends.append(step)
  for every in (log_every, checkpoint_every, plot_every):
    assert set(range(every, total + 1, every)) <= set(ends)
  starts = [0, *ends[:-1]]
  assert len({b - a for a, b in zip(starts, ends)}) <= 2 + np.log2(fused)  # programs


def test_loop_plots_on_the_exact_steps_without_compiling():
  """The real loop body driven by a trainer that only counts steps: plots land on multiples of
  plot_every below the last step (the last is the final picture), fused chunks of 4."""
  config = tiny.tiny_config(
    "--config.train.steps=20",
    "--config.train.fused_steps=4",
    "--config.train.log_every=4",
    "--config.train.checkpoint_every=8",
    "--config.train.plot_every=5",
  )

  def advance(state, num_steps, batch):
    zeros = np.zeros(num_steps)
    return state + num_steps, {"loss": zeros, "grad_norm": zeros, "nonfinite_streak": zeros}

  from diffjax.train.preemption import PreemptionWatcher
  from diffjax.train.watchdog import StepWatchdog

  trainer = types.SimpleNamespace(
    experiment=types.SimpleNamespace(sample_batch=object()), advance=advance, num_seeds=1
  )
  run = loop._Run(
    config,
    trainer,
    None,
    StepWatchdog(0),
    PreemptionWatcher(),
    checkpoints=pathlib.Path("/nonexistent"),
    fingerprint={},
    is_lead=True,
    start=0,
    resumed=False,
  )
  plotted = []
  run.progress = None
  run._record = lambda metrics: None
  run._save = lambda state, data_state: None
  run.plot = lambda state, final=False: plotted.append((run.step, state))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop.ckpt, "commit_if_done", lambda *a, **k: None)
    patch.setattr(loop.ckpt, "commit_step", lambda *a, **k: None)
    assert run.loop(0, {}) == 20
  assert plotted == [(5, 5), (10, 10), (15, 15)]  # the state of that very step


# ---- TensorBoard ---------------------------------------------------------------------------------


def _event_records(path: pathlib.Path) -> list:
  """The events of a TFRecord event file, parsed here: each record is a little-endian uint64
  length, its masked CRC (4 bytes), the serialized Event, the data's masked CRC (4 bytes)."""
  from tensorboardX.proto import event_pb2

  data, events, i = path.read_bytes(), [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i : i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + length]))
    i += 12 + length + 4
  assert i == len(data)  # the records tile the file exactly
  return events


def _summaries(workdir: pathlib.Path) -> dict[str, list]:
  """``{tag: [(step, value), ...]}`` over every event file of WORKDIR/tensorboard."""
  found: dict[str, list] = {}
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    for event in _event_records(path):
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value))
  return found


def test_tensorboard_has_learning_rate_images_and_config(reported):
  from PIL import Image

  found = _summaries(reported.workdir)
  # Linear warm-up: the update that makes step s is optax's update s - 1, rate lr (s - 1) / W.
  lr = {step: v.simple_value for step, v in found["learning_rate"]}
  expected = {s: LEARNING_RATE * min(s - 1, WARMUP) / WARMUP for s in (4, 8, 12)}
  assert lr.keys() == expected.keys()
  np.testing.assert_allclose([lr[s] for s in expected], list(expected.values()), rtol=1e-6)
  # The loss of step 4 is NaN (the NaN batch): in metrics.jsonl, flagged, not in TensorBoard.
  assert [step for step, _ in found["loss"]] == [8, 12]
  images = dict(found["samples"])
  assert sorted(images) == [6, 12]
  for step, value in images.items():
    png = reported.workdir / "plots" / f"step_{step:06d}.png"
    with Image.open(png) as picture:
      assert (value.image.width, value.image.height) == picture.size
    decoded = Image.open(io.BytesIO(value.image.encoded_image_string))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(Image.open(png).convert("RGB")))
  [(step, text)] = found["config/text_summary"]
  markdown = text.tensor.string_val[0].decode("utf-8")
  assert step == 0 and all(line.startswith("    ") for line in markdown.splitlines())
  config = json.loads("\n".join(line[4:] for line in markdown.splitlines()))
  assert config == json.loads((reported.workdir / "config.json").read_text())


# ---- metrics.jsonl -------------------------------------------------------------------------------


def test_metrics_are_strict_json_with_nonfinite_flagged(reported):
  """The NaN batch of step 2 makes the step-4 row's loss and gradient norm NaN: written as null
  and named in "nonfinite"; every line parses as strict JSON; the other rows carry no flag."""
  lines = (reported.workdir / "metrics.jsonl").read_text().splitlines()
  rows = [_strict_json(line) for line in lines]
  assert [r["step"] for r in rows] == [4, 8, 12]
  assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None
  assert rows[0]["nonfinite"] == ["grad_norm", "loss"]
  for row in rows[1:]:
    assert "nonfinite" not in row and math.isfinite(row["loss"]) and row["learning_rate"] > 0
  assert read_metrics(reported.workdir / "metrics.jsonl") == rows  # the reader still reads it


def test_writer_and_resume_rewrite_are_strict(tmp_path):
  """Non-finite scalars and list entries (per seed) become null with a flag; a file holding the
  bare NaN/Infinity tokens an older writer left is rewritten strictly on resume."""
  path = tmp_path / "metrics.jsonl"
  old_rows = ['{"step": 1, "loss": NaN}', '{"step": 2, "loss": Infinity, "x": [1.0, -Infinity]}']
  path.write_text("".join(row + "\n" for row in old_rows))
  writer = MetricsWriter(tmp_path, resume_step=2, tensorboard=False)
  writer.write(3, {"loss": float("inf"), "grad_norm": 1.5, "loss_per_seed": [0.5, float("nan")]})
  writer.write(4, {"loss": 0.25})
  writer.close()
  rows = [_strict_json(line) for line in path.read_text().splitlines()]
  assert rows == [
    {"step": 1, "loss": None, "nonfinite": ["loss"]},
    {"step": 2, "loss": None, "x": [1.0, None], "nonfinite": ["loss", "x"]},
    {
      "step": 3,
      "loss": None,
      "grad_norm": 1.5,
      "loss_per_seed": [0.5, None],
      "nonfinite": ["loss", "loss_per_seed"],
    },
    {"step": 4, "loss": 0.25},
  ]
  assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


# ---- progress without a terminal -----------------------------------------------------------------


def test_progress_lines_once_per_log_step(reported):
  """train.progress_bar=false (tiny.TINY): one plain line per logging step, nothing per step."""
  lines = [line for line in reported.log if line.startswith("train step ")]
  assert [line.split()[2] for line in lines] == ["4/12", "8/12", "12/12"]
  for line in lines:
    assert " loss " in line and " steps/s " in line and " ETA " in line
  assert lines[-1].endswith("ETA 0:00:00")


def test_progress_line_and_live_bar_choice(monkeypatch):
  assert progress_line(step=250, total=1000, loss=0.12345, steps_per_second=50.0) == (
    "train step 250/1000 (25%)  loss 0.1235  50 steps/s  ETA 0:00:15"
  )
  assert progress_line(step=0, total=10, loss=1.0, steps_per_second=0.0).endswith("ETA ?")
  assert format_duration(3600 * 2 + 61.2) == "2:01:02" and format_duration(math.nan) == "?"

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  assert loop._live_bar_possible(Terminal()) and not loop._live_bar_possible(io.StringIO())
  config = tiny.tiny_config("--config.train.progress_bar=true")
  monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: plain lines, no bar
  assert loop._progress_bar(config, 0, 12, True) is None
  monkeypatch.setattr(sys, "stderr", Terminal())
  bar = loop._progress_bar(config, 0, 12, True)
  assert bar is not None
  bar.close()


# ---- the real command (slow) ---------------------------------------------------------------------


@pytest.mark.slow
def test_cli_without_a_terminal_prints_lines_and_a_summary_whose_commands_work(tmp_path):
  """`diffjax train` in a subprocess with progress_bar=true and stderr a pipe: the plain lines
  on stderr (no bar's carriage returns), the summary on stdout; a resume says where it resumed
  from; the printed sample and evaluate commands run as printed."""
  workdir = tmp_path / "wd"
  program = [sys.executable, "-m", "diffjax.cli"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def run(argv):
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

  base = [*program, "train", "--config", tiny.CONFIG, "--workdir", str(workdir), *tiny.TINY]
  done = run([*base, "--config.train.progress_bar=true"])
  lines = [line for line in done.stderr.splitlines() if line.startswith("train step ")]
  assert [line.split()[2] for line in lines] == [f"{s}/12" for s in range(2, 13, 2)]
  assert "\r" not in done.stderr
  assert done.stdout.startswith("diffjax train: done, step 12 of 12, ")
  resumed = run([*base, "--config.train.steps=16"])
  assert "diffjax train: done, step 16 of 16 (resumed from step 12)" in resumed.stdout
  rows = _summary_rows(resumed.stdout)
  for name in ("sample", "evaluate"):
    argv = shlex.split(rows[name])
    assert argv[0] == "diffjax"
    report = json.loads(run([*program, *argv[1:]]).stdout.strip().splitlines()[-1])
    assert report["step"] == 16
