"""EDM (Karras et al. 2022): the preconditioned denoiser, log-normal noise levels, the loss
weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` and the Heun sampler
with churn.

The process is ``x = x0 + sigma n`` with the noise level as time (``sigma(t) = t``, ``s(t) = 1``);
the network ``F`` sees ``(c_in x, c_noise)`` and the denoiser is ``D(x; sigma) = c_skip x +
c_out F(c_in x; c_noise)`` (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", eq. 7 and Table 1, https://arxiv.org/abs/2206.00364).
"""

from __future__ import annotations

from diffjax import losses as losses_lib
from diffjax import parameterization
from diffjax import samplers as samplers_lib
from diffjax import schedules as schedules_lib
from diffjax.objectives import base
from diffjax.shapes import broadcast_to_data

__all__ = ["edm", "check", "preconditioned_denoiser", "DEFAULT_SAMPLER", "SPEC"]

DEFAULT_SAMPLER = "edm"
"""Karras et al.'s Algorithm 2 (Algorithm 1, deterministic Heun, when ``s_churn = 0``)."""


def check(
  *,
  sigma_data: float = 0.5,
  p_mean: float = -1.2,
  p_std: float = 1.2,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = 1e9,
  s_noise: float = 1.0,
  label_dropout: float = 0.0,
) -> list[str]:
  """Out-of-range values and wrong combinations, one line each with the reason."""
  del p_mean  # any mean of ln(sigma) is a distribution
  problems = []
  if not sigma_data > 0:
    problems.append(
      f"objective.sigma_data={sigma_data!r}: must be > 0 (the data's standard deviation)"
    )
  if not p_std > 0:
    problems.append(f"objective.p_std={p_std!r}: must be > 0 (the std of ln(sigma))")
  if not 0.0 < sigma_min < sigma_max:
    problems.append(
      f"objective.sigma_min={sigma_min!r}, objective.sigma_max={sigma_max!r}: "
      "need 0 < sigma_min < sigma_max"
    )
  if not rho > 0:
    problems.append(f"objective.rho={rho!r}: must be > 0")
  if not s_churn >= 0:
    problems.append(f"objective.s_churn={s_churn!r}: must be >= 0")
  if not s_noise >= 0:
    problems.append(f"objective.s_noise={s_noise!r}: must be >= 0")
  if not s_tmin >= 0:
    problems.append(f"objective.s_tmin={s_tmin!r}: must be >= 0")
  if not s_tmin <= s_tmax:
    problems.append(
      f"objective.s_tmin={s_tmin!r} > objective.s_tmax={s_tmax!r}: churn applies "
      "where s_tmin <= sigma <= s_tmax, an empty range; lower s_tmin or raise "
      "s_tmax"
    )
  problems += base.label_dropout_problems(label_dropout)
  if not problems and s_churn == 0:
    why = "only churn reads it, and churn is off (objective.s_churn=0)"
    problems += base.unread_problems(
      edm,
      {
        key: (value, why)
        for key, value in (("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise))
      },
    )
  return problems


def preconditioned_denoiser(apply, *, sigma_data: float):
  """``denoise(params, x, sigma, cond) = c_skip x + c_out F(c_in x; c_noise)`` for the network
  ``apply(params, x, t, cond) -> F`` (Karras et al. 2022, eq. 7 and Table 1,
  https://arxiv.org/abs/2206.00364); ``sigma`` is ``[batch]``."""

  def denoise(params, x, sigma, cond):
    pre = losses_lib.edm_preconditioning(sigma, sigma_data=sigma_data)
    raw = apply(params, broadcast_to_data(pre.c_in, x) * x, pre.c_noise, cond)
    return losses_lib.edm_denoiser(raw, x=x, sigma=sigma, sigma_data=sigma_data)

  return denoise


def edm(
  context: base.ObjectiveContext,
  *,
  sigma_data: float = 0.5,
  p_mean: float = -1.2,
  p_std: float = 1.2,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = 1e9,
  s_noise: float = 1.0,
  label_dropout: float = 0.0,
) -> base.Objective:
  """EDM's objective ``E_{sigma, x0, n} lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2`` with
  ``ln(sigma) ~ N(p_mean, p_std^2)``, written for the raw network: ``lambda c_out^2 ||F(c_in x;
  c_noise) - (x0 - c_skip x) / c_out||^2`` with ``lambda c_out^2 = 1``
  (:func:`~diffjax.losses.edm_example`; Karras et al. 2022, eq. 8 and Table 1,
  https://arxiv.org/abs/2206.00364).

  Args:
    sigma_data: the data's standard deviation (0.5 for data in [-1, 1]).
    p_mean, p_std: mean and std of ``ln(sigma)`` in training.
    sigma_min, sigma_max, rho: the sampler's noise levels (eq. 5) and the likelihood's range.
    s_churn, s_tmin, s_tmax, s_noise: the churn of the "edm" sampler (Algorithm 2; none when
      ``s_churn = 0``); ``s_tmax`` is finite because config values are (EDM's code uses inf:
      any value >= ``sigma_max`` is the same).
    label_dropout: the fraction of labels dropped for classifier-free guidance.

  The likelihood integrates the probability-flow ODE ``dx / dsigma = (x - D(x; sigma)) /
  sigma`` from ``sigma_min`` to ``sigma_max`` in the time ``u`` of :func:`~diffjax.schedules.
  edm_sigma` (``sigma(u)`` rho-spaced, so uniform steps in ``u`` follow eq. 5), with the prior
  ``N(0, sigma_max^2 I)`` (the marginal at ``sigma_max`` without the data's share:
  ``sigma_data^2 / sigma_max^2 = 4e-5`` of its variance by default).
  """
  problems = check(
    sigma_data=sigma_data,
    p_mean=p_mean,
    p_std=p_std,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    rho=rho,
    s_churn=s_churn,
    s_tmin=s_tmin,
    s_tmax=s_tmax,
    s_noise=s_noise,
    label_dropout=label_dropout,
  )
  if not context.source_is_normal:
    problems.append("objective 'edm' denoises Gaussian noise into data: set data.source='normal'")
  if problems:
    raise ValueError("; ".join(problems))
  num_classes = context.num_classes
  denoise = preconditioned_denoiser(context.apply, sigma_data=sigma_data)

  def make_example(key, batch, labels):
    return losses_lib.edm_example(
      key, data=batch["x"], sigma_data=sigma_data, p_mean=p_mean, p_std=p_std, cond=labels
    )

  loss_fn = base.regression_loss_fn(context, make_example, label_dropout=label_dropout)

  generate = samplers_lib.edm_generator(
    apply=denoise,
    data_shape=context.data_shape,
    num_classes=num_classes,
    sigma_min=sigma_min,
    sigma_max=sigma_max,
    rho=rho,
    s_churn=s_churn,
    s_tmin=s_tmin,
    s_tmax=s_tmax,
    s_noise=s_noise,
    default_sampler=DEFAULT_SAMPLER,
  )

  ramp = schedules_lib.edm_schedule(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  coefficients_fn = lambda u: parameterization.diffusion_coefficients(ramp, u)
  log_likelihood = base.probability_flow_likelihood(
    lambda params: samplers_lib.velocity_field(
      lambda x, u: denoise(params, x, ramp.sigma(u), None),
      target=parameterization.get_prediction_target("x0"),
      coefficients_fn=coefficients_fn,
    ),
    data_time=0.0,
    noise_time=1.0,
    data_shape=context.data_shape,
    prior_std=sigma_max,
  )
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=None,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


SPEC = base.ObjectiveSpec(
  build=edm,
  check=check,
  samplers=samplers_lib.CONTINUOUS_SAMPLERS,
  default_sampler=DEFAULT_SAMPLER,
  output="F of EDM's denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)",
  summary="EDM (Karras et al. 2022): preconditioned denoiser, log-normal sigma, Heun with churn",
)
