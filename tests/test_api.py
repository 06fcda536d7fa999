"""The top-level API without traps: ``import diffjax`` and its modules, time grids that take the
direction of sampling from what they sample, a model wrapper that names the call signature it
needs, "v" against "velocity", and config values the run would ignore refused with the reason."""

from __future__ import annotations

import functools
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config

import diffjax
from diffjax import parameterization, samplers, schedules
from diffjax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- import diffjax ------------------------------------------------------------------------


def test_import_is_light_and_every_public_module_is_an_attribute():
  # A fresh interpreter: importing the package starts neither JAX nor any module below it.
  code = (
    "import sys, diffjax; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'diffjax')))"
  )
  loaded = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  assert loaded.strip() == "['diffjax']", loaded
  for name in sorted(set(diffjax.__all__) - {"__version__"}):
    module = getattr(diffjax, name)
    assert isinstance(module, types.ModuleType) and module.__name__ == f"diffjax.{name}"
  assert diffjax.samplers.get_sampler is samplers.get_sampler
  with pytest.raises(AttributeError, match="nonesuch"):
    diffjax.nonesuch  # noqa: B018


def test_version_is_the_package_metadata_of_pyproject():
  project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
  (declared,) = re.findall(r'^version = "([^"]+)"', project, flags=re.M)
  assert diffjax.__version__ == declared


# ---- time grids and the direction of sampling ---------------------------------------------

VP = schedules.get_continuous_schedule("vp")
DIFFUSION = functools.partial(parameterization.diffusion_coefficients, VP)  # data at t = 0
FLOW = functools.partial(parameterization.flow_coefficients, VP)  # noise at t = 0


def test_grids_run_from_the_noise_end_of_what_they_sample():
  np.testing.assert_allclose(samplers.uniform_grid(num_steps=4), [0.0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(
    samplers.uniform_grid(num_steps=4, coefficients_fn=DIFFUSION), [1.0, 0.75, 0.5, 0.25, 0.0]
  )
  np.testing.assert_allclose(
    samplers.uniform_grid(num_steps=4, coefficients_fn=FLOW), [0.0, 0.25, 0.5, 0.75, 1.0]
  )
  assert samplers.sampling_interval() == (0.0, 1.0)
  assert samplers.sampling_interval(coefficients_fn=DIFFUSION) == (1.0, 0.0)
  assert samplers.sampling_interval(coefficients_fn=FLOW) == (0.0, 1.0)
  # Grids defined by noise levels: log-SNR increases along each (noise -> data), both clocks.
  for coefficients_fn, t_data in ((DIFFUSION, 0.02), (FLOW, 0.98)):
    times = samplers.log_snr_grid(num_steps=6, t_end=t_data, coefficients_fn=coefficients_fn)
    log_snr = np.asarray(samplers.log_snr_of(coefficients_fn(times)))
    assert np.all(np.diff(log_snr) > 0), log_snr
  # Explicit ends are taken as given: a likelihood integrates from data to noise.
  np.testing.assert_allclose(
    samplers.uniform_grid(num_steps=2, t_start=1.0, t_end=0.0), [1, 0.5, 0]
  )


def test_samplers_refuse_a_grid_from_data_to_noise():
  backwards = samplers.uniform_grid(num_steps=8, t_start=1.0, t_end=0.0)
  with pytest.raises(ValueError, match=r"backwards for a velocity model.*uniform_grid\(num_steps"):
    samplers.get_sampler("euler", target="velocity", times=backwards)
  forwards_in_diffusion_time = samplers.uniform_grid(num_steps=8, t_start=0.01, t_end=1.0)
  for name in ("heun", "dpmpp_2m"):
    with pytest.raises(ValueError, match="from data toward noise"):
      samplers.get_sampler(
        name, target="eps", times=forwards_in_diffusion_time, coefficients_fn=DIFFUSION
      )


def test_a_velocity_model_on_the_default_grid_reaches_its_gaussian_target():
  """The linear path from x0 ~ N(0, I) to x1 ~ N(m, s^2 I), independent: p_t = N(t m, S_t^2 I)
  with S_t^2 = (1 - t)^2 + t^2 s^2, and the marginal velocity E[x1 - x0 | x_t = x] is
  m + (S_t' / S_t) (x - t m), which carries N(0, I) exactly onto N(m, s^2 I)."""
  mean, std, num = jnp.array([3.0, -2.0]), 0.5, 4000

  def velocity(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 + t**2 * std**2
    return mean + (t * std**2 - (1 - t)) / var * (x - t * mean)

  sampler = samplers.get_sampler(
    "rk4", target="velocity", times=samplers.uniform_grid(num_steps=40)
  )
  noise = jax.random.normal(jax.random.PRNGKey(0), (num, 2))
  out = np.asarray(sampler(jax.random.PRNGKey(1), velocity, noise).samples, np.float64)
  # Tolerances: 5 standard errors of the sample mean (std / sqrt(n)) and of the sample standard
  # deviation (std / sqrt(2 n)); RK4's error at 40 steps is far below both.
  np.testing.assert_allclose(out.mean(0), mean, atol=5 * std / np.sqrt(num))
  np.testing.assert_allclose(out.std(0), std, atol=5 * std / np.sqrt(2 * num))


# ---- models.functionalize names the signature it needs ------------------------------------


class _TorchStyle(nnx.Module):
  """``forward(x, t)``: no labels, no rngs."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x, t):
    return self.linear(jnp.concatenate([x, t[:, None]], -1))


class _Diffjax(_TorchStyle):
  def __call__(self, x, t, cond=None, *, rngs=None):
    del cond, rngs
    return super().__call__(x, t)


def test_functionalize_names_the_signature_it_needs_before_tracing():
  with pytest.raises(ValueError, match=r"_TorchStyle.__call__\(x, t\).*__call__\(self, x, t, cond"):
    diffjax.models.functionalize(_TorchStyle, data_shape=(2,))
  with pytest.raises(ValueError, match=r"build\(\).*build\(\*, rngs: nnx.Rngs\)"):
    diffjax.models.functionalize(lambda: _Diffjax(rngs=nnx.Rngs(0)), data_shape=(2,))
  model = diffjax.models.functionalize(_Diffjax, data_shape=(2,))
  params = model.init(jax.random.PRNGKey(0))
  assert model.apply(params, jnp.ones((4, 2)), jnp.zeros(4)).shape == (4, 2)


# ---- "v" and "velocity" are different targets ---------------------------------------------


def test_v_prediction_and_flow_velocity_differ_as_documented():
  x0, eps = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3))
  t = jnp.full((5,), 0.3)
  # alpha = cos(phi), sigma = sin(phi), phi = pi t / 2: velocity = (d phi / dt) v.
  phi, rate = jnp.pi * t / 2, jnp.pi / 2
  trig = parameterization.Coefficients(
    jnp.cos(phi), jnp.sin(phi), -rate * jnp.sin(phi), rate * jnp.cos(phi)
  )
  v = parameterization.v_from_x0_eps(x0, eps, coefficients=trig)
  velocity = parameterization.velocity_from_x0_eps(x0, eps, coefficients=trig)
  np.testing.assert_allclose(velocity, rate * v, rtol=1e-5, atol=1e-6)
  # The linear flow path (data x0 with alpha = t, noise with sigma = 1 - t): data minus noise.
  linear = parameterization.Coefficients(t, 1 - t, jnp.ones_like(t), -jnp.ones_like(t))
  np.testing.assert_allclose(
    parameterization.velocity_from_x0_eps(x0, eps, coefficients=linear), x0 - eps, rtol=1e-6
  )
  assert not np.allclose(parameterization.v_from_x0_eps(x0, eps, coefficients=linear), x0 - eps)
  with pytest.raises(ValueError, match=r"'v' is v-prediction.*'velocity' is the flow velocity"):
    parameterization.get_prediction_target("vel")


# ---- config values the chosen combination would ignore ------------------------------------

# (config, overrides that set a value nothing reads, the key named, what makes it read)
IGNORED = [
  (
    "toy2d_ddpm",
    ["objective.min_snr_gamma=3.0"],
    "objective.min_snr_gamma=3.0",
    ["weighting=min_snr"],
  ),
  ("toy2d_vp", ["objective.sigma_max=80.0"], "objective.sigma_max=80.0", ["schedule=ve"]),
  (
    "toy2d_vp",
    ["objective.beta_max=30.0", "objective.schedule=ve"],
    "objective.beta_max",
    ["schedule=vp"],
  ),
  (
    "toy2d_vp",
    ["objective.resolution=128"],
    "objective.resolution=128",
    ["schedule=shifted_cosine"],
  ),
  (
    "toy2d_vp",
    ["objective.min_snr_gamma=1.0"],
    "objective.min_snr_gamma=1.0",
    ["weighting=min_snr"],
  ),
  ("toy2d_edm", ["objective.s_noise=1.007"], "objective.s_noise=1.007", ["s_churn=40.0"]),
  ("toy2d_edm", ["objective.s_tmin=0.05"], "objective.s_tmin=0.05", ["s_churn=40.0"]),
  (
    "toy2d_icfm",
    ["objective.path=vp", "objective.sigma=0.3"],
    "objective.sigma=0.3",
    ["path=icfm"],
  ),
  ("toy2d_icfm", ["objective.ot_solver=lsa"], "objective.ot_solver='lsa'", ["coupling=exact_ot"]),
  (
    "toy2d_icfm",
    ["objective.coupling_scope=per_device"],
    "objective.coupling_scope",
    ["coupling=sinkhorn"],
  ),
  (
    "toy2d_marginal_fm",
    ["objective.path=cosine", "objective.sigma=0.2"],
    "objective.sigma=0.2",
    ["path=icfm"],
  ),
  ("toy2d_icfm", ["objective.label_dropout=0.1"], "objective.label_dropout=0.1", None),
  ("toy2d_icfm", ["data.augment_flip=true"], "data.augment_flip=True", None),
]


@pytest.mark.parametrize(
  "base, settings, named, read_by", IGNORED, ids=[f"{c[0]}:{c[2]}" for c in IGNORED]
)
def test_an_ignored_value_is_one_line_with_the_reason(base, settings, named, read_by):
  config = tiny_config(*[f"--config.{s}" for s in settings], base=base)
  with pytest.raises(config_lib.ConfigError) as caught:
    config_lib.validate(config, num_devices=None)
  message = str(caught.value)
  assert message.startswith(named) and "would be ignored" in message and "\n" not in message
  if read_by is not None:  # the same value where the combination reads it is accepted
    config = tiny_config(
      *[f"--config.{s}" for s in settings],
      *[f"--config.objective.{s}" for s in read_by],
      base=base,
    )
    config_lib.validate(config, num_devices=None)
