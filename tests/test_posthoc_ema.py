"""Post-hoc EMA (Karras et al. 2024, EDM2, https://arxiv.org/abs/2312.02696): the power-function
EMA against its closed forms, the least-squares reconstruction against directly tracked EMAs
(a random walk and a real short training), the snapshot store's integrity, resume, and
`diffjax evaluate --sigma-rel`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import tiny_config

from diffjax import cli
from diffjax.train import config as config_lib
from diffjax.train import loop
from diffjax.train import posthoc_ema as pe
from diffjax.train.state import PosthocTrainState, TrainState, init_train_state
from diffjax.train.step import train_step

TRACKED = (0.05, 0.1)
TARGET = 0.08  # tracked directly as a third profile, reconstructed from the first two only


def relative_l2(a, b) -> float:
  """``||a - b|| / ||b||`` over all leaves of two parameter trees (float64)."""
  pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  num = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2) for x, y in pairs)
  den = sum(np.sum(np.asarray(y, np.float64) ** 2) for _, y in pairs)
  return float(np.sqrt(num / den))


# ---- the math ------------------------------------------------------------------------------


def test_gamma_round_trip_and_paper_values():
  sigma_rels = np.array([0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.28])
  gammas = pe.gamma_from_sigma_rel(sigma_rels)
  assert np.all(gammas > 0)
  np.testing.assert_allclose(pe.sigma_rel_from_gamma(gammas), sigma_rels, rtol=1e-10)
  # EDM2 Section 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
  np.testing.assert_allclose(pe.gamma_from_sigma_rel([0.05, 0.1]), [16.97, 6.94], atol=5e-3)
  # Independent of eq. 3: the standard deviation of the density (gamma + 1) tau^gamma on [0, 1]
  # by quadrature (midpoint rule, 2e6 cells: error far below the tolerance).
  tau = (np.arange(2_000_000) + 0.5) / 2_000_000
  for gamma, sigma_rel in zip(gammas, sigma_rels, strict=True):
    density = (gamma + 1) * tau**gamma / tau.size
    mean = np.sum(density * tau)
    np.testing.assert_allclose(np.sqrt(np.sum(density * (tau - mean) ** 2)), sigma_rel, rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, np.sqrt(1 / 12)])
def test_gamma_refuses_widths_without_a_positive_exponent(bad):
  with pytest.raises(ValueError, match=r"must lie in \(0, 0.2887\)"):
    pe.gamma_from_sigma_rel(bad)


def test_update_is_the_closed_form_average_of_the_power_profile():
  """After t steps the EMA is sum_tau (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1) theta_tau: the power
  profile integrated over each step (float64 reference; float32 update, rtol 1e-5)."""
  values = np.random.default_rng(0).normal(size=300) + 3.0
  gamma = float(pe.gamma_from_sigma_rel(0.08))

  def update(average, inputs):
    t, value = inputs
    average = pe.power_ema_update(average, value, t=t, gamma=gamma)
    return average, average

  _, averages = jax.lax.scan(
    update, jnp.float32(123.0), (jnp.arange(1, 301), jnp.asarray(values, jnp.float32))
  )
  for t in (1, 2, 10, 150, 300):
    tau = np.arange(1, t + 1, dtype=np.float64)
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    np.testing.assert_allclose(averages[t - 1], weights @ values[:t], rtol=1e-5)
  np.testing.assert_allclose(float(pe.power_ema_beta(1, gamma)), 0.0)  # the start is forgotten


def test_profile_inner_products_match_quadrature():
  """<p_{t_a,g_a}, p_{t_b,g_b}> in closed form against a midpoint sum over [0, min(t_a, t_b)]."""
  for t_a, g_a, t_b, g_b in [(100, 6.9, 100, 17.0), (40, 3.0, 100, 6.9), (100, 17.0, 30, 2.5)]:
    n = 1_000_000
    tau = (np.arange(n) + 0.5) * min(t_a, t_b) / n
    p_a = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
    p_b = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
    np.testing.assert_allclose(
      pe.power_profile_dot(t_a, g_a, t_b, g_b), np.sum(p_a * p_b) * min(t_a, t_b) / n, rtol=1e-5
    )


def _tracked(trajectory, sigma_rels):
  """Each width's power EMA over ``trajectory`` (``[steps, d]``), after every step."""
  out = []
  for gamma in pe.gamma_from_sigma_rel(np.asarray(sigma_rels)):

    def update(average, inputs, gamma=float(gamma)):
      t, theta = inputs
      average = pe.power_ema_update(average, theta, t=t, gamma=gamma)
      return average, average

    steps = jnp.arange(1, trajectory.shape[0] + 1)
    out.append(np.asarray(jax.lax.scan(update, trajectory[0] * 0, (steps, trajectory))[1]))
  return out


def test_reconstruction_of_a_random_walk_matches_the_tracked_ema():
  """Snapshots of sigma_rel 0.05 and 0.1 every 50 of 1000 steps rebuild the 0.08 EMA to 1e-3;
  either tracked EMA alone misses it by over 1e-2 (so the check can fail)."""
  walk = np.cumsum(np.random.default_rng(1).normal(size=(1000, 200)), axis=0)
  low, high, direct = _tracked(jnp.asarray(walk, jnp.float32), (*TRACKED, TARGET))
  steps = np.arange(50, 1001, 50)
  gammas = pe.gamma_from_sigma_rel(np.asarray(TRACKED))
  weights = pe.reconstruction_weights(
    times=np.repeat(steps, 2),
    gammas=np.tile(gammas, steps.size),
    target_t=1000.0,
    target_gammas=pe.gamma_from_sigma_rel([TARGET]),
  )[:, 0]
  stored = np.stack([[low[s - 1], high[s - 1]] for s in steps]).reshape(-1, 200)
  rebuilt = weights @ stored.astype(np.float64)
  assert relative_l2(rebuilt, direct[-1]) < 1e-3
  assert min(relative_l2(low[-1], direct[-1]), relative_l2(high[-1], direct[-1])) > 1e-2


def test_residual_and_range():
  gammas = pe.gamma_from_sigma_rel(np.asarray(TRACKED))
  steps = np.arange(10, 201, 10)
  kwargs = dict(times=np.repeat(steps, 2), gammas=np.tile(gammas, steps.size), target_t=200.0)
  # A tracked width at the last snapshot is one of the snapshots: reconstructed exactly.
  assert pe.reconstruction_residual(**kwargs, target_gammas=gammas).max() < 1e-6
  residual = pe.reconstruction_residual(**kwargs, target_gammas=pe.gamma_from_sigma_rel([0.08]))
  low, high = pe.reconstructable_range(**kwargs)
  assert residual[0] < 0.01 and low < 0.05 and 0.1 < high < pe.SIGMA_REL_MAX
  outside = pe.reconstruction_residual(**kwargs, target_gammas=pe.gamma_from_sigma_rel([high]))
  np.testing.assert_allclose(outside, pe.MAX_RESIDUAL, rtol=0.1)  # the edge is where it fails


# ---- the store -----------------------------------------------------------------------------


def _profiles(value: float):
  return [{"w": np.full((3, 2), value, np.float32), "b": np.full(2, -value, np.float32)}] * 2


def _write(workdir, step, value=1.0):
  gammas = pe.gamma_from_sigma_rel(np.asarray(TRACKED))
  pe.write_snapshot(
    workdir,
    step=step,
    profiles=_profiles(value),
    sigma_rels=TRACKED,
    gammas=gammas,
    is_lead=True,
  )


def test_store_checks_digests_and_survives_a_failed_write(tmp_path, monkeypatch, caplog):
  for step in (10, 20, 30):
    _write(tmp_path, step, value=step)
  store = pe.read_store(tmp_path)
  assert [s.step for s in store.snapshots] == [10, 20, 30]
  # A kill while the next manifest is written: the file of step 40 exists, the manifest does
  # not name it, every earlier snapshot is still listed and intact.
  monkeypatch.setattr(pe, "write_atomic", lambda *a, **k: (_ for _ in ()).throw(OSError("kill")))
  with pytest.raises(OSError, match="kill"):
    _write(tmp_path, 40)
  monkeypatch.undo()
  assert (tmp_path / pe.STORE_DIR / "step_000000040.npz").is_file()
  plan = pe.plan_reconstruction(tmp_path, sigma_rels=[0.08])
  assert [s.step for s in plan.snapshots] == [10, 20, 30]
  # A damaged file is left out with a warning; with one snapshot left there are too few.
  for step in (20, 30):
    path = tmp_path / pe.STORE_DIR / f"step_{step:09d}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="diffjax"):
    with pytest.raises(pe.PosthocEmaError, match="1 usable post-hoc EMA snapshot.*at least 2"):
      pe.plan_reconstruction(tmp_path, sigma_rels=[0.08])
  assert "does not match its digest" in caplog.text
  # A resume from step 10 drops the later entries (they will be written again).
  assert pe.prune_snapshots(tmp_path, after=10) == [20, 30]
  assert [s.step for s in pe.read_store(tmp_path).snapshots] == [10]
  # A store that is a link is never written through.
  (tmp_path / "elsewhere").mkdir()
  linked = tmp_path / "linked"
  linked.mkdir()
  (linked / pe.STORE_DIR).symlink_to(tmp_path / "elsewhere")
  with pytest.raises(pe.PosthocEmaError, match="is a symbolic link"):
    _write(linked, 10)
  assert not list((tmp_path / "elsewhere").iterdir())


def test_reconstruction_of_constant_snapshots(tmp_path):
  """Every stored EMA equal to c: the rebuilt parameters are c sum_i x_i (linearity), and
  sum_i x_i = int (p_r + r) = 1 + int r, with |int r| <= ||r|| sqrt(t_r) (Cauchy-Schwarz on
  [0, t_r]) = residual (g + 1) / sqrt(2 g + 1)."""
  for step in range(8, 81, 8):
    _write(tmp_path, step, value=0.5)
  plan = pe.plan_reconstruction(tmp_path, sigma_rels=[0.06, 0.09])
  rebuilt = pe.reconstruct(plan, template=_profiles(0.0)[0])
  gammas = pe.gamma_from_sigma_rel(np.asarray(plan.sigma_rels))
  for k, params in enumerate(rebuilt):
    total = plan.weights[:, k].sum()
    assert params["w"].dtype == np.float32 and params["w"].shape == (3, 2)
    np.testing.assert_allclose(params["w"], 0.5 * total, rtol=1e-6)
    np.testing.assert_allclose(params["b"], -0.5 * total, rtol=1e-6)
    bound = plan.residuals[k] * (gammas[k] + 1) / np.sqrt(2 * gammas[k] + 1)
    assert abs(total - 1.0) <= bound + 1e-9 and bound < 0.05


# ---- the train step and the checkpoint ----------------------------------------------------


def _posthoc_state(optimizer):
  return init_train_state(
    key=jax.random.PRNGKey(0),
    init_params=lambda k: {"w": jax.random.normal(k, (3,))},
    optimizer=optimizer,
    posthoc_profiles=2,
  )


def test_state_layout_unchanged_without_posthoc_ema():
  """Off (the default), the state is the plain TrainState, so the checkpoints of older
  workdirs restore into it; on, the profiles are a field of their own."""
  kwargs = dict(key=jax.random.PRNGKey(0), init_params=lambda k: {"w": jnp.ones(2)})
  off = init_train_state(**kwargs, optimizer=optax.sgd(0.1))
  assert type(off) is TrainState
  assert [f.name for f in dataclasses.fields(off)] == [
    "params",
    "opt_state",
    "ema_params",
    "step",
    "key",
    "nonfinite_streak",
  ]
  on = _posthoc_state(optax.sgd(0.1))
  assert isinstance(on, PosthocTrainState) and len(on.posthoc_ema) == 2
  # A workdir written before the key resumes: its absent key equals the default.
  config = tiny_config()
  saved = {k: v for k, v in config_lib.resume_fingerprint(config).items() if "posthoc" not in k}
  assert config_lib.fingerprint_differences(saved, config_lib.resume_fingerprint(config)) == []
  enabled = tiny_config("--config.train.posthoc_ema.sigma_rels=(0.05,)")
  assert config_lib.fingerprint_differences(saved, config_lib.resume_fingerprint(enabled))


def test_train_step_updates_each_profile_and_skips_nonfinite_steps():
  """Each profile after 6 steps equals the closed-form power average of the 6 parameter
  values (t = step + 1); a non-finite step leaves the profiles as they were."""
  optimizer = optax.sgd(0.1)
  state = _posthoc_state(optimizer)
  gammas = tuple(float(g) for g in pe.gamma_from_sigma_rel(np.asarray(TRACKED)))
  loss_fn = lambda p, key, b: jnp.sum((p["w"] - b["x"]) ** 2)
  step = jax.jit(
    lambda s, b: train_step(
      s, b, loss_fn=loss_fn, optimizer=optimizer, ema_decay=0.9, posthoc_gammas=gammas
    )
  )
  history = []
  for i in range(6):
    state, _ = step(state, {"x": jnp.full(3, float(i))})
    history.append(np.asarray(state.params["w"], np.float64))
  tau = np.arange(1, 7, dtype=np.float64)
  for profile, gamma in zip(state.posthoc_ema, gammas, strict=True):
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 6 ** (gamma + 1)
    np.testing.assert_allclose(profile["w"], weights @ np.stack(history), rtol=1e-5)
  skipped, _ = step(state, {"x": jnp.full(3, jnp.nan)})
  for a, b in zip(jax.tree.leaves(skipped.posthoc_ema), jax.tree.leaves(state.posthoc_ema)):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_restores_the_profiles_bit_exact(tmp_path):
  from diffjax.train import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.trainer import state_shardings_for  # pylint: disable=import-outside-toplevel

  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  state = _posthoc_state(optax.adam(0.1))
  state = state.replace(
    posthoc_ema=tuple({"w": p["w"] * (1 + 1e-7 * i)} for i, p in enumerate(state.posthoc_ema))
  )
  manager = ckpt.make_checkpoint_manager(tmp_path, keep=2, async_save=False)
  ckpt.save(manager, 3, state, {"step": 3}, force=True)
  manager.wait_until_finished()
  abstract = jax.eval_shape(lambda: state)
  target = ckpt.abstract_with_shardings(abstract, state_shardings_for(abstract, mesh))
  _, restored, _ = ckpt.restore_latest(manager, target)
  manager.close()
  assert isinstance(restored, PosthocTrainState)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  "override, fragment",
  [
    ("sigma_rels=(0.05, 0.5)", "sigma_rels=(0.05, 0.5): each must be a number in (0, 0.2887)"),
    ("sigma_rels=(0.05, 0.05)", "drop the repeated values"),
    ("sigma_rels=('a',)", "each must be a number"),
    ("snapshot_every=-1", "snapshot_every=-1: must be >= 0"),
  ],
)
def test_config_errors(override, fragment):
  config = tiny_config(f"--config.train.posthoc_ema.{override}")
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_devices=None)
  assert fragment in str(error.value) and len(str(error.value).splitlines()) == 1


# ---- `diffjax evaluate --sigma-rel`: errors, before anything is restored --------------------


def _evaluate_error(capsys, workdir, *args) -> str:
  code = cli.main(["evaluate", "--workdir", str(workdir), "--num", "8", *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  return err[0]


def _workdir(path: pathlib.Path, *overrides: str) -> pathlib.Path:
  """A workdir holding only a config.json: all evaluate reads before its checks."""
  path.mkdir()
  (path / "config.json").write_text(config_lib.config_to_json(tiny_config(*overrides)))
  return path


def test_evaluate_errors(tmp_path, capsys):
  plain = _workdir(tmp_path / "plain")
  line = _evaluate_error(capsys, plain, "--sigma-rel", "0.05")
  assert "was trained without post-hoc EMA" in line
  tracked = f"--config.train.posthoc_ema.sigma_rels=({TRACKED[0]}, {TRACKED[1]})"
  few = _workdir(tmp_path / "few", tracked)
  assert "no post-hoc EMA snapshots" in _evaluate_error(capsys, few, "--sigma-rel", "0.05")
  _write(few, 8)
  assert "needs at least 2" in _evaluate_error(capsys, few, "--sigma-rel", "0.05")
  for step in range(16, 81, 8):
    _write(few, step)
  line = _evaluate_error(capsys, few, "--sigma-rel", "0.27")
  assert "--sigma-rel 0.27: the stored profiles (sigma_rel 0.05, 0.1; 10 snapshots, " in line
  assert "steps 8 to 80) reconstruct sigma_rel in [" in line
  assert "0 < sigma_rel < 0.2887" in _evaluate_error(capsys, few, "--sigma-rel", "0.5")
  assert "must be a number" in _evaluate_error(capsys, few, "--sigma-rel", "0.05,abc")
  seeds = _workdir(tmp_path / "seeds", tracked, "--config.train.num_seeds=2")
  assert "pass --seed-index" in _evaluate_error(capsys, seeds, "--sigma-rel", "0.05")


# ---- a real training (slow: three short runs and an evaluation) ---------------------------

STEPS = 64
OVERRIDES = (
  f"--config.train.steps={STEPS}",
  f"--config.train.posthoc_ema.sigma_rels=({TRACKED[0]}, {TRACKED[1]}, {TARGET})",
  "--config.train.posthoc_ema.snapshot_every=4",
  "--config.train.checkpoint_every=32",
  "--config.train.fused_steps=8",
  "--config.train.log_every=32",
  "--config.optimizer.learning_rate=0.01",
)


def _train(workdir, *overrides):
  config = tiny_config(*OVERRIDES, *overrides)
  return loop.train(config, workdir, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("posthoc") / "w"
  return workdir, _train(workdir)


@pytest.mark.slow
def test_reconstruction_from_training_matches_the_tracked_ema(trained):
  """A real run tracks 0.05, 0.1 and 0.08; 0.08 rebuilt from the 16 snapshots of the first two
  alone matches the tracked one to 1e-3 relative L2, while the nearest tracked width misses
  by more than 2e-3."""
  workdir, result = trained
  state = result["state"]
  store = pe.read_store(workdir)
  assert [s.step for s in store.snapshots] == list(range(4, STEPS + 1, 4))
  for snapshot in store.snapshots:
    data = (store.folder / snapshot.file).read_bytes()
    assert hashlib.sha256(data).hexdigest() == snapshot.sha256
  two = dataclasses.replace(store, sigma_rels=store.sigma_rels[:2], gammas=store.gammas[:2])
  times = np.repeat([s.step for s in two.snapshots], 2).astype(float)
  kwargs = dict(times=times, gammas=np.tile(two.gammas, len(two.snapshots)), target_t=STEPS)
  plan = pe.Reconstruction(
    store=two,
    snapshots=two.snapshots,
    sigma_rels=(TARGET,),
    step=STEPS,
    weights=pe.reconstruction_weights(**kwargs, target_gammas=pe.gamma_from_sigma_rel([TARGET])),
    residuals=(0.0,),
    range=(0.0, 1.0),
  )
  (rebuilt,) = pe.reconstruct(plan, template=state.ema_params)
  direct = state.posthoc_ema[2]
  assert relative_l2(rebuilt, direct) < 1e-3
  nearest = min(relative_l2(state.posthoc_ema[i], direct) for i in (0, 1))
  assert nearest > 2e-3, nearest
  # The last snapshot is the final state's profiles, bit for bit.
  with np.load(store.folder / store.snapshots[-1].file) as npz:
    for j, leaf in enumerate(jax.tree.leaves(state.posthoc_ema[1])):
      np.testing.assert_array_equal(npz[f"p1_{j}"], np.asarray(leaf))


@pytest.mark.slow
def test_resume_restores_the_profiles_bit_exact(trained, tmp_path):
  workdir, result = trained
  half = tmp_path / "w"
  _train(half, f"--config.train.steps={STEPS // 2}")
  resumed = _train(half)
  assert resumed["start_step"] == STEPS // 2
  for a, b in zip(
    jax.tree.leaves(resumed["state"].posthoc_ema),
    jax.tree.leaves(result["state"].posthoc_ema),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ours, theirs = pe.read_store(half), pe.read_store(workdir)
  assert [(s.step, s.sha256) for s in ours.snapshots] == [
    (s.step, s.sha256) for s in theirs.snapshots
  ]


@pytest.mark.slow
def test_evaluate_sweeps_sigma_rel(trained, capsys):
  workdir, _ = trained
  args = ["--num", "32", "--steps", "2", "--no-likelihood", "--sigma-rel", "0.05,0.08,0.12"]
  code = cli.main(["evaluate", "--workdir", str(workdir), *args])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  report = json.loads(captured.out.strip().splitlines()[-1])
  assert [row["sigma_rel"] for row in report["rows"]] == [0.05, 0.08, 0.12]
  assert report["step"] == STEPS and report["posthoc_ema"]["snapshots"] == STEPS // 4
  assert all(row["w2"] is not None for row in report["rows"])
  assert len({row["w2"] for row in report["rows"]}) == 3  # three different models
  header = next(line for line in captured.err.splitlines() if line.startswith("sigma_rel"))
  assert "sampler" in header
  assert "post-hoc EMA (EDM2)" in captured.err
  assert pathlib.Path(report["table"]).is_file() and "sigma_rel_0.05-0.08-0.12" in report["table"]
  # The tracked width 0.05 rebuilt at the last snapshot is that snapshot itself.
  assert report["posthoc_ema"]["residuals"][0] < 1e-6
