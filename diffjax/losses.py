"""Training objectives for diffusion and flow matching, split into pair-making and regression.

Every objective here is a weighted regression ``E[w ||F(model_input, model_time, cond) -
target||^2]``. Making the pair is one pure function of a key and a data batch that returns a
:class:`TrainingExample`; the loss is a separate, injectable function ``(prediction, example) ->
scalar`` (:func:`regression_loss` by default), as in ott-jax's ``neural/methods/flow_matching.py``.
The train step only calls ``model(example.model_input, example.model_time, example.cond)``.

Time conventions follow each family's literature: flow matching gets flow time (``t = 0`` source,
``t = 1`` data, :mod:`diffjax.paths`); diffusion gets diffusion time (``t = 0`` data, ``t = 1``
noise, :mod:`diffjax.schedules`); EDM gets its ``c_noise = ln(sigma) / 4``.

Contents:

* time samplers on ``[0, 1]``: uniform, stratified, logit-normal, U-shaped
  (:func:`get_time_sampler`);
* flow matching: :func:`flow_matching_example` and the CFM recipes
  (:data:`FLOW_MATCHING_RECIPES`, :func:`get_flow_matching_recipe`);
* diffusion: :func:`diffusion_example` for discrete and continuous schedules and any
  :class:`~diffjax.parameterization.PredictionTarget`, weighted by :func:`get_weighting`
  ("uniform", "min_snr", "elbo", "edm"); EDM's preconditioned objective, :func:`edm_example`;
* the exact marginal flow-matching objective on a finite data set, :func:`marginal_velocity` and
  :func:`marginal_fm_loss`, the reference against which the conditional objective is tested.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from diffjax._lookup import lookup
from diffjax.couplings import Coupling, get_coupling
from diffjax.parameterization import (
  Coefficients,
  PredictionTarget,
  check_discrete_target,
  diffusion_coefficients,
  discrete_coefficients,
)
from diffjax.paths import Path, get_path
from diffjax.schedules import ContinuousSchedule, DiscreteSchedule
from diffjax.shapes import broadcast_to_data, compute_dtype

__all__ = [
  "TrainingExample",
  "LossFn",
  "TimeSampler",
  "regression_loss",
  # time samplers
  "uniform_time",
  "stratified_time",
  "logit_normal_time",
  "u_shaped_time",
  "TIME_SAMPLERS",
  "get_time_sampler",
  # flow matching
  "flow_matching_example",
  "FlowMatchingRecipe",
  "FLOW_MATCHING_RECIPES",
  "get_flow_matching_recipe",
  "build_flow_matching_recipe",
  # diffusion
  "Weighting",
  "uniform_weighting",
  "min_snr_weighting",
  "elbo_weighting",
  "edm_weighting",
  "WEIGHTINGS",
  "get_weighting",
  "diffusion_example_from_coefficients",
  "discrete_diffusion_example",
  "continuous_diffusion_example",
  "diffusion_example",
  # EDM
  "EDMPreconditioning",
  "edm_preconditioning",
  "edm_loss_weight",
  "edm_denoiser",
  "edm_example_from_noise",
  "edm_example",
  # marginal flow matching
  "marginal_velocity",
  "with_marginal_target",
  "marginal_fm_loss",
]


class TrainingExample(NamedTuple):
  """One batch of regression pairs: the model sees ``(model_input, model_time, cond)`` and is
  regressed on ``target`` with per-example weight ``weight``.

  Attributes:
    model_input: ``[batch, ...]`` network input (``x_t``; ``c_in x`` for EDM).
    model_time: ``[batch]`` float time (or noise conditioning) fed to the network.
    cond: ``[batch]`` integer labels, any ``[batch, ...]`` conditioning, or ``None``.
    target: ``[batch, ...]`` regression target, same shape as ``model_input``.
    weight: ``[batch]`` loss weight per example.
  """

  model_input: Array
  model_time: Array
  cond: Array | None
  target: Array
  weight: Array


LossFn = Callable[[Array, TrainingExample], Array]
TimeSampler = Callable[[Array, int], Array]


def regression_loss(prediction: Array, example: TrainingExample) -> Array:
  """``L = 1/B sum_i w_i * 1/D sum_d (F_i,d - target_i,d)^2``.

  Mean over the ``D`` feature dimensions, so the scale of a loss (and of its learning rate) does
  not change with resolution or channel count; the per-example weight then multiplies a per-dim
  MSE. Mean over the batch, so gradients do not scale with the batch size and a sharded batch
  gives the same number. Computed in at least float32 (bfloat16 network outputs lose the small
  residuals late in training otherwise). Pass a different function of the same signature to the
  train step to change the loss (e.g. a pseudo-Huber).

  Args:
    prediction: ``[batch, ...]`` network output.
    example: the :class:`TrainingExample` the prediction was made for.

  Returns:
    A scalar.
  """
  dtype = compute_dtype(prediction)
  squared = optax.squared_error(prediction.astype(dtype), example.target.astype(dtype))
  per_example = jnp.mean(squared.reshape(squared.shape[0], -1), axis=-1)
  return jnp.mean(example.weight.astype(dtype) * per_example)


# --------------------------------------------------------------------------------------------
# Time samplers: fn(key, batch_size) -> [batch_size] times in [0, 1].
# --------------------------------------------------------------------------------------------


def uniform_time(key: Array, batch_size: int) -> Array:
  """``t ~ U[0, 1)`` (Lipman et al. 2023, https://arxiv.org/abs/2210.02747)."""
  return jax.random.uniform(key, (batch_size,))


def stratified_time(key: Array, batch_size: int) -> Array:
  """Low-discrepancy uniform times: ``t_i = (u + i / B) mod 1`` with one ``u ~ U[0, 1)``.

  Each ``t_i`` is marginally ``U[0, 1)`` and the batch covers ``[0, 1)`` evenly, which lowers the
  variance of the batch loss. Kingma et al. (2021), "Variational Diffusion Models", App. I.1,
  https://arxiv.org/abs/2107.00630.
  """
  u = jax.random.uniform(key, ())
  return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)


def logit_normal_time(
  key: Array, batch_size: int, *, loc: float = 0.0, scale: float = 1.0
) -> Array:
  """Logit-normal times: ``t = sigmoid(loc + scale n)``, ``n ~ N(0, 1)``, i.e. density
  ``p(t) = 1 / (scale sqrt(2 pi)) / (t (1 - t)) exp(-(logit(t) - loc)^2 / (2 scale^2))``.

  Esser et al. (2024), "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
  (SD3), Sec. 3.1, eq. 19, https://arxiv.org/abs/2403.03206.
  """
  return jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch_size,)))


def u_shaped_time(key: Array, batch_size: int, *, a: float = 4.0) -> Array:
  """U-shaped times with density ``p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2))`` on ``[0, 1]``.

  This is Lee et al.'s ``p(t) ~ exp(a t) + exp(-a t)`` made symmetric about ``1/2`` as their code
  does (an equal mixture of ``C exp(a t)`` and its mirror ``C exp(a (1 - t))``, which sums to the
  cosh above). Sampled by inverting the CDF ``F(t) = (sinh(a (t - 1/2)) + sinh(a / 2)) /
  (2 sinh(a / 2))``: ``t = 1/2 + asinh((2u - 1) sinh(a / 2)) / a``, ``u ~ U[0, 1)``.
  Lee, Lin & Fanti (2024), "Improving the Training of Rectified Flows", Sec. 4.1,
  https://arxiv.org/abs/2405.20320 (``a = 4``).
  """
  u = jax.random.uniform(key, (batch_size,))
  return 0.5 + jnp.arcsinh((2.0 * u - 1.0) * math.sinh(0.5 * a)) / a


TIME_SAMPLERS: dict[str, Callable[..., Array]] = {
  "uniform": uniform_time,
  "stratified": stratified_time,
  "logit_normal": logit_normal_time,
  "u_shaped": u_shaped_time,
}


def get_time_sampler(name: str, **kwargs) -> TimeSampler:
  """Resolves a time sampler by name (at the edge, once) into ``fn(key, batch_size) -> t``.

  Args:
    name: one of ``TIME_SAMPLERS``: "uniform", "stratified", "logit_normal" (``loc``,
      ``scale``), "u_shaped" (``a``).
  """
  return functools.partial(lookup(TIME_SAMPLERS, name, "time sampler"), **kwargs)


# --------------------------------------------------------------------------------------------
# Flow matching.
# --------------------------------------------------------------------------------------------


def flow_matching_example(
  key: Array,
  *,
  x0: Array,
  x1: Array,
  path: Path,
  time_sampler: TimeSampler = uniform_time,
  cond: Array | None = None,
  coupling: Coupling | None = None,
) -> TrainingExample:
  """Conditional flow-matching pairs: ``t ~ time_sampler``, ``x_t`` on the path between ``x0``
  and ``x1``, target ``u_t = d_alpha x1 + d_sigma x0 + d_gamma z``, weight 1.

  The loss ``E ||v(x_t, t) - u_t(x0, x1, z)||^2`` has the gradient of the marginal objective
  ``E ||v(x_t, t) - u_t(x_t)||^2`` (Lipman et al. 2023, Theorem 2,
  https://arxiv.org/abs/2210.02747; Tong et al. 2024, Theorem 3.2,
  https://arxiv.org/abs/2302.00482).

  Args:
    key: PRNG key.
    x0: ``[batch, ...]`` source samples (``N(0, I)`` noise for Gaussian-source recipes).
    x1: ``[batch, ...]`` data samples.
    path: a :class:`~diffjax.paths.Path`.
    time_sampler: ``fn(key, batch_size) -> t`` in ``[0, 1]``.
    cond: optional ``[batch, ...]`` labels/conditioning belonging to ``x1``.
    coupling: optional ``fn(key, x0, x1, cond) -> (x0, x1, cond)`` applied first (exact OT,
      Sinkhorn, ...). Usually the caller couples once per batch and leaves this ``None``.

  Returns:
    A :class:`TrainingExample` with ``model_input = x_t`` and ``model_time = t`` (flow time).
  """
  key_coupling, key_time, key_noise = jax.random.split(key, 3)
  if coupling is not None:
    x0, x1, cond = coupling(key_coupling, x0, x1, cond)
  t = time_sampler(key_time, x1.shape[0])
  z = jax.random.normal(key_noise, x1.shape, x1.dtype) if path.stochastic else None
  pair = path.interpolate(x0=x0, x1=x1, t=t, z=z)
  return TrainingExample(
    model_input=pair["x_t"], model_time=t, cond=cond, target=pair["target"], weight=jnp.ones_like(t)
  )


@dataclasses.dataclass(frozen=True)
class FlowMatchingRecipe:
  """A named flow-matching method: which path, which coupling, and where it comes from.

  ``path`` and ``coupling`` are names for :func:`diffjax.paths.get_path` and
  :func:`diffjax.couplings.get_coupling`; the ``*_kwargs`` are their keyword arguments. The
  source is ``x0 ~ N(0, I)`` for every recipe here.
  """

  name: str
  path: str
  path_kwargs: dict
  coupling: str
  coupling_kwargs: dict
  reference: str


def _icfm_recipe(*, sigma: float = 0.1) -> FlowMatchingRecipe:
  return FlowMatchingRecipe(
    "icfm",
    "icfm",
    {"sigma": sigma},
    "independent",
    {},
    "Tong et al. 2024, I-CFM, https://arxiv.org/abs/2302.00482",
  )


def _otcfm_recipe(*, sigma: float = 0.1) -> FlowMatchingRecipe:
  return FlowMatchingRecipe(
    "otcfm",
    "icfm",
    {"sigma": sigma},
    "exact_ot",
    {},
    "Tong et al. 2024, OT-CFM (exact minibatch OT), https://arxiv.org/abs/2302.00482",
  )


def _sbcfm_recipe(*, sigma: float = 1.0) -> FlowMatchingRecipe:
  # The entropic OT plan with absolute reg = 2 sigma^2 is the static Schrodinger bridge between the
  # marginals for a Brownian motion of variance sigma^2 (Tong et al. 2024, Prop. 3.5).
  return FlowMatchingRecipe(
    "sbcfm",
    "brownian_bridge",
    {"sigma": sigma},
    "sinkhorn",
    {"epsilon": 2.0 * sigma**2, "relative_epsilon": None},
    "Tong et al. 2024, SB-CFM, https://arxiv.org/abs/2302.00482",
  )


def _fm_recipe(*, sigma_min: float = 1e-4) -> FlowMatchingRecipe:
  return FlowMatchingRecipe(
    "fm",
    "linear",
    {"sigma_min": sigma_min},
    "independent",
    {},
    "Lipman et al. 2023, FM with the OT path, https://arxiv.org/abs/2210.02747",
  )


FLOW_MATCHING_RECIPES: dict[str, Callable[..., FlowMatchingRecipe]] = {
  "icfm": _icfm_recipe,
  "otcfm": _otcfm_recipe,
  "sbcfm": _sbcfm_recipe,
  "fm": _fm_recipe,
}


def get_flow_matching_recipe(name: str, **kwargs) -> FlowMatchingRecipe:
  """Resolves a flow-matching recipe by name.

  Args:
    name: "icfm" (I-CFM: icfm path, independent pairs), "otcfm" (OT-CFM: icfm path, exact OT
      coupling), "sbcfm" (SB-CFM: Brownian-bridge path, Sinkhorn coupling with absolute
      ``epsilon = 2 sigma^2``), "fm" (Lipman's FM: linear path with ``sigma_min``, independent
      pairs).
    **kwargs: ``sigma`` (icfm, otcfm, sbcfm) or ``sigma_min`` (fm).
  """
  return lookup(FLOW_MATCHING_RECIPES, name, "flow-matching recipe")(**kwargs)


def build_flow_matching_recipe(recipe: FlowMatchingRecipe) -> tuple[Path, Coupling]:
  """Resolves a recipe's names into ``(path, coupling)``, once, at the edge."""
  return (
    get_path(recipe.path, **recipe.path_kwargs),
    get_coupling(recipe.coupling, **recipe.coupling_kwargs),
  )


# --------------------------------------------------------------------------------------------
# Diffusion: weightings.
# --------------------------------------------------------------------------------------------

# weighting(*, log_snr, d_log_snr, eps_scale) -> [batch] weight on the target's per-dim MSE.
Weighting = Callable[..., Array]


def uniform_weighting(*, log_snr: Array, d_log_snr: Array, eps_scale: Array) -> Array:
  """Weight 1 on the chosen target's MSE ("L_simple" of Ho et al. 2020 for eps-prediction,
  https://arxiv.org/abs/2006.11239; plain x0- or v-MSE for the others)."""
  del d_log_snr, eps_scale
  return jnp.ones_like(log_snr)


def min_snr_weighting(
  *, log_snr: Array, d_log_snr: Array, eps_scale: Array, gamma: float = 5.0
) -> Array:
  """Min-SNR-gamma: the eps-MSE weight ``min(SNR, gamma) / SNR``, on the target's MSE
  ``min(SNR, gamma) / SNR * eps_scale^2``.

  That is ``min(SNR, gamma) / SNR`` for eps-, ``min(SNR, gamma)`` for x0- and
  ``min(SNR, gamma) / (SNR + 1)`` for v-prediction (variance preserving). Hang et al. (2023),
  "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8 and Sec. 3.4,
  https://arxiv.org/abs/2303.09556. Written ``min(1, gamma / SNR)`` so that ``SNR = 0`` (a
  zero-terminal-SNR step) gives 1, not 0/0.
  """
  del d_log_snr
  return jnp.minimum(1.0, gamma * jnp.exp(-log_snr)) * eps_scale**2


def elbo_weighting(*, log_snr: Array, d_log_snr: Array, eps_scale: Array) -> Array:
  """ELBO weighting: the eps-MSE weight ``-1/2 d lambda / dt`` per unit time, on the target's MSE
  ``-1/2 d lambda / dt * eps_scale^2``.

  The continuous-time diffusion loss is ``L = -1/2 E_{t ~ U(0, 1)} [lambda'(t) ||eps -
  eps_hat||^2]`` (Kingma et al. 2021, VDM, eq. 17, https://arxiv.org/abs/2107.00630; Kingma &
  Gao 2023, eq. 7, https://arxiv.org/abs/2303.00848). With :func:`regression_loss`'s mean over
  the ``D`` dimensions, ``D`` times the weighted loss is this term of the negative ELBO in nats
  (for uniform ``t``). Discrete schedules use a finite-difference ``lambda'`` (see
  :func:`discrete_diffusion_example`).
  """
  del log_snr
  return -0.5 * d_log_snr * eps_scale**2


def edm_weighting(
  *, log_snr: Array, d_log_snr: Array, eps_scale: Array, sigma_data: float = 0.5
) -> Array:
  """EDM's loss weighting on any schedule: the x0-MSE weight ``(s^2 + sd^2) / (s sd)^2`` at the
  equivalent VE noise ``s^2 = sigma^2 / alpha^2 = exp(-lambda)``.

  Since ``x0_err = -(sigma / alpha) eps_err``, the eps-MSE weight is ``s^2 (s^2 + sd^2) / (s
  sd)^2 = 1 + exp(-lambda) / sd^2``, times ``eps_scale^2`` for the target's MSE. Karras et al.
  (2022), Table 1 (``lambda(sigma)``), https://arxiv.org/abs/2206.00364; Kingma & Gao (2023),
  App. D. The full EDM recipe (log-normal sigma, preconditioning) is :func:`edm_example`.
  """
  del d_log_snr
  return (1.0 + jnp.exp(-log_snr) / sigma_data**2) * eps_scale**2


WEIGHTINGS: dict[str, Weighting] = {
  "uniform": uniform_weighting,
  "min_snr": min_snr_weighting,
  "elbo": elbo_weighting,
  "edm": edm_weighting,
}


def get_weighting(name: str, **kwargs) -> Weighting:
  """Resolves a loss weighting by name (at the edge, once).

  Args:
    name: one of ``WEIGHTINGS``: "uniform", "min_snr" (``gamma``), "elbo", "edm"
      (``sigma_data``).
  """
  return functools.partial(lookup(WEIGHTINGS, name, "weighting"), **kwargs)


# --------------------------------------------------------------------------------------------
# Diffusion: examples.
# --------------------------------------------------------------------------------------------


def diffusion_example_from_coefficients(
  *,
  data: Array,
  noise: Array,
  coefficients: Coefficients,
  log_snr: Array,
  d_log_snr: Array,
  model_time: Array,
  target: PredictionTarget,
  weighting: Weighting,
  cond: Array | None = None,
) -> TrainingExample:
  """The pair shared by all diffusion objectives: ``x_t = alpha x0 + sigma eps`` and the target
  ``target.from_x0_eps(x0, eps)``, weighted by ``weighting``.

  ``eps_scale = d eps_hat / d prediction`` at fixed ``x_t`` (1 for eps, ``-alpha / sigma`` for
  x0, ``alpha / (alpha^2 + sigma^2)`` for v, ...) is read off the target's own conversion
  (it is linear, so ``eps(prediction = 1, x_t = 0)``); an error ``e`` in the target is an error
  ``eps_scale e`` in eps, which is how each weighting, defined on the eps-MSE, is moved onto the
  target's MSE.

  Args:
    data: ``[batch, ...]`` clean data ``x0``.
    noise: ``[batch, ...]`` standard normal ``eps``.
    coefficients: per-example ``alpha, sigma`` (and derivatives, used by a "velocity" target).
    log_snr: ``[batch]`` ``lambda = log(alpha^2 / sigma^2)``.
    d_log_snr: ``[batch]`` ``d lambda / dt`` (used by the ELBO weighting).
    model_time: ``[batch]`` time fed to the network.
    target: the prediction target, from :func:`diffjax.parameterization.get_prediction_target`.
    weighting: from :func:`get_weighting`.
    cond: optional conditioning.
  """
  alpha = broadcast_to_data(coefficients.alpha, data)
  sigma = broadcast_to_data(coefficients.sigma, data)
  x_t = alpha * data + sigma * noise
  regression_target = target.from_x0_eps(data, noise, coefficients=coefficients)
  ones = jnp.ones_like(log_snr)
  _, eps_scale = target.to_x0_eps(ones, x_t=jnp.zeros_like(ones), coefficients=coefficients)
  weight = weighting(log_snr=log_snr, d_log_snr=d_log_snr, eps_scale=eps_scale)
  return TrainingExample(
    model_input=x_t, model_time=model_time, cond=cond, target=regression_target, weight=weight
  )


def discrete_diffusion_example(
  key: Array,
  *,
  data: Array,
  schedule: DiscreteSchedule,
  target: PredictionTarget,
  weighting: Weighting,
  cond: Array | None = None,
) -> TrainingExample:
  """DDPM pairs: step ``s ~ U{0, ..., T-1}``, ``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps``
  (Ho et al. 2020, Algorithm 1, https://arxiv.org/abs/2006.11239).

  ``model_time = (s + 1) / T`` in ``(0, 1]``: step ``s`` ends at continuous diffusion time
  ``(s + 1) / T`` (schedules built from a continuous ``abar`` define ``abar_s = abar((s+1)/T)``),
  so the same network can be evaluated by continuous-time samplers. ``alpha_s, sigma_s`` come
  from the log-SNR (:func:`~diffjax.parameterization.discrete_coefficients`), so ``sigma_s =
  sqrt(sigmoid(-lambda_s))`` stays accurate where ``abar_s`` is close to 1. The ELBO
  weighting uses ``d lambda / dt ~ T (lambda_s - lambda_{s-1})`` (a forward difference at
  ``s = 0``), the continuous-time approximation of the discrete bound. With a zero-terminal-SNR
  schedule the last step has ``lambda = -inf``, where the ELBO and EDM weights are infinite:
  use the uniform or min-SNR weighting there.
  """
  check_discrete_target(target)
  num_steps = schedule.num_steps
  key_step, key_noise = jax.random.split(key)
  batch = data.shape[0]
  step = jax.random.randint(key_step, (batch,), 0, num_steps)
  log_snr = schedule.log_snr[step]
  lambdas = schedule.log_snr
  d_log_snr_all = num_steps * jnp.diff(lambdas, prepend=2.0 * lambdas[:1] - lambdas[1:2])
  coefficients = discrete_coefficients(log_snr)
  noise = jax.random.normal(key_noise, data.shape, data.dtype)
  model_time = (step + 1).astype(jnp.float32) / num_steps
  return diffusion_example_from_coefficients(
    data=data,
    noise=noise,
    coefficients=coefficients,
    log_snr=log_snr,
    d_log_snr=d_log_snr_all[step],
    model_time=model_time,
    target=target,
    weighting=weighting,
    cond=cond,
  )


def continuous_diffusion_example(
  key: Array,
  *,
  data: Array,
  schedule: ContinuousSchedule,
  target: PredictionTarget,
  weighting: Weighting,
  cond: Array | None = None,
  time_sampler: TimeSampler = uniform_time,
  t_min: float = 1e-5,
) -> TrainingExample:
  """Continuous-time pairs: ``t = t_min + (1 - t_min) u`` with ``u ~ time_sampler``, ``x_t =
  alpha(t) x0 + sigma(t) eps``; ``model_time = t`` (diffusion time, 0 data, 1 noise).

  ``t_min`` keeps ``sigma(t) > 0`` (the VP schedule has ``sigma(0) = 0``; Song et al. 2021 train
  on ``[1e-5, 1]``, https://arxiv.org/abs/2011.13456). Derivatives and ``d lambda / dt`` come
  from the schedule by ``jax.jvp``.
  """
  key_time, key_noise = jax.random.split(key)
  batch = data.shape[0]
  t = t_min + (1.0 - t_min) * time_sampler(key_time, batch)
  coefficients = diffusion_coefficients(schedule, t)
  noise = jax.random.normal(key_noise, data.shape, data.dtype)
  return diffusion_example_from_coefficients(
    data=data,
    noise=noise,
    coefficients=coefficients,
    log_snr=schedule.log_snr(t),
    d_log_snr=schedule.d_log_snr(t),
    model_time=t,
    target=target,
    weighting=weighting,
    cond=cond,
  )


def diffusion_example(
  key: Array,
  *,
  data: Array,
  schedule: DiscreteSchedule | ContinuousSchedule,
  target: PredictionTarget,
  weighting: Weighting,
  cond: Array | None = None,
  **kwargs,
) -> TrainingExample:
  """Diffusion pairs for either schedule family: :func:`discrete_diffusion_example` for a
  :class:`~diffjax.schedules.DiscreteSchedule`, :func:`continuous_diffusion_example` (which
  takes ``time_sampler`` and ``t_min`` as ``kwargs``) for a
  :class:`~diffjax.schedules.ContinuousSchedule`."""
  if isinstance(schedule, DiscreteSchedule):
    if kwargs:
      raise ValueError(f"a discrete schedule samples its steps uniformly; drop {sorted(kwargs)}")
    return discrete_diffusion_example(
      key, data=data, schedule=schedule, target=target, weighting=weighting, cond=cond
    )
  if isinstance(schedule, ContinuousSchedule):
    return continuous_diffusion_example(
      key, data=data, schedule=schedule, target=target, weighting=weighting, cond=cond, **kwargs
    )
  raise ValueError(
    f"schedule must be a DiscreteSchedule or a ContinuousSchedule, got "
    f"{type(schedule).__name__}; build one with diffjax.schedules.get_*_schedule"
  )


# --------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022): preconditioned objective.
# --------------------------------------------------------------------------------------------


class EDMPreconditioning(NamedTuple):
  """``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (Karras et al. 2022, eq. 7)."""

  c_skip: Array
  c_out: Array
  c_in: Array
  c_noise: Array


def edm_preconditioning(sigma: Array, *, sigma_data: float = 0.5) -> EDMPreconditioning:
  """``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
  ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``.

  Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models",
  Table 1, https://arxiv.org/abs/2206.00364.
  """
  total = sigma**2 + sigma_data**2
  inv_root = jax.lax.rsqrt(total)
  return EDMPreconditioning(
    c_skip=sigma_data**2 / total,
    c_out=sigma * sigma_data * inv_root,
    c_in=inv_root,
    c_noise=0.25 * jnp.log(sigma),
  )


def edm_loss_weight(sigma: Array, *, sigma_data: float = 0.5) -> Array:
  """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, the weight on ``||D(x) - x0||^2``
  that makes the effective weight ``lambda c_out^2`` equal to 1 (Karras et al. 2022, Table 1 and
  eq. 8, https://arxiv.org/abs/2206.00364)."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoiser(raw_output: Array, *, x: Array, sigma: Array, sigma_data: float = 0.5) -> Array:
  """``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F`` from the raw network output ``F``
  (Karras et al. 2022, eq. 7, https://arxiv.org/abs/2206.00364). The network must have been
  called on ``c_in x`` and ``c_noise`` of :func:`edm_preconditioning`.

  Args:
    raw_output: ``[batch, ...]`` ``F(c_in x; c_noise)``.
    x: ``[batch, ...]`` noisy input ``x = x0 + sigma n``.
    sigma: ``[batch]`` noise levels.
    sigma_data: the data's standard deviation.
  """
  pre = edm_preconditioning(sigma, sigma_data=sigma_data)
  return broadcast_to_data(pre.c_skip, x) * x + broadcast_to_data(pre.c_out, x) * raw_output


def edm_example_from_noise(
  *, data: Array, noise: Array, sigma: Array, sigma_data: float = 0.5, cond: Array | None = None
) -> TrainingExample:
  """EDM's objective written for the raw network ``F``: with ``x = x0 + sigma n``,

      lambda ||D(x) - x0||^2 = lambda c_out^2 ||F(c_in x; c_noise) - (x0 - c_skip x) / c_out||^2,

  so ``model_input = c_in x``, ``model_time = c_noise``, ``target = (x0 - c_skip x) / c_out`` and
  ``weight = lambda c_out^2 = 1`` (Karras et al. 2022, eq. 8 and Table 1,
  https://arxiv.org/abs/2206.00364). Recover ``D`` with :func:`edm_denoiser`.
  """
  pre = edm_preconditioning(sigma, sigma_data=sigma_data)
  x = data + broadcast_to_data(sigma, data) * noise
  c_skip = broadcast_to_data(pre.c_skip, data)
  c_out = broadcast_to_data(pre.c_out, data)
  return TrainingExample(
    model_input=broadcast_to_data(pre.c_in, data) * x,
    model_time=pre.c_noise,
    cond=cond,
    target=(data - c_skip * x) / c_out,
    weight=edm_loss_weight(sigma, sigma_data=sigma_data) * pre.c_out**2,
  )


def edm_example(
  key: Array,
  *,
  data: Array,
  sigma_data: float = 0.5,
  p_mean: float = -1.2,
  p_std: float = 1.2,
  cond: Array | None = None,
) -> TrainingExample:
  """EDM pairs: ``ln(sigma) ~ N(P_mean, P_std^2)``, ``n ~ N(0, I)``, then
  :func:`edm_example_from_noise` (Karras et al. 2022, Table 1, https://arxiv.org/abs/2206.00364;
  defaults ``P_mean = -1.2``, ``P_std = 1.2``, ``sigma_data = 0.5``)."""
  key_sigma, key_noise = jax.random.split(key)
  log_sigma = p_mean + p_std * jax.random.normal(key_sigma, (data.shape[0],))
  noise = jax.random.normal(key_noise, data.shape, data.dtype)
  return edm_example_from_noise(
    data=data, noise=noise, sigma=jnp.exp(log_sigma), sigma_data=sigma_data, cond=cond
  )


# --------------------------------------------------------------------------------------------
# The exact marginal flow-matching objective on a finite data set.
# --------------------------------------------------------------------------------------------


def marginal_velocity(x: Array, t: Array, *, data: Array, path: Path) -> Array:
  """The exact marginal velocity of a Gaussian-source path over a finite data set.

  With ``x0 ~ N(0, I)`` independent of ``x1 ~ (1/N) sum_i delta(x1_i)``, the path's kernel is
  ``p_t(x | x1) = N(alpha_t x1, s_t^2 I)``, ``s_t = sqrt(sigma_t^2 + gamma_t^2)``
  (:meth:`~diffjax.paths.Path.gaussian_coefficients`), its conditional field
  ``u_t(x | x1) = d_alpha x1 + (d_s / s)(x - alpha x1)``, and the marginal field

      u_t(x) = sum_i w_i(x, t) u_t(x | x1_i),
      w_i = softmax_i(-||x - alpha_t x1_i||^2 / (2 s_t^2))

  (Lipman et al. 2023, eq. 8, https://arxiv.org/abs/2210.02747). The weights are the posterior
  over data points, computed with a softmax of log-densities so far-away ``x`` (where every
  density underflows) stays finite. ``O(N)`` per point. Needs ``s_t > 0``.

  Args:
    x: ``[*event]`` one point (vmap for a batch).
    t: scalar flow time.
    data: ``[N, *event]`` the data set.
    path: a :class:`~diffjax.paths.Path`.

  Returns:
    ``[*event]`` the marginal velocity at ``(x, t)``.
  """
  if jnp.shape(x) != jnp.shape(data)[1:]:
    raise ValueError(
      f"x of shape {jnp.shape(x)} must be one point of the data set of shape "
      f"{jnp.shape(data)} (vmap over a batch of points)"
    )
  alpha, s, d_alpha, d_s = path.gaussian_coefficients(t)
  residual = x[None] - alpha * data
  log_density = -0.5 * jnp.sum(residual.reshape(data.shape[0], -1) ** 2, axis=-1) / s**2
  weights = jax.nn.softmax(log_density)
  conditional = d_alpha * data + (d_s / s) * residual
  return jnp.tensordot(weights, conditional, axes=1)


def with_marginal_target(example: TrainingExample, *, data: Array, path: Path) -> TrainingExample:
  """The same pairs with the target replaced by the exact marginal field at
  ``(model_input, model_time)``, :func:`marginal_velocity`; valid for a flow-matching example
  made with ``x0 ~ N(0, I)`` and independent pairs."""
  target = jax.vmap(lambda x, t: marginal_velocity(x, t, data=data, path=path))(
    example.model_input, example.model_time
  )
  return example._replace(target=target)


def marginal_fm_loss(
  prediction: Array, example: TrainingExample, *, data: Array, path: Path
) -> Array:
  """The marginal flow-matching loss ``E_t E_{x ~ p_t} [w ||v(x, t) - u_t(x)||^2]`` at the
  example's points, with the exact marginal field (:func:`with_marginal_target`) and the
  reduction of :func:`regression_loss`. The conditional loss differs from it by a constant
  independent of the model (Lipman et al. 2023, Theorem 2, https://arxiv.org/abs/2210.02747)."""
  return regression_loss(prediction, with_marginal_target(example, data=data, path=path))
