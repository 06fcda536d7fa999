"""SF2M (diffjax.objectives.sf2m, diffjax.samplers.bridge) and models with several output heads:
the Brownian bridge's moments, its flow target against finite differences and its score against
autodiff of the Gaussian log density, the entropic pairs against POT's Sinkhorn plan, a zero loss
at the exact fields, the SDE and ODE samplers on a Gaussian path with known marginals, the
sampler names, and a short training and the CLI end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from tiny import CONFIGS, TINY

from diffjax import cli, models, objectives
from diffjax.objectives import base, sf2m
from diffjax.samplers import FLOW_SAMPLERS, bridge
from diffjax.train import config as config_lib

SIGMA = 0.7
TIME_EPS = 1e-3


def _context(*, apply=None, source=None, source_is_normal=False, num_classes=0):
  return base.ObjectiveContext(
    apply=apply,
    source=source if source is not None else (lambda key, n: jax.random.normal(key, (n, 2))),
    data_shape=(2,),
    num_classes=num_classes,
    source_is_normal=source_is_normal,
  )


# ---- models with several output heads ------------------------------------------------------

MODEL_CASES = {
  "mlp": ((2,), dict(width=16, depth=2)),
  "unet": ((4, 4, 1), dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())),
  "dit": ((4, 4, 1), dict(patch_size=2, hidden_size=16, depth=1, num_heads=2)),
}


@pytest.mark.parametrize(
  "name",
  # The image models compile for ~10 s each on a loaded 2-core machine: in the slow suite.
  [
    "mlp",
    pytest.param("unet", marks=pytest.mark.slow),
    pytest.param("dit", marks=pytest.mark.slow),
  ],
)
def test_one_output_head_is_the_plain_model_and_more_heads_widen_only_the_last_layer(name):
  """output_heads=1 builds the model bit for bit as before (the same parameter tree, shapes and
  values from one key, the same outputs); output_heads=2 changes only the output layer, whose
  width doubles, and keeps every other parameter bit for bit (the same initialisation draws)."""
  shape, kwargs = MODEL_CASES[name]
  plain = models.create_model(name, data_shape=shape, **kwargs)
  one = models.create_model(name, data_shape=shape, output_heads=1, **kwargs)
  two = models.create_model(name, data_shape=shape, output_heads=2, **kwargs)
  key = jax.random.key(3)
  p_plain, p_one, p_two = plain.init(key), one.init(key), two.init(key)
  leaves_plain = jax.tree_util.tree_leaves_with_path(p_plain)
  leaves_one = jax.tree_util.tree_leaves_with_path(p_one)
  assert [k for k, _ in leaves_plain] == [k for k, _ in leaves_one]
  for (_, a), (_, b) in zip(leaves_plain, leaves_one):
    np.testing.assert_array_equal(a, b)
  # Perturbed so that zero-initialised output layers (UNet, DiT) give non-zero outputs.
  p_plain = jax.tree.map(lambda a: a + 0.01 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), p_plain)
  x = jax.random.normal(jax.random.key(1), (3, *shape))
  t = jnp.array([0.1, 0.5, 0.9])
  out_plain = plain.apply(p_plain, x, t)
  assert out_plain.shape == x.shape
  np.testing.assert_array_equal(out_plain, one.apply(p_plain, x, t))
  assert two.apply(p_two, x, t).shape == (3, *shape[:-1], 2 * shape[-1])

  widened = []
  flat_two = dict(jax.tree_util.tree_leaves_with_path(p_two))
  for path, a in jax.tree_util.tree_leaves_with_path(p_one):
    b = flat_two[path]
    if a.shape == b.shape:
      np.testing.assert_array_equal(a, b)
    else:
      assert b.shape[:-1] == a.shape[:-1] and b.shape[-1] == 2 * a.shape[-1], (path, a.shape)
      widened.append(path)
  assert widened and len(widened) <= 2, widened  # the output layer's kernel (and its bias)


def test_output_heads_must_be_a_positive_int():
  for bad in (0, 1.5, True, "2"):
    with pytest.raises(ValueError, match=r"output_heads must be an int >= 1"):
      models.create_model("mlp", data_shape=(2,), output_heads=bad)


# ---- the bridge ------------------------------------------------------------------------------


def _pairs(n, key=0):
  k0, k1 = jax.random.split(jax.random.key(key))
  return jax.random.normal(k0, (n, 2)), 2.0 + jax.random.normal(k1, (n, 2))


# One compiled program per shape and dtype instead of op-by-op dispatch.
_bridge_example = jax.jit(sf2m.bridge_example, static_argnames=("sigma", "time_eps"))


def test_bridge_points_have_the_closed_form_mean_and_variance():
  """x_t given (x0, x1, t) is N((1 - t) x0 + t x1, sigma^2 t (1 - t) I): the residuals divided
  by the closed-form std are N(0, 1). N = 20000 x 2 residuals: the mean's standard error is
  1/sqrt(2N) = 0.005, the variance's sqrt(2 / 2N) = 0.007; 5 standard errors each. The times
  are U[eps, 1 - eps] (mean 1/2, std error 0.29/sqrt(N) = 0.002)."""
  n = 20_000
  x0, x1 = _pairs(n)
  ex = _bridge_example(jax.random.key(5), x0=x0, x1=x1, sigma=SIGMA, time_eps=TIME_EPS)
  t = np.asarray(ex.t)[:, None]
  mean = (1 - t) * np.asarray(x0) + t * np.asarray(x1)
  std = SIGMA * np.sqrt(t * (1 - t))
  residual = (np.asarray(ex.x_t) - mean) / std
  assert abs(residual.mean()) < 5 * 0.005
  assert abs(residual.var() - 1.0) < 5 * 0.007
  # XLA may compute t once for ex.t and again, contracted into a fused multiply-add, inside
  # ex.std: an ulp apart, 6e-8 near t = 1 - eps, where the std's slope sigma / (2 sqrt(eps)) = 11
  # turns it into 7e-7; so atol is 2e-6.
  np.testing.assert_allclose(np.asarray(ex.std), std[:, 0], rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(residual, np.asarray(ex.z), atol=1e-3)
  assert TIME_EPS <= t.min() and t.max() <= 1 - TIME_EPS
  assert abs(t.mean() - 0.5) < 5 * 0.002


def test_flow_target_is_the_time_derivative_of_the_bridge_sample():
  """u_t = d/dt [(1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z] at fixed (x0, x1, z). Central
  differences in float64, h = 1e-6: truncation h^2 |x'''| <= 1e-12 / t^(5/2) ~ 1e-4 at the
  smallest t here (~0.02) and far less elsewhere, rounding 1e-16 / h = 1e-10; rtol 1e-4
  catches any wrong coefficient (the (1 - 2t) / (2 t (1 - t)) factor included)."""
  with jax.enable_x64(True):
    x0, x1 = (jnp.asarray(a, jnp.float64) for a in _pairs(64, key=1))
    ex = _bridge_example(jax.random.key(2), x0=x0, x1=x1, sigma=SIGMA, time_eps=0.02)
    assert ex.flow_target.dtype == jnp.float64
    t, z = np.asarray(ex.t)[:, None], np.asarray(ex.z)

    def x_of(s):
      return (1 - s) * np.asarray(x0) + s * np.asarray(x1) + SIGMA * np.sqrt(s * (1 - s)) * z

    h = 1e-6
    finite_difference = (x_of(t + h) - x_of(t - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(ex.flow_target), finite_difference, rtol=1e-4, atol=1e-6)
    mean = (1 - t) * np.asarray(x0) + t * np.asarray(x1)
    closed = (1 - 2 * t) / (2 * t * (1 - t)) * (np.asarray(ex.x_t) - mean) + np.asarray(x1 - x0)
    np.testing.assert_allclose(np.asarray(ex.flow_target), closed, rtol=1e-9, atol=1e-9)


def test_score_target_is_the_gradient_of_the_bridge_log_density():
  """s_t = grad_x log N(x; mu_t, sigma^2 t (1 - t) I) by jax.grad of the log density written
  with jax.scipy; and sigma_t s_t = -z, the identity the weighted score loss rests on."""
  with jax.enable_x64(True):
    x0, x1 = (jnp.asarray(a, jnp.float64) for a in _pairs(32, key=3))
    ex = _bridge_example(jax.random.key(4), x0=x0, x1=x1, sigma=SIGMA, time_eps=TIME_EPS)
    t = ex.t

    def log_density(x):
      mean = (1 - t)[:, None] * x0 + t[:, None] * x1
      std = SIGMA * jnp.sqrt(t * (1 - t))[:, None]
      return jnp.sum(jax.scipy.stats.norm.logpdf(x, mean, std))

    expected = jax.jit(jax.grad(log_density))(ex.x_t)
    score = sf2m.bridge_score_target(x0=x0, x1=x1, t=t, x_t=ex.x_t, sigma=SIGMA)
    np.testing.assert_allclose(score, expected, rtol=1e-9)
    np.testing.assert_allclose(ex.std[:, None] * score, -ex.z, rtol=1e-8, atol=1e-10)


def test_pairs_are_drawn_from_the_entropic_plan_of_regularisation_two_sigma_squared():
  """The objective's pair_fn on 6 fixed source and 6 fixed data points, 3000 draws: the
  empirical plan matches POT's ot.sinkhorn(a, b, M, reg=2 sigma^2). Row i draws j with
  probability B P_ij, so the count is Binomial(3000, B P_ij): 5 standard errors, plus 2e-3 for
  Sinkhorn's stopping threshold (ott-jax: marginal error 1e-3)."""
  b, draws = 6, 3000
  x0 = jax.random.normal(jax.random.key(7), (b, 2))
  x1 = jax.random.normal(jax.random.key(8), (b, 2)) + jnp.array([1.0, 0.0])
  objective = sf2m.sf2m(_context(source=lambda key, n: x0), sigma=SIGMA)
  paired = jax.jit(jax.vmap(lambda k: objective.pair_fn(k, {"x": x1})))(
    jax.random.split(jax.random.key(0), draws)
  )
  np.testing.assert_array_equal(np.asarray(paired["x0"]), np.broadcast_to(x0, (draws, b, 2)))
  # Which data point each source point got: the gathered rows are exact copies.
  index = np.argmin(
    np.abs(np.asarray(paired["x"])[:, :, None, :] - np.asarray(x1)[None, None]).sum(-1), axis=-1
  )
  counts = np.zeros((b, b))
  np.add.at(counts, (np.tile(np.arange(b), draws), index.ravel()), 1)
  empirical = counts / (draws * b)
  cost = ((np.asarray(x0)[:, None] - np.asarray(x1)[None]) ** 2).sum(-1).astype(np.float64)
  plan = ot.sinkhorn(np.full(b, 1 / b), np.full(b, 1 / b), cost, reg=2 * SIGMA**2, stopThr=1e-12)
  p_row = b * plan
  stderr = np.sqrt(p_row * (1 - p_row) / draws) / b
  assert np.all(np.abs(empirical - plan) <= 5 * stderr + 2e-3 / b), np.abs(empirical - plan).max()
  assert plan.max() > 2.5 / b**2 and plan.min() < 0.5 / b**2  # a plan far from independent


def _exact_point_mass_fields(a, b_point, sigma):
  """v and s of the bridge between two point masses a -> b_point: the marginal p_t is the one
  bridge N(mu_t, sigma^2 t (1 - t) I), so the marginal fields are the conditional ones."""

  def apply(params, x, t, cond, dropout_key=None):
    del params, cond, dropout_key
    tb = t[:, None]
    mean = (1 - tb) * a + tb * b_point
    var = sigma**2 * tb * (1 - tb)
    velocity = (1 - 2 * tb) / (2 * tb * (1 - tb)) * (x - mean) + (b_point - a)
    return jnp.concatenate([velocity, -(x - mean) / var], axis=-1)

  return apply


def test_loss_is_zero_at_the_exact_fields_of_a_point_mass_bridge():
  """From a point mass to a point mass, the exact velocity and score make the loss ~0 (float32
  rounding); a score off by a factor 2 (the g^2 / 2 slip) does not."""
  a, b_point = jnp.array([-1.0, 0.5]), jnp.array([2.0, 1.0])
  exact = _exact_point_mass_fields(a, b_point, SIGMA)
  source = lambda key, n: jnp.broadcast_to(a, (n, 2))
  objective = sf2m.sf2m(_context(apply=exact, source=source), sigma=SIGMA)

  def wrong(params, x, t, cond, dropout_key=None):
    v, s = bridge.velocity_and_score(exact(params, x, t, cond))
    return jnp.concatenate([v, 2 * s], axis=-1)

  wrong_objective = sf2m.sf2m(_context(apply=wrong, source=source), sigma=SIGMA)

  @jax.jit
  def losses():
    # Both losses on one batch in one program (one compile, not op-by-op dispatch).
    batch = objective.pair_fn(jax.random.key(0), {"x": jnp.broadcast_to(b_point, (256, 2))})
    key = jax.random.key(1)
    return objective.loss_fn(None, key, batch), wrong_objective.loss_fn(None, key, batch)

  loss, wrong_loss = map(float, losses())
  assert loss < 1e-8, loss
  assert wrong_loss > 0.5, wrong_loss


# ---- generation --------------------------------------------------------------------------------


def _gaussian_path_model(shift):
  """[v, s] of p_t = N(t shift, I) from an N(0, I) source: v = shift (a translation), s = -(x -
  t shift). The SDE dx = [shift - sigma^2 / 2 (x - t shift)] dt + sigma dW keeps p_t (an OU
  process around t shift with stationary variance 1)."""

  def apply(params, x, t, cond, dropout_key=None):
    del params, cond, dropout_key
    return jnp.concatenate([jnp.broadcast_to(shift, x.shape), -(x - t[:, None] * shift)], axis=-1)

  return apply


def test_sde_and_ode_samplers_keep_the_marginals_of_a_known_path():
  """Both generators land on N(shift, I) at t = 1. 4000 samples, 100 steps: the mean's standard
  error is 1/sqrt(4000) = 0.016 and the variance's sqrt(2/4000) = 0.022 (Euler-Maruyama's
  stationary variance of the OU is 1 / (1 - dt sigma^2 / 4), a 0.4% bias); 5 standard errors.
  A drift with g^2 s instead of g^2 / 2 s would give variance 1/2, one without s 1 + sigma^2."""
  shift = jnp.array([3.0, -1.0])
  sigma = 1.3
  objective = sf2m.sf2m(
    _context(apply=_gaussian_path_model(shift), source_is_normal=True), sigma=sigma
  )
  for sampler, nfe in (("euler_maruyama", 100), (None, 100), ("heun", 200)):
    # The SDE's runs return their trajectories too: one compiled program serves the named and
    # the default sampler and the trajectory check.
    sde = sampler != "heun"
    out = objective.generate(
      None, jax.random.key(0), 4000, steps=100, sampler=sampler, return_trajectories=sde
    )
    samples = np.asarray(out["samples"])
    assert int(out["nfe"]) == nfe, sampler
    assert np.all(np.abs(samples.mean(0) - np.asarray(shift)) < 5 * 0.016), sampler
    assert np.all(np.abs(samples.var(0) - 1.0) < 5 * 0.022), (sampler, samples.var(0))
    if sde:
      assert out["trajectories"].shape == (101, 4000, 2)
      np.testing.assert_array_equal(out["trajectories"][-1], samples)


def test_likelihood_is_the_ode_of_the_velocity_head():
  """With an N(0, I) source the log-likelihood integrates v alone: for v = shift (divergence
  0) log p(x) = log N(x - shift; 0, I) in closed form."""
  shift = jnp.array([3.0, -1.0])
  objective = sf2m.sf2m(_context(apply=_gaussian_path_model(shift), source_is_normal=True))
  x = shift + jax.random.normal(jax.random.key(3), (16, 2))
  log_p = np.asarray(objective.log_likelihood(None, jax.random.key(0), x, steps=4))
  expected = -0.5 * ((np.asarray(x) - np.asarray(shift)) ** 2).sum(1) - np.log(2 * np.pi)
  np.testing.assert_allclose(log_p, expected, atol=1e-4)
  assert sf2m.sf2m(_context(apply=_gaussian_path_model(shift))).log_likelihood is None


def test_forward_sde_checks_its_grid():
  drift = lambda x, t: x
  with pytest.raises(ValueError, match=r"times must increase"):
    bridge.forward_sde_euler_maruyama(
      jax.random.key(0), drift, jnp.zeros((2, 2)), times=jnp.array([1.0, 0.0]), diffusion=1.0
    )
  with pytest.raises(ValueError, match=r"the bridge's SDE needs g > 0"):
    bridge.bridge_generator(apply=None, source=None, diffusion=0.0)


# ---- the table entry, sampler names, config ----------------------------------------------------


def test_spec_sampler_names_and_checks():
  spec = objectives.OBJECTIVES["sf2m"]
  assert spec.output_heads == 2 and spec.any_source and spec.time_inputs == 1
  assert spec.default_sampler == "euler_maruyama"
  assert spec.samplers == ("euler_maruyama", *FLOW_SAMPLERS)
  for normal in (True, False):
    assert objectives.accepted_samplers(spec, {"name": "sf2m"}, source_is_normal=normal) == (
      spec.samplers
    )
  assert spec.check() == []
  problems = spec.check(sigma=0.0, time_eps=0.5, label_dropout=1.0)
  for fragment in ("objective.sigma=0.0", "objective.time_eps=0.5", "objective.label_dropout=1.0"):
    assert any(p.startswith(fragment) for p in problems), (fragment, problems)

  objective = sf2m.sf2m(_context(apply=_gaussian_path_model(jnp.zeros(2))))
  for name in ("ddim", "dpmpp_2m", "sde_heun", "nonesuch"):
    with pytest.raises(ValueError) as info:
      objective.generate(None, jax.random.key(0), 4, steps=2, sampler=name)
    message = str(info.value)
    assert "\n" not in message and f"{name!r}" in message and "'euler_maruyama'" in message


def test_config_builds_a_two_head_model():
  config = config_lib.load_config_file(f"{CONFIGS / 'toy2d_sf2m.py'}:small")
  config_lib.validate(config, num_devices=1)
  assert config.objective.name == "sf2m" and config.objective.sigma == 1.0
  assert (config.data.source, config.data.target) == ("8gaussians", "moons")
  assert (config.train.batch_size, config.optimizer.learning_rate) == (256, 1e-3)
  from diffjax.train import experiment  # pylint: disable=import-outside-toplevel

  model = experiment.create_model(config)
  params = jax.eval_shape(model.init, jax.random.key(0))
  out = jax.eval_shape(model.apply, params, jnp.zeros((3, 2)), jnp.zeros((3,)))
  assert out.shape == (3, 4)


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.slow  # compiles the trainer (tens of seconds on a loaded 2-core machine)
def test_short_training_on_the_small_config_reduces_the_loss():
  """configs/toy2d_sf2m.py:small shrunk (width 32, batch 64), 150 steps of the trainer: the loss
  on 8 fixed batches (fixed keys) falls by more than a third (it starts near 20: the target
  ``x1 - x0`` spans the 8gaussians radius 5 to the moons)."""
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.trainer import make_trainer  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config_file(f"{CONFIGS / 'toy2d_sf2m.py'}:small")
  config_lib.apply_overrides(
    config,
    [
      "--config.model.width=32",
      "--config.train.batch_size=64",
      "--config.train.fused_steps=50",
      "--config.train.progress_bar=false",
    ],
  )
  config_lib.validate(config, num_devices=1)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  trainer = make_trainer(config, mesh)
  experiment = trainer.experiment
  target = experiment.target_sampler

  @jax.jit
  def held_out_loss(params):
    def one(key):
      k_data, k_pair, k_loss = jax.random.split(key, 3)
      batch = experiment.pair_fn(k_pair, {"x": target(k_data, 256)})
      return experiment.loss_fn(params, k_loss, batch)

    return jnp.mean(jax.vmap(one)(jax.random.split(jax.random.key(99), 8)))

  state = trainer.create_state()
  before = float(held_out_loss(state.params))
  for _ in range(3):
    state, _ = trainer.advance(state, 50, None)
  after = float(held_out_loss(state.params))
  assert np.isfinite(after) and after < 2 / 3 * before, (before, after)


@pytest.mark.slow  # an end-to-end CLI run
def test_cli_trains_samples_and_evaluates_with_every_sampler(tmp_path, capsys):
  """`diffjax train` on configs/toy2d_sf2m.py:small (a few steps), then `sample` with the
  default (the SDE) and with the ODE, `evaluate --sampler euler_maruyama`, and a sampler the
  model cannot use: one line listing the compatible ones, exit code 2."""
  workdir = tmp_path / "run"
  path = f"{CONFIGS / 'toy2d_sf2m.py'}:small"
  assert cli.main(["train", "--config", path, "--workdir", str(workdir), *TINY]) == 0
  for sampler, name in ((None, "euler_maruyama"), ("euler", "euler")):
    out = tmp_path / f"{name}.npz"
    capsys.readouterr()
    argv = ["sample", "--workdir", str(workdir), "--num", "8", "--steps", "3", "--out", str(out)]
    assert cli.main(argv + (["--sampler", sampler] if sampler else [])) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sampler"] == name and report["nfe"] == 3, report
    with np.load(out) as f:
      assert f["samples"].shape == (8, 2) and np.isfinite(f["samples"]).all()
  capsys.readouterr()
  argv = ["evaluate", "--workdir", str(workdir), "--num", "64", "--steps", "3"]
  assert cli.main(argv + ["--sampler", "euler_maruyama"]) == 0
  capsys.readouterr()
  argv = ["sample", "--workdir", str(workdir), "--num", "8", "--out", str(tmp_path / "x.npz")]
  assert cli.main(argv + ["--sampler", "ddim"]) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1 and "'ddim'" in error and "'euler_maruyama'" in error, error


def test_reproduce_2d_renders_the_sf2m_rows_and_merges_its_method():
  """scripts/reproduce_2d.py: an SF2M cell (synthetic numbers) shows in the ODE tables and in
  the SDE table, for both implementations; merging a run of SF2M into a run of the paper's
  methods adds the method to the table."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location(
    "reproduce_2d", CONFIGS.parent / "scripts" / "reproduce_2d.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "sf2m" in module.METHODS and module.SIGMAS["sf2m"] == 1.0

  def side(w2, seeds):
    rows = [
      dict(seed=s, train_s=1.0, w2_euler=w2, w2_dopri5=w2 + 0.01, nfe_dopri5=30, w2_sde=w2 / 2)
      for s in seeds
    ]
    for row in rows:
      row["nfe_sde"] = 100
    summary = module.summarise(rows)
    summary_keys = {"w2_euler", "w2_dopri5", "nfe_dopri5", "w2_sde", "nfe_sde"}
    assert set(summary) == summary_keys
    return dict(seeds=rows, summary=summary)

  ours = side(0.5, [42, 43])
  ours.update(train_s_all_seeds=2.0, train_s_per_seed=1.0, compile_and_first_chunk_s=3.0)
  run = dict(
    command="python scripts/reproduce_2d.py --methods sf2m",
    steps=2000,
    seeds=[42, 43],
    peer_seeds=[42],
    tasks=["8gaussians->moons"],
    methods=["sf2m"],
    eval_samples=2000,
    euler_steps=100,
    batch_size=256,
    learning_rate=1e-3,
    peer_threads=1,
    date="today",
    machine="test",
    loadavg_start=[0.0, 0.0, 0.0],
  )
  report = dict(
    run=run,
    status="complete",
    peer_note="peer",
    secondary_reference=module.DSBM_TABLE2,
    results={"sf2m": {"8gaussians->moons": dict(ours=ours, peer=side(0.7, [42]))}},
  )
  text = module.to_markdown(report)
  assert "and SF2M" in text and "### W2, SDE by Euler-Maruyama (100 steps, NFE 100)" in text
  sde_table = text.split("### W2, SDE")[1].split("###")[0]
  assert "| SF2M | diffjax | 0.250 ± 0.000 |" in sde_table
  assert "| SF2M | TorchCFM | 0.350 (1 seed) |" in sde_table

  paper = json.loads(json.dumps(report))
  paper["run"]["methods"] = ["icfm"]
  paper["results"] = {"icfm": {}}
  module.merge_reports(paper, report, name="sf2m run")
  assert paper["run"]["methods"] == ["icfm", "sf2m"] and "sf2m" in paper["results"]
