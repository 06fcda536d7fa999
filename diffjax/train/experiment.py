"""From a config to functions: every name in the config is resolved here, once, at the edge.

:func:`build_experiment` returns an :class:`Experiment`, a bundle of pure functions (the model,
the loss, the on-device batch sampler, the sample generator) plus the host-side data iterator
hooks. Nothing below this point looks at a config string again.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import couplings as couplings_lib
from diffjax import losses as losses_lib
from diffjax import models as models_lib
from diffjax import parameterization
from diffjax import samplers as samplers_lib
from diffjax import schedules as schedules_lib
from diffjax.data import toy2d
from diffjax.train import sharding as sharding_lib
from diffjax.train import step as step_lib

__all__ = ["Experiment", "build_experiment", "create_model", "model_kwargs", "compute_dtype"]


class Experiment(NamedTuple):
  """The resolved experiment.

  Attributes:
    model: ``ModelFns(init, apply)``.
    pair_fn: ``pair_fn(key, batch) -> batch``, the parameter-free part of the objective run
      before the loss (flow matching: source draws and the coupling), or ``None``; in one
      program (a host-solved coupling through a callback: for one device).
    host_pairing: the same pairing as a :class:`~diffjax.train.step.HostPairing` when its
      coupling is solved on the host (exact OT), else ``None``; what the trainer runs.
    loss_fn: ``loss_fn(params, key, batch) -> scalar`` on the batch ``pair_fn`` returns.
    sample_batch: ``key -> batch`` for data generated on device, else ``None``.
    make_iterator: ``data_state -> iterator`` for host data (grain), else ``None``.
    next_batch: ``iterator -> batch`` placed on the mesh.
    iterator_state: ``iterator -> JSON-able dict`` saved with each checkpoint.
    generate: ``generate(params, key, num, *, steps, sampler=None, labels=None,
      guidance=None) -> dict(samples=..., trajectories=...)``.
    plot: ``(state, workdir) -> None`` writing WORKDIR/samples.png, or ``None``.
    target_sampler: ``(key, num) -> samples`` of the data distribution for 2D toys, else None.
    source_sampler: ``(key, num) -> samples`` of the source distribution.
    log_likelihood: ``(params, key, data, *, steps) -> [batch] log p(data)`` in nats through
      the probability-flow ODE, or ``None`` when the source density is not N(0, I).
  """

  model: Any
  pair_fn: Callable | None
  host_pairing: step_lib.HostPairing | None
  loss_fn: Callable
  sample_batch: Callable | None
  make_iterator: Callable | None
  next_batch: Callable | None
  iterator_state: Callable | None
  generate: Callable
  plot: Callable | None
  target_sampler: Callable | None
  source_sampler: Callable
  log_likelihood: Callable | None


def compute_dtype(config: ml_collections.ConfigDict):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.train.compute_dtype]


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """``config.model`` minus its name: exactly the model constructor's keywords."""
  kwargs = dict(config.model)
  kwargs.pop("name")
  return kwargs


def create_model(config):
  return models_lib.create_model(
      config.model.name, data_shape=tuple(config.data.shape),
      num_classes=config.data.num_classes, dtype=compute_dtype(config),
      param_dtype=jnp.float32, **model_kwargs(config))


def _source_sampler(config) -> Callable:
  """The flow's source: a toy 2D distribution or a standard normal of the data's shape."""
  shape = tuple(config.data.shape)
  if config.data.kind == "toy2d" and config.data.source != "normal":
    return toy2d.get_toy2d(config.data.source)

  def normal(key, num):
    return jax.random.normal(key, (num,) + shape, jnp.float32)
  return normal


def _paired(x0, x1, labels):
  paired = {"x0": x0, "x": x1}
  if labels is not None:
    paired["label"] = labels
  return paired


def _flow_matching_loss(config, mesh, model, source):
  # Lipman's FM names its noise level sigma_min; the CFM recipes call it sigma.
  sigma_name = "sigma_min" if config.objective.recipe == "fm" else "sigma"
  recipe = losses_lib.get_flow_matching_recipe(config.objective.recipe,
                                               **{sigma_name: config.objective.sigma})
  path, coupling = losses_lib.build_flow_matching_recipe(recipe)
  if recipe.coupling == "exact_ot":
    # Rebuilt to bind the configured solver. Class-agnostic OT pairs noise meant for one class
    # with data of another, which hurts conditional models: with labels, pair within a class.
    coupling = couplings_lib.get_coupling(
        "label_exact_ot" if config.data.num_classes else "exact_ot",
        solver=config.objective.ot_solver)
  if config.objective.coupling_scope == "per_device":
    coupling = sharding_lib.per_device_coupling(coupling, mesh)
  time_sampler = losses_lib.get_time_sampler(config.objective.time_sampler)
  num_classes = config.data.num_classes
  label_dropout = config.objective.label_dropout

  def draw(key, batch):
    k_source, k_pairs = jax.random.split(key)
    x1 = batch["x"]
    x0 = source(k_source, x1.shape[0])
    labels = batch.get("label") if num_classes else None
    return k_pairs, x0, x1, labels

  def pair_fn(key, batch):
    """Source draws and the coupling: no parameters, so fused steps pair ahead of the scan."""
    return _paired(*coupling(*draw(key, batch)))

  host_pairing = None
  if isinstance(coupling, couplings_lib.HostSolvedCoupling):
    def propose(key, batch):
      k_pairs, x0, x1, labels = draw(key, batch)
      return _paired(x0, x1, labels), coupling.problem(k_pairs, x0, x1, labels)

    def finish(batch, solution):
      return _paired(*coupling.apply(solution, batch["x0"], batch["x"], batch.get("label")))

    host_pairing = step_lib.HostPairing(propose=propose, solve=coupling.solve, finish=finish)

  def loss_fn(params, key, batch):
    k_example, k_labels, k_dropout = jax.random.split(key, 3)
    labels = batch.get("label")
    if labels is not None and label_dropout > 0:
      labels = models_lib.drop_labels(k_labels, labels, num_classes=num_classes,
                                      drop_prob=label_dropout)
    example = losses_lib.flow_matching_example(k_example, x0=batch["x0"], x1=batch["x"],
                                               path=path, time_sampler=time_sampler,
                                               cond=labels)
    prediction = model.apply(params, example.model_input, example.model_time, example.cond,
                             dropout_key=k_dropout)
    return losses_lib.regression_loss(prediction, example)

  return pair_fn, host_pairing, loss_fn, path


def _diffusion_schedule(config):
  return schedules_lib.get_discrete_schedule(
      config.objective.schedule, num_steps=config.objective.num_diffusion_steps)


def _diffusion_loss(config, model):
  schedule = _diffusion_schedule(config)
  weighting_kwargs = ({"gamma": config.objective.min_snr_gamma}
                      if config.objective.weighting == "min_snr" else {})
  weighting = losses_lib.get_weighting(config.objective.weighting, **weighting_kwargs)
  target = parameterization.get_prediction_target(config.objective.prediction)
  num_classes = config.data.num_classes
  label_dropout = config.objective.label_dropout

  def loss_fn(params, key, batch):
    k_example, k_labels, k_dropout = jax.random.split(key, 3)
    labels = batch.get("label") if num_classes else None
    if labels is not None and label_dropout > 0:
      labels = models_lib.drop_labels(k_labels, labels, num_classes=num_classes,
                                      drop_prob=label_dropout)
    example = losses_lib.diffusion_example(k_example, data=batch["x"], schedule=schedule,
                                           target=target, weighting=weighting, cond=labels)
    prediction = model.apply(params, example.model_input, example.model_time, example.cond,
                             dropout_key=k_dropout)
    return losses_lib.regression_loss(prediction, example)

  return loss_fn, schedule


def _likelihood(velocity_of: Callable, *, data_time: float, noise_time: float,
                data_shape: tuple[int, ...]) -> Callable:
  """``log p(x)`` by the instantaneous change of variables along the probability-flow ODE
  (Chen et al. 2018; Song et al. 2021, App. D.2), with RK4 from the data time to the noise
  time: the exact divergence for vectors (2D toys), Hutchinson's estimator for images."""
  exact = len(data_shape) == 1
  divergence = (samplers_lib.exact_divergence if exact else samplers_lib.hutchinson_divergence)

  @functools.partial(jax.jit, static_argnames="steps")
  def log_likelihood(params, key, data, *, steps):
    times = jnp.linspace(data_time, noise_time, steps + 1)
    out = samplers_lib.log_likelihood(key, velocity_of(params), data, times=times,
                                      divergence=divergence)
    return out.log_prob

  return log_likelihood


def build_experiment(config: ml_collections.ConfigDict, *, mesh) -> Experiment:
  """Resolves every name in ``config`` into functions (the one place that does)."""
  model = create_model(config)
  source = _source_sampler(config)
  batch_size = config.train.batch_size
  batch_sharding = sharding_lib.batch_sharding(mesh)

  if config.objective.kind == "flow_matching":
    pair_fn, host_pairing, loss_fn, path = _flow_matching_loss(config, mesh, model, source)
    generate = samplers_lib.flow_generator(apply=model.apply, source=source,
                                           data_shape=tuple(config.data.shape),
                                           num_classes=config.data.num_classes)
    log_likelihood = None
    if config.data.kind == "images" or config.data.source == "normal":
      # Flow time runs noise (0) -> data (1); the model predicts the velocity directly.
      log_likelihood = _likelihood(
          lambda params: lambda x, t: model.apply(params, x, t, None), data_time=1.0,
          noise_time=0.0, data_shape=tuple(config.data.shape))
  else:
    # A diffusion example needs nothing drawn ahead of the parameters.
    pair_fn = host_pairing = None
    loss_fn, schedule = _diffusion_loss(config, model)
    generate = samplers_lib.diffusion_generator(
        apply=model.apply, schedule=schedule, prediction=config.objective.prediction,
        data_shape=tuple(config.data.shape), num_classes=config.data.num_classes)
    target = parameterization.get_prediction_target(config.objective.prediction)
    coefficients_fn = samplers_lib.interpolated_coefficients_fn(schedule)
    # Diffusion time runs data (first model time 1/T) -> noise (1); the prior N(0, I) is the
    # schedule's terminal marginal up to alpha(1)^2 (about 4e-5 for DDPM's linear betas).
    log_likelihood = _likelihood(
        lambda params: samplers_lib.velocity_field(
            lambda x, t: model.apply(params, x, t, None), target=target,
            coefficients_fn=coefficients_fn),
        data_time=1.0 / schedule.num_steps, noise_time=1.0,
        data_shape=tuple(config.data.shape))

  target_sampler = None
  sample_batch = make_iterator = next_batch = iterator_state = None
  if config.data.kind == "toy2d":
    target_sampler = toy2d.get_toy2d(config.data.target)

    def sample_batch(key):
      x = target_sampler(key, batch_size)
      return {"x": jax.lax.with_sharding_constraint(x, batch_sharding)}
  else:
    from diffjax.train import image_input  # pylint: disable=import-outside-toplevel
    make_iterator, next_batch, iterator_state = image_input.make_input_hooks(config, mesh)

  plot = None
  if tuple(config.data.shape) == (2,) or len(config.data.shape) == 3:
    from diffjax import plots  # pylint: disable=import-outside-toplevel
    plot = functools.partial(plots.plot_experiment, config=config, generate=generate,
                             target_sampler=target_sampler)

  return Experiment(model=model, pair_fn=pair_fn, host_pairing=host_pairing, loss_fn=loss_fn,
                    sample_batch=sample_batch,
                    make_iterator=make_iterator, next_batch=next_batch,
                    iterator_state=iterator_state, generate=generate, plot=plot,
                    target_sampler=target_sampler, source_sampler=source,
                    log_likelihood=log_likelihood)
