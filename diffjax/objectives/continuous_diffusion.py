"""Continuous-time diffusion: the VP, VE, cosine, shifted-cosine and linear-log-SNR schedules,
eps / x0 / v / velocity targets, uniform / min-SNR / ELBO weighting, any time sampler.

Diffusion time runs from data (``t = 0``) to noise (``t = 1``) and the model sees ``t`` itself,
drawn in ``[t_min, 1]`` (Song et al. 2021, https://arxiv.org/abs/2011.13456; Kingma et al. 2021,
https://arxiv.org/abs/2107.00630). Each schedule's knobs are keywords of their own, used only by
the schedules that take them.
"""

from __future__ import annotations

from diffjax import losses as losses_lib
from diffjax import parameterization
from diffjax import samplers as samplers_lib
from diffjax import schedules as schedules_lib
from diffjax.objectives import base

__all__ = [
  "continuous_diffusion",
  "check",
  "SCHEDULE_KEYWORDS",
  "PREDICTIONS",
  "WEIGHTINGS",
  "DEFAULT_SAMPLER",
  "SPEC",
]

SCHEDULE_KEYWORDS: dict[str, tuple[str, ...]] = {
  "vp": ("beta_min", "beta_max"),
  "ve": ("sigma_min", "sigma_max"),
  "cosine": ("log_snr_min", "log_snr_max"),
  "shifted_cosine": ("resolution", "base_resolution", "log_snr_min", "log_snr_max"),
  "linear_log_snr": ("log_snr_min", "log_snr_max"),
}
"""The schedules of :data:`~diffjax.schedules.CONTINUOUS_SCHEDULES` this objective takes, with
the keywords each one reads ("edm" belongs to ``objective.name=edm``)."""

PREDICTIONS = ("eps", "x0", "v", "velocity")
"""Targets whose regression is well scaled on ``[t_min, 1]``."""

WEIGHTINGS = ("uniform", "min_snr", "elbo")
"""Loss weightings (EDM's is ``objective.name=edm``, with its preconditioning)."""

DEFAULT_SAMPLER = "heun"
"""Heun's method on EDM's time steps (Karras et al. 2022, Algorithm 1,
https://arxiv.org/abs/2206.00364): deterministic, second order."""

# The ELBO weighting is the ELBO only when t is uniform on [0, 1] (VDM, eq. 17).
_UNIFORM_TIME_SAMPLERS = ("uniform", "stratified")


def _schedule_problems(
  schedule: str,
  *,
  beta_min,
  beta_max,
  sigma_min,
  sigma_max,
  log_snr_min,
  log_snr_max,
  resolution,
  base_resolution,
) -> list[str]:
  """The chosen schedule's own keywords out of range (the others are not read)."""
  problems = []
  if schedule == "vp" and not (0.0 <= beta_min <= beta_max and beta_max > 0.0):
    problems.append(
      f"objective.beta_min={beta_min!r}, objective.beta_max={beta_max!r}: the vp "
      "schedule needs 0 <= beta_min <= beta_max and beta_max > 0"
    )
  if schedule == "ve" and not 0.0 < sigma_min < sigma_max:
    problems.append(
      f"objective.sigma_min={sigma_min!r}, objective.sigma_max={sigma_max!r}: "
      "the ve schedule needs 0 < sigma_min < sigma_max"
    )
  if "log_snr_min" in SCHEDULE_KEYWORDS.get(schedule, ()) and not log_snr_min < log_snr_max:
    problems.append(
      f"objective.log_snr_min={log_snr_min!r}, objective.log_snr_max="
      f"{log_snr_max!r}: the {schedule} schedule needs log_snr_min < log_snr_max"
    )
  if schedule == "shifted_cosine":
    for key, value in (("resolution", resolution), ("base_resolution", base_resolution)):
      if isinstance(value, bool) or int(value) != value or value < 1:
        problems.append(f"objective.{key}={value!r}: must be a positive integer")
  return problems


def check(
  *,
  schedule: str = "vp",
  beta_min: float = 0.1,
  beta_max: float = 20.0,
  sigma_min: float = 0.01,
  sigma_max: float = 50.0,
  log_snr_min: float = -15.0,
  log_snr_max: float = 15.0,
  resolution: int = 64,
  base_resolution: int = 64,
  prediction: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  time_sampler: str = "uniform",
  t_min: float = 1e-5,
  label_dropout: float = 0.0,
) -> list[str]:
  """Unknown names, out-of-range values and wrong combinations, one line each with the reason."""
  problems = []
  if schedule not in SCHEDULE_KEYWORDS:
    reason = " (EDM's schedule: objective.name=edm)" if schedule == "edm" else ""
    problems.append(
      f"objective.schedule={schedule!r}: choose one of {sorted(SCHEDULE_KEYWORDS)}{reason}"
    )
  problems += _schedule_problems(
    schedule,
    beta_min=beta_min,
    beta_max=beta_max,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    log_snr_min=log_snr_min,
    log_snr_max=log_snr_max,
    resolution=resolution,
    base_resolution=base_resolution,
  )
  if prediction not in PREDICTIONS:
    reason = (
      " ('score' = -eps / sigma is unbounded as sigma -> 0; 'eps' is the same model "
      "up to that factor)"
      if prediction == "score"
      else ""
    )
    problems.append(
      f"objective.prediction={prediction!r}: choose one of {list(PREDICTIONS)}{reason} ('v' "
      "is v-prediction alpha eps - sigma x0, Salimans & Ho 2022; 'velocity' is the flow "
      "velocity dx_t/dt)"
    )
  if weighting not in WEIGHTINGS:
    reason = " (EDM's weighting: objective.name=edm)" if weighting == "edm" else ""
    problems.append(f"objective.weighting={weighting!r}: choose one of {list(WEIGHTINGS)}{reason}")
  if time_sampler not in losses_lib.TIME_SAMPLERS:
    problems.append(
      f"objective.time_sampler={time_sampler!r}: choose one of {sorted(losses_lib.TIME_SAMPLERS)}"
    )
  if not min_snr_gamma > 0:
    problems.append(f"objective.min_snr_gamma={min_snr_gamma!r}: must be > 0")
  if not 0.0 <= t_min < 1.0:
    problems.append(f"objective.t_min={t_min!r}: must lie in [0, 1)")
  problems += base.label_dropout_problems(label_dropout)
  if schedule == "vp" and t_min == 0.0:
    problems.append(
      "objective.t_min=0 with objective.schedule='vp': sigma(0) = 0 there, where "
      "d sigma / dt and the eps -> x0 conversion are infinite; use t_min > 0 "
      "(Song et al. 2021 use 1e-5)"
    )
  if (
    weighting == "elbo"
    and time_sampler in losses_lib.TIME_SAMPLERS
    and (time_sampler not in _UNIFORM_TIME_SAMPLERS)
  ):
    problems.append(
      f"objective.weighting='elbo' with objective.time_sampler={time_sampler!r}: "
      "the ELBO weight -lambda'(t) / 2 is per unit of uniform time (Kingma et al. "
      "2021, eq. 17), so another time density makes the loss something else; use "
      f"time_sampler {' or '.join(map(repr, _UNIFORM_TIME_SAMPLERS))}"
    )
  if not problems:
    problems += _unread_problems(
      schedule,
      weighting,
      beta_min=beta_min,
      beta_max=beta_max,
      sigma_min=sigma_min,
      sigma_max=sigma_max,
      log_snr_min=log_snr_min,
      log_snr_max=log_snr_max,
      resolution=resolution,
      base_resolution=base_resolution,
      min_snr_gamma=min_snr_gamma,
    )
  return problems


def _unread_problems(schedule: str, weighting: str, **values) -> list[str]:
  """Keywords set away from their defaults that ``schedule`` and ``weighting`` do not read."""
  unread = {}
  for key, value in values.items():
    if key == "min_snr_gamma":
      if weighting != "min_snr":
        unread[key] = (
          value,
          f"only weighting 'min_snr' reads it, and objective.weighting={weighting!r}",
        )
      continue
    if key not in SCHEDULE_KEYWORDS[schedule]:
      readers = sorted(name for name, keys in SCHEDULE_KEYWORDS.items() if key in keys)
      unread[key] = (
        value,
        f"only schedules {readers} read it, and objective.schedule={schedule!r}",
      )
  return base.unread_problems(continuous_diffusion, unread)


def _schedule(name: str, **keywords) -> schedules_lib.ContinuousSchedule:
  """The schedule ``name`` from the keywords it reads (:data:`SCHEDULE_KEYWORDS`)."""
  return schedules_lib.get_continuous_schedule(
    name, **{key: keywords[key] for key in SCHEDULE_KEYWORDS[name]}
  )


def continuous_diffusion(
  context: base.ObjectiveContext,
  *,
  schedule: str = "vp",
  beta_min: float = 0.1,
  beta_max: float = 20.0,
  sigma_min: float = 0.01,
  sigma_max: float = 50.0,
  log_snr_min: float = -15.0,
  log_snr_max: float = 15.0,
  resolution: int = 64,
  base_resolution: int = 64,
  prediction: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  time_sampler: str = "uniform",
  t_min: float = 1e-5,
  label_dropout: float = 0.0,
) -> base.Objective:
  """``E_t w(t) ||F(x_t, t) - target(x0, eps)||^2`` with ``x_t = alpha(t) x0 + sigma(t) eps``,
  ``t = t_min + (1 - t_min) u``, ``u ~ time_sampler`` (:func:`~diffjax.losses.
  continuous_diffusion_example`; Song et al. 2021, https://arxiv.org/abs/2011.13456; Kingma et
  al. 2021, https://arxiv.org/abs/2107.00630).

  Args:
    schedule: "vp" (``beta_min``, ``beta_max``), "ve" (``sigma_min``, ``sigma_max``), "cosine"
      and "linear_log_snr" (``log_snr_min``, ``log_snr_max``), "shifted_cosine" (``resolution``,
      ``base_resolution``, ``log_snr_min``, ``log_snr_max``); the other keywords are not read.
    prediction: "eps", "x0", "v" or "velocity" (``d x_t / dt``).
    weighting: "uniform", "min_snr" (``min_snr_gamma``) or "elbo" (uniform times only).
    time_sampler: a name of :data:`~diffjax.losses.TIME_SAMPLERS`, with its defaults.
    t_min: the earliest training time, where sampling ends and the likelihood starts.
    label_dropout: the fraction of labels dropped for classifier-free guidance.

  The generator (:func:`~diffjax.samplers.continuous_diffusion_generator`) and the likelihood
  start from ``N(0, sigma(1)^2 I)``: the terminal marginal ``N(alpha(1) x0, sigma(1)^2 I)``
  without the data's share (``alpha(1) = 6.6e-3`` for the default VP, ``1`` for VE, where
  ``sigma(1) = sigma_max`` dominates data of unit scale). The likelihood integrates the
  probability-flow ODE from ``t_min`` to 1 with that prior
  (:func:`~diffjax.objectives.base.probability_flow_likelihood`).
  """
  problems = check(
    schedule=schedule,
    beta_min=beta_min,
    beta_max=beta_max,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    log_snr_min=log_snr_min,
    log_snr_max=log_snr_max,
    resolution=resolution,
    base_resolution=base_resolution,
    prediction=prediction,
    weighting=weighting,
    min_snr_gamma=min_snr_gamma,
    time_sampler=time_sampler,
    t_min=t_min,
    label_dropout=label_dropout,
  )
  if not context.source_is_normal:
    problems.append(
      "objective 'continuous_diffusion' diffuses data into Gaussian noise and "
      "samples from it: set data.source='normal'"
    )
  if problems:
    raise ValueError("; ".join(problems))
  process = _schedule(
    schedule,
    beta_min=beta_min,
    beta_max=beta_max,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    log_snr_min=log_snr_min,
    log_snr_max=log_snr_max,
    resolution=resolution,
    base_resolution=base_resolution,
  )
  weighting_fn = losses_lib.get_weighting(
    weighting, **({"gamma": min_snr_gamma} if weighting == "min_snr" else {})
  )
  time_sampler_fn = losses_lib.get_time_sampler(time_sampler)
  target = parameterization.get_prediction_target(prediction)
  num_classes = context.num_classes

  def make_example(key, batch, labels):
    return losses_lib.continuous_diffusion_example(
      key,
      data=batch["x"],
      schedule=process,
      target=target,
      weighting=weighting_fn,
      cond=labels,
      time_sampler=time_sampler_fn,
      t_min=t_min,
    )

  loss_fn = base.regression_loss_fn(context, make_example, label_dropout=label_dropout)

  generate = samplers_lib.continuous_diffusion_generator(
    apply=context.apply,
    schedule=process,
    prediction=prediction,
    data_shape=context.data_shape,
    num_classes=num_classes,
    t_min=t_min,
    default_sampler=DEFAULT_SAMPLER,
  )
  coefficients_fn = lambda t: parameterization.diffusion_coefficients(process, t)
  log_likelihood = base.probability_flow_likelihood(
    lambda params: samplers_lib.velocity_field(
      lambda x, t: context.apply(params, x, t, None), target=target, coefficients_fn=coefficients_fn
    ),
    data_time=t_min,
    noise_time=1.0,
    data_shape=context.data_shape,
    prior_std=float(process.sigma(1.0)),
  )
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=None,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


SPEC = base.ObjectiveSpec(
  build=continuous_diffusion,
  check=check,
  samplers=samplers_lib.CONTINUOUS_SAMPLERS,
  default_sampler=DEFAULT_SAMPLER,
  output="the prediction target: eps, x0, v or velocity",
  summary="continuous-time diffusion (VP, VE, cosine, shifted cosine, linear log-SNR; "
  "eps/x0/v/velocity; uniform, min-SNR, ELBO weighting)",
)
