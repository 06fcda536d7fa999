# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 - Schedules, prediction targets, and the weighting each loss implies
#
# Every Gaussian diffusion and flow-matching model here has the marginal
# $x_t = \alpha_t\,x_0 + \sigma_t\,\varepsilon$, $\varepsilon \sim \mathcal N(0, I)$. Three
# choices look different and are not independent:
#
# 1. the **schedule** $t \mapsto (\alpha_t, \sigma_t)$, best read through the log
#    signal-to-noise ratio $\lambda_t = \log(\alpha_t^2/\sigma_t^2)$;
# 2. the **prediction target**: $\varepsilon$, the data $x_0$, $v$, the velocity, or the
#    score, all linear functions of $(x_0, \varepsilon)$ and so of each other given $x_t$;
# 3. the **loss weighting** and the time distribution.
#
# Kingma & Gao (2023), *Understanding Diffusion Objectives as the ELBO with Simple Data
# Augmentation*, https://arxiv.org/abs/2303.00848, show that (2) and (3), and the schedule's
# speed, all collapse into one function $w(\lambda)$: every such loss is
# $\frac12\int w(\lambda)\,\mathbb E\|\hat\varepsilon_\lambda - \varepsilon\|^2\,d\lambda$.
# This notebook plots the schedules in log-SNR, derives and checks the conversions between
# targets, and derives and checks the $w(\lambda)$ of each loss in diffjax.
#
# Diffusion time: $t = 0$ data, $t = 1$ noise (`diffjax.schedules`); flow matching runs the
# other way (`diffjax.paths`).

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy import integrate, stats

from diffjax import losses, parameterization, paths, schedules

NUM_SE = 5.0  # the Monte Carlo checks allow 5 standard errors


# %% [markdown]
# ## 1. Every schedule in log-SNR
#
# $\lambda_t$ decreases from data to noise; where a schedule spends its time in $\lambda$ is
# what distinguishes it (its density $p(\lambda) = |d\lambda/dt|^{-1}$ for $t \sim U[0,1]$,
# section 3). Each continuous schedule of `schedules.CONTINUOUS_SCHEDULES` is checked
# against a float64 transcription of its paper's formula, its derivative
# $d\lambda/dt$ (by `jax.jvp` in the library) against central finite differences of that
# transcription, and its monotonicity; each discrete schedule of
# `schedules.DISCRETE_SCHEDULES` ($T = 1000$, plotted at $t = (i+1)/T$) against
# $\bar\alpha_i = \prod_{j\le i}(1-\beta_j)$ in float64 from its papers' betas.


# %%
def sigmoid64(x):
  return 1.0 / (1.0 + np.exp(-x))


def vp_ref(t, beta_min=0.1, beta_max=20.0):
  # Song et al. 2021, eq. 29: alpha^2 = exp(-int_0^t beta), sigma^2 = 1 - alpha^2.
  integral = beta_min * t + 0.5 * (beta_max - beta_min) * t**2
  return -integral - np.log(-np.expm1(-integral))


def cosine_ref(t, lo=-15.0, hi=15.0):
  # Hoogeboom et al. 2023: lambda = -2 log tan(pi t / 2), clipped to [lo, hi] through t.
  t_min, t_max = np.arctan(np.exp(-hi / 2)), np.arctan(np.exp(-lo / 2))
  return -2.0 * np.log(np.tan(t_min + t * (t_max - t_min)))


def edm_ref(t, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  # Karras et al. 2022, eq. 5 (alpha = 1, lambda = -2 log sigma).
  sigma = (sigma_min ** (1 / rho) + t * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
  return -2.0 * np.log(sigma)


def chen_gamma(t, start=-3.0, end=3.0, tau=1.0):
  # Chen 2023, Algorithm 1: abar(t) = gamma(t).
  v_start, v_end = sigmoid64(start / tau), sigmoid64(end / tau)
  return (v_end - sigmoid64((t * (end - start) + start) / tau)) / (v_end - v_start)


continuous_refs = {
  "vp": vp_ref,
  "ve": lambda t: -2.0 * np.log(0.01 * (50.0 / 0.01) ** t),  # Song et al. 2021, eq. 31
  "cosine": cosine_ref,
  "shifted_cosine": cosine_ref,  # default resolution = base resolution: no shift
  "linear_log_snr": lambda t: 10.0 - 20.0 * t,  # Kingma et al. 2021
  "edm": edm_ref,
  "sigmoid": lambda t: np.log(chen_gamma(t)) - np.log1p(-chen_gamma(t)),
}
assert sorted(continuous_refs) == sorted(schedules.CONTINUOUS_SCHEDULES)
continuous = {name: schedules.get_continuous_schedule(name) for name in continuous_refs}
# Hoogeboom et al.'s shift for 256 px images at a 64 px base: lambda + 2 log(64 / 256).
continuous["shifted_cosine, 256 px"] = schedules.get_continuous_schedule(
  "shifted_cosine", resolution=256
)
continuous_refs["shifted_cosine, 256 px"] = lambda t: cosine_ref(t) + 2 * math.log(64 / 256)

t_grid = np.linspace(0.0, 1.0, 2001)[1:-1]  # open: VP and Chen's sigmoid have lambda(0) = inf
h = 1e-5
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
for name, schedule in continuous.items():
  ref = continuous_refs[name]
  got = np.asarray(schedule.log_snr(jnp.asarray(t_grid, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, ref(t_grid), rtol=1e-4, atol=2e-4, err_msg=name)
  inner = t_grid[(t_grid > 0.01) & (t_grid < 0.99)]
  slope = np.asarray(schedule.d_log_snr(jnp.asarray(inner, jnp.float32)), np.float64)
  np.testing.assert_allclose(
    slope, (ref(inner + h) - ref(inner - h)) / (2 * h), rtol=1e-3, err_msg=name
  )
  assert np.all(np.diff(got) < 0), name
  axes[0].plot(t_grid, got, label=name)
axes[0].set_title("continuous schedules")
axes[0].set_xlabel("diffusion time t")
axes[0].set_ylabel("log-SNR lambda")


def discrete_ref_betas(name, num_steps=1000):
  i = np.arange(num_steps)
  if name == "linear":  # Ho et al. 2020
    return np.linspace(1e-4, 0.02, num_steps)
  if name == "scaled_linear":  # Rombach et al. 2022 (Stable Diffusion)
    return np.linspace(0.00085**0.5, 0.012**0.5, num_steps) ** 2
  if name == "cosine":  # Nichol & Dhariwal 2021, eq. 17, s = 0.008, clipped at 0.999
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)
  if name == "sigmoid":  # Chen 2023, discretised, clipped at 0.999
    return np.minimum(1 - chen_gamma((i + 1) / num_steps) / chen_gamma(i / num_steps), 0.999)
  if name == "geodiff_sigmoid":  # Xu et al. 2022 (GeoDiff's code)
    return sigmoid64(np.linspace(-6, 6, num_steps)) * (2e-3 - 1e-7) + 1e-7
  raise ValueError(name)


assert set(schedules.DISCRETE_SCHEDULES) == {
  "linear",
  "scaled_linear",
  "cosine",
  "sigmoid",
  "geodiff_sigmoid",
}
step_times = (np.arange(1000) + 1) / 1000
for name in schedules.DISCRETE_SCHEDULES:
  log_alpha_bars = np.cumsum(np.log1p(-discrete_ref_betas(name)))
  ref = log_alpha_bars - np.log(-np.expm1(log_alpha_bars))
  got = np.asarray(schedules.get_discrete_schedule(name, num_steps=1000).log_snr, np.float64)
  finite = np.isfinite(ref)
  np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-3, atol=2e-3, err_msg=name)
  assert np.all(np.diff(got) < 0), name
  axes[1].plot(step_times, got, label=name)
# Lin et al. 2024: rescaled to zero terminal SNR, the last step is pure noise.
zero_snr = schedules.get_discrete_schedule("linear", num_steps=1000, zero_terminal_snr=True)
assert np.isneginf(float(zero_snr.log_snr[-1])) and np.all(np.diff(zero_snr.log_snr[:-1]) < 0)
axes[1].plot(step_times[:-1], zero_snr.log_snr[:-1], "--", label="linear, zero terminal SNR")
axes[1].set_title("discrete schedules (T = 1000)")
axes[1].set_xlabel("(i + 1) / T")
for ax in axes:
  ax.set_ylim(-25, 25)
  ax.axhline(0, c="0.8", lw=0.8)
  ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2. Conversions between $\varepsilon$, $x_0$, $v$, velocity and score
#
# Given $x_t = \alpha x_0 + \sigma\varepsilon$ (and $\dot\alpha, \dot\sigma$, the time
# derivatives), each target is a linear function of $(x_0, \varepsilon)$ and can be solved
# back for them:
#
# * $\varepsilon$ (Ho et al. 2020): $x_0 = (x_t - \sigma\varepsilon)/\alpha$;
# * $x_0$: $\varepsilon = (x_t - \alpha x_0)/\sigma$;
# * $v = \alpha\varepsilon - \sigma x_0$ (Salimans & Ho 2022):
#   $x_0 = \frac{\alpha x_t - \sigma v}{\alpha^2+\sigma^2}$,
#   $\varepsilon = \frac{\sigma x_t + \alpha v}{\alpha^2+\sigma^2}$;
# * velocity $u = \dot\alpha x_0 + \dot\sigma\varepsilon$ (Lipman et al. 2023):
#   $x_0 = \frac{\dot\sigma x_t - \sigma u}{\det}$,
#   $\varepsilon = \frac{\alpha u - \dot\alpha x_t}{\det}$;
# * score $s = -\varepsilon/\sigma$ (Song et al. 2021): $\varepsilon = -\sigma s$.
#
# Here $\det = \alpha\dot\sigma - \sigma\dot\alpha = -\tfrac12\alpha\sigma\dot\lambda$ (from
# $\dot\lambda = 2\dot\alpha/\alpha - 2\dot\sigma/\sigma$), nonzero wherever $\lambda$ moves.
# All maps are linear in $(x_t, \text{prediction})$, so they commute with the conditional
# expectation: a network's $\hat x_0 = \mathbb E[x_0 \mid x_t]$ converts into
# $\mathbb E[\varepsilon\mid x_t]$, the $v$ and velocity of the probability-flow ODE, and
# the marginal score (Tweedie). For $\alpha = \cos\phi$, $\sigma = \sin\phi$ (the unclipped
# cosine schedule, $\phi = \pi t/2$), $v = dx_\phi/d\phi$ (Salimans & Ho 2022, Sec. 4).
#
# **Checks.** (a) All $5 \times 5$ conversions (`parameterization.convert`) reproduce the
# target computed directly from $(x_0, \varepsilon)$, on three schedules. (b) Independent
# references: the velocity is the finite-difference $dx_t/dt$ at fixed $(x_0,\varepsilon)$;
# the score is `jax.grad` of $\log\mathcal N(x_t; \alpha x_0, \sigma^2 I)$; $v =
# \frac{2}{\pi}\,dx_t/dt$ on the unclipped cosine schedule. (c) Tweedie on Gaussian data
# $x_0 \sim \mathcal N(0, s^2 I)$: the exact posterior mean
# $\hat x_0 = \frac{\alpha s^2}{\alpha^2 s^2 + \sigma^2} x_t$ must convert into the exact
# marginal score $-x_t / (\alpha^2 s^2 + \sigma^2)$ and into the exact probability-flow
# velocity
# $x_t\,\frac{d}{dt}\log\sqrt{\alpha^2 s^2 + \sigma^2}$ (the marginal stays
# $\mathcal N(0, (\alpha^2 s^2 + \sigma^2) I)$, so the flow only rescales).

# %%
names = sorted(parameterization.PREDICTION_TARGETS)
targets = {name: parameterization.get_prediction_target(name) for name in names}
key_x0, key_eps = jax.random.split(jax.random.key(0))
t = jnp.linspace(0.05, 0.95, 16)
x0 = jax.random.normal(key_x0, (16, 3))
eps = jax.random.normal(key_eps, (16, 3))

for schedule_name in ["cosine", "vp", "edm"]:
  schedule = schedules.get_continuous_schedule(schedule_name)
  coefficients = parameterization.diffusion_coefficients(schedule, t)
  x_t = coefficients.alpha[:, None] * x0 + coefficients.sigma[:, None] * eps
  direct = {name: targets[name].from_x0_eps(x0, eps, coefficients=coefficients) for name in names}
  for source in names:
    for destination in names:
      got = parameterization.convert(
        direct[source],
        source=targets[source],
        destination=targets[destination],
        x_t=x_t,
        coefficients=coefficients,
      )
      scale = float(jnp.abs(direct[destination]).max())
      np.testing.assert_allclose(
        got,
        direct[destination],
        atol=2e-4 * scale,
        err_msg=f"{schedule_name}: {source} -> {destination}",
      )
print("all 25 conversions agree on cosine, vp and edm")

# (b) Independent references, on the VP schedule.
schedule = schedules.get_continuous_schedule("vp")
coefficients = parameterization.diffusion_coefficients(schedule, t)


def x_of_time(time):
  alpha, sigma = schedule.alpha_sigma(time)
  return alpha[:, None] * x0 + sigma[:, None] * eps


step = 1e-3
finite_difference = (x_of_time(t + step) - x_of_time(t - step)) / (2 * step)
velocity = targets["velocity"].from_x0_eps(x0, eps, coefficients=coefficients)
np.testing.assert_allclose(velocity, finite_difference, rtol=2e-3, atol=2e-3)


def log_kernel(x, mean, sigma):
  return jnp.sum(-0.5 * ((x - mean) / sigma) ** 2 - jnp.log(sigma))


x_t = x_of_time(t)
score_ref = jax.vmap(jax.grad(log_kernel))(
  x_t, coefficients.alpha[:, None] * x0, coefficients.sigma[:, None]
)
score = targets["score"].from_x0_eps(x0, eps, coefficients=coefficients)
np.testing.assert_allclose(score, score_ref, rtol=1e-5, atol=1e-5)

unclipped = schedules.get_continuous_schedule("cosine", log_snr_min=-np.inf, log_snr_max=np.inf)
cos_coefficients = parameterization.diffusion_coefficients(unclipped, t)
np.testing.assert_allclose(cos_coefficients.alpha, np.cos(np.pi * t / 2), atol=1e-6)
v = targets["v"].from_x0_eps(x0, eps, coefficients=cos_coefficients)
cos_velocity = targets["velocity"].from_x0_eps(x0, eps, coefficients=cos_coefficients)
np.testing.assert_allclose(v, 2 / np.pi * cos_velocity, rtol=1e-5, atol=1e-5)
print("velocity = finite-difference dx/dt; score = grad log N; v = dx/dphi")

# (c) Tweedie on Gaussian data of variance s^2.
s2 = 0.7**2
alpha, sigma, d_alpha, d_sigma = coefficients
variance = alpha**2 * s2 + sigma**2
x_t = x_of_time(t)
x0_hat = (alpha * s2 / variance)[:, None] * x_t  # E[x0 | x_t], Gaussian conditioning
as_target = {
  name: parameterization.convert(
    x0_hat, source=targets["x0"], destination=targets[name], x_t=x_t, coefficients=coefficients
  )
  for name in names
}
np.testing.assert_allclose(as_target["score"], -x_t / variance[:, None], rtol=1e-4, atol=1e-5)
flow_rate = (alpha * d_alpha * s2 + sigma * d_sigma) / variance  # d/dt log sqrt(variance)
np.testing.assert_allclose(as_target["velocity"], flow_rate[:, None] * x_t, rtol=1e-4, atol=1e-4)
print("posterior mean -> exact marginal score and probability-flow velocity")

# %% [markdown]
# ## 3. The weighting each loss implies in log-SNR
#
# Every objective below is $\mathcal L = \mathbb E_{t \sim p(t)}\,\mathbb E\,[\,W(t)\,
# \|\hat f - f\|^2\,]$ for some target $f$ and weight $W$. At fixed $x_t$ the conversions
# are linear, so an error $e_f$ in the target is an error $e_\varepsilon = k(t)\,e_f$ in
# $\varepsilon$ ($k = \partial\hat\varepsilon/\partial\hat f$: $1$ for $\varepsilon$,
# $-\alpha/\sigma$ for $x_0$, $\alpha/(\alpha^2+\sigma^2)$ for $v$, $\alpha/\det$ for the
# velocity, $-\sigma$ for the score). Changing variables from $t$ to $\lambda$, with density
# $p(\lambda) = p(t)\,|d\lambda/dt|^{-1}$:
#
# $$\mathcal L = \int p(\lambda)\,\frac{W}{k^2}\,\mathbb E\|\hat\varepsilon - \varepsilon\|^2
#   \,d\lambda
#   \equiv \frac12\int w(\lambda)\,\mathbb E\|\hat\varepsilon-\varepsilon\|^2\,d\lambda,
#   \qquad w(\lambda) = \frac{2\,p(\lambda)\,W}{k^2}$$
#
# (Kingma & Gao 2023, eq. 7-8, where $t \sim U[0,1]$ and $w(\lambda_t)\,|\dot\lambda_t| =
# 2W/k^2$). For the cosine schedule clipped to $|\lambda| \le 15$, $\lambda = -2\log\tan u$
# with $u = t_{\min} + t\,\Delta$, so
# $|\dot\lambda| = 4\Delta/\sin 2u = 4\Delta\cosh(\lambda/2)$ and
# $p(\lambda) = \mathrm{sech}(\lambda/2)/(4\Delta)$. With $e^{-\lambda} = \sigma^2/\alpha^2$,
# $\alpha^2 = \mathrm{sigmoid}(\lambda)$ and $\lambda = 2\,\mathrm{logit}\,t$ on the straight
# flow-matching path:
#
# * ELBO, `elbo` weighting (Kingma et al. 2021), any schedule: $w = 1$;
# * $\varepsilon$-MSE, `uniform` weighting (Ho et al. 2020), cosine:
#   $w = \mathrm{sech}(\lambda/2)\,/\,(2\Delta)$;
# * $x_0$-MSE, `uniform`, cosine: $w = e^{-\lambda}\,\mathrm{sech}(\lambda/2)\,/\,(2\Delta)$;
# * $v$-MSE, `uniform` (Salimans & Ho 2022), cosine: $w = e^{-\lambda/2}\,/\,\Delta$;
# * $\varepsilon$-MSE, `min_snr` with $\gamma = 5$ (Hang et al. 2023), cosine:
#   $w = \min(1, \gamma e^{-\lambda})\,\mathrm{sech}(\lambda/2)\,/\,(2\Delta)$;
# * flow matching, straight path, $t \sim U[0,1]$ (Lipman et al. 2023): $w = e^{-\lambda/2}$;
# * flow matching, logit-normal $t$ (Esser et al. 2024, SD3):
#   $w = 2\,\mathcal N(\lambda; 0, 2^2)\,(1 + e^{-\lambda/2})^2$;
# * EDM (Karras et al. 2022), $\sigma_d = 0.5$:
#   $w = 2\,\mathcal N(\lambda; 2.4, 2.4^2)\,(e^{-\lambda} + \sigma_d^2)/\sigma_d^2$.
#
# Up to constants these are Kingma & Gao's Table 1 entries; in particular $v$-prediction with
# the cosine schedule and flow matching with the straight path have the same
# $w \propto e^{-\lambda/2}$.
#
# **Checks.** (A) For the losses with uniform $t$, on a grid of $t$: the library's own
# training weight (`losses.diffusion_example_from_coefficients`, or 1 for
# `losses.flow_matching_example`), the library's conversion of a unit $\varepsilon$ error
# into the target (`parameterization.convert`), and the library's $\dot\lambda$ (`jax.jvp`)
# give $w = 2W e_f^2/|\dot\lambda|$, which must equal the closed form of the table.
# (B) For the two losses with non-uniform time (EDM, logit-normal), a Monte Carlo estimate:
# draw $n$ training examples with the library (`losses.edm_example`,
# `losses.flow_matching_example` with `losses.logit_normal_time`), compute each one's loss
# $L_i$ for a unit $\varepsilon$ error, and histogram their $\lambda_i$ weighted by $L_i/n$:
# in each bin this estimates $\frac12\int_{\rm bin} w(\lambda)\,d\lambda$, with standard error
# $\mathrm{std}(L_i 1_{\rm bin})/\sqrt n$; each bin must agree with the integral of the
# closed form (scipy `quad`) within 5 standard errors.

# %%
EPS = parameterization.get_prediction_target("eps")
VELOCITY = parameterization.get_prediction_target("velocity")
cosine = schedules.get_continuous_schedule("cosine")
delta = math.atan(math.exp(7.5)) - math.atan(math.exp(-7.5))  # t_max - t_min, |lambda| <= 15
t = jnp.linspace(0.002, 0.998, 999)


def unit_eps_error(target, coefficients, like):
  # The error in `target` caused by an error of 1 in eps at fixed x_t (the maps are linear).
  return parameterization.convert(
    jnp.ones_like(like),
    source=EPS,
    destination=target,
    x_t=jnp.zeros_like(like),
    coefficients=coefficients,
  )


def diffusion_implied_w(schedule, target_name, weighting_name, **weighting_kwargs):
  target = parameterization.get_prediction_target(target_name)
  coefficients = parameterization.diffusion_coefficients(schedule, t)
  log_snr, d_log_snr = schedule.log_snr(t), schedule.d_log_snr(t)
  example = losses.diffusion_example_from_coefficients(
    data=jnp.zeros((t.shape[0], 1)),
    noise=jnp.zeros((t.shape[0], 1)),
    coefficients=coefficients,
    log_snr=log_snr,
    d_log_snr=d_log_snr,
    model_time=t,
    target=target,
    weighting=losses.get_weighting(weighting_name, **weighting_kwargs),
  )
  error = unit_eps_error(target, coefficients, t)
  return log_snr, 2.0 * example.weight * error**2 / jnp.abs(d_log_snr)


def flow_matching_implied_w():
  path = paths.get_path("linear")  # flow time: x_t = t x1 + (1 - t) x0
  example = losses.flow_matching_example(
    jax.random.key(0),
    x0=jnp.zeros((t.shape[0], 1)),
    x1=jnp.zeros((t.shape[0], 1)),
    path=path,
    time_sampler=lambda key, n: t,
  )
  log_snr_fn = lambda time: 2.0 * jnp.log(time / (1.0 - time))  # alpha = t, sigma = 1 - t
  d_log_snr = jax.jvp(log_snr_fn, (t,), (jnp.ones_like(t),))[1]
  error = unit_eps_error(VELOCITY, path.gaussian_coefficients(t), t)
  return log_snr_fn(t), 2.0 * example.weight * error**2 / jnp.abs(d_log_snr)


sech = lambda x: 1.0 / np.cosh(x)
table = {
  "ELBO": (diffusion_implied_w(cosine, "eps", "elbo"), lambda l: np.ones_like(l)),
  "ELBO, VP schedule": (
    diffusion_implied_w(schedules.get_continuous_schedule("vp"), "eps", "elbo"),
    lambda l: np.ones_like(l),
  ),
  "eps-MSE, cosine": (
    diffusion_implied_w(cosine, "eps", "uniform"),
    lambda l: sech(l / 2) / (2 * delta),
  ),
  "x0-MSE, cosine": (
    diffusion_implied_w(cosine, "x0", "uniform"),
    lambda l: np.exp(-l) * sech(l / 2) / (2 * delta),
  ),
  "v-MSE, cosine": (diffusion_implied_w(cosine, "v", "uniform"), lambda l: np.exp(-l / 2) / delta),
  "min-SNR-5 eps, cosine": (
    diffusion_implied_w(cosine, "eps", "min_snr", gamma=5.0),
    lambda l: np.minimum(1, 5 * np.exp(-l)) * sech(l / 2) / (2 * delta),
  ),
  "flow matching, uniform t": (flow_matching_implied_w(), lambda l: np.exp(-l / 2)),
}
for name, ((log_snr, w), closed_form) in table.items():
  log_snr, w = np.asarray(log_snr, np.float64), np.asarray(w, np.float64)
  inside = np.abs(log_snr) < 14.0  # away from the clipped ends
  np.testing.assert_allclose(w[inside], closed_form(log_snr[inside]), rtol=2e-3, err_msg=name)
  relative_error = np.max(np.abs(w[inside] / closed_form(log_snr[inside]) - 1))
  print(
    f"{name:>26}: implied w(lambda) matches the closed form (max rel. error {relative_error:.1e})"
  )

# %%
n_mc = 400_000
sigma_data = 0.5


def edm_w(l):
  return 2 * stats.norm.pdf(l, 2.4, 2.4) * (np.exp(-l) + sigma_data**2) / sigma_data**2


def logit_normal_w(l):
  return 2 * stats.norm.pdf(l, 0.0, 2.0) * (1 + np.exp(-l / 2)) ** 2


@jax.jit
def edm_draws(key):
  example = losses.edm_example(key, data=jnp.zeros((n_mc, 1)), sigma_data=sigma_data)
  sigma = jnp.exp(4.0 * example.model_time)  # c_noise = ln(sigma) / 4
  # D = c_skip x + c_out F and x0 = x - sigma eps: a unit eps error is an error -sigma in D
  # and -sigma / c_out in the network output F.
  c_out = losses.edm_preconditioning(sigma, sigma_data=sigma_data).c_out
  return -2.0 * jnp.log(sigma), example.weight * (sigma / c_out) ** 2


@jax.jit
def logit_normal_draws(key):
  path = paths.get_path("linear")
  example = losses.flow_matching_example(
    key,
    x0=jnp.zeros((n_mc, 1)),
    x1=jnp.zeros((n_mc, 1)),
    path=path,
    time_sampler=losses.get_time_sampler("logit_normal"),
  )
  time = example.model_time
  error = unit_eps_error(VELOCITY, path.gaussian_coefficients(time), time)
  return 2.0 * jnp.log(time / (1.0 - time)), example.weight * error**2


fig, ax = plt.subplots(figsize=(8, 4.5))
# name: (draws, closed form, bins over +-3 standard deviations of lambda's density)
monte_carlo = {
  "EDM": (edm_draws, edm_w, np.linspace(2.4 - 3 * 2.4, 2.4 + 3 * 2.4, 25)),
  "flow matching, logit-normal t": (logit_normal_draws, logit_normal_w, np.linspace(-6.0, 6.0, 25)),
}
for (name, (draw, closed_form, bins)), key in zip(
  monte_carlo.items(), jax.random.split(jax.random.key(1))
):
  log_snr, per_example = (np.asarray(a, np.float64) for a in draw(key))
  index = np.digitize(log_snr, bins)  # bin b + 1 holds [bins[b], bins[b + 1])
  first = np.bincount(index, per_example, minlength=len(bins) + 1)[1:-1] / n_mc
  second = np.bincount(index, per_example**2, minlength=len(bins) + 1)[1:-1] / n_mc
  estimate = first  # mean of L_i 1[lambda_i in bin], estimates 1/2 int_bin w
  standard_error = np.sqrt((second - first**2) / n_mc)
  exact = np.array(
    [0.5 * integrate.quad(closed_form, a, b)[0] for a, b in zip(bins[:-1], bins[1:])]
  )
  z = (estimate - exact) / standard_error
  print(f"{name:>30}: max |z| over {len(exact)} bins = {np.abs(z).max():.2f}")
  assert np.all(np.abs(z) < NUM_SE), (name, z)
  centres, widths = 0.5 * (bins[:-1] + bins[1:]), np.diff(bins)
  ax.errorbar(
    centres,
    2 * estimate / widths,
    yerr=2 * standard_error / widths,
    fmt="o",
    ms=3,
    label=f"{name}: Monte Carlo",
  )
  ax.plot(np.linspace(-10, 14, 400), closed_form(np.linspace(-10, 14, 400)), "k-", lw=0.8)
styles = ["-", ":", "-", "-", "-", "--", "-."]
for (name, ((log_snr, w), _)), style in zip(table.items(), styles):
  ax.plot(log_snr, w, style, label=name)
ax.set_yscale("log")
ax.set_ylim(1e-3, 1e2)
ax.set_xlim(-15, 15)
ax.set_xlabel("log-SNR lambda (noise <- -> data)")
ax.set_ylabel("implied weighting w(lambda)")
ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
plt.show()

# %% [markdown]
# **Reading the figure.** The ELBO weights every noise level equally; $\varepsilon$-MSE
# with the cosine schedule puts a $\mathrm{sech}(\lambda/2)$ bump at $\lambda = 0$;
# $x_0$-MSE is dominated by the noisiest levels; $v$-MSE and flow matching weight
# $e^{-\lambda/2}$, monotone decreasing, which by Kingma & Gao's Theorem 1 makes them
# ELBOs of noise-augmented data; EDM and the logit-normal flow matching of SD3 concentrate
# their weight on middle noise levels through the time density. The choice of schedule
# changes $w$ only through $p(\lambda)$ (compare the ELBO on cosine and VP: identical).
