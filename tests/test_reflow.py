"""Reflow (k-rectified flow) and the straightness metric (Liu, Gong & Liu 2022,
https://arxiv.org/abs/2209.03003).

The metric is checked against closed forms: a linear field ``v = A x`` (paths
``expm(A t) x0``, its integral by Gauss-Legendre quadrature), a constant field (``S = 0``) and a
straight path run at a varying speed. The reflow pairs are checked against teachers whose ODE
solution is known exactly (linear fields: Euler's ``(I + A/N)^N x0``, RK4's polynomial), then end
to end: a tiny 1-RF teacher trained, a 2-RF student trained from its workdir and sampled through
the CLI, its online pairs equal to an Euler loop over the teacher restored independently, a 3-RF
built from the 2-RF without the 1-RF, and each way a teacher can be wrong failing in one line.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from tiny import CONFIGS, TINY, tiny_config

from diffjax import cli, evaluate, objectives
from diffjax import run as run_lib
from diffjax.objectives import reflow as reflow_lib
from diffjax.train import config as config_lib
from diffjax.train import experiment as experiment_lib
from diffjax.train import loop, sharding
from diffjax.train import teacher as teacher_lib

REFLOW = str(CONFIGS / "toy2d_reflow.py")
# A rotating, decaying linear field: curved paths with a closed-form flow map.
A = np.array([[-0.5, 1.5], [-1.5, -0.2]])


def _exact_straightness(a: np.ndarray, x0: np.ndarray) -> np.ndarray:
  """``S_j = int_0^1 ||(expm(A) - I - A expm(A t)) x0_j||^2 dt`` by 48-node Gauss-Legendre
  quadrature (the integrand is entire in ``t``: exact to rounding)."""
  chord = scipy.linalg.expm(a) - np.eye(len(a))
  nodes, weights = np.polynomial.legendre.leggauss(48)
  values = [
    np.sum((x0 @ (chord - a @ scipy.linalg.expm(a * t)).T) ** 2, axis=1) for t in (nodes + 1) / 2
  ]
  return 0.5 * np.tensordot(weights, np.stack(values), axes=1)


# ---- straightness ----------------------------------------------------------------------------


def test_straightness_of_a_linear_field_converges_to_the_quadrature_at_first_order():
  x0 = np.random.default_rng(0).normal(size=(64, 2))
  exact = _exact_straightness(A, x0)
  a = jnp.asarray(A, jnp.float32)
  errors = []
  for steps in (100, 200, 400):
    s = np.asarray(evaluate.straightness(lambda x, t: x @ a.T, x0, steps=steps))
    errors.append(np.max(np.abs(s - exact)) / np.max(exact))
  # Euler's path error is O(h): the error halves with the step (slope -1 on a log-log plot).
  slopes = np.diff(np.log(errors)) / np.log(2.0)
  assert np.all(np.abs(slopes + 1.0) < 0.1), (errors, slopes)
  assert errors[-1] < 5e-3, errors


def test_path_straightness_of_the_exact_path_is_second_order():
  x0 = np.random.default_rng(1).normal(size=(32, 2))
  exact = _exact_straightness(A, x0)
  errors = []
  for steps in (16, 32):
    times = np.linspace(0.0, 1.0, steps + 1)
    path = np.stack([x0 @ scipy.linalg.expm(A * t).T for t in times])
    s = np.asarray(jax.jit(evaluate.path_straightness)(path, path @ A.T, times=times))
    errors.append(np.max(np.abs(s - exact)) / np.max(exact))
  # The trapezoid rule on a smooth integrand: the error quarters when the step halves.
  assert 3.5 < errors[0] / errors[1] < 4.5 and errors[1] < 3e-3, errors


def test_euler_straightness_of_a_trajectory_equals_the_scan():
  x0 = np.random.default_rng(2).normal(size=(16, 2)).astype(np.float32)
  path = [x0]
  for _ in range(50):
    path.append(path[-1] + 0.02 * path[-1] @ A.T.astype(np.float32))
  a = jnp.asarray(A, jnp.float32)
  from_path = np.asarray(jax.jit(evaluate.euler_straightness)(np.stack(path)))
  from_scan = np.asarray(evaluate.straightness(lambda x, t: x @ a.T, x0, steps=50))
  np.testing.assert_allclose(from_path, from_scan, rtol=1e-4)


def test_straightness_is_zero_for_a_constant_field_and_sees_a_varying_speed():
  x0 = np.random.default_rng(3).normal(size=(8, 2))
  c = jnp.asarray([1.0, -2.0])
  constant = evaluate.straightness(lambda x, t: jnp.broadcast_to(c, x.shape), x0, steps=64)
  np.testing.assert_allclose(np.asarray(constant), 0.0, atol=1e-6)
  path = np.stack([x0 + t * np.asarray(c) for t in np.linspace(0, 1, 9)])
  np.testing.assert_allclose(np.asarray(evaluate.euler_straightness(path)), 0.0, atol=1e-5)
  # A straight line at speed 2t: S = ||c||^2 int_0^1 (1 - 2t)^2 dt = ||c||^2 / 3 (Euler's left
  # sum over N steps: ||c||^2 (1/3 + 2/(3 N^2)), exact to 1e-6 at N = 1000).
  varying = evaluate.straightness(lambda x, t: 2.0 * t[:, None] * c, x0, steps=1000)
  np.testing.assert_allclose(np.asarray(varying), 5.0 / 3.0, rtol=1e-4)


def test_straightness_rejects_bad_input_in_one_line():
  with pytest.raises(ValueError, match="steps=0"):
    evaluate.straightness(lambda x, t: x, np.zeros((4, 2)), steps=0)
  with pytest.raises(ValueError, match="expected \\[steps \\+ 1, batch"):
    evaluate.euler_straightness(np.zeros((1, 4, 2)))
  with pytest.raises(ValueError, match="velocity at every state"):
    evaluate.path_straightness(np.zeros((3, 4, 2)), np.zeros((2, 4, 2)))


# ---- the objective on analytic teachers ------------------------------------------------------


def _linear_teacher(a: np.ndarray) -> objectives.Teacher:
  return objectives.Teacher(
    apply=lambda params, x, t, cond: x @ params.T,
    params=jnp.asarray(a, jnp.float32),
    config=None,
    step=0,
    workdir="linear",
  )


def _context(tmp_path, teacher) -> objectives.ObjectiveContext:
  (tmp_path / "config.json").write_text("{}")  # check() only asks that a workdir is there

  def source(key, num):
    return jax.random.normal(key, (num, 2))

  return objectives.ObjectiveContext(
    apply=lambda params, x, t, cond, dropout_key=None: params * x,
    source=source,
    data_shape=(2,),
    source_is_normal=True,
    seed=7,
    load_workdir=lambda workdir: teacher,
  )


def _rk4_matrix(h_a: np.ndarray) -> np.ndarray:
  """One RK4 step of ``dx/dt = A x`` multiplies by ``sum_{k <= 4} (hA)^k / k!``."""
  out, term = np.eye(2), np.eye(2)
  for k in range(1, 5):
    term = term @ h_a / k
    out = out + term
  return out


@pytest.mark.parametrize("sampler", ["euler", "rk4"])
def test_online_pairs_are_the_teacher_ode_endpoints(sampler, tmp_path):
  context = _context(tmp_path, _linear_teacher(A))
  objective = objectives.get_objective(
    "reflow",
    context,
    teacher_workdir=str(tmp_path),
    mode="online",
    teacher_steps=8,
    teacher_sampler=sampler,
  )
  batch = {"x": jnp.zeros((32, 2))}
  pairs = jax.jit(objective.pair_fn)(jax.random.PRNGKey(0), batch)
  step = (np.eye(2) + A / 8) if sampler == "euler" else _rk4_matrix(A / 8)
  flow_map = np.linalg.matrix_power(step, 8)
  x0 = np.asarray(pairs["x0"], np.float64)
  np.testing.assert_allclose(np.asarray(pairs["x"]), x0 @ flow_map.T, rtol=1e-5, atol=1e-5)
  # Fresh draws per key; the loader's data never become a pair.
  other = objective.pair_fn(jax.random.PRNGKey(1), batch)
  assert not np.allclose(other["x0"], pairs["x0"]) and np.abs(x0).max() > 0.5


def test_pregenerated_pairs_come_from_one_fixed_set(tmp_path):
  context = _context(tmp_path, _linear_teacher(A))
  kwargs = dict(teacher_workdir=str(tmp_path), mode="pregenerated", num_pairs=16, teacher_steps=4)
  objective = objectives.get_objective("reflow", context, **kwargs)
  endpoints = reflow_lib.teacher_endpoints(_linear_teacher(A), sampler="euler", steps=4)
  fixed = reflow_lib.coupling_set(endpoints, context.source, seed=7, num_pairs=16)
  flow_map = np.linalg.matrix_power(np.eye(2) + A / 4, 4)
  np.testing.assert_allclose(fixed["x"], np.asarray(fixed["x0"]) @ flow_map.T, rtol=1e-5, atol=1e-6)
  seen = set()
  for k in range(4):
    pairs = objective.pair_fn(jax.random.PRNGKey(k), {"x": jnp.zeros((32, 2))})
    both = np.concatenate([pairs["x0"], pairs["x"]], axis=1)
    table = np.concatenate([fixed["x0"], fixed["x"]], axis=1)
    rows = np.argmin(np.abs(both[:, None] - table[None]).sum(-1), axis=1)
    np.testing.assert_array_equal(both, table[rows])  # each pair is a row of the fixed set
    seen.update(rows.tolist())
  assert len(seen) > 12  # 128 uniform draws of 16 rows reach (nearly) all of them
  again = objectives.get_objective("reflow", context, **kwargs)  # a resumed run: the same set
  np.testing.assert_array_equal(
    again.pair_fn(jax.random.PRNGKey(0), {"x": jnp.zeros((32, 2))})["x"],
    objective.pair_fn(jax.random.PRNGKey(0), {"x": jnp.zeros((32, 2))})["x"],
  )


def test_the_loss_is_rectified_flow_on_the_pairs(tmp_path):
  """On given pairs, reflow's loss is I-CFM's with sigma 0 (1-rectified flow), and a model that
  outputs 0 pays exactly the mean of ||x1 - x0||^2 / D: the target is x1 - x0, no noise added."""
  context = _context(tmp_path, _linear_teacher(A))
  reflow = objectives.get_objective(
    "reflow", context, teacher_workdir=str(tmp_path), mode="online", teacher_steps=1
  )
  rf1 = objectives.get_objective("icfm", context, sigma=0.0)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  batch = {
    "x0": jax.random.normal(keys[0], (64, 2)),
    "x": 3.0 + jax.random.normal(keys[1], (64, 2)),
  }
  for params in (jnp.asarray(0.5), jnp.asarray(0.0)):
    ours = float(reflow.loss_fn(params, jax.random.PRNGKey(5), batch))
    assert ours == pytest.approx(float(rf1.loss_fn(params, jax.random.PRNGKey(5), batch)), rel=1e-6)
  expected = float(np.mean(np.sum((batch["x"] - batch["x0"]) ** 2, axis=1) / 2))
  assert ours == pytest.approx(expected, rel=1e-6)


def test_icfm_with_sigma_zero_is_a_valid_1_rectified_flow_config():
  config = config_lib.load_config_file(REFLOW + ":rf1")
  assert (config.objective.name, config.objective.sigma) == ("icfm", 0.0)
  config_lib.validate(config, num_devices=8)
  group = config_lib.objective_group("icfm", sigma=0.0)
  assert objectives.objective_problems(group.to_dict()) == []


def test_reflow_check_reports_each_bad_value():
  problems = reflow_lib.check(
    mode="offline",
    teacher_sampler="ddim",
    num_pairs=0,
    teacher_steps=True,
    label_dropout=1.0,
    teacher_workdir="/nonexistent/rf1",
  )
  keys = [p.split("=", 1)[0] for p in problems]
  assert keys == [
    "objective.mode",
    "objective.teacher_sampler",
    "objective.num_pairs",
    "objective.teacher_steps",
    "objective.label_dropout",
    "objective.teacher_workdir",
  ], problems
  assert "toy2d_reflow.py:rf1 --workdir /nonexistent/rf1" in problems[-1]
  assert reflow_lib.check() == []  # the default (empty teacher) is reported at build time
  ignored = reflow_lib.check(mode="online", num_pairs=10, teacher_sampler="dopri5", teacher_steps=7)
  assert [p.split(":", 1)[0] for p in ignored] == [
    "objective.num_pairs=10",
    "objective.teacher_steps=7",
  ], ignored
  assert reflow_lib.check(mode="online", teacher_sampler="dopri5") == []


# ---- end to end: a tiny teacher, its student, the CLI --------------------------------------


def _train(config, workdir: pathlib.Path) -> pathlib.Path:
  config_lib.validate(config, num_devices=1)
  loop.train(config, workdir, devices=jax.devices()[:1])
  return workdir


def _mesh():
  return sharding.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])


def _student_config(teacher: pathlib.Path, *overrides: str, mode: str = "pregenerated"):
  pairs = ["--config.objective.num_pairs=64"] if mode == "pregenerated" else []
  return tiny_config(
    f"--config.objective.teacher_workdir={teacher}",
    f"--config.objective.mode={mode}",
    *pairs,
    "--config.objective.teacher_steps=4",
    *overrides,
    base="toy2d_reflow",
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-RF teacher (I-CFM, sigma 0) and a 2-RF student trained from its workdir: two fused
  chunks and one checkpoint each (what these tests read is the pairing, not the training)."""
  root = tmp_path_factory.mktemp("reflow")
  short = ["--config.train.steps=4", "--config.train.checkpoint_every=4"]
  rf1 = config_lib.load_config_file(REFLOW + ":rf1")
  config_lib.apply_overrides(rf1, [*TINY, *short])
  teacher = _train(rf1, root / "rf1")
  student = _train(_student_config(teacher, *short), root / "rf2")
  return teacher, student


# slow, as every test of the `trained` fixture: it trains a 1-RF teacher and a 2-RF student
# (20 s); reflow's pairing math stays in the fast suite.
@pytest.mark.slow
def test_a_student_trains_from_a_teacher_workdir_and_samples_in_one_step(trained, tmp_path, capsys):
  teacher, student = trained
  rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
  assert rows and all(np.isfinite(row["loss"]) for row in rows)
  out = tmp_path / "s.npz"
  args = ["sample", "--workdir", str(student), "--num", "16", "--out", str(out), "--steps", "1"]
  assert cli.main(args) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["nfe"] == 1
  with np.load(out) as samples:
    assert samples["samples"].shape == (16, 2) and np.isfinite(samples["samples"]).all()
  assert (teacher / "config.json").is_file()  # the teacher is read, never changed


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_the_student_samples_with_more_steps(trained, tmp_path, capsys, steps):
  _, student = trained
  out = tmp_path / "s.npz"
  args = ["sample", "--workdir", str(student), "--num", "16", "--out", str(out), "--steps"]
  assert cli.main([*args, str(steps)]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == steps
  with np.load(out) as samples:
    assert np.isfinite(samples["samples"]).all()


@pytest.mark.slow
def test_online_pairs_equal_an_euler_loop_over_the_teacher_restored_independently(trained):
  teacher, _ = trained
  config = _student_config(teacher, mode="online")
  experiment = experiment_lib.build_experiment(config, mesh=_mesh())
  batch = experiment.sample_batch(jax.random.PRNGKey(0))
  pairs = experiment.pair_fn(jax.random.PRNGKey(1), batch)
  # The teacher through the sampling reader (its own trainer), and Euler written out.
  _, restored, params, _ = run_lib.restore_for_inference(teacher)
  x = np.asarray(pairs["x0"])
  for i in range(4):
    t = np.full((x.shape[0],), i / 4, np.float32)
    x = x + 0.25 * np.asarray(restored.model.apply(params, x, t, None))
  np.testing.assert_allclose(np.asarray(pairs["x"]), x, rtol=1e-5, atol=1e-5)
  assert not np.allclose(pairs["x0"], batch["x"])


@pytest.mark.slow
def test_a_reflow_teacher_loads_without_its_own_teacher(trained):
  """3-RF from a 2-RF: the 2-RF's own teacher (the 1-RF) is not needed, here moved away."""
  teacher, student = trained
  moved = teacher.with_name("rf1_moved")
  teacher.rename(moved)
  try:
    config = _student_config(student, mode="online")
    experiment = experiment_lib.build_experiment(config, mesh=_mesh())
    batch = experiment.sample_batch(jax.random.PRNGKey(0))
    pairs = experiment.pair_fn(jax.random.PRNGKey(1), batch)
  finally:
    moved.rename(teacher)
  assert np.isfinite(np.asarray(pairs["x"])).all()
  assert not np.allclose(pairs["x"], pairs["x0"])


# ---- a teacher that cannot teach: one line each ----------------------------------------------


def _workdir_with(tmp_path, config, name="teacher") -> pathlib.Path:
  workdir = tmp_path / name
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.config_to_json(config))
  return workdir


def _teacher_error(workdir, student=None) -> str:
  student = student or _student_config(workdir)
  with pytest.raises(teacher_lib.TeacherError) as info:
    teacher_lib.load_teacher(str(workdir), data=student.data, mesh=_mesh())
  message = str(info.value)
  assert "\n" not in message and f"objective.teacher_workdir={str(workdir)!r}" in message
  return message


def test_teacher_errors_name_the_value_and_the_fix(tmp_path):
  rf1 = config_lib.load_config_file(REFLOW + ":rf1")
  assert "does not exist" in _teacher_error(tmp_path / "nonesuch")
  assert "no checkpoint" in _teacher_error(_workdir_with(tmp_path, rf1))
  ddpm = tiny_config(base="toy2d_ddpm")
  assert "not a velocity model" in _teacher_error(_workdir_with(tmp_path, ddpm, "ddpm"))
  other = config_lib.load_config_file(REFLOW + ":rf1")
  config_lib.apply_overrides(other, ["--config.data.target=circles", "--config.data.source=normal"])
  message = _teacher_error(_workdir_with(tmp_path, other, "other"))
  assert "data.source: 'normal' -> '8gaussians'" in message
  assert "data.target: 'circles' -> 'moons'" in message
  seeds = config_lib.load_config_file(REFLOW + ":rf1")
  config_lib.apply_overrides(seeds, ["--config.train.num_seeds=2"])
  assert "num_seeds=2" in _teacher_error(_workdir_with(tmp_path, seeds, "seeds"))
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "config.json").write_text("{not json")
  assert "is unreadable" in _teacher_error(tmp_path / "broken")


def test_file_data_must_match_on_every_key_but_augmentation():
  teacher, student = config_lib.base_config().data, config_lib.base_config().data
  assert teacher_lib.data_differences(teacher, student) == []
  student.path = "elsewhere.npz"  # ignored for toys drawn on device
  assert teacher_lib.data_differences(teacher, student) == []
  teacher.kind = student.kind = "npz"
  teacher.augment_flip = True
  assert teacher_lib.data_differences(teacher, student) == ["data.path: '' -> 'elsewhere.npz'"]


def test_cli_reports_a_missing_or_empty_teacher_in_one_line(tmp_path, capsys):
  base = ["train", "--config", REFLOW + ":small", *TINY]
  workdir = tmp_path / "w"
  code = cli.main([*base, "--workdir", str(workdir), "--config.objective.teacher_workdir=nope"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "objective.teacher_workdir='nope': no such" in err[0]
  assert not workdir.exists()
  code = cli.main([*base, "--workdir", str(workdir)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "teacher_workdir is empty" in err[0]
  assert "--config configs/toy2d_reflow.py:rf1" in err[0]
  assert not (workdir / "config.json").exists()


# ---- the point of reflow: straighter paths --------------------------------------------------


@pytest.mark.slow
def test_the_student_is_straighter_than_its_teacher(tmp_path):
  """A 1-RF teacher and its 2-RF student trained 300 steps each (width 16): the student's
  straightness is below the teacher's by many standard errors (measured 0.14 vs 0.35, each with
  a standard error near 0.005 over 2000 paths; the bound below leaves a factor 1.5)."""
  common = ["--config.train.steps=300", "--config.train.checkpoint_every=300"]
  rf1 = config_lib.load_config_file(REFLOW + ":rf1")
  config_lib.apply_overrides(rf1, [*TINY, *common, "--config.train.batch_size=256"])
  teacher = _train(rf1, tmp_path / "rf1")
  config = tiny_config(
    f"--config.objective.teacher_workdir={teacher}",
    "--config.objective.num_pairs=10000",
    *common,
    "--config.train.batch_size=256",
    base="toy2d_reflow",
  )
  student = _train(config, tmp_path / "rf2")
  values = {}
  for name, workdir in (("teacher", teacher), ("student", student)):
    _, experiment, params, _ = run_lib.restore_for_inference(workdir)
    x0 = experiment.source_sampler(jax.random.PRNGKey(123), 2000)
    velocity = functools.partial(experiment.model.apply, params, cond=None)
    s = np.asarray(evaluate.straightness(velocity, x0))
    values[name] = (s.mean(), s.std() / np.sqrt(s.size))
  (s_teacher, se_teacher), (s_student, se_student) = values["teacher"], values["student"]
  assert s_student * 1.5 < s_teacher, values
  assert s_teacher - s_student > 10 * np.hypot(se_teacher, se_student), values
