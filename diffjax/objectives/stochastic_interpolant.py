"""Stochastic interpolants: one network with a drift head and a denoiser head, sampled by the
generative SDE at any ``epsilon``.

Albergo, Boffi & Vanden-Eijnden (2023), https://arxiv.org/abs/2303.08797, with the interpolant
``x_t = alpha x0 + beta x1 + gamma z`` of :mod:`diffjax.interpolants` (base ``x0`` from the
source at ``t = 0``, data ``x1`` at ``t = 1``, independent pairs). The model's last axis holds
two blocks of the data's channels (``ObjectiveSpec.output_heads = 2``): the drift ``b_hat`` and
the denoiser ``eta_hat``. The loss is the sum of the paper's two quadratic objectives (Sec. 2.3),
written as regressions (each differs from its quadratic form by a model-free constant, so the
gradients agree):

    L = E ||b_hat(t, x_t) - (d_alpha x0 + d_beta x1 + d_gamma z)||^2 / D
      + E ||eta_hat(t, x_t) - z||^2 / D,          t ~ U(t_min, 1 - t_min).

Times stay ``t_min`` away from the ends, where ``gamma = 0``: there the drift target's
``d_gamma z`` has infinite variance (``sqrt`` gamma) and the score ``-eta / gamma`` is 0 / 0.

Sampling ("euler_maruyama", the default) integrates ``dX = (b + eps s) dt + sqrt(2 eps) dW``
with ``s = -eta_hat / gamma`` by Euler-Maruyama on a uniform grid from ``t_min`` to 1, started
from source draws (the start replaces ``x_{t_min}`` by ``x_0``: a bias of order ``t_min``); the
fields are evaluated only at the left end of each step, so never at ``t = 1``. ``epsilon = 0`` is
Euler on the probability-flow ODE ``dX = b dt``. The ODE solvers of
:data:`~diffjax.samplers.FLOW_SAMPLERS` integrate ``b`` from 0 to 1, and with an ``N(0, I)``
source the same ODE gives the likelihood.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import interpolants as interpolants_lib
from diffjax import losses as losses_lib
from diffjax import samplers as samplers_lib
from diffjax.objectives import base
from diffjax.samplers.generate import make_generate
from diffjax.samplers.registry import guided, on_head
from diffjax.samplers.sde import euler_maruyama_integrate

__all__ = ["stochastic_interpolant", "check", "split_heads", "SAMPLERS", "SPEC"]

SDE_SAMPLER = "euler_maruyama"
SAMPLERS = (SDE_SAMPLER,) + samplers_lib.FLOW_SAMPLERS
"""The generative SDE by Euler-Maruyama, and the ODE solvers on the drift head."""


def split_heads(output):
  """``(b_hat, eta_hat)``: the two blocks of the model output's last axis."""
  drift, denoiser = jnp.split(output, 2, axis=-1)
  return drift, denoiser


def _sde_sampler(path, *, times, epsilon):
  """The forward generative SDE by :func:`~diffjax.samplers.sde.euler_maruyama_integrate`,
  with the one signature of :class:`~diffjax.samplers.Sampler`."""

  def sample(
    key, predict, noise, *, predict_uncond=None, guidance_scale=1.0, return_trajectory=False
  ):
    predict = guided(predict, predict_uncond, guidance_scale)

    def fields(x, t):
      drift, denoiser = split_heads(predict(x, t))
      gamma = path.coefficients(t)[2].astype(x.dtype)
      return drift, interpolants_lib.score_from_denoiser(eta_z=denoiser, gamma=gamma)

    terms = interpolants_lib.generative_sde(fields, epsilon=epsilon)
    return euler_maruyama_integrate(
      key, terms, noise, times=times, return_trajectory=return_trajectory
    )

  return sample


def _drift_head(output):
  return split_heads(output)[0]


def stochastic_interpolant(
  context: base.ObjectiveContext,
  *,
  interpolant: str = "linear",
  gamma: str = "sqrt",
  a: float = 1.0,
  epsilon: float = 1.0,
  t_min: float = 1e-3,
  label_dropout: float = 0.0,
) -> base.Objective:
  """Stochastic interpolants (Albergo et al. 2023, https://arxiv.org/abs/2303.08797).

  Args:
    context: the model and the source (:class:`~diffjax.objectives.base.ObjectiveContext`).
    interpolant: "linear" (``alpha = 1 - t``, ``beta = t``) or "trig" (``cos``, ``sin`` of
      ``pi t / 2``), :data:`~diffjax.interpolants.INTERPOLANTS`.
    gamma: "sqrt" (``sqrt(a t (1 - t))``) or "quadratic" (``sqrt(a) t (1 - t)``).
    a: the scale of ``gamma^2``.
    epsilon: the generative SDE's ``eps >= 0`` (0: the ODE of the drift).
    t_min: training times are ``U(t_min, 1 - t_min)``; the SDE runs from ``t_min`` to 1.
    label_dropout: fraction of labels replaced by the null label (classifier-free guidance).
  """
  path = interpolants_lib.stochastic_interpolant(interpolant=interpolant, gamma=gamma, a=a)
  num_classes = context.num_classes

  def pair_fn(key, batch):
    k_source, _ = jax.random.split(key)
    x1 = batch["x"]
    paired = {"x0": context.source(k_source, x1.shape[0]), "x": x1}
    if num_classes and "label" in batch:
      paired["label"] = batch["label"]
    return paired

  def loss_fn(params, key, batch):
    k_time, k_noise, k_labels, k_dropout = jax.random.split(key, 4)
    x0, x1 = batch["x0"], batch["x"]
    t = jax.random.uniform(k_time, x1.shape[:1], minval=t_min, maxval=1.0 - t_min)
    z = jax.random.normal(k_noise, x1.shape, x1.dtype)
    example = path.interpolate(x0=x0, x1=x1, t=t, z=z)
    labels = batch.get("label") if num_classes else None
    labels = base.drop_labels_for_guidance(
      k_labels, labels, num_classes=num_classes, label_dropout=label_dropout
    )
    output = context.apply(params, example["x_t"], t, labels, dropout_key=k_dropout)
    drift, denoiser = split_heads(output)
    ones = jnp.ones_like(t)
    regress = lambda prediction, target: losses_lib.regression_loss(
      prediction, losses_lib.TrainingExample(example["x_t"], t, labels, target, ones)
    )
    return regress(drift, example["target"]) + regress(denoiser, z)

  def build(name: str, steps: int):
    if name == SDE_SAMPLER:
      times = samplers_lib.uniform_grid(num_steps=steps, t_start=t_min, t_end=1.0)
      return _sde_sampler(path, times=times, epsilon=epsilon)
    if name in samplers_lib.FLOW_SAMPLERS:
      times = samplers_lib.uniform_grid(num_steps=steps, t_start=0.0, t_end=1.0)
      return on_head(samplers_lib.get_sampler(name, target="velocity", times=times), _drift_head)
    raise ValueError(
      f"sampler {name!r} cannot sample a stochastic interpolant; choose one of {list(SAMPLERS)}"
    )

  # The generator shared by every objective (sampler cache, chunks, labels, guidance).
  generate = make_generate(
    build, apply=context.apply, source=context.source, default=SDE_SAMPLER, num_classes=num_classes
  )

  log_likelihood = None
  if context.source_is_normal:
    # x_0 = x0 exactly, so rho_0 = N(0, I) and the ODE of b carries it to the data.
    drift_of = lambda params: lambda x, t: split_heads(context.apply(params, x, t, None))[0]
    log_likelihood = base.flow_likelihood(context, drift_of)
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=pair_fn,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


def check(
  *,
  interpolant: str = "linear",
  gamma: str = "sqrt",
  a: float = 1.0,
  epsilon: float = 1.0,
  t_min: float = 1e-3,
  label_dropout: float = 0.0,
) -> list[str]:
  """Unknown names and out-of-range values, one line each."""
  problems = []
  for key, value, table in (
    ("interpolant", interpolant, interpolants_lib.INTERPOLANTS),
    ("gamma", gamma, interpolants_lib.GAMMAS),
  ):
    if value not in table:
      problems.append(f"objective.{key}={value!r}: unknown; choose one of {sorted(table)}")
  if not a > 0:
    problems.append(f"objective.a={a!r}: the scale of gamma^2 must be > 0")
  if not epsilon >= 0:
    problems.append(f"objective.epsilon={epsilon!r}: must be >= 0 (0: the ODE of the drift)")
  if not 0.0 < t_min < 0.5:
    problems.append(
      f"objective.t_min={t_min!r}: must lie in (0, 0.5); gamma = 0 at t = 0 and 1 makes the "
      "score -eta / gamma singular there (e.g. 1e-3)"
    )
  problems += base.label_dropout_problems(label_dropout)
  return problems


SPEC = base.ObjectiveSpec(
  build=stochastic_interpolant,
  check=check,
  samplers=SAMPLERS,
  default_sampler=SDE_SAMPLER,
  output="drift b and denoiser eta_z (two heads)",
  summary="Stochastic interpolant: drift + denoiser heads, SDE at any epsilon (Albergo et al.)",
  any_source=True,
  output_heads=2,
)
