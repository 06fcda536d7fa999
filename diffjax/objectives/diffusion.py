"""Discrete-time diffusion (DDPM): any discrete schedule, zero terminal SNR, eps / x0 / v targets,
uniform / min-SNR / ELBO weighting.

Diffusion time counts steps toward noise (``t = 0`` data); the model sees ``(s + 1) / T`` for
step ``s`` (Ho et al. 2020, https://arxiv.org/abs/2006.11239), so continuous-time samplers can run
it on the interpolated schedule.
"""

from __future__ import annotations

from diffjax import losses as losses_lib
from diffjax import parameterization
from diffjax import samplers as samplers_lib
from diffjax import schedules as schedules_lib
from diffjax.objectives import base

__all__ = ["diffusion", "check", "PREDICTIONS", "SPEC"]

PREDICTIONS = ("eps", "x0", "v")
"""Targets a discrete schedule defines ("velocity" needs d alpha / dt)."""


def check(
  *,
  schedule: str = "linear",
  num_diffusion_steps: int = 1000,
  zero_terminal_snr: bool = False,
  prediction: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  label_dropout: float = 0.0,
) -> list[str]:
  """Unknown names and wrong combinations, one line each with the reason."""
  problems = []
  if schedule not in schedules_lib.DISCRETE_SCHEDULES:
    problems.append(
      f"objective.schedule={schedule!r}: unknown; choose one of "
      f"{sorted(schedules_lib.DISCRETE_SCHEDULES)}"
    )
  if prediction not in PREDICTIONS:
    reason = (
      " ('velocity' needs d alpha / dt, which a discrete schedule does not define: use "
      "objective.name=continuous_diffusion)"
      if prediction == "velocity"
      else ""
    )
    problems.append(
      f"objective.prediction={prediction!r}: choose one of {list(PREDICTIONS)}{reason} ('v' is "
      "v-prediction alpha eps - sigma x0, Salimans & Ho 2022; 'velocity' is the flow velocity "
      "dx_t/dt)"
    )
  if weighting not in losses_lib.WEIGHTINGS or weighting == "edm":
    problems.append(
      f"objective.weighting={weighting!r}: choose one of "
      f"{sorted(set(losses_lib.WEIGHTINGS) - {'edm'})} (EDM's weighting: "
      "objective.name=edm)"
    )
  if not num_diffusion_steps >= 2:
    problems.append(f"objective.num_diffusion_steps={num_diffusion_steps!r}: must be >= 2")
  if not min_snr_gamma > 0:
    problems.append(f"objective.min_snr_gamma={min_snr_gamma!r}: must be > 0")
  problems += base.label_dropout_problems(label_dropout)
  if zero_terminal_snr and prediction == "eps":
    problems.append(
      "objective.prediction='eps' with objective.zero_terminal_snr=True: at the "
      "last step x_T is pure noise, so eps = x_T and x0 cannot be recovered from "
      "it (Lin et al. 2024); use prediction 'v' or 'x0'"
    )
  if zero_terminal_snr and weighting == "elbo":
    problems.append(
      "objective.weighting='elbo' with objective.zero_terminal_snr=True: the ELBO "
      "weight is infinite at the last step (log-SNR -inf); use 'uniform' or "
      "'min_snr'"
    )
  if not problems and weighting != "min_snr":
    reason = f"only weighting 'min_snr' reads it, and objective.weighting={weighting!r}"
    problems += base.unread_problems(diffusion, {"min_snr_gamma": (min_snr_gamma, reason)})
  return problems


def diffusion(
  context: base.ObjectiveContext,
  *,
  schedule: str = "linear",
  num_diffusion_steps: int = 1000,
  zero_terminal_snr: bool = False,
  prediction: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  label_dropout: float = 0.0,
) -> base.Objective:
  """DDPM's objective ``E_s w(s) ||F(x_s, (s + 1) / T) - target(x0, eps)||^2`` on a discrete
  schedule of ``num_diffusion_steps`` steps (:func:`diffjax.losses.discrete_diffusion_example`);
  ``zero_terminal_snr`` rescales the betas so ``abar_T = 0`` (Lin et al. 2024,
  https://arxiv.org/abs/2305.08891)."""
  problems = check(
    schedule=schedule,
    num_diffusion_steps=num_diffusion_steps,
    zero_terminal_snr=zero_terminal_snr,
    prediction=prediction,
    weighting=weighting,
    min_snr_gamma=min_snr_gamma,
    label_dropout=label_dropout,
  )
  if problems:
    raise ValueError("; ".join(problems))
  betas_schedule = schedules_lib.get_discrete_schedule(
    schedule, zero_terminal_snr=zero_terminal_snr, num_steps=num_diffusion_steps
  )
  weighting_fn = losses_lib.get_weighting(
    weighting, **({"gamma": min_snr_gamma} if weighting == "min_snr" else {})
  )
  target = parameterization.get_prediction_target(prediction)
  num_classes = context.num_classes

  def make_example(key, batch, labels):
    return losses_lib.diffusion_example(
      key,
      data=batch["x"],
      schedule=betas_schedule,
      target=target,
      weighting=weighting_fn,
      cond=labels,
    )

  loss_fn = base.regression_loss_fn(context, make_example, label_dropout=label_dropout)

  generate = samplers_lib.diffusion_generator(
    apply=context.apply,
    schedule=betas_schedule,
    prediction=prediction,
    data_shape=context.data_shape,
    num_classes=num_classes,
  )
  coefficients_fn = samplers_lib.interpolated_coefficients_fn(betas_schedule)
  # Diffusion time runs data (first model time 1/T) -> noise (1); the prior N(0, I) is the
  # schedule's terminal marginal up to alpha(1)^2 (about 4e-5 for DDPM's linear betas).
  log_likelihood = base.probability_flow_likelihood(
    lambda params: samplers_lib.velocity_field(
      lambda x, t: context.apply(params, x, t, None), target=target, coefficients_fn=coefficients_fn
    ),
    data_time=1.0 / num_diffusion_steps,
    noise_time=1.0,
    data_shape=context.data_shape,
  )
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=None,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


SPEC = base.ObjectiveSpec(
  build=diffusion,
  check=check,
  samplers=tuple(samplers_lib.SAMPLERS),
  default_sampler="ddim",
  output="the prediction target: eps, x0 or v",
  summary="DDPM on a discrete schedule (eps/x0/v; uniform, min-SNR, ELBO weighting)",
)
