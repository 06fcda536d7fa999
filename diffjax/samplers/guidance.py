"""Guidance: a conditional prediction pushed away from a reference prediction.

Every rule here forms a guided prediction from the conditional network ``cond(x, t)`` and a
reference ``ref(x, t)`` at the same ``(x_t, t)``, with weight ``w`` (``w = 1``: the conditional
model alone):

* classifier-free guidance (CFG), ``ref`` the null-label prediction: ``ref + w (cond - ref)``
  (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6,
  https://arxiv.org/abs/2207.12598, write ``eps~ = (1 + w') eps(x, c) - w' eps(x)``, i.e.
  ``w = 1 + w'`` here). Flow-matching models guide the velocity the same way (Zheng et al. 2023,
  "Guided Flows", https://arxiv.org/abs/2311.13443).
* the guidance interval: CFG only for ``t`` in ``[t_lo, t_hi]``, the conditional prediction
  outside (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
  and Distribution Quality in Diffusion Models", https://arxiv.org/abs/2404.07724), see
  :func:`interval_scale`.
* autoguidance: ``ref`` is a weaker model of the same conditioning (smaller or trained
  shorter), ``D_w = D_guide + w (D_main - D_guide)`` (Karras et al. 2024, "Guiding a Diffusion
  Model with a Bad Version of Itself", eq. 2, https://arxiv.org/abs/2406.02507):
  :func:`autoguidance`.
* adaptive projected guidance (APG): the update ``cond - ref`` in the denoised (x0) space,
  rescaled to norm at most ``r``, split into its parts parallel and orthogonal to the
  conditional x0 prediction, the parallel part scaled by ``eta``, optionally averaged with a
  reverse momentum ``beta`` over the sampling steps (Sadat et al. 2024, "Eliminating
  Oversaturation and Artifacts of High Guidance Scales in Diffusion Models", Sec. 4 and
  Algorithm 1, https://arxiv.org/abs/2410.02416): :func:`adaptive_projected_guidance`.

Which target space CFG and autoguidance mix in does not matter: every conversion between targets
(:mod:`diffjax.parameterization`) is affine in the prediction at fixed ``(x_t, t)``, and
``(1 - w) ref + w cond`` is an affine combination (weights sum to one), so mixing eps, x0, v,
velocity or score predictions gives the same guided ``(x0, eps)``. APG is not affine in the
predictions (the projection onto ``cond`` and the norm cap are not), so its target space matters:
it is defined on the denoised prediction ``D(x, c) = x0_hat``, and a velocity, eps, v or score
model is converted to ``x0_hat`` first and back after (:func:`apg_in_x0_space`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from diffjax.parameterization import PredictionTarget
from diffjax.samplers.fields import (
  CoefficientsFn,
  Predictor,
  SamplerOutput,
  prepend_initial,
  velocity_field,
)
from diffjax.shapes import broadcast_to_data

__all__ = [
  "APG",
  "Guidance",
  "classifier_free_guidance",
  "batched_classifier_free_guidance",
  "interval_scale",
  "guidance_interval",
  "autoguidance",
  "project",
  "cap_norm",
  "momentum_average",
  "apg_update",
  "adaptive_projected_guidance",
  "apg_in_x0_space",
  "guided_predictor",
  "apg_momentum_euler_sampler",
]


@dataclasses.dataclass(frozen=True)
class APG:
  """Adaptive projected guidance's settings (Sadat et al. 2024, Algorithm 1).

  Attributes:
    eta: the weight of the update's part parallel to the conditional prediction (0: dropped,
      the paper's choice; 1 with ``norm_threshold = inf`` and ``momentum = 0``: CFG).
    norm_threshold: ``r``, the largest norm of the update per example (``inf``: no cap).
    momentum: ``beta``, the running average ``m_k = diff_k + beta m_{k-1}`` over the sampler's
      steps (the paper's reverse momentum is negative; 0: none).
  """

  eta: float = 0.0
  norm_threshold: float = math.inf
  momentum: float = 0.0


@dataclasses.dataclass(frozen=True)
class Guidance:
  """How a guided prediction is formed beyond plain CFG (hashable: it keys a compiled program).

  Attributes:
    interval: ``(t_lo, t_hi)`` in the sampler's model time: guidance weight ``w`` inside, 1
      outside (None: everywhere).
    apg: APG's settings (None: the affine rule ``ref + w (cond - ref)``).
  """

  interval: tuple[float, float] | None = None
  apg: APG | None = None


def _mix(uncond: Array, cond: Array, scale) -> Array:
  """``uncond + w (cond - uncond)`` with ``w`` a scalar or one weight per example."""
  w = broadcast_to_data(jnp.asarray(scale, cond.dtype), cond)
  return uncond + w * (cond - uncond)


def classifier_free_guidance(
  predict_cond: Predictor, predict_uncond: Predictor, *, scale: float | Array
) -> Predictor:
  """``(x, t) -> uncond(x, t) + scale (cond(x, t) - uncond(x, t))`` (Ho & Salimans 2022, eq. 6).

  Args:
    predict_cond: the network with the condition, ``(x, t) -> prediction``.
    predict_uncond: the network with the null condition, same target.
    scale: guidance weight ``w`` (1 = no guidance); a scalar or ``[batch]``.
  """

  def predict(x: Array, t: Array) -> Array:
    return _mix(predict_uncond(x, t), predict_cond(x, t), scale)

  return predict


def batched_classifier_free_guidance(
  apply: Callable[..., Array], params: Any, *, cond: Any, null_cond: Any, scale: float | Array
) -> Predictor:
  """Classifier-free guidance with one network call on a doubled batch.

  ``apply(params, [x; x], [t; t], [cond; null_cond])`` is split into the conditional and
  unconditional halves and combined as in :func:`classifier_free_guidance`: half the calls of
  two separate evaluations, the usual implementation (Ho & Salimans 2022, Sec. 3.2).

  Args:
    apply: ``apply(params, x_t, t, cond) -> prediction``.
    params: the network's parameters.
    cond: per-example conditions (a pytree with leading axis ``[batch]``).
    null_cond: the null condition in the same structure (e.g. labels equal to ``num_classes``).
    scale: guidance weight ``w``.
  """
  both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)

  def predict(x: Array, t: Array) -> Array:
    out = apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond_out, uncond_out = jnp.split(out, 2)
    return _mix(uncond_out, cond_out, scale)

  return predict


# ---- the guidance interval -------------------------------------------------------------------


def interval_scale(t: Array, *, scale: float | Array, t_lo: float, t_hi: float) -> Array:
  """``w(t) = scale`` for ``t_lo <= t <= t_hi``, else 1 (one weight per example of ``t``).

  Kynkaanniemi et al. (2024, eq. 2, https://arxiv.org/abs/2404.07724) guide only for noise
  levels ``sigma`` in ``(sigma_lo, sigma_hi]`` and use the conditional model elsewhere. Here the
  interval is in the sampler's model time ``t``; the noise level of a Gaussian process is
  ``sigma / alpha = exp(-lambda(t) / 2)``, monotone in ``t``, so a sigma interval is a time
  interval: for the linear flow path (``alpha = t``, ``sigma = 1 - t``, data at ``t = 1``)
  ``t = 1 / (1 + sigma)``, so ``(sigma_lo, sigma_hi]`` is ``[1 / (1 + sigma_hi), 1 / (1 +
  sigma_lo))``; for a diffusion schedule (data at ``t = 0``) ``t = lambda^{-1}(-2 log sigma)``
  (:func:`~diffjax.samplers.fields.time_of_log_snr`), with the ends in the same order; for EDM's
  denoiser the model time is ``sigma`` itself.

  Args:
    t: ``[batch]`` model times.
    scale: the guidance weight ``w`` (scalar or ``[batch]``).
    t_lo, t_hi: the interval's ends in model time, ``t_lo < t_hi``.
  """
  inside = (t >= t_lo) & (t <= t_hi)
  return jnp.where(inside, jnp.asarray(scale, jnp.result_type(t, float)), 1.0)


def guidance_interval(
  predict_cond: Predictor,
  predict_uncond: Predictor,
  *,
  scale: float | Array,
  t_lo: float,
  t_hi: float,
) -> Predictor:
  """``(x, t) -> uncond + w(t) (cond - uncond)`` with ``w(t)`` of :func:`interval_scale`: CFG
  inside ``[t_lo, t_hi]``, the conditional prediction outside (Kynkaanniemi et al. 2024, eq. 2,
  https://arxiv.org/abs/2404.07724)."""

  def predict(x: Array, t: Array) -> Array:
    w = interval_scale(t, scale=scale, t_lo=t_lo, t_hi=t_hi)
    return _mix(predict_uncond(x, t), predict_cond(x, t), w)

  return predict


def autoguidance(
  predict_main: Predictor, predict_guide: Predictor, *, scale: float | Array
) -> Predictor:
  """``(x, t) -> D_guide + w (D_main - D_guide)``, both with the same condition (Karras et al.
  2024, eq. 2, https://arxiv.org/abs/2406.02507): the guide is a weaker model (smaller, trained
  shorter) whose errors the extrapolation moves away from. Affine in the predictions, so any
  common target serves (module docstring); ``w = 1`` is the main model.

  Args:
    predict_main: the main conditional model, ``(x, t) -> prediction``.
    predict_guide: the guide, same condition and target.
    scale: the guidance weight ``w``.
  """
  return classifier_free_guidance(predict_main, predict_guide, scale=scale)


# ---- adaptive projected guidance -------------------------------------------------------------


def _per_example_dot(a: Array, b: Array) -> Array:
  """``<a_i, b_i>`` over every axis but the first, kept as ``[batch, 1, ..., 1]``."""
  axes = tuple(range(1, a.ndim))
  return jnp.sum(a * b, axis=axes, keepdims=True)


def project(update: Array, *, onto: Array) -> tuple[Array, Array]:
  """``(parallel, orthogonal)`` parts of ``update`` relative to ``onto``, per example:
  ``parallel = <update, u> u`` with ``u = onto / ||onto||``, ``orthogonal = update - parallel``
  (Sadat et al. 2024, Sec. 4.1, https://arxiv.org/abs/2410.02416). ``onto = 0`` gives a zero
  parallel part.

  Args:
    update: ``[batch, *event]``.
    onto: ``[batch, *event]``, the conditional prediction.
  """
  norm = jnp.sqrt(_per_example_dot(onto, onto))
  unit = onto / jnp.where(norm > 0, norm, 1.0)
  parallel = _per_example_dot(update, unit) * unit
  return parallel, update - parallel


def cap_norm(update: Array, *, threshold: float) -> Array:
  """``update min(1, r / ||update||)`` per example: the update rescaled into the ball of radius
  ``r = threshold`` (Sadat et al. 2024, Sec. 4.2, https://arxiv.org/abs/2410.02416)."""
  if math.isinf(threshold):
    return update
  norm = jnp.sqrt(_per_example_dot(update, update))
  return update * jnp.minimum(1.0, threshold / jnp.where(norm > 0, norm, 1.0))


def momentum_average(buffer: Array, diff: Array, *, momentum: float) -> Array:
  """``m_k = diff_k + beta m_{k-1}``, ``m_0 = 0``: the reverse momentum of Sadat et al. (2024,
  Sec. 4.3 and Algorithm 1, https://arxiv.org/abs/2410.02416) with ``beta < 0``."""
  return diff + momentum * buffer


def apg_update(diff: Array, *, cond: Array, eta: float, norm_threshold: float) -> Array:
  """``orthogonal + eta parallel`` of ``cap_norm(diff, r)`` relative to ``cond`` (Sadat et al.
  2024, Algorithm 1, https://arxiv.org/abs/2410.02416)."""
  parallel, orthogonal = project(cap_norm(diff, threshold=norm_threshold), onto=cond)
  return orthogonal + eta * parallel


def adaptive_projected_guidance(
  cond: Array,
  ref: Array,
  *,
  scale: float | Array,
  apg: APG,
  buffer: Array | None = None,
) -> tuple[Array, Array]:
  """``(guided, buffer)`` with ``guided = cond + (w - 1) apg_update(m)``, ``m = (cond - ref) +
  beta buffer`` (Sadat et al. 2024, Algorithm 1, https://arxiv.org/abs/2410.02416), on
  denoised (x0) predictions.

  With ``eta = 1``, ``r = inf`` and ``beta = 0`` this is CFG, ``ref + w (cond - ref)``.

  Args:
    cond: ``[batch, *event]`` the conditional x0 prediction.
    ref: the reference's x0 prediction (null label, or an autoguidance guide).
    scale: ``w`` (scalar or ``[batch]``).
    apg: the settings.
    buffer: the previous running average (None: zeros, the first step).

  Returns:
    The guided x0 prediction and the new running average ``m``.
  """
  diff = cond - ref
  if buffer is not None:
    diff = momentum_average(buffer, diff, momentum=apg.momentum)
  update = apg_update(diff, cond=cond, eta=apg.eta, norm_threshold=apg.norm_threshold)
  w = broadcast_to_data(jnp.asarray(scale, cond.dtype), cond)
  return cond + (w - 1.0) * update, diff


def apg_in_x0_space(
  pred_cond: Array,
  pred_ref: Array,
  *,
  x: Array,
  t: Array,
  scale: float | Array,
  apg: APG,
  target: PredictionTarget,
  coefficients_fn: CoefficientsFn,
  buffer: Array | None = None,
) -> tuple[Array, Array]:
  """APG of two predictions of ``target`` at ``(x, t)``, computed on their x0 estimates.

  ``(x0, eps) = target.to_x0_eps(pred)`` (:mod:`diffjax.parameterization`); APG gives ``x0_g =
  x0_c + (w - 1) u``. Holding ``x_t = alpha x0 + sigma eps`` fixed, the noise estimate moves by
  ``-(alpha / sigma) (w - 1) u``, and ``target.from_x0_eps(x0_g, eps_g)`` is the guided
  prediction in the network's own target (a velocity model: ``d_alpha x0_g + d_sigma eps_g``).
  At ``sigma = 0`` (no noise left) ``eps`` is left as the conditional one: there an eps, v,
  velocity or score model's ``x0 = x / alpha`` does not depend on the network (``u = 0``), and
  an x0 model's guided ``x0_g`` is returned as it is.

  Returns:
    The guided prediction (``target``'s space) and the new running average (x0 space).
  """
  coefficients = coefficients_fn(t)
  x0_c, eps_c = target.to_x0_eps(pred_cond, x_t=x, coefficients=coefficients)
  x0_r, _ = target.to_x0_eps(pred_ref, x_t=x, coefficients=coefficients)
  x0_g, buffer = adaptive_projected_guidance(x0_c, x0_r, scale=scale, apg=apg, buffer=buffer)
  alpha = broadcast_to_data(coefficients.alpha, x)
  sigma = broadcast_to_data(coefficients.sigma, x)
  ratio = jnp.where(sigma > 0, alpha / jnp.where(sigma > 0, sigma, 1.0), 0.0)
  eps_g = eps_c - ratio * (x0_g - x0_c)
  return target.from_x0_eps(x0_g, eps_g, coefficients=coefficients), buffer


def _scale_at(t: Array, scale, guidance: Guidance):
  if guidance.interval is None:
    return scale
  t_lo, t_hi = guidance.interval
  return interval_scale(t, scale=scale, t_lo=t_lo, t_hi=t_hi)


def guided_predictor(
  predict_cond: Predictor,
  predict_ref: Predictor,
  *,
  scale: float | Array,
  guidance: Guidance,
  target: PredictionTarget | None = None,
  coefficients_fn: CoefficientsFn | None = None,
) -> Predictor:
  """The stateless guided predictor of ``guidance``: ``ref + w(t) (cond - ref)``, or APG in x0
  space (:func:`apg_in_x0_space`, which needs ``target`` and ``coefficients_fn``), with
  ``w(t)`` of :func:`interval_scale` when ``guidance.interval`` is set. APG's momentum needs
  state across steps: :func:`apg_momentum_euler_sampler`."""
  apg = guidance.apg
  if apg is not None and (target is None or coefficients_fn is None):
    raise ValueError(
      "APG works on the x0 prediction: pass target and coefficients_fn (a model of a Gaussian "
      "process), or use CFG"
    )
  if apg is not None and apg.momentum != 0:
    raise ValueError(
      f"APG momentum={apg.momentum!r} needs state across steps: sample with "
      "apg_momentum_euler_sampler, or set momentum=0"
    )

  def predict(x: Array, t: Array) -> Array:
    w = _scale_at(t, scale, guidance)
    cond, ref = predict_cond(x, t), predict_ref(x, t)
    if apg is None:
      return _mix(ref, cond, w)
    guided, _ = apg_in_x0_space(
      cond, ref, x=x, t=t, scale=w, apg=apg, target=target, coefficients_fn=coefficients_fn
    )
    return guided

  return predict


def apg_momentum_euler_sampler(
  *,
  times: Array,
  target: PredictionTarget,
  coefficients_fn: CoefficientsFn,
  guidance: Guidance,
):
  """Euler steps of the probability-flow ODE ``dx/dt = d_alpha x0_g + d_sigma eps_g`` with the
  APG prediction of :func:`apg_in_x0_space`, its running average ``m`` carried through the
  ``jax.lax.scan`` over ``times`` (one update per step, as each step evaluates the networks
  once; Sadat et al. 2024, Algorithm 1, https://arxiv.org/abs/2410.02416).

  Returns ``sample(key, predict, noise, *, predict_uncond, guidance_scale,
  return_trajectory=False) -> SamplerOutput``, the registry's signature
  (:mod:`diffjax.samplers.registry`) with ``predict_uncond`` the reference (required). Like the
  registry's "euler" of a velocity model it starts from ``noise`` as given: the flow's source
  draws at ``times[0]``.
  """
  if guidance.apg is None:
    raise ValueError("apg_momentum_euler_sampler needs guidance.apg; use the registry's 'euler'")
  times = jnp.asarray(times)

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ) -> SamplerOutput:
    del key
    if predict_uncond is None:
      raise ValueError("APG needs the reference prediction: pass predict_uncond")
    x_init = noise
    batch = noise.shape[0]

    def body(carry, t_pair):
      x, buffer = carry
      t = jnp.full((batch,), t_pair[0], x.dtype)
      w = _scale_at(t, guidance_scale, guidance)
      guided, buffer = apg_in_x0_space(
        predict(x, t),
        predict_uncond(x, t),
        x=x,
        t=t,
        scale=w,
        apg=guidance.apg,
        target=target,
        coefficients_fn=coefficients_fn,
        buffer=buffer,
      )
      velocity = velocity_field(
        lambda _x, _t: guided, target=target, coefficients_fn=coefficients_fn
      )(x, t)
      x_next = x + (t_pair[1] - t_pair[0]).astype(x.dtype) * velocity
      return (x_next, buffer), (x_next if return_trajectory else None)

    (final, _), path = jax.lax.scan(body, (x_init, jnp.zeros_like(x_init)), (times[:-1], times[1:]))
    trajectory = prepend_initial(x_init, path) if return_trajectory else None
    nfe = jnp.asarray(times.shape[0] - 1, jnp.int32)
    return SamplerOutput(samples=final, trajectory=trajectory, nfe=nfe)

  return sample
