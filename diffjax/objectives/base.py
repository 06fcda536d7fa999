"""What an objective is, and the pieces every objective module shares.

An objective is the value a method resolves to: built by one factory from ``config.objective``
(its ``name`` plus exactly that factory's keyword arguments) and an :class:`ObjectiveContext`
(the model's apply function and the data's source, resolved at the edge), it carries everything
the trainer, the samplers and the evaluator need, so no config string is read below the edge.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffjax import losses as losses_lib
from diffjax import models as models_lib
from diffjax import samplers as samplers_lib

__all__ = [
  "Teacher",
  "ObjectiveContext",
  "Objective",
  "ObjectiveSpec",
  "HostPairing",
  "keywords",
  "defaults",
  "accepted_samplers",
  "unread_problems",
  "drop_labels_for_guidance",
  "regression_loss_fn",
  "probability_flow_likelihood",
  "flow_likelihood",
  "label_dropout_problems",
]


class Teacher(NamedTuple):
  """A trained velocity model read from another workdir (the edge reads it, read-only).

  Attributes:
    apply: ``apply(params, x_t, t, cond) -> velocity`` in flow time (source ``t = 0``, data
      ``t = 1``).
    params: its EMA parameters.
    config: its experiment config (what it was trained with; for reports, not read below the
      edge).
    step: the checkpoint step the parameters come from.
    workdir: where it was read.
  """

  apply: Callable
  params: Any
  config: Any
  step: int
  workdir: str


class ObjectiveContext(NamedTuple):
  """What a factory gets besides its keywords (the experiment's edge resolves it once).

  Attributes:
    apply: ``apply(params, x_t, t, cond, dropout_key=None) -> output`` of the model.
    source: ``(key, num) -> [num, *data_shape]`` source draws (noise or a 2D toy).
    data_shape: shape of one example.
    num_classes: > 0 for a class-conditional model (labels in ``0 .. num_classes - 1``).
    num_batch_shards: how many pieces the batch is split over (per-device couplings).
    source_is_normal: the source is ``N(0, I)``, so a likelihood through the ODE exists.
    target_sampler: ``(key, num) -> samples`` of a data distribution generated on device
      (2D toys), else ``None``.
    seed: the experiment's seed (fixed draws an objective needs once, e.g. a finite data set).
    load_workdir: ``workdir -> Teacher``, the trained velocity model of another workdir with
      its data checked against this experiment's (raises ``ValueError`` in one line), or
      ``None`` where the edge provides none.
  """

  apply: Callable
  source: Callable
  data_shape: tuple[int, ...]
  num_classes: int = 0
  num_batch_shards: int = 1
  source_is_normal: bool = True
  target_sampler: Callable | None = None
  seed: int = 0
  load_workdir: Callable[[str], Teacher] | None = None


class HostPairing(NamedTuple):
  """A pairing whose coupling is solved on the host, between two programs.

  Attributes:
    propose: ``(key, batch) -> (batch, problem)`` in graph: the batch with its source draws
      (unpaired) and the coupling's problem (cost matrix and constraints).
    solve: ``problem -> solution`` on the host (NumPy), for a stack of problems with leading
      step axes.
    finish: ``(batch, solution) -> batch`` in graph: the paired batch ``pair_fn`` would return.
  """

  propose: Callable[[jax.Array, Any], tuple[Any, Any]]
  solve: Callable[[Any], Any]
  finish: Callable[[Any, Any], Any]


class Objective(NamedTuple):
  """A built objective.

  Attributes:
    loss_fn: ``(params, key, batch) -> scalar`` on the batch ``pair_fn`` returns.
    pair_fn: ``(key, batch) -> batch``, the parameter-free draws made before the loss (source
      points and their coupling), or ``None``; one program (a host-solved coupling through a
      callback: for one device).
    host_pairing: the same pairing as a :class:`HostPairing` when a coupling is solved on the
      host (exact OT), else ``None``: what the trainer runs.
    generate: ``generate(params, key, num, *, steps, sampler=None, labels=None, guidance=None,
      return_trajectories=False) -> dict(samples=..., trajectories=..., nfe=...)``.
    log_likelihood: ``(params, key, data, *, steps) -> [batch] log p(data)`` in nats, or
      ``None`` where the objective defines no density.
  """

  loss_fn: Callable
  pair_fn: Callable | None
  host_pairing: HostPairing | None
  generate: Callable
  log_likelihood: Callable | None


class ObjectiveSpec(NamedTuple):
  """One entry of the objectives table.

  Attributes:
    build: ``build(context, **keywords) -> Objective``; its keyword-only parameters are exactly
      the config group's keys (besides ``name``), their defaults the group's defaults.
    check: ``check(**keywords) -> [problem, ...]``: combinations that are wrong, each one line
      with the reason (run at validation, before anything is built).
    samplers: the sampler names its generator accepts.
    default_sampler: the one it uses when none is named.
    output: what the model's output means ("velocity", "eps", "x0", "v", "edm_denoiser").
    summary: one line for the README and ``--help``.
    any_source: the objective transports any source distribution (flow matching); otherwise
      its source is ``N(0, I)`` (``data.source='normal'``).
    time_inputs: times per example its model takes (1: ``t`` is ``[batch]``; 2 for MeanFlow's
      ``u(z, t, s)`` and the shortcut model's ``s(z, t, d)``: ``t`` is ``[batch, 2]``); the
      edge builds the model with it.
    sampler_choices: ``(*, source_is_normal, **keywords) -> names``, the samplers a configured
      objective accepts where they depend on its configuration (a flow's score-based samplers
      need an ``N(0, I)`` source and independent pairs), or None: always ``samplers``, which
      lists every name its generator may accept (:func:`accepted_samplers`).
    output_heads: blocks of the data's channels in the model's output (1: one field of the
      data's shape). The model's last axis carries ``output_heads`` blocks of the data's
      channels (``output_heads * C``); the objective splits them with ``jnp.split(output,
      output_heads, axis=-1)`` (SF2M's velocity and score); the edge builds the model with it.
  """

  build: Callable[..., Objective]
  check: Callable[..., list[str]]
  samplers: tuple[str, ...]
  default_sampler: str
  output: str
  summary: str
  any_source: bool = False
  time_inputs: int = 1
  sampler_choices: Callable[..., tuple[str, ...]] | None = None
  output_heads: int = 1


def accepted_samplers(spec: ObjectiveSpec, group: dict, *, source_is_normal: bool) -> tuple:
  """The sampler names a configured objective's generator accepts: ``spec.sampler_choices`` of
  the ``config.objective`` group (its ``name`` dropped, defaults filled in) and the source, or
  ``spec.samplers`` where the choice does not depend on them."""
  if spec.sampler_choices is None:
    return tuple(spec.samplers)
  keywords_ = {**defaults(spec.build), **{k: v for k, v in group.items() if k != "name"}}
  return tuple(spec.sampler_choices(source_is_normal=source_is_normal, **keywords_))


def unread_problems(build: Callable, unread: dict[str, tuple[Any, str]]) -> list[str]:
  """One line per keyword that the chosen combination does not read but that is set away from
  its default in ``build`` (a value the run would silently ignore), with the reason.

  Args:
    build: the objective's factory (its keyword defaults).
    unread: ``{key: (value, why it is not read)}`` for the keywords the combination ignores.
  """
  default = defaults(build)
  return [
    f"objective.{key}={value!r}: {why}, so this value would be ignored; choose what reads it, "
    f"or leave objective.{key} at its default {default[key]!r}"
    for key, (value, why) in unread.items()
    if value != default[key]
  ]


def keywords(build: Callable) -> dict[str, inspect.Parameter]:
  """The keyword-only parameters of a factory, by name."""
  return {
    p.name: p
    for p in inspect.signature(build).parameters.values()
    if p.kind == inspect.Parameter.KEYWORD_ONLY
  }


def defaults(build: Callable) -> dict[str, Any]:
  """A factory's keywords with their defaults (what ``config.objective`` holds by default)."""
  return {name: p.default for name, p in keywords(build).items()}


def label_dropout_problems(label_dropout: float) -> list[str]:
  """The one check every objective makes of its ``label_dropout``."""
  if not 0.0 <= label_dropout < 1.0:
    return [f"objective.label_dropout={label_dropout!r}: must lie in [0, 1)"]
  return []


def flow_likelihood(context: ObjectiveContext, velocity_of: Callable | None = None) -> Callable:
  """``log p(x)`` of a flow in flow time (source ``N(0, I)`` at ``t = 0``, data at ``t = 1``)
  by :func:`probability_flow_likelihood`; ``velocity_of(params) -> (x, t) -> dx/dt`` defaults
  to the model's output, a velocity."""
  if velocity_of is None:
    velocity_of = lambda params: lambda x, t: context.apply(params, x, t, None)
  return probability_flow_likelihood(
    velocity_of, data_time=1.0, noise_time=0.0, data_shape=context.data_shape
  )


def drop_labels_for_guidance(key, labels, *, num_classes: int, label_dropout: float):
  """Labels with a fraction ``label_dropout`` replaced by the null label (classifier-free
  guidance training, Ho & Salimans 2022, https://arxiv.org/abs/2207.12598); unchanged when
  there are no labels or no dropout."""
  if labels is None or label_dropout <= 0:
    return labels
  return models_lib.drop_labels(key, labels, num_classes=num_classes, drop_prob=label_dropout)


def regression_loss_fn(
  context: ObjectiveContext, make_example: Callable, *, label_dropout: float = 0.0
) -> Callable:
  """``loss_fn(params, key, batch)`` of an objective that regresses the model on one
  :class:`~diffjax.losses.TrainingExample`: ``split(key, 3)`` into the example's, the label
  dropout's and the model's dropout key; labels (a conditional model's) dropped for guidance;
  ``example = make_example(key, batch, labels)``; then :func:`~diffjax.losses.regression_loss`
  of ``apply(params, example.model_input, example.model_time, example.cond)``."""
  num_classes = context.num_classes

  def loss_fn(params, key, batch):
    k_example, k_labels, k_dropout = jax.random.split(key, 3)
    labels = batch.get("label") if num_classes else None
    labels = drop_labels_for_guidance(
      k_labels, labels, num_classes=num_classes, label_dropout=label_dropout
    )
    example = make_example(k_example, batch, labels)
    output = context.apply(
      params, example.model_input, example.model_time, example.cond, dropout_key=k_dropout
    )
    return losses_lib.regression_loss(output, example)

  return loss_fn


def probability_flow_likelihood(
  velocity_of: Callable,
  *,
  data_time: float,
  noise_time: float,
  data_shape: tuple[int, ...],
  prior_std: float = 1.0,
) -> Callable:
  """``log p(x)`` by the instantaneous change of variables along the probability-flow ODE
  (Chen et al. 2018, https://arxiv.org/abs/1806.07366; Song et al. 2021, App. D.2), with RK4
  from the data time to the noise time: the exact divergence for vectors (2D toys),
  Hutchinson's estimator for images.

  A prior ``N(0, c^2 I)`` (``c = prior_std``, VE and EDM) is handled by solving for
  ``z = x / c``: its field ``dz/dt = v(c z, t) / c`` has the same divergence and the prior
  ``N(0, I)``, and ``log p_x(x) = log p_z(x / c) - D log c``.

  Args:
    velocity_of: ``params -> (x, t) -> dx/dt`` in the objective's own time.
    data_time: the time at which the ODE holds the data.
    noise_time: the time at which it holds ``N(0, prior_std^2 I)``.
    data_shape: shape of one example.
    prior_std: the prior's standard deviation ``c``.
  """
  exact = len(data_shape) == 1
  divergence = samplers_lib.exact_divergence if exact else samplers_lib.hutchinson_divergence
  log_jacobian = math.prod(data_shape) * math.log(prior_std)

  @functools.partial(jax.jit, static_argnames="steps")
  def log_likelihood(params, key, data, *, steps):
    times = jnp.linspace(data_time, noise_time, steps + 1)
    velocity = velocity_of(params)
    scaled = lambda z, t: velocity(prior_std * z, t) / prior_std
    out = samplers_lib.log_likelihood(
      key, scaled, data / prior_std, times=times, divergence=divergence
    )
    return out.log_prob - log_jacobian

  return log_likelihood
