"""Sampling and likelihood for diffusion and flow-matching models.

Modules (private detail; import from here):

* :mod:`~diffjax.samplers.fields`: adaptors from ``predict(x, t)`` + a
  :class:`~diffjax.parameterization.PredictionTarget` + ``coefficients_fn(t)`` to denoisers and
  probability-flow velocity fields; the :class:`SamplerOutput` type.
* :mod:`~diffjax.samplers.grids`: time grids (uniform, EDM rho, log-SNR) and DDPM step spacings
  (linspace, leading, trailing).
* :mod:`~diffjax.samplers.ode`: fixed-step Euler, Heun, midpoint, RK4 over any grid.
* :mod:`~diffjax.samplers.adaptive`: Dopri5 / Tsit5 / Dopri8 through diffrax, with NFE.
* :mod:`~diffjax.samplers.diffusion`: DDPM ancestral, DDIM, Euler-ancestral, DPM-Solver++ 2M/3M.
* :mod:`~diffjax.samplers.edm`: EDM's stochastic sampler (Karras et al. 2022, Algorithm 2).
* :mod:`~diffjax.samplers.multistep`: UniPC, DEIS, DPM-Solver++(2M) SDE.
* :mod:`~diffjax.samplers.sde`: reverse-SDE samplers (Euler-Maruyama, stochastic Heun,
  predictor-corrector) and the score of any prediction target.
* :mod:`~diffjax.samplers.consistency`: multistep consistency sampling (Song et al. 2023).
* :mod:`~diffjax.samplers.guidance`: classifier-free guidance, the guidance interval,
  autoguidance and adaptive projected guidance (APG).
* :mod:`~diffjax.samplers.likelihood`: log-likelihood through the probability-flow ODE, bits/dim.
* :mod:`~diffjax.samplers.registry`: :func:`get_sampler`, every sampler by name behind one
  signature ``sample(key, predict, noise, *, predict_uncond=None, guidance_scale=1.0,
  return_trajectory=False) -> SamplerOutput``.
* :mod:`~diffjax.samplers.generate`: generators for trained models (the training code's edge).
"""

from diffjax.samplers.adaptive import (
  ADAPTIVE_SOLVERS,
  evaluations_per_step,
  get_adaptive_solver,
  integrate_adaptive,
)
from diffjax.samplers.consistency import (
  consistency_sampler,
  multistep_consistency_sample,
  multistep_times,
)
from diffjax.samplers.diffusion import (
  DDPM_VARIANCES,
  ddim_sample,
  ddpm_sample,
  default_time_of_step,
  discrete_coefficients,
  dpm_solver_pp_sample,
  euler_ancestral_sample,
  get_ddpm_variance,
  interpolated_coefficients_fn,
  large_variance,
  small_variance,
)
from diffjax.samplers.edm import edm_sample
from diffjax.samplers.fields import (
  CoefficientsFn,
  Denoiser,
  Predictor,
  SamplerOutput,
  SigmaDenoiser,
  VelocityField,
  denoiser,
  log_snr_of,
  ode_field,
  sigma_denoiser,
  time_of_log_snr,
  velocity_field,
)
from diffjax.samplers.generate import (
  CONSISTENCY_SAMPLERS,
  CONTINUOUS_SAMPLERS,
  FLOW_SAMPLERS,
  GAUSSIAN_FLOW_SAMPLERS,
  GAUSSIAN_SAMPLERS,
  consistency_generator,
  continuous_diffusion_generator,
  diffusion_generator,
  edm_generator,
  flow_generator,
  noise_level_coefficients,
)
from diffjax.samplers.grids import (
  DISCRETE_STEPS,
  TIME_GRIDS,
  check_sampling_direction,
  edm_grid,
  edm_sigmas,
  get_discrete_steps,
  get_time_grid,
  leading_steps,
  linspace_steps,
  log_snr_grid,
  sampling_interval,
  shift_times,
  shifted_grid,
  trailing_steps,
  uniform_grid,
)
from diffjax.samplers.guidance import batched_classifier_free_guidance, classifier_free_guidance
from diffjax.samplers.likelihood import (
  DIVERGENCES,
  PIXEL_BIN_WIDTH,
  PROBES,
  LikelihoodOutput,
  bits_per_dim,
  dequantize,
  exact_divergence,
  gaussian_probes,
  get_divergence,
  get_probes,
  hutchinson_divergence,
  log_likelihood,
  rademacher_probes,
  standard_normal_log_prob,
)
from diffjax.samplers.multistep import (
  DPMPP_SDE_SOLVER_TYPES,
  UNIPC_VARIANTS,
  deis_coefficients,
  deis_sample,
  dpmpp_2m_sde_sample,
  get_dpmpp_sde_solver_type,
  get_unipc_variant,
  unipc_sample,
)
from diffjax.samplers.ode import (
  FIXED_STEP_METHODS,
  FixedStepMethod,
  ODESolution,
  euler_step,
  get_fixed_step_method,
  heun_step,
  integrate_fixed,
  midpoint_step,
  rk4_step,
)
from diffjax.samplers.registry import SAMPLERS, Sampler, get_sampler
from diffjax.samplers.sde import (
  euler_maruyama_sample,
  pc_sample,
  reverse_sde,
  score_field,
  sde_heun_sample,
)

__all__ = [
  # fields
  "Predictor",
  "CoefficientsFn",
  "Denoiser",
  "VelocityField",
  "SigmaDenoiser",
  "SamplerOutput",
  "log_snr_of",
  "denoiser",
  "velocity_field",
  "ode_field",
  "time_of_log_snr",
  "sigma_denoiser",
  # grids
  "sampling_interval",
  "check_sampling_direction",
  "uniform_grid",
  "edm_sigmas",
  "edm_grid",
  "log_snr_grid",
  "shift_times",
  "shifted_grid",
  "TIME_GRIDS",
  "get_time_grid",
  "linspace_steps",
  "leading_steps",
  "trailing_steps",
  "DISCRETE_STEPS",
  "get_discrete_steps",
  # ode
  "ODESolution",
  "euler_step",
  "heun_step",
  "midpoint_step",
  "rk4_step",
  "FixedStepMethod",
  "FIXED_STEP_METHODS",
  "get_fixed_step_method",
  "integrate_fixed",
  # adaptive
  "ADAPTIVE_SOLVERS",
  "get_adaptive_solver",
  "evaluations_per_step",
  "integrate_adaptive",
  # diffusion
  "default_time_of_step",
  "discrete_coefficients",
  "interpolated_coefficients_fn",
  "small_variance",
  "large_variance",
  "DDPM_VARIANCES",
  "get_ddpm_variance",
  "ddpm_sample",
  "ddim_sample",
  "euler_ancestral_sample",
  "dpm_solver_pp_sample",
  # edm
  "edm_sample",
  # multistep
  "UNIPC_VARIANTS",
  "get_unipc_variant",
  "unipc_sample",
  "deis_coefficients",
  "deis_sample",
  "DPMPP_SDE_SOLVER_TYPES",
  "get_dpmpp_sde_solver_type",
  "dpmpp_2m_sde_sample",
  # sde
  "score_field",
  "reverse_sde",
  "euler_maruyama_sample",
  "sde_heun_sample",
  "pc_sample",
  # guidance
  "classifier_free_guidance",
  "batched_classifier_free_guidance",
  # likelihood
  "DIVERGENCES",
  "exact_divergence",
  "hutchinson_divergence",
  "get_divergence",
  "rademacher_probes",
  "gaussian_probes",
  "PROBES",
  "get_probes",
  "standard_normal_log_prob",
  "LikelihoodOutput",
  "log_likelihood",
  "PIXEL_BIN_WIDTH",
  "dequantize",
  "bits_per_dim",
  # registry and generators
  "Sampler",
  "SAMPLERS",
  "get_sampler",
  "FLOW_SAMPLERS",
  "GAUSSIAN_SAMPLERS",
  "GAUSSIAN_FLOW_SAMPLERS",
  "flow_generator",
  "CONSISTENCY_SAMPLERS",
  "consistency_generator",
  "multistep_times",
  "multistep_consistency_sample",
  "consistency_sampler",
  "diffusion_generator",
  "CONTINUOUS_SAMPLERS",
  "continuous_diffusion_generator",
  "edm_generator",
  "noise_level_coefficients",
]
