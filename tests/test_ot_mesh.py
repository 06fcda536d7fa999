"""Exact OT couplings on multi-device meshes: training, resume, pairs, and a stuck host solve.

Each mesh test runs tests/ot_mesh_check.py in a fresh process with N simulated CPU devices (the
count sizes the CPU client's thread pool, which the old in-program callback deadlocked on, so
it cannot be simulated inside this 8-device test process) and a timeout, so a hang fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "ot_mesh_check.py"


def _mesh_reports(
  tmp_path, devices: int, cases: list[str], *, steps: int = 200, timeout: float = 600
) -> list[dict]:
  argv = [
    sys.executable,
    str(CHECK),
    "--devices",
    str(devices),
    "--workdir",
    str(tmp_path),
    "--steps",
    str(steps),
  ]
  for case in cases:
    argv += ["--case", case]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def _check_report(report: dict, *, steps: int) -> None:
  scope = report["case"].split(":")[2]
  assert report["finite"], report
  assert report["trace_count"] == 1, report  # one compile of the update program, none per step
  assert report["resumed_from"] == steps // 2, report
  assert report["resume_bit_exact"] and report["resumed_losses_equal"], report
  # Each solved assignment is an optimal one for the float64 cost (scipy as the reference).
  assert report["optimality_gap"] <= 1e-6, report
  devices = report["devices"]
  if scope == "global":
    # The whole batch is one problem per step, the same problem and pairs as on one device.
    assert report["solution_shape"][-1] == report["batch"], report
    assert report["pairs_equal_one_device"], report
    assert report["costs_max_rel_diff_one_device"] <= 1e-5, report
  else:
    # One problem per device shard, each of batch / devices points.
    assert report["solution_shape"][-2:] == [devices, report["batch"] // devices], report


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4])
def test_ot_cfm_protocol_trains_and_resumes_on_a_mesh(tmp_path, devices):
  """configs/toy2d_otcfm.py at batch 256 and 100 fused steps on 4 devices, FSDP 2 with the
  global coupling and pure data parallel with per-device couplings: both train (this aborted
  in an XLA rendezvous, or hung), resume bit-exact, solve optimal assignments, and the global
  pairs equal the single-device pairs for the same key."""
  reports = _mesh_reports(tmp_path, devices, ["toy2d:2:global", "toy2d:1:per_device"])
  for report in reports:
    _check_report(report, steps=200)


@pytest.mark.slow
@pytest.mark.parametrize(
  "devices,cases",
  [
    (2, ["toy2d:1:global", "toy2d:2:global", "toy2d:1:per_device", "toy2d:2:per_device"]),
    (4, ["toy2d:1:global", "toy2d:2:per_device"]),
    (8, ["toy2d:1:global", "toy2d:2:global", "toy2d:1:per_device", "toy2d:2:per_device"]),
  ],
  ids=["2dev", "4dev", "8dev"],
)
def test_ot_cfm_protocol_every_mesh(tmp_path, devices, cases):
  """The rest of the matrix: 2, 4 and 8 devices, FSDP 1 and 2, global and per-device scope."""
  for report in _mesh_reports(tmp_path, devices, cases):
    _check_report(report, steps=200)


@pytest.mark.slow
def test_label_conditional_ot_on_digits_four_devices(tmp_path):
  """Conditional digits with label-conditional exact OT (one host solve per step, grain data)
  on 4 devices: trains, resumes bit-exact, pairs equal the single-device pairs."""
  (report,) = _mesh_reports(tmp_path, 4, ["digits:1:global"], steps=8)
  _check_report(report, steps=8)


# --- a slow or stuck host solve ---------------------------------------------------------------

# Runs `diffjax train` with POT's solver replaced by one that blocks forever from the
# BLOCK_FROM-th host call on (each call is one chunk's stack of problems), and says when it blocks.
_DRIVER = """
import sys, threading, time
from diffjax import couplings
calls = [0]
solve = couplings._assignment_host
def blocking(cost, **kw):
  calls[0] += 1
  if calls[0] >= {block_from}:
    print("SOLVER BLOCKED", file=sys.stderr, flush=True)
    threading.Event().wait()
  return solve(cost, **kw)
couplings._assignment_host = blocking
from diffjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_with_blocking_solver(workdir, *, block_from: int, devices: int, extra=()):
  argv = [
    sys.executable,
    "-c",
    _DRIVER.format(block_from=block_from),
    "train",
    "--config",
    str(ROOT / "configs" / "toy2d_otcfm.py") + ":small",
    "--workdir",
    str(workdir),
    "--config.train.progress_bar=false",
    "--config.train.async_checkpoint=false",
    "--config.sample.num=64",
    "--config.sample.steps=2",
    *extra,
  ]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
    argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
  )


def _wait_for_line(process, text: str, timeout: float) -> list[str]:
  lines, deadline = [], time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = process.stderr.readline()
    if not line and process.poll() is not None:
      break
    lines.append(line)
    if text in line:
      return lines
  process.kill()
  raise AssertionError(f"{text!r} not seen in {timeout} s:\n{''.join(lines)[-3000:]}")


@pytest.mark.parametrize(
  "signum",
  [pytest.param(s, marks=pytest.mark.slow) for s in (signal.SIGTERM, signal.SIGINT)],
  ids=["SIGTERM", "SIGINT"],
)
def test_signal_while_waiting_on_a_stuck_solve_checkpoints_and_exits(tmp_path, signum):
  """The second chunk's solve never returns; SIGTERM or SIGINT then ends the run within 10 s
  (the loop waits for the solve in slices and checks for the signal), exit 0, with the last
  finished step (100) checkpointed and a resume starting there."""
  process = _train_with_blocking_solver(tmp_path, block_from=2, devices=4)
  _wait_for_line(process, "SOLVER BLOCKED", timeout=240)
  sent = time.monotonic()
  process.send_signal(signum)
  try:
    _, stderr = process.communicate(timeout=10)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert time.monotonic() - sent < 10
  assert process.returncode == 0, stderr[-3000:]
  assert "checkpointed step 100" in stderr, stderr[-3000:]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [100]


@pytest.mark.slow
def test_step_timeout_catches_a_solve_that_never_returns(tmp_path):
  """train.step_timeout_s bounds the wait for a host solve, the first chunk's included: the
  watchdog names the phase, dumps stacks and exits 75 (restartable) shortly after the limit."""
  process = _train_with_blocking_solver(
    tmp_path, block_from=1, devices=2, extra=["--config.train.step_timeout_s=3"]
  )
  _wait_for_line(process, "SOLVER BLOCKED", timeout=240)
  blocked = time.monotonic()
  try:
    _, stderr = process.communicate(timeout=30)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 75, stderr[-3000:]
  assert time.monotonic() - blocked < 3 + 10
  assert "no host coupling solve finished" in stderr and "train.step_timeout_s=3" in stderr


# --- other programs that run under a mesh --------------------------------------------------------


def _callback_ops(lowered) -> int:
  """Host callbacks in a lowered program (jax.pure_callback / io_callback / debug.callback)."""
  text = lowered.as_text()
  return text.count("xla_python_cpu_callback") + text.count("xla_ffi_python_cpu_callback")


@pytest.mark.parametrize(
  "recipe,scope",
  [
    # slow: the global scope's program gathers the batch (12 s to compile); per-device stays fast
    pytest.param("otcfm", "global", marks=pytest.mark.slow),
    ("otcfm", "per_device"),
    ("sbcfm", "per_device"),
  ],
)
def test_trainer_programs_hold_no_host_callback(recipe, scope):
  """What the trainer compiles for a 4-device mesh (the chunk's pairing problems and the update
  with its pairs finished) contains no host callback, for exact OT in both scopes and for
  ott-jax's Sinkhorn vmapped over device blocks; the one-program form with the exact coupling
  does (the control: the count can fail)."""
  import functools

  import jax
  import numpy as np
  from test_train import tiny_config  # pylint: disable=import-outside-toplevel

  from diffjax.train import checkpoint as ckpt
  from diffjax.train import sharding as sharding_lib
  from diffjax.train import trainer as trainer_lib
  from diffjax.train.experiment import build_experiment
  from diffjax.train.optim import make_optimizer
  from diffjax.train.step import finish_fused_steps, fused_train_steps, propose_fused_pairs

  config = tiny_config(recipe, **{"objective.coupling_scope": scope})
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:4])
  experiment = build_experiment(config, mesh=mesh)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  abstract, shardings, _ = trainer_lib.make_initial_state(
    experiment, optimizer, seed=config.seed, mesh=mesh
  )
  # Shapes and shardings only: the checks read lowered programs, so nothing is compiled.
  state = ckpt.abstract_with_shardings(abstract, shardings)
  update = dict(loss_fn=experiment.loss_fn, optimizer=optimizer, ema_decay=0.9)
  one_program = jax.jit(
    lambda s: fused_train_steps(
      s, num_steps=5, sample_batch=experiment.sample_batch, pair_fn=experiment.pair_fn, **update
    )
  ).lower(state)
  if experiment.host_pairing is None:  # Sinkhorn: in-graph, one program
    assert _callback_ops(one_program) == 0
    return
  assert _callback_ops(one_program) >= 1
  propose = jax.jit(
    functools.partial(
      propose_fused_pairs,
      num_steps=5,
      sample_batch=experiment.sample_batch,
      propose=experiment.host_pairing.propose,
    )
  )
  batches, problems = jax.eval_shape(propose, state.key, state.step)
  # The host solve on problems of the right shapes gives solutions of the right shapes.
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), problems)
  solutions = experiment.host_pairing.solve(zeros)
  finish = jax.jit(
    functools.partial(finish_fused_steps, finish=experiment.host_pairing.finish, **update)
  )
  assert _callback_ops(propose.lower(state.key, state.step)) == 0
  assert _callback_ops(finish.lower(state, batches, solutions)) == 0


@pytest.mark.slow
def test_sinkhorn_per_device_plots_likelihood_and_samplers_on_four_devices(tmp_path):
  """SB-CFM (ott-jax Sinkhorn) with the per-device scope and FSDP 2 trains on 4 devices and
  plots at the end; `evaluate` (samples with diffrax's Dopri5, the likelihood through the
  probability-flow ODE) and `sample` run on the same 4 devices, each within its timeout."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workdir = tmp_path / "sb"
  commands = [
    [
      "train",
      "--config",
      str(ROOT / "configs" / "toy2d_otcfm.py") + ":small",
      "--config.objective.name=sbcfm",
      "--config.objective.coupling_scope=per_device",
      "--config.data.source=normal",
      "--config.mesh.fsdp=2",
      "--config.train.progress_bar=false",
      "--workdir",
      str(workdir),
    ],
    ["evaluate", "--workdir", str(workdir), "--num", "256", "--sampler", "dopri5"],
    [
      "sample",
      "--workdir",
      str(workdir),
      "--num",
      "256",
      "--out",
      str(workdir / "s.npz"),
      "--sampler",
      "heun",
      "--steps",
      "8",
    ],
  ]
  outputs = []
  for command in commands:
    done = subprocess.run(
      [sys.executable, "-m", "diffjax.cli", *command],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs.append(done.stdout)
  assert (workdir / "samples.png").stat().st_size > 10_000
  metrics = json.loads(outputs[1].strip().splitlines()[-1])
  assert metrics["nfe"] > 0 and 0 < metrics["w2"] < 3 and abs(metrics["nll"]) < 20, metrics
  import numpy as np

  assert np.isfinite(np.load(workdir / "s.npz")["samples"]).all()
