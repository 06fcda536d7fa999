"""From a config to functions: every name in the config is resolved here, once, at the edge.

:func:`build_experiment` returns an :class:`Experiment`, a bundle of pure functions (the model,
the loss, the on-device batch sampler, the sample generator) plus the host-side data iterator
hooks. Nothing below this point looks at a config string again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import models as models_lib
from diffjax import objectives as objectives_lib
from diffjax.data import toy2d
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib

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
    sample_batch: ``key -> batch`` for data generated or held on device, else ``None``.
    make_iterator: ``data_state -> iterator`` for host data (grain), else ``None``.
    next_batch: ``iterator -> batch`` placed on the mesh.
    iterator_state: ``iterator -> JSON-able dict`` saved with each checkpoint.
    generate: ``generate(params, key, num, *, steps, sampler=None, labels=None,
      guidance=None) -> dict(samples=..., trajectories=...)``.
    plot: ``(state, workdir) -> None`` writing WORKDIR/samples.png, or ``None``.
    target_sampler: ``(key, num) -> samples`` of the data distribution for 2D toys, else None
      (data read from a file: :attr:`reference_points`).
    source_sampler: ``(key, num) -> samples`` of the source distribution.
    log_likelihood: ``(params, key, data, *, steps) -> [batch] log p(data)`` in nats through
      the probability-flow ODE, or ``None`` when the source density is not N(0, I).
    reference_points: ``(key, num) -> [n, *data_shape]`` data to compare generated samples
      with (2-Wasserstein, plots), in the model range: ``n = num`` fresh draws of a 2D toy, or
      ``n = min(num, N)`` examples of a data set of ``N``, drawn without replacement.
    device_data: a data set held on the devices
      (:class:`~diffjax.train.device_data.DeviceData`; ``sample_batch`` draws from it), whose
      arrays the trainer passes to its programs as an argument, else ``None``.
  """

  model: Any
  pair_fn: Callable | None
  host_pairing: objectives_lib.HostPairing | None
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
  reference_points: Callable | None = None
  device_data: Any = None


def compute_dtype(config: ml_collections.ConfigDict):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.train.compute_dtype]


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """``config.model`` minus its name: exactly the model constructor's keywords."""
  kwargs = dict(config.model)
  kwargs.pop("name")
  return kwargs


def create_model(config):
  """The model of ``config.model``, taking as many times per example and giving as many output
  heads as the objective needs (an unknown objective name, reported by validation, gets one
  of each)."""
  spec = objectives_lib.OBJECTIVES.get(config.objective.name)
  return models_lib.create_model(
    config.model.name,
    data_shape=tuple(config.data.shape),
    num_classes=config.data.num_classes,
    time_inputs=1 if spec is None else spec.time_inputs,
    output_heads=1 if spec is None else spec.output_heads,
    dtype=compute_dtype(config),
    param_dtype=jnp.float32,
    **model_kwargs(config),
  )


def _source_sampler(config) -> Callable:
  """The flow's source: a toy 2D distribution or a standard normal of the data's shape."""
  shape = tuple(config.data.shape)
  if config.data.kind in ("toy2d", "npz") and config.data.source != "normal":
    return toy2d.get_toy2d(config.data.source)  # validation: npz data are then 2D

  def normal(key, num):
    return jax.random.normal(key, (num,) + shape, jnp.float32)

  return normal


def _load_teacher(workdir: str, *, data, mesh):
  """Another workdir's trained velocity model (:func:`diffjax.train.teacher.load_teacher`,
  which builds its model with :func:`create_model`: imported when called)."""
  from diffjax.train import teacher  # pylint: disable=import-outside-toplevel

  return teacher.load_teacher(workdir, data=data, mesh=mesh)


def build_experiment(config: ml_collections.ConfigDict, *, mesh) -> Experiment:
  """Resolves every name in ``config`` into functions (the one place that does)."""
  model = create_model(config)
  source = _source_sampler(config)
  batch_size = config.train.batch_size
  batch_sharding = sharding_lib.batch_sharding(mesh)
  target_sampler = toy2d.get_toy2d(config.data.target) if config.data.kind == "toy2d" else None
  context = objectives_lib.ObjectiveContext(
    apply=model.apply,
    source=source,
    data_shape=tuple(config.data.shape),
    num_classes=config.data.num_classes,
    num_batch_shards=sharding_lib.num_batch_shards(mesh),
    source_is_normal=config.data.source == "normal",
    target_sampler=target_sampler,
    seed=config.seed,
    load_workdir=functools.partial(_load_teacher, data=config.data, mesh=mesh),
  )
  keywords = {k: v for k, v in config.objective.items() if k != "name"}
  try:
    objective = objectives_lib.get_objective(config.objective.name, context, **keywords)
  except ValueError as e:  # what only the built context shows (the data, the labels)
    raise config_lib.ConfigError(f"objective {config.objective.name!r}: {e}") from None

  sample_batch = make_iterator = next_batch = iterator_state = device_data = None
  reference_points = target_sampler
  if config.data.kind == "toy2d" and config.data.num_classes:
    # A class-conditional toy: the mixture's components are the labels (validated counts).
    labelled = toy2d.get_toy2d(config.data.target, labelled=True)

    def sample_batch(key):
      x, label = labelled(key, batch_size)
      constrain = lambda a: jax.lax.with_sharding_constraint(a, batch_sharding)
      return {"x": constrain(x), "label": constrain(label)}
  elif config.data.kind == "toy2d":

    def sample_batch(key):
      x = target_sampler(key, batch_size)
      return {"x": jax.lax.with_sharding_constraint(x, batch_sharding)}
  else:
    # pylint: disable-next=import-outside-toplevel
    from diffjax.train import device_data as device_data_lib
    from diffjax.train import image_input  # pylint: disable=import-outside-toplevel

    loaded = device_data_lib.load_in_memory(config)
    if loaded is not None:
      device_data = device_data_lib.place(config, *loaded, mesh=mesh)
    if device_data is not None:
      sample_batch = lambda key: device_data.draw(key, device_data.arrays)
    else:  # the arrays loaded for the size check are grain's source, not read twice
      make_iterator, next_batch, iterator_state = image_input.make_input_hooks(
        config, mesh, arrays=loaded
      )
    reference_points = image_input.make_reference_points(config)
  vectors = len(config.data.shape) == 1

  plot = None
  if tuple(config.data.shape) == (2,) or len(config.data.shape) == 3:
    from diffjax import plots  # pylint: disable=import-outside-toplevel

    plot = functools.partial(
      plots.plot_experiment,
      generate=objective.generate,
      target_sampler=reference_points if vectors else None,
      data_shape=tuple(config.data.shape),
      seed=config.seed,
      num=config.sample.num,
      steps=config.sample.steps,
      num_trajectories=config.sample.num_trajectories,
      title=f"{config.objective.name}: {config.model.name}",
    )

  return Experiment(
    model=model,
    pair_fn=objective.pair_fn,
    host_pairing=objective.host_pairing,
    loss_fn=objective.loss_fn,
    sample_batch=sample_batch,
    make_iterator=make_iterator,
    next_batch=next_batch,
    iterator_state=iterator_state,
    generate=objective.generate,
    plot=plot,
    target_sampler=target_sampler,
    source_sampler=source,
    log_likelihood=objective.log_likelihood,
    reference_points=reference_points,
    device_data=device_data,
  )
