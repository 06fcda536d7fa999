"""Guidance beyond CFG: the guidance interval, autoguidance and APG, their wiring and flags.

The math is checked on analytic predictors against hand-written NumPy references (Algorithm 1 of
Sadat et al. 2024 written out in NumPy for APG); the generator and the CLI on a tiny conditional
2D model at its initial state (no training: the plumbing under test does not need a trained
model).
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sample_cli import workdir_at_init
from tiny import tiny_config

from diffjax import cli
from diffjax import run as run_lib
from diffjax.parameterization import Coefficients, get_prediction_target
from diffjax.samplers import generate as generate_lib
from diffjax.samplers import guidance as G
from diffjax.train import config as config_lib

KEY = jax.random.PRNGKey(0)


def _linear_path(t):
  """The linear flow path ``x_t = t x0 + (1 - t) eps`` (data at t = 1)."""
  t = jnp.asarray(t, jnp.float32)
  return Coefficients(alpha=t, sigma=1.0 - t, d_alpha=jnp.ones_like(t), d_sigma=-jnp.ones_like(t))


def _cond(x, t):
  return 0.7 * x + jnp.sin(3.0 * t)[:, None] + 1.0


def _uncond(x, t):
  return -0.4 * x + t[:, None] ** 2


def _data(shape=(6, 2), seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


# ---- guidance interval ----------------------------------------------------------------------


def test_interval_is_cfg_inside_and_the_conditional_model_outside():
  x = _data()
  t = jnp.array([0.05, 0.2, 0.5, 0.8, 0.81, 0.99])
  inside = np.array([False, True, True, True, False, False])
  w = 3.0
  got = np.asarray(G.guidance_interval(_cond, _uncond, scale=w, t_lo=0.2, t_hi=0.8)(x, t))
  cond, uncond = np.asarray(_cond(x, t)), np.asarray(_uncond(x, t))
  cfg = uncond + w * (cond - uncond)
  np.testing.assert_allclose(got[inside], cfg[inside], rtol=1e-6)
  np.testing.assert_allclose(got[~inside], cond[~inside], rtol=1e-6)
  assert not np.allclose(cfg[~inside], cond[~inside])  # the two cases are told apart


# ---- autoguidance ---------------------------------------------------------------------------


def test_autoguidance_is_the_affine_extrapolation_and_the_main_model_for_its_own_guide():
  x, t = _data(), jnp.linspace(0.1, 0.9, 6)
  for w in (0.0, 1.0, 2.5, 7.0):
    same = G.autoguidance(_cond, _cond, scale=w)(x, t)
    np.testing.assert_allclose(same, _cond(x, t), rtol=1e-6, atol=1e-6)
  w = 2.5
  main, guide = np.asarray(_cond(x, t)), np.asarray(_uncond(x, t))
  got = G.autoguidance(_cond, _uncond, scale=w)(x, t)
  np.testing.assert_allclose(got, guide + w * (main - guide), rtol=1e-6)


# ---- APG -------------------------------------------------------------------------------------


def _np_project(v0, v1):
  """Algorithm 1's ``project`` in NumPy float64: per-example flattening."""
  flat0, flat1 = v0.reshape(len(v0), -1), v1.reshape(len(v1), -1)
  unit = flat1 / np.linalg.norm(flat1, axis=1, keepdims=True)
  parallel = np.sum(flat0 * unit, axis=1, keepdims=True) * unit
  return parallel.reshape(v0.shape), (flat0 - parallel).reshape(v0.shape)


def _np_apg(cond, uncond, w, *, eta, r, beta, buffer):
  """Algorithm 1 of Sadat et al. (2024) in NumPy: returns (guided, new running average)."""
  diff = cond - uncond
  if buffer is not None:
    diff = diff + beta * buffer
  average = diff
  if r > 0 and math.isfinite(r):
    norm = np.linalg.norm(diff.reshape(len(diff), -1), axis=1)
    diff = diff * np.minimum(1.0, r / norm).reshape((-1,) + (1,) * (diff.ndim - 1))
  parallel, orthogonal = _np_project(diff, cond)
  return cond + (w - 1.0) * (orthogonal + eta * parallel), average


def test_apg_with_eta_one_no_cap_no_momentum_is_cfg():
  cond, ref = _data((5, 3, 2), 2), _data((5, 3, 2), 3)
  w = jnp.array([0.0, 1.0, 2.0, 4.5, 9.0])  # one weight per example
  guided, _ = G.adaptive_projected_guidance(cond, ref, scale=w, apg=G.APG(eta=1.0))
  expected = ref + w[:, None, None] * (cond - ref)
  np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5)
  # With eta = 0 it is not CFG: the parallel part is gone.
  other, _ = G.adaptive_projected_guidance(cond, ref, scale=w, apg=G.APG(eta=0.0))
  assert not np.allclose(other, expected, atol=1e-3)


def test_projection_reconstructs_the_update_and_its_orthogonal_part_is_orthogonal():
  update, onto = _data((7, 4, 3), 4), _data((7, 4, 3), 5)
  parallel, orthogonal = G.project(update, onto=onto)
  np.testing.assert_allclose(parallel + orthogonal, update, rtol=1e-6, atol=1e-6)
  dots = np.sum(np.asarray(orthogonal * onto).reshape(7, -1), axis=1)
  norms = np.linalg.norm(np.asarray(onto).reshape(7, -1), axis=1)
  np.testing.assert_allclose(dots / norms, 0.0, atol=1e-5)  # per example
  # The parallel part is a multiple of each example's own conditional prediction.
  ratio = np.asarray(parallel).reshape(7, -1) / np.asarray(onto).reshape(7, -1)
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4)
  np.testing.assert_allclose(parallel, _np_project(np.asarray(update), np.asarray(onto))[0], 1e-5)


def test_norm_cap_holds_and_keeps_direction_and_small_updates():
  update = _data((6, 3), 6) * jnp.array([0.1, 0.5, 1.0, 2.0, 5.0, 20.0])[:, None]
  capped = np.asarray(G.cap_norm(update, threshold=1.5))
  norms, before = np.linalg.norm(capped, axis=1), np.linalg.norm(np.asarray(update), axis=1)
  assert np.all(norms <= 1.5 + 1e-5)
  small = before <= 1.5
  np.testing.assert_allclose(capped[small], np.asarray(update)[small], rtol=1e-6)
  np.testing.assert_allclose(norms[~small], 1.5, rtol=1e-5)
  cosine = np.sum(capped * np.asarray(update), axis=1) / (norms * before)
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
  assert np.array_equal(G.cap_norm(update, threshold=math.inf), update)


def test_apg_momentum_matches_algorithm_1_over_three_steps():
  apg = G.APG(eta=0.3, norm_threshold=1.2, momentum=-0.5)
  buffer_jax = jnp.zeros((4, 2, 3))
  buffer_np = np.zeros((4, 2, 3))
  for step in range(3):
    cond, ref = _data((4, 2, 3), 10 + step), _data((4, 2, 3), 20 + step)
    guided, buffer_jax = G.adaptive_projected_guidance(
      cond, ref, scale=3.0, apg=apg, buffer=buffer_jax
    )
    expected, buffer_np = _np_apg(
      np.asarray(cond, np.float64),
      np.asarray(ref, np.float64),
      3.0,
      eta=0.3,
      r=1.2,
      beta=-0.5,
      buffer=buffer_np,
    )
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(buffer_jax, buffer_np, rtol=1e-5, atol=1e-5)


def test_apg_momentum_euler_sampler_matches_a_hand_written_loop():
  """Three Euler steps of a velocity model on the linear path, APG on x0 = x + (1 - t) v with the
  running average carried between steps, written out by hand."""
  apg = G.APG(eta=0.2, norm_threshold=0.8, momentum=-0.6)
  times = jnp.array([0.0, 0.3, 0.6, 0.9])
  sampler = G.apg_momentum_euler_sampler(
    times=times,
    target=get_prediction_target("velocity"),
    coefficients_fn=_linear_path,
    guidance=G.Guidance(apg=apg),
  )
  noise = _data((5, 2), 7)
  out = sampler(KEY, _cond, noise, predict_uncond=_uncond, guidance_scale=2.5)
  x, buffer = np.asarray(noise, np.float64), np.zeros((5, 2))
  ts = np.asarray(times, np.float64)
  for t, t_next in zip(ts[:-1], ts[1:], strict=True):
    tb = jnp.full((5,), t, jnp.float32)
    v_c, v_u = np.asarray(_cond(jnp.asarray(x, jnp.float32), tb), np.float64), None
    v_u = np.asarray(_uncond(jnp.asarray(x, jnp.float32), tb), np.float64)
    x0_c, x0_u = x + (1 - t) * v_c, x + (1 - t) * v_u  # x0 = x + sigma v on this path
    eps_c = x - t * v_c
    x0_g, buffer = _np_apg(x0_c, x0_u, 2.5, eta=0.2, r=0.8, beta=-0.6, buffer=buffer)
    eps_g = eps_c - t / (1 - t) * (x0_g - x0_c)
    x = x + (t_next - t) * (x0_g - eps_g)  # velocity = d_alpha x0 + d_sigma eps
  np.testing.assert_allclose(out.samples, x, rtol=1e-4, atol=1e-4)
  assert int(out.nfe) == 3


def test_apg_target_space_is_x0_for_any_network_target():
  """The same model written as an eps or a velocity predictor gives one APG (x0, eps); applying
  the APG formula to the velocities themselves gives another (the target space matters)."""
  x, t = _data((6, 2), 8), jnp.linspace(0.15, 0.85, 6)
  coefficients = _linear_path(t)
  velocity, eps = get_prediction_target("velocity"), get_prediction_target("eps")

  def as_eps(predict):
    return lambda x, t: eps.from_x0_eps(
      *velocity.to_x0_eps(predict(x, t), x_t=x, coefficients=_linear_path(t)),
      coefficients=_linear_path(t),
    )

  rule = G.Guidance(apg=G.APG(eta=0.0, norm_threshold=1.0))
  results = {}
  for name, target, cond, ref in (
    ("velocity", velocity, _cond, _uncond),
    ("eps", eps, as_eps(_cond), as_eps(_uncond)),
  ):
    guided = G.guided_predictor(
      cond, ref, scale=3.0, guidance=rule, target=target, coefficients_fn=_linear_path
    )(x, t)
    results[name] = target.to_x0_eps(guided, x_t=x, coefficients=coefficients)
  for a, b in zip(results["velocity"], results["eps"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  on_velocity, _ = G.adaptive_projected_guidance(
    _cond(x, t), _uncond(x, t), scale=3.0, apg=rule.apg
  )
  x0_direct, _ = velocity.to_x0_eps(on_velocity, x_t=x, coefficients=coefficients)
  assert not np.allclose(x0_direct, results["velocity"][0], atol=1e-2)


def test_apg_outside_the_interval_is_the_conditional_model():
  x, t = _data(), jnp.array([0.05, 0.1, 0.5, 0.6, 0.95, 0.97])
  rule = G.Guidance(interval=(0.3, 0.7), apg=G.APG(eta=0.0, norm_threshold=1.0))
  got = G.guided_predictor(
    _cond,
    _uncond,
    scale=4.0,
    guidance=rule,
    target=get_prediction_target("velocity"),
    coefficients_fn=_linear_path,
  )(x, t)
  outside = np.array([True, True, False, False, True, True])
  np.testing.assert_allclose(np.asarray(got)[outside], np.asarray(_cond(x, t))[outside], 1e-5)
  assert not np.allclose(np.asarray(got)[~outside], np.asarray(_cond(x, t))[~outside])


# ---- the generator ---------------------------------------------------------------------------


def _apply(params, x, t, cond):
  """A class-conditional velocity: the null label (None) is another field."""
  if cond is None:
    return _uncond(x, t) * params
  return _cond(x, t) * params + 0.1 * cond[:, None].astype(x.dtype)


def _weak_apply(params, x, t, cond):
  return 0.5 * _apply(params, x, t, cond)


def _generator(**kwargs):
  return generate_lib.flow_generator(
    apply=_apply,
    source=lambda key, n: jax.random.normal(key, (n, 2)),
    data_shape=(2,),
    num_classes=3,
    coefficients_fn=_linear_path,
    **kwargs,
  )


def test_generator_rules_reach_the_sampler():
  generate = _generator()
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  params = jnp.float32(1.0)
  common = dict(steps=4, sampler="euler", labels=labels)
  cfg = generate(params, KEY, 6, guidance=2.0, **common)["samples"]
  as_cfg = generate(
    params, KEY, 6, guidance=2.0, guidance_rule=G.Guidance(apg=G.APG(eta=1.0)), **common
  )["samples"]
  np.testing.assert_allclose(as_cfg, cfg, rtol=1e-5, atol=1e-5)
  plain = generate(params, KEY, 6, **common)["samples"]
  own_guide = generate(
    params, KEY, 6, guidance=3.0, guide_apply=_apply, guide_params=params, **common
  )["samples"]
  np.testing.assert_allclose(own_guide, plain, rtol=1e-5, atol=1e-5)
  weak = generate(
    params, KEY, 6, guidance=3.0, guide_apply=_weak_apply, guide_params=params, **common
  )["samples"]
  assert not np.allclose(weak, plain, atol=1e-3)
  # An interval holding no grid time is the conditional model.
  empty = generate(
    params, KEY, 6, guidance=3.0, guidance_rule=G.Guidance(interval=(5.0, 6.0)), **common
  )["samples"]
  np.testing.assert_allclose(empty, plain, rtol=1e-5, atol=1e-5)
  momentum = G.Guidance(apg=G.APG(momentum=-0.5))
  chunked = generate(params, KEY, 6, guidance=3.0, guidance_rule=momentum, chunk_size=4, **common)
  assert np.isfinite(chunked["samples"]).all() and chunked["nfe"] == 4


def _noisy_path(t):
  """I-CFM's Gaussian path with sigma 0.1: ``sigma(0) = sqrt(1.01)``, not 1."""
  t = jnp.asarray(t, jnp.float32)
  sigma = jnp.sqrt((1.0 - t) ** 2 + 0.01)
  return Coefficients(alpha=t, sigma=sigma, d_alpha=jnp.ones_like(t), d_sigma=-(1.0 - t) / sigma)


def test_apg_momentum_sampler_at_weight_one_is_the_plain_euler_sampler():
  """At w = 1 the guided prediction is the conditional one, so the momentum sampler must retrace
  the registry's 'euler' path from the same source draws (on a path where sigma(0) != 1)."""
  generate = generate_lib.flow_generator(
    apply=_apply,
    source=lambda key, n: jax.random.normal(key, (n, 2)),
    data_shape=(2,),
    num_classes=3,
    coefficients_fn=_noisy_path,
  )
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  params = jnp.float32(1.0)
  common = dict(steps=5, sampler="euler", labels=labels)
  plain = generate(params, KEY, 6, guidance=1.0, **common)["samples"]
  momentum = G.Guidance(apg=G.APG(momentum=-0.5, norm_threshold=1.0))
  same = generate(params, KEY, 6, guidance=1.0, guidance_rule=momentum, **common)["samples"]
  np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)
  guided = generate(params, KEY, 6, guidance=3.0, guidance_rule=momentum, **common)["samples"]
  assert not np.allclose(guided, plain, atol=1e-3)


def test_generator_rejects_what_it_cannot_do_before_tracing():
  generate = _generator()
  params = jnp.float32(1.0)
  momentum = G.Guidance(apg=G.APG(momentum=-0.5))
  with pytest.raises(ValueError, match="'euler' sampler of a flow model only"):
    generate(params, KEY, 4, steps=2, sampler="heun", guidance=2.0, guidance_rule=momentum)
  with pytest.raises(ValueError, match="needs a guidance weight"):
    generate(params, KEY, 4, steps=2, guidance_rule=G.Guidance(interval=(0.1, 0.2)))
  no_x0 = generate_lib.flow_generator(
    apply=_apply, source=lambda key, n: jnp.zeros((n, 2)), data_shape=(2,), num_classes=3
  )
  with pytest.raises(ValueError, match="denoised"):
    no_x0(params, KEY, 4, steps=2, guidance=2.0, guidance_rule=G.Guidance(apg=G.APG()))


# ---- the CLI ---------------------------------------------------------------------------------

CONDITIONAL = ("--config.data.num_classes=8", "--config.objective.label_dropout=0.15")


def _config_only(tmp_path, name, *overrides):
  """A workdir holding only config.json (the checks read no checkpoint)."""
  config = tiny_config(*overrides)
  path = tmp_path / name
  path.mkdir()
  (path / "config.json").write_text(config_lib.config_to_json(config))
  return path


@pytest.fixture(scope="module")
def cond_workdir(tmp_path_factory) -> pathlib.Path:
  return workdir_at_init(tiny_config(*CONDITIONAL), tmp_path_factory.mktemp("cond") / "w")


@pytest.fixture(scope="module")
def guide_workdir(tmp_path_factory) -> pathlib.Path:
  config = tiny_config(*CONDITIONAL, "--config.model.width=8", "--config.model.depth=1")
  return workdir_at_init(config, tmp_path_factory.mktemp("guide") / "w")


@pytest.mark.slow  # two CLI runs that compile (about 30 s on a loaded 2-core CPU)
def test_sample_and_evaluate_with_every_guidance_flag(
  cond_workdir, guide_workdir, tmp_path, capsys
):
  out = tmp_path / "s.npz"
  flags = [
    "--guidance", "2", "--guidance-interval", "0.1,0.9", "--guide-workdir", str(guide_workdir),
    "--guidance-method", "apg", "--apg-eta", "0.1", "--apg-norm", "3", "--apg-momentum", "-0.5",
  ]  # fmt: skip
  code = cli.main(
    ["sample", "--workdir", str(cond_workdir), "--out", str(out), "--num", "16", "--steps", "3"]
    + ["--sampler", "euler", *flags]
  )
  captured = capsys.readouterr()
  assert code == 0, captured.err
  with np.load(out) as saved:
    assert saved["samples"].shape == (16, 2) and np.isfinite(saved["samples"]).all()
  code = cli.main(
    ["evaluate", "--workdir", str(cond_workdir), "--num", "16", "--steps", "3", "--sampler"]
    + ["euler", "--no-likelihood", "--out", str(tmp_path / "e.png"), *flags]
  )
  captured = capsys.readouterr()
  assert code == 0, captured.err
  report = json.loads(captured.out.strip().splitlines()[-1])
  assert report["guidance"] == 2.0 and "--apg-momentum -0.5" in report["guidance_flags"]
  assert report["rows"][0]["w2"] is not None


@pytest.mark.slow
@pytest.mark.parametrize(
  "flags",
  [
    ["--guidance-interval", "0.2,0.8"],
    ["--guide-workdir", "GUIDE"],
    ["--guidance-method", "apg"],
    ["--guidance-method", "apg", "--apg-eta", "1", "--apg-norm", "inf"],
    ["--guidance-method", "cfg"],
  ],
)
def test_each_guidance_flag_alone(cond_workdir, guide_workdir, tmp_path, capsys, flags):
  flags = [str(guide_workdir) if f == "GUIDE" else f for f in flags]
  out = tmp_path / "s.npz"
  code = cli.main(
    ["sample", "--workdir", str(cond_workdir), "--out", str(out), "--num", "8", "--steps", "2"]
    + ["--guidance", "3", *flags]
  )
  assert code == 0, capsys.readouterr().err
  with np.load(out) as saved:
    assert np.isfinite(saved["samples"]).all()


def _one_line(capsys, code: int) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, (code, err)
  assert len(lines) == 1 and lines[0].startswith("diffjax: error: "), err
  return lines[0]


@pytest.fixture()
def no_restore(monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("a bad input reached the checkpoint restore")

  monkeypatch.setattr(run_lib, "restore_for_inference", restore)


BAD_VALUES = [
  (["--guidance-interval", "0.8,0.2"], "--guidance-interval 0.8,0.2: must be two numbers"),
  (["--guidance-interval", "0.5"], "--guidance-interval 0.5: must be two numbers"),
  (["--guidance-interval", "a,b"], "--guidance-interval a,b: must be two numbers"),
  (["--guidance-interval", "nan,1"], "--guidance-interval nan,1: must be two numbers"),
  (["--guidance-interval=-1,0.5"], "--guidance-interval -1,0.5: must be two numbers"),
  (["--guidance-method", "pag"], "--guidance-method 'pag': choose one of ['cfg', 'apg']"),
  (["--apg-eta", "0.5"], "--apg-eta 0.5: applies to --guidance-method apg only"),
  (["--guidance-method", "apg", "--apg-eta", "nan"], "--apg-eta nan: must be a finite number"),
  (["--guidance-method", "apg", "--apg-norm", "0"], "--apg-norm 0.0: must be > 0"),
  (["--guidance-method", "apg", "--apg-norm", "nan"], "--apg-norm nan: must be > 0"),
  (["--guidance-method", "apg", "--apg-momentum", "1"], "--apg-momentum 1.0: must be in (-1, 1)"),
  (["--guidance-method", "apg", "--apg-momentum", "-0.5", "--sampler", "heun"], "'euler' sampler"),
  (["--guide-workdir", "MISSING"], "config.json not found"),
  (["--guide-workdir", "UNCOND"], "the main model is unconditional"),
]


@pytest.mark.parametrize("args, fragment", BAD_VALUES)
def test_bad_guidance_values_are_one_line_before_restoring(
  tmp_path, capsys, no_restore, args, fragment
):
  main = _config_only(tmp_path, "main", *CONDITIONAL)
  uncond = _config_only(tmp_path, "uncond")
  places = {"MISSING": str(tmp_path / "nowhere"), "UNCOND": str(main)}
  workdir = uncond if "UNCOND" in args else main
  args = [places.get(a, a) for a in args]
  for command in (["sample", "--out", str(tmp_path / "s.npz")], ["evaluate"]):
    code = cli.main([*command, "--workdir", str(workdir), "--guidance", "2", *args])
    line = _one_line(capsys, code)
    assert fragment in line, line
  # Without --guidance every one of these flags asks for it.
  code = cli.main(["sample", "--out", str(tmp_path / "s.npz"), "--workdir", str(main), *args])
  line = _one_line(capsys, code)
  assert "needs a guidance weight" in line or fragment in line, line


GUIDE_MISMATCHES = [
  ((), "the guide is unconditional"),
  (
    (
      "--config.data.num_classes=2",
      "--config.objective.label_dropout=0.15",
      "--config.data.target=moons",
    ),
    "data.target: 'moons' -> '8gaussians'",
  ),
  ((*CONDITIONAL, "--config.objective.sigma=0.3"), "objective.sigma: 0.3 -> 0.1"),
  ((*CONDITIONAL, "--config.train.num_seeds=2"), "train.num_seeds=2"),
]


@pytest.mark.parametrize("overrides, fragment", GUIDE_MISMATCHES)
def test_incompatible_guides_are_one_line(tmp_path, capsys, no_restore, overrides, fragment):
  main = _config_only(tmp_path, "main", *CONDITIONAL)
  guide = _config_only(tmp_path, "guide", *overrides)
  out = str(tmp_path / "s.npz")
  code = cli.main(
    ["sample", "--workdir", str(main), "--out", out, "--guidance", "2"]
    + ["--guide-workdir", str(guide)]
  )
  line = _one_line(capsys, code)
  assert f"--guide-workdir {guide}" in line and fragment in line, line


def test_apg_on_a_model_without_x0_is_one_line(tmp_path, capsys, no_restore):
  main = _config_only(tmp_path, "main", *CONDITIONAL, "--config.data.source=moons")
  code = cli.main(
    ["sample", "--workdir", str(main), "--out", str(tmp_path / "s.npz"), "--guidance", "2"]
    + ["--guidance-method", "apg"]
  )
  assert "gives no denoised (x0) estimate" in _one_line(capsys, code)


def test_autoguidance_needs_no_label_dropout_but_cfg_does(tmp_path, capsys, no_restore):
  main = _config_only(tmp_path, "main", "--config.data.num_classes=8")
  out = str(tmp_path / "s.npz")
  code = cli.main(["sample", "--workdir", str(main), "--out", out, "--guidance", "2"])
  assert "without label dropout" in _one_line(capsys, code)
  guide = _config_only(tmp_path, "guide", "--config.data.num_classes=8")
  with pytest.raises(AssertionError, match="reached the checkpoint restore"):
    cli.main(
      ["sample", "--workdir", str(main), "--out", out, "--guidance", "2"]
      + ["--guide-workdir", str(guide)]
    )


# ---- the class-conditional 2D task ------------------------------------------------------------


def test_conditional_toy_batches_carry_the_component_labels():
  """A class-conditional toy trains on its mixture's components: each point lies nearest the
  centre of its label's Gaussian (centres 3.8 apart, std 0.56: all but ~1e-3 of the points)."""
  from diffjax.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from diffjax.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel

  config = tiny_config(*CONDITIONAL)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices()[:1])
  batch = jax.jit(build_experiment(config, mesh=mesh).sample_batch)(KEY)
  x, labels = np.asarray(batch["x"]), np.asarray(batch["label"])
  angles = np.arange(8) * np.pi / 4
  centres = 5.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  nearest = np.argmin(np.linalg.norm(x[:, None] - centres[None], axis=2), axis=1)
  assert labels.shape == (x.shape[0],) and np.mean(nearest == labels) >= 0.97


@pytest.mark.parametrize(
  "overrides, fragment",
  [
    (("--config.data.num_classes=3",), "toy target '8gaussians' has 8 components"),
    (("--config.data.num_classes=8", "--config.data.target=swissroll"), "has no labels"),
  ],
)
def test_conditional_toy_configs_name_the_label_count(overrides, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment):
    config_lib.validate(tiny_config(*overrides), num_devices=1)


def test_guidance_page_is_rendered_from_its_json():
  import importlib.util  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location(
    "guidance_table", root / "scripts" / "guidance_table.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  report = json.loads((root / "docs" / "guidance.json").read_text())
  assert (root / "docs" / "guidance.md").read_text() == module.to_markdown(report), (
    "docs/guidance.md is stale: python scripts/guidance_table.py --render"
  )
  assert report["command"] and report["date"] and report["loadavg"]
  # w = 1 is the conditional model whatever the rule: every rule's first row agrees.
  firsts = [entry["rows"][0] for entry in report["rules"].values()]
  assert all(row["w"] == 1.0 for row in firsts)
  np.testing.assert_allclose([row["mean"] for row in firsts], firsts[0]["mean"], rtol=1e-3)
