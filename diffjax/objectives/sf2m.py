"""SF2M: simulation-free Schrodinger bridges by score and flow matching (Tong, Malkin, Fatras,
Atanackovic, Zhang, Huguet, Wolf & Bengio 2023, https://arxiv.org/abs/2307.03672).

Flow time runs from the source (``t = 0``) to the data (``t = 1``). Pairs ``(x0, x1)`` are drawn
from the entropic OT plan of the batch with regularisation ``2 sigma^2`` (the static Schrodinger
bridge for the reference ``sigma W``; each ``x0`` draws its partner from its row of the plan,
:func:`~diffjax.couplings.sinkhorn_coupling`). Between them runs the Brownian bridge

    x_t = mu_t + sigma_t z,   mu_t = (1 - t) x0 + t x1,   sigma_t = sigma sqrt(t (1 - t)),

whose conditional probability-flow velocity and score are

    u_t = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + (x1 - x0),
    s_t = grad_x log N(x_t; mu_t, sigma_t^2 I) = -(x_t - mu_t) / (sigma^2 t (1 - t)) = -z / sigma_t.

One network with two output heads (``ObjectiveSpec.output_heads = 2``: ``[v, s]`` along the last
axis) regresses both (the paper's Alg. 3):

    L = E ||v(x_t, t) - u_t||^2 + E ||sigma_t s(x_t, t) + z||^2.

The score term is ``lambda(t)^2 ||(g^2 / 2) (s - s_t)||^2`` with the paper's ``lambda(t) = 2
sigma_t / g^2`` and ``g = sigma``, i.e. ``sigma_t^2 ||s - s_t||^2``: the weighting makes the score
loss the bounded ``||sigma_t s + z||^2``. TorchCFM (``compute_lambda``, ``examples/2D_tutorials/
SF2M_tutorial.ipynb``) writes the same term as ``||lambda(t) s' + z||^2`` for a network ``s' =
(g^2 / 2) s``, the score already scaled as it enters the drift; the two losses are the same number.
The score head here is the score itself, ``grad_x log p_t``.

Times are drawn uniformly in ``[time_eps, 1 - time_eps]``: the flow target's noise term has
variance ``sigma^2 (1 - 2t)^2 / (4 t (1 - t))``, not integrable over ``[0, 1]`` (the Monte Carlo
gradient would have infinite variance), and the score target ``-z / sigma_t`` is infinite at
both ends. With ``time_eps = 1e-3`` the flow target's noise term is at most ``15.8 sigma |z|``.

Generation: the forward SDE ``dx = [v + sigma^2 / 2 s] dt + sigma dW`` by Euler-Maruyama
("euler_maruyama", the default), or the probability-flow ODE ``dx/dt = v`` by the flow samplers
(:mod:`diffjax.samplers.bridge`); both have the bridge's marginals, so for an ``N(0, I)`` source
``log p(x)`` is the ODE's (:func:`~diffjax.objectives.base.flow_likelihood` of the velocity head).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from diffjax import couplings as couplings_lib
from diffjax import losses as losses_lib
from diffjax import paths as paths_lib
from diffjax.objectives import base
from diffjax.samplers import bridge as bridge_lib
from diffjax.shapes import broadcast_to_data

__all__ = [
  "OUTPUT_HEADS",
  "BridgeExample",
  "bridge_score_target",
  "sample_bridge_time",
  "bridge_example",
  "sf2m_loss",
  "entropic_coupling",
  "sf2m",
  "check",
  "SPEC",
]

OUTPUT_HEADS = 2
"""The model's output is ``[v, s]``: the velocity head, then the score head."""


class BridgeExample(NamedTuple):
  """One batch of SF2M regression pairs.

  Attributes:
    t: ``[batch]`` times.
    x_t: ``[batch, ...]`` points on the bridges.
    z: ``[batch, ...]`` the standard normal draws, ``x_t = mu_t + sigma_t z``.
    std: ``[batch]`` ``sigma_t = sigma sqrt(t (1 - t))``.
    flow_target: ``[batch, ...]`` ``u_t``.
  """

  t: Array
  x_t: Array
  z: Array
  std: Array
  flow_target: Array


def bridge_score_target(*, x0: Array, x1: Array, t: Array, x_t: Array, sigma: float) -> Array:
  """``s_t = -(x_t - mu_t) / (sigma^2 t (1 - t))``, ``mu_t = (1 - t) x0 + t x1``: the score of
  the Brownian bridge's Gaussian ``N(mu_t, sigma^2 t (1 - t) I)`` at ``x_t`` (Tong et al. 2023,
  Sec. 3, https://arxiv.org/abs/2307.03672). Infinite at ``t in {0, 1}``.

  Args:
    x0, x1: ``[batch, ...]`` the bridge's end points.
    t: ``[batch]`` times in ``(0, 1)``.
    x_t: ``[batch, ...]`` points.
    sigma: the bridge's noise level.
  """
  tb = broadcast_to_data(t, x_t)
  mean = (1.0 - tb) * x0 + tb * x1
  return -(x_t - mean) / (sigma**2 * tb * (1.0 - tb))


def sample_bridge_time(key: Array, batch: int, *, time_eps: float) -> Array:
  """``t ~ U[time_eps, 1 - time_eps]`` (why the ends are cut: the module docstring)."""
  return time_eps + (1.0 - 2.0 * time_eps) * losses_lib.uniform_time(key, batch)


def bridge_example(
  key: Array, *, x0: Array, x1: Array, sigma: float, time_eps: float
) -> BridgeExample:
  """Times, bridge points and the flow target for the pairs ``(x0, x1)``: ``t ~ U[time_eps, 1 -
  time_eps]``, ``z ~ N(0, I)``, ``x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z`` and ``u_t =
  (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0`` (Tong et al. 2023, Sec. 3,
  https://arxiv.org/abs/2307.03672), from the Brownian-bridge path of :mod:`diffjax.paths`
  (its target is ``d x_t / dt`` at fixed ``(x0, x1, z)``, which is this ``u_t``)."""
  k_time, k_noise = jax.random.split(key)
  t = sample_bridge_time(k_time, x1.shape[0], time_eps=time_eps)
  z = jax.random.normal(k_noise, x1.shape, x1.dtype)
  path = paths_lib.brownian_bridge_path(sigma=sigma, derivative_eps=time_eps)
  out = path.interpolate(x0=x0, x1=x1, t=t, z=z)
  std = path.coefficients(t)[2]
  return BridgeExample(t=t, x_t=out["x_t"], z=z, std=std, flow_target=out["target"])


def sf2m_loss(output: Array, example: BridgeExample) -> Array:
  """``mean (v - u_t)^2 + mean (sigma_t s + z)^2`` over the batch and the data dimensions, ``[v,
  s]`` the two heads of ``output`` (Tong et al. 2023, Alg. 3, https://arxiv.org/abs/2307.03672;
  the score term is ``sigma_t^2 ||s - s_t||^2``, see the module docstring). Per-dimension means,
  as :func:`~diffjax.losses.regression_loss`, so the number is TorchCFM's ``flow_loss +
  score_loss``."""
  output = output.astype(jnp.promote_types(output.dtype, jnp.float32))
  velocity, score = bridge_lib.velocity_and_score(output)
  flow = jnp.mean(jnp.square(velocity - example.flow_target))
  std = broadcast_to_data(example.std, score)
  return flow + jnp.mean(jnp.square(std * score + example.z))


def entropic_coupling(*, sigma: float) -> couplings_lib.Coupling:
  """Pairs from the entropic OT plan with absolute regularisation ``eps = 2 sigma^2``, each
  source point drawing its partner from its row: the static Schrodinger bridge of the reference
  process ``sigma W`` (Tong et al. 2023, Sec. 2.2 and Alg. 3, https://arxiv.org/abs/2307.03672;
  TorchCFM's ``OTPlanSampler(method="sinkhorn", reg=2 * sigma**2)``)."""
  return couplings_lib.get_coupling(
    "sinkhorn", epsilon=2.0 * sigma**2, relative_epsilon=None, mode="sample"
  )


def sf2m(
  context: base.ObjectiveContext,
  *,
  sigma: float = 1.0,
  time_eps: float = 1e-3,
  label_dropout: float = 0.0,
) -> base.Objective:
  """SF2M (see the module docstring).

  Args:
    context: the model (two output heads) and the source (the edge resolves them).
    sigma: the reference process's noise ``g = sigma``: the bridge's ``sigma_t = sigma sqrt(t (1
      - t))``, the plan's ``eps = 2 sigma^2`` and the sampling SDE's diffusion (TorchCFM's 2D
      SF2M example: 1.0).
    time_eps: training times in ``[time_eps, 1 - time_eps]``.
    label_dropout: label dropout for classifier-free guidance (conditional models).
  """
  coupling = entropic_coupling(sigma=sigma)
  num_classes = context.num_classes

  def pair_fn(key, batch):
    k_source, k_pairs = jax.random.split(key)
    x1 = batch["x"]
    labels = batch.get("label") if num_classes else None
    x0, x1, labels = coupling(k_pairs, context.source(k_source, x1.shape[0]), x1, labels)
    paired = {"x0": x0, "x": x1}
    if labels is not None:
      paired["label"] = labels
    return paired

  def loss_fn(params, key, batch):
    k_example, k_labels, k_dropout = jax.random.split(key, 3)
    labels = batch.get("label") if num_classes else None
    labels = base.drop_labels_for_guidance(
      k_labels, labels, num_classes=num_classes, label_dropout=label_dropout
    )
    example = bridge_example(
      k_example, x0=batch["x0"], x1=batch["x"], sigma=sigma, time_eps=time_eps
    )
    output = context.apply(params, example.x_t, example.t, labels, dropout_key=k_dropout)
    return sf2m_loss(output, example)

  generate = bridge_lib.bridge_generator(
    apply=context.apply, source=context.source, diffusion=sigma, num_classes=num_classes
  )

  def velocity_of(params):
    return lambda x, t: bridge_lib.velocity_and_score(context.apply(params, x, t, None))[0]

  log_likelihood = None
  if context.source_is_normal:
    log_likelihood = base.flow_likelihood(context, velocity_of)
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=pair_fn,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


def check(*, sigma: float = 1.0, time_eps: float = 1e-3, label_dropout: float = 0.0) -> list[str]:
  """Out-of-range values, one line each."""
  problems = []
  if not sigma > 0:
    problems.append(
      f"objective.sigma={sigma!r}: the bridge's noise must be > 0 (TorchCFM's 2D SF2M: 1.0)"
    )
  if not 0.0 < time_eps < 0.5:
    problems.append(
      f"objective.time_eps={time_eps!r}: training times lie in [time_eps, 1 - time_eps], so it "
      "must lie in (0, 0.5); e.g. 1e-3"
    )
  return problems + base.label_dropout_problems(label_dropout)


SPEC = base.ObjectiveSpec(
  build=sf2m,
  check=check,
  samplers=bridge_lib.BRIDGE_SAMPLERS,
  default_sampler="euler_maruyama",
  output="velocity and score [v, s] (two heads)",
  summary="SF2M: flow and score on the Brownian bridge, entropic OT pairs (Tong et al. 2023)",
  any_source=True,
  output_heads=OUTPUT_HEADS,
)
