"""UniPC, DEIS and DPM-Solver++(2M) SDE against references: stored outputs of diffusers and
k-diffusion (tests/data, written by scripts/make_parity_data.py), the solvers they reduce to,
exact integrals of DEIS's weights, the closed-form flow map of Gaussian data (orders of
convergence, flows started at alpha = 0), and SD3's time shift."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_fields import MARGIN, GaussianData, trig_coefficients
from scipy import integrate

from diffjax import paths
from diffjax import samplers as S
from diffjax.parameterization import Coefficients, get_prediction_target

DATA = GaussianData([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])
FLOW = paths.get_path("linear").gaussian_coefficients  # flow time: t = 0 noise, t = 1 data
TARGETS = {name: get_prediction_target(name) for name in ("eps", "x0", "v", "velocity")}
PARITY = pathlib.Path(__file__).resolve().parent / "data"
KEY = jax.random.PRNGKey(0)


def _denoiser(data, target, coefficients_fn):
  return S.denoiser(
    data.predictor(TARGETS[target], coefficients_fn),
    target=TARGETS[target],
    coefficients_fn=coefficients_fn,
  )


def _vp_of_sigma(s):
  """The VP process with its variance-exploding noise level ``s = sigma / alpha`` as the clock
  (diffusers' ``sigmas``): ``alpha = 1 / sqrt(1 + s^2)``, ``sigma = s alpha``."""
  s = jnp.asarray(s)

  def alpha_sigma(s):
    alpha = 1.0 / jnp.sqrt(1.0 + s**2)
    return alpha, s * alpha

  (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(alpha_sigma, (s,), (jnp.ones_like(s),))
  return Coefficients(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)


# ---- parity with diffusers and k-diffusion ------------------------------------------------------


def _unipc_cases():
  data = np.load(PARITY / "parity_unipc.npz")
  return [(data, i) for i in range(len(data["order"]))]


def _unipc_id(case):
  data, i = case
  kind = "flow" if data["flow"][i] else "vp"
  lower = "lof" if data["lower_order_final"][i] else "full"
  return f"{kind}-{data['variant'][i]}-{data['order'][i]}-{lower}"


_UNIPC = _unipc_cases()
# A few cases in the fast suite (different settings compile apart), all of them in the slow one.
_FAST_UNIPC = {"vp-bh2-3-lof", "flow-bh2-2-lof"}


@pytest.mark.parametrize(
  "case",
  [
    case if _unipc_id(case) in _FAST_UNIPC else pytest.param(case, marks=pytest.mark.slow)
    for case in _UNIPC
  ],
  ids=[_unipc_id(case) for case in _UNIPC],
)
def test_unipc_matches_diffusers(case):
  data, i = case
  versions = json.loads(str(data["versions"]))
  assert "diffusers" in versions
  with jax.enable_x64(True):
    sigmas = jnp.asarray(data["sigmas"][i])
    if data["flow"][i]:
      # diffusers' flow sigmas s run x = (1 - s) x0 + s eps: flow time t = 1 - s, and its model
      # predicts eps - x0, minus our velocity.
      times, coefficients_fn, target = 1.0 - sigmas, FLOW, "velocity"
    else:
      times, coefficients_fn, target = sigmas, _vp_of_sigma, "eps"
    gaussian = GaussianData(data["mean"], data["cov"])
    run = functools.partial(
      S.unipc_sample,
      _denoiser(gaussian, target, coefficients_fn),
      times=times,
      coefficients_fn=coefficients_fn,
      order=int(data["order"][i]),
      variant=S.get_unipc_variant(str(data["variant"][i])),
      lower_order_final=bool(data["lower_order_final"][i]),
    )
    out = jax.jit(run)(jnp.asarray(data["x_init"]))
    np.testing.assert_allclose(out.samples, data["samples"][i], rtol=1e-5, atol=1e-5)
    if _unipc_id(case) != "flow-bh2-2-lof":
      return
    # The registry's sampler scales standard normal noise by sigma(times[0]) itself.
    sampler = S.get_sampler(
      "unipc",
      target=target,
      times=times,
      coefficients_fn=coefficients_fn,
      order=int(data["order"][i]),
      variant=str(data["variant"][i]),
      lower_order_final=bool(data["lower_order_final"][i]),
    )
    predict = gaussian.predictor(TARGETS[target], coefficients_fn)
    registry = jax.jit(
      lambda x_init: sampler(KEY, predict, x_init / coefficients_fn(times[:1]).sigma[0])
    )(jnp.asarray(data["x_init"]))
    np.testing.assert_allclose(registry.samples, data["samples"][i], rtol=1e-5, atol=1e-5)


def _dpmpp_cases():
  data = np.load(PARITY / "parity_dpmpp_2m_sde.npz")
  return [(data, i) for i in range(len(data["eta"]))]


@pytest.mark.parametrize(
  "case",
  [
    case
    if (case[0]["eta"][case[1]], case[0]["solver_type"][case[1]]) == (1.0, "midpoint")
    else pytest.param(case, marks=pytest.mark.slow)
    for case in _dpmpp_cases()
  ],
  ids=[f"eta{d['eta'][i]}-{d['solver_type'][i]}" for d, i in _dpmpp_cases()],
)
def test_dpmpp_2m_sde_matches_k_diffusion_on_the_same_noise(case):
  # k-diffusion runs in x = x0 + sigma n with the noise level as its clock:
  # noise_level_coefficients, an x0 (denoiser) model, the stored draws in the same order.
  data, i = case
  assert "k-diffusion" in json.loads(str(data["versions"]))
  with jax.enable_x64(True):
    gaussian = GaussianData(data["mean"], data["cov"])
    coefficients_fn = S.noise_level_coefficients
    run = functools.partial(
      S.dpmpp_2m_sde_sample,
      KEY,
      _denoiser(gaussian, "x0", coefficients_fn),
      times=jnp.asarray(data["sigmas"]),
      coefficients_fn=coefficients_fn,
      eta=float(data["eta"][i]),
      solver_type=S.get_dpmpp_sde_solver_type(str(data["solver_type"][i])),
      noises=jnp.asarray(data["noises"]),
    )
    out = jax.jit(run)(jnp.asarray(data["x_init"]))
    np.testing.assert_allclose(out.samples, data["samples"][i], rtol=1e-5, atol=1e-5)


# ---- what the solvers reduce to --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("orders", [(2,), (1,)])
def test_unip2_and_dpmpp_2m_sde_at_eta_0_are_dpm_solver_pp_2m_and_deis_1_is_ddim(orders):
  # UniP-2 with B(h) = e^{-h} - 1 (bh2) and rho = 1/2 is DPM-Solver++(2M) (as Zhao et al. 2023
  # note); the SDE solver at eta = 0 ("midpoint") too; DEIS and UniP of order 1 are DDIM.
  times = S.log_snr_grid(num_steps=12, t_start=1.0, t_end=1e-3, coefficients_fn=trig_coefficients)
  x = jax.random.normal(KEY, (32, 2))
  denoise = _denoiser(DATA, "v", trig_coefficients)
  kw = dict(times=times, coefficients_fn=trig_coefficients)
  runs = {
    2: [
      lambda x: S.dpm_solver_pp_sample(denoise, x, order=2, **kw),
      lambda x: S.unipc_sample(denoise, x, order=2, corrector=False, lower_order_final=False, **kw),
      lambda x: S.dpmpp_2m_sde_sample(KEY, denoise, x, eta=0.0, **kw),
    ],
    1: [
      lambda x: S.dpm_solver_pp_sample(denoise, x, order=1, **kw),
      lambda x: S.deis_sample(denoise, x, order=1, **kw),
      lambda x: S.unipc_sample(denoise, x, order=1, corrector=False, **kw),
    ],
  }
  for order in orders:
    reference, *others = [jax.jit(run)(x) for run in runs[order]]
    for out in others:
      np.testing.assert_allclose(out.samples, reference.samples, rtol=2e-5, atol=2e-5)
      assert int(out.nfe) == 12


def test_deis_weights_are_the_integrals_of_the_lagrange_basis():
  # C_ij = int_{t_i}^{t_{i+1}} l_j(tau) rho'(tau) dtau: against scipy's adaptive quadrature for
  # the trig process (rho = tan(phi), phi(t) linear with slope RATE, rho' = RATE / cos^2(phi)), and
  # exactly for VE (rho = t: polynomials).
  with jax.enable_x64(True):
    times = jnp.asarray([0.9, 0.8, 0.65, 0.5, 0.4], jnp.float64)

    @jax.jit  # one program for all three: eager calls compile each small op on its own
    def compute(times):
      trig = {
        order: S.deis_coefficients(times, coefficients_fn=trig_coefficients, order=order)
        for order in (2, 3)
      }
      return trig, S.deis_coefficients(times, coefficients_fn=S.noise_level_coefficients, order=3)

    trig, ve = compute(times)
    for order, weights in trig.items():
      weights = np.asarray(weights)
      assert weights.shape == (4, order - 1)
      np.testing.assert_array_equal(weights[: order - 1], 0.0)  # no history yet
      t = np.asarray(times)
      for i in range(order - 1, 4):
        nodes = [t[i - j] for j in range(order)]
        for j in range(1, order):
          rate = 0.5 * np.pi * (1.0 - 2.0 * MARGIN)  # phi = pi/2 (MARGIN + (1 - 2 MARGIN) t)

          def integrand(tau, j=j, nodes=nodes, rate=rate):
            basis = np.prod([(tau - n) / (nodes[j] - n) for m, n in enumerate(nodes) if m != j])
            return basis * rate / np.cos(0.5 * np.pi * MARGIN + rate * tau) ** 2

          expected = integrate.quad(integrand, t[i], t[i + 1], epsabs=1e-13, epsrel=1e-12)[0]
          np.testing.assert_allclose(weights[i, j - 1], expected, rtol=1e-9, atol=1e-12)
    ve = np.asarray(ve)
    # Nodes t_2, t_1, t_0 for step 2 -> 3: l_1 and l_2 integrated as polynomials.
    t = np.asarray(times)
    for j, (a, b) in ((1, (t[2], t[0])), (2, (t[2], t[1]))):
      node = t[2 - j]
      poly = np.polynomial.Polynomial.fromroots([a, b]) / ((node - a) * (node - b))
      np.testing.assert_allclose(ve[2, j - 1], poly.integ()(t[3]) - poly.integ()(t[2]), rtol=1e-12)


# ---- flows: a start at alpha = 0 and an end at sigma = 0 ---------------------------------------


FLOW_CASES = [("unipc", {}), ("deis", {}), ("dpmpp_2m_sde", dict(eta=0.0))]


@pytest.mark.parametrize(
  "name, options",
  [c if c[0] == "unipc" else pytest.param(*c, marks=pytest.mark.slow) for c in FLOW_CASES],
  ids=[c[0] for c in FLOW_CASES],
)
def test_multistep_solvers_sample_a_flow_from_alpha_zero(name, options):
  # The linear path from t = 0 (alpha = 0, log-SNR -inf) to t = 1 (sigma = 0, +inf). The first
  # step is DDIM: at t = 0 the posterior means are E[x0 | x] = mu and E[eps | x] = x, so x_1 =
  # t_1 mu + (1 - t_1) x exactly; the final state is near the exact flow map's mu + C^{1/2} x
  # (its error is that of Heun's method on the same grid, 3.4e-3).
  noise = jax.random.normal(KEY, (64, 2))
  times = S.uniform_grid(num_steps=16, t_start=0.0, t_end=1.0)
  sampler = S.get_sampler(name, target="velocity", times=times, coefficients_fn=FLOW, **options)
  predict = DATA.predictor(TARGETS["velocity"], FLOW)
  out = jax.jit(lambda z: sampler(KEY, predict, z, return_trajectory=True))(noise)
  t1 = float(times[1])
  np.testing.assert_allclose(out.trajectory[1], t1 * DATA.mean + (1 - t1) * noise, atol=1e-6)
  exact = DATA.flow_map(noise, alpha_from=0.0, sigma_from=1.0, alpha_to=1.0, sigma_to=0.0)
  assert np.abs(np.asarray(out.samples) - exact).max() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name, options", FLOW_CASES, ids=[c[0] for c in FLOW_CASES])
def test_multistep_solvers_converge_on_a_flow_from_alpha_zero(name, options):
  # Uniform steps in t are long in log-SNR near t = 0 (lambda = 2 log(t / (1 - t))), so the
  # error settles into its order only from about 32 steps; float64, errors measured at 1e-3.
  with jax.enable_x64(True):
    noise = jax.random.normal(KEY, (64, 2), jnp.float64)
    exact = DATA.flow_map(noise, alpha_from=0.0, sigma_from=1.0, alpha_to=1.0, sigma_to=0.0)
    errors = []
    for steps in (32, 64, 128):
      times = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float64)
      out = S.get_sampler(name, target="velocity", times=times, coefficients_fn=FLOW, **options)(
        KEY, DATA.predictor(TARGETS["velocity"], FLOW), noise
      )
      errors.append(np.abs(np.asarray(out.samples) - exact).max())
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1.5e-3, errors


# ---- orders of convergence --------------------------------------------------------------------

# Error of the final state against the closed-form flow map of the trig process from t = 0.9 to
# 0.1, in float64. A multistep method of order p is order p when its start is accurate to
# O(h^p); the solvers' own lower-order first steps are not (a DDIM step has local error h^2), so
# the grid makes them negligible: the first two steps are h^2 long, then N uniform steps.
T0, T1 = 0.9, 0.1


def _warm_grid(num_steps):
  h = (T1 - T0) / num_steps
  first = h * abs(h)
  return jnp.concatenate(
    [jnp.asarray([T0, T0 + first]), jnp.linspace(T0 + 2 * first, T1, num_steps + 1)]
  )


def _final_errors(run, counts, grid):
  with jax.enable_x64(True):
    x = jax.random.normal(KEY, (8, 2), jnp.float64)
    denoise = _denoiser(DATA, "eps", trig_coefficients)
    c0, c1 = trig_coefficients(np.float64(T0)), trig_coefficients(np.float64(T1))
    exact = DATA.flow_map(
      x,
      alpha_from=float(c0.alpha),
      sigma_from=float(c0.sigma),
      alpha_to=float(c1.alpha),
      sigma_to=float(c1.sigma),
    )
    kw = dict(coefficients_fn=trig_coefficients)
    return [
      np.abs(np.asarray(run(denoise, x, times=grid(n), **kw).samples) - exact).max() for n in counts
    ]


_UNIPC_ORDER = functools.partial(S.unipc_sample, lower_order_final=False)
ORDER_CASES = [
  # (name, run, theory): UniC raises UniP-p to p + 1 (Zhao et al. 2023).
  *[
    (
      f"unipc{p}-{v}",
      functools.partial(_UNIPC_ORDER, order=p, variant=S.get_unipc_variant(v)),
      p + 1,
    )
    for p in (1, 2, 3)
    for v in ("bh1", "bh2")
  ],
  *[(f"unip{p}", functools.partial(_UNIPC_ORDER, order=p, corrector=False), p) for p in (1, 2, 3)],
  *[(f"deis{k}", functools.partial(S.deis_sample, order=k), k) for k in (1, 2, 3)],
  *[
    (
      f"dpmpp_2m_sde-eta0-{kind}",
      lambda d, x, kind=kind, **kw: S.dpmpp_2m_sde_sample(
        KEY, d, x, eta=0.0, solver_type=S.get_dpmpp_sde_solver_type(kind), **kw
      ),
      2,
    )
    for kind in ("midpoint", "heun")
  ],
]


@pytest.mark.slow
@pytest.mark.parametrize("name, run, order", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_order_of_convergence(name, run, order):
  # Steps 32 .. 256 for the second-order start-up of UniPC-2 (its error ratio reaches 2^3 slowly),
  # 16 .. 128 otherwise; the log-log slope within 0.25 of the order.
  counts = (
    np.array([32, 64, 128, 256]) if name.startswith("unipc2") else np.array([16, 32, 64, 128])
  )
  errors = _final_errors(run, counts, _warm_grid)
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(-slope - order) < 0.25, (errors, slope)


@pytest.mark.slow
def test_own_first_order_start_keeps_deis_3_at_order_2():
  # On a uniform grid DEIS-3's own DDIM first step (local error h^2) bounds the global order at
  # 2, as for DPM-Solver++(3M): the reason the order tests above start on a refined grid.
  counts = np.array([16, 32, 64, 128])
  uniform = lambda n: jnp.linspace(T0, T1, n + 1)
  errors = _final_errors(functools.partial(S.deis_sample, order=3), counts, uniform)
  slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
  assert abs(-slope - 2.0) < 0.25, (errors, slope)


# ---- settings and errors ------------------------------------------------------------------------


def test_settings_and_errors():
  times = S.uniform_grid(num_steps=4, t_start=1.0, t_end=0.1)
  kw = dict(target="eps", times=times, coefficients_fn=trig_coefficients)
  with pytest.raises(ValueError, match="order"):
    S.get_sampler("unipc", order=4, **kw)
  with pytest.raises(ValueError, match="bh1"):
    S.get_sampler("unipc", variant="bh3", **kw)
  with pytest.raises(ValueError, match="order"):
    S.get_sampler("deis", order=0, **kw)
  with pytest.raises(ValueError, match="midpoint"):
    S.get_sampler("dpmpp_2m_sde", solver_type="euler", **kw)
  with pytest.raises(ValueError, match="eta"):
    S.get_sampler("dpmpp_2m_sde", eta=-0.5, **kw)
  with pytest.raises(ValueError, match="does not take"):
    S.get_sampler("deis", variant="bh1", **kw)
  with pytest.raises(ValueError, match="coefficients_fn"):
    S.get_sampler("unipc", target="velocity", times=times)
  with pytest.raises(ValueError, match="data toward noise"):
    S.get_sampler("deis", target="eps", times=times[::-1], coefficients_fn=trig_coefficients)


# ---- SD3's time shift ----------------------------------------------------------------------------


def test_shift_moves_inner_times_toward_the_noise_end_in_either_clock():
  shift = 3.0
  flow = np.asarray(S.shifted_grid(num_steps=8, t_start=0.0, t_end=1.0, shift=shift))
  diffusion = np.asarray(S.shifted_grid(num_steps=8, t_start=1.0, t_end=0.0, shift=shift))
  u = 1.0 - np.arange(9) / 8  # SD3's time (1 = noise) of each uniform point
  sd3 = shift * u / (1 + (shift - 1) * u)  # Esser et al. 2024, Sec. 5.3.2
  np.testing.assert_allclose(flow, 1.0 - sd3, atol=1e-6)  # flow time t = 1 - u
  np.testing.assert_allclose(diffusion, sd3, atol=1e-6)  # diffusion time t = u
  assert np.all(flow[1:-1] < np.linspace(0, 1, 9)[1:-1])  # toward t = 0, the flow's noise
  assert np.all(np.diff(flow) > 0) and np.all(np.diff(diffusion) < 0)
  same = S.uniform_grid(num_steps=5, t_start=1.0, t_end=1e-3)
  np.testing.assert_array_equal(S.shift_times(same, shift=1.0), same)
  uneven = jnp.asarray([1.0, 0.5, 0.2, 0.05, 1e-3])  # any grid: its own ends stay
  shifted = np.asarray(S.shift_times(uneven, shift=2.0))
  assert shifted[0] == uneven[0] and shifted[-1] == uneven[-1]
  assert np.all(shifted[1:-1] > uneven[1:-1])
  by_name = S.get_time_grid("shifted", num_steps=8, t_start=0.0, t_end=1.0, shift=shift)
  np.testing.assert_array_equal(by_name, flow)
  with pytest.raises(ValueError, match="shift"):
    S.shift_times(same, shift=0.0)
