"""Reflow: k-rectified flow, trained on the couplings of a teacher flow.

Rectified flow (Liu, Gong & Liu 2022, "Flow Straight and Fast",
https://arxiv.org/abs/2209.03003) regresses a velocity on the straight path between the two ends
of a coupling ``(X0, X1)``:

    v = argmin_v  int_0^1 E || (X1 - X0) - v(X_t, t) ||^2 dt,    X_t = t X1 + (1 - t) X0,

and its ODE ``dZ_t = v(Z_t, t) dt`` from ``Z_0 = X0`` gives a new, deterministic coupling
``(Z_0, Z_1)``. With independent pairs this is 1-rectified flow (I-CFM with ``sigma = 0``:
``objective_group("icfm", sigma=0.0)``); reflow trains the (k+1)-rectified flow on the pairs
``(x0, Z_1(x0))`` of a trained k-rectified teacher, whose paths it straightens (fewer ODE steps
for the same samples). Flow time runs from the source (``t = 0``) to the data (``t = 1``).

The teacher is read from another workdir by the edge (``ObjectiveContext.load_workdir``); its
ODE runs with a named fixed-step or adaptive sampler. Two modes:

* "online": each batch draws ``x0`` from the source and solves the teacher's ODE for it inside
  the training program (fresh pairs every step; the teacher's cost is paid every step);
* "pregenerated": ``num_pairs`` pairs are solved once when the objective is built and each
  batch picks pairs uniformly from that fixed set (Liu et al.'s procedure; the teacher's cost is
  paid once, the student sees a finite set).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax import losses as losses_lib
from diffjax import paths as paths_lib
from diffjax import samplers as samplers_lib
from diffjax.objectives import base

__all__ = ["reflow", "check", "MODES", "teacher_endpoints", "coupling_set", "SPEC"]

MODES = ("online", "pregenerated")

# The branch of the seed's key the pregenerated set is drawn from (the trainer takes branches 0
# and 1 of split(PRNGKey(seed)); marginal_fm's finite set uses another constant).
_PAIRS_BRANCH = 0x7265666C

# Pairs solved per vectorised call while the fixed set is built: bounds the memory of the
# teacher's activations, whatever num_pairs is.
_SET_CHUNK = 4096


def _train_teacher(workdir: str) -> str:
  """The fix of a missing teacher: which run to train first."""
  return (
    "train a flow-matching teacher on the same data first, e.g. `diffjax train --config "
    f"configs/toy2d_reflow.py:rf1 --workdir {workdir}` (1-rectified flow: I-CFM with sigma 0), "
    f"then pass --config.objective.teacher_workdir={workdir}"
  )


def check(
  *,
  teacher_workdir: str = "",
  mode: str = "pregenerated",
  num_pairs: int = 50_000,
  teacher_steps: int = 100,
  teacher_sampler: str = "euler",
  time_sampler: str = "uniform",
  label_dropout: float = 0.0,
) -> list[str]:
  """Unknown names, out-of-range values, a teacher workdir that is not one, and a keyword the
  chosen mode or teacher sampler would ignore, one line each.

  An empty ``teacher_workdir`` is reported when the objective is built (the experiment files
  leave it to the command line, and must validate as they stand)."""
  problems = []
  choices = [
    ("mode", mode, MODES),
    ("teacher_sampler", teacher_sampler, samplers_lib.FLOW_SAMPLERS),
    ("time_sampler", time_sampler, losses_lib.TIME_SAMPLERS),
  ]
  for key, value, table in choices:
    if value not in table:
      problems.append(f"objective.{key}={value!r}: unknown; choose one of {sorted(table)}")
  for key, value in (("num_pairs", num_pairs), ("teacher_steps", teacher_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      problems.append(f"objective.{key}={value!r}: must be an integer >= 1")
  problems += base.label_dropout_problems(label_dropout)
  if teacher_workdir and not (pathlib.Path(teacher_workdir) / "config.json").is_file():
    problems.append(
      f"objective.teacher_workdir={teacher_workdir!r}: no such workdir (no config.json "
      f"there); {_train_teacher(teacher_workdir)}"
    )
  unread = {}
  if mode == "online":
    unread["num_pairs"] = (num_pairs, "mode='online' solves fresh pairs for every batch")
  if teacher_sampler in samplers_lib.ADAPTIVE_SOLVERS:
    why = f"teacher_sampler={teacher_sampler!r} chooses its own steps"
    unread["teacher_steps"] = (teacher_steps, why)
  return problems + base.unread_problems(reflow, unread)


def teacher_endpoints(
  teacher: base.Teacher, *, sampler: str, steps: int
) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
  """``x1 = Z_1(x0)``: the end of the teacher's ODE ``dZ_t = v(Z_t, t | label) dt`` from
  ``Z_0 = x0`` at ``t = 0`` to ``t = 1``, on a uniform grid of ``steps`` steps with the flow
  sampler ``sampler`` (for the adaptive ones ``steps`` sets only the saved times). Returns
  ``endpoints(x0, labels) -> x1`` (``[batch, *event]``; ``labels`` ``[batch]`` or ``None``),
  with no gradient to anything."""
  times = samplers_lib.uniform_grid(num_steps=steps, t_start=0.0, t_end=1.0)
  solve = samplers_lib.get_sampler(sampler, target="velocity", times=times)
  params = teacher.params
  unused_key = jax.random.PRNGKey(0)  # the flow samplers are deterministic

  def endpoints(x0, labels=None):
    predict = lambda x, t: teacher.apply(params, x, t, labels)
    return jax.lax.stop_gradient(solve(unused_key, predict, x0).samples)

  return endpoints


def coupling_set(
  endpoints: Callable, source: Callable, *, seed: int, num_pairs: int, num_classes: int = 0
) -> dict[str, jax.Array]:
  """The fixed coupling ``{x0, x[, label]}`` of ``num_pairs`` pairs: ``x0 = source(k, num_pairs)``
  and uniform labels (a class-conditional teacher) from ``fold_in(PRNGKey(seed), branch)``, then
  ``x = endpoints(x0, label)``, solved :data:`_SET_CHUNK` pairs at a time."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _PAIRS_BRANCH)
  k_source, k_labels = jax.random.split(key)
  x0 = jnp.asarray(source(k_source, num_pairs), jnp.float32)
  pairs = {"x0": x0}
  if num_classes:
    pairs["label"] = jax.random.randint(k_labels, (num_pairs,), 0, num_classes)

  def one(pair):
    label = pair["label"][None] if "label" in pair else None
    return endpoints(pair["x0"][None], label)[0]

  solve = jax.jit(lambda p: jax.lax.map(one, p, batch_size=min(_SET_CHUNK, num_pairs)))
  pairs["x"] = solve(pairs)
  return pairs


def _tie(value: jax.Array, batch_x: jax.Array) -> jax.Array:
  """``value`` (``[batch, ...]``) unchanged, tied to the loader batch's sharding: a draw from a
  key alone carries no sharding, so on a mesh every device would compute the whole batch's
  teacher ODE (or gather); a select on the loader's values (finite: a no-op) ties it."""
  finite = ~jnp.isnan(batch_x.reshape(batch_x.shape[0], -1)[:, 0])
  return jnp.where(finite.reshape((-1,) + (1,) * (value.ndim - 1)), value, jnp.zeros_like(value))


def reflow(
  context: base.ObjectiveContext,
  *,
  teacher_workdir: str = "",
  mode: str = "pregenerated",
  num_pairs: int = 50_000,
  teacher_steps: int = 100,
  teacher_sampler: str = "euler",
  time_sampler: str = "uniform",
  label_dropout: float = 0.0,
) -> base.Objective:
  """(k+1)-rectified flow on the teacher's coupling ``(x0, Z_1(x0))``: the loss
  ``E_t || v(t x1 + (1 - t) x0, t) - (x1 - x0) ||^2 / D`` (the linear path, no added noise;
  Liu et al. 2022, eq. 1, https://arxiv.org/abs/2209.03003).

  Args:
    context: the experiment's context; its ``load_workdir`` reads the teacher.
    teacher_workdir: the workdir of a trained velocity model on the same data (I-CFM with
      sigma 0 for 2-rectified flow, a reflow run for the next one).
    mode: "online" (the teacher's ODE solved for each batch, in the training program) or
      "pregenerated" (``num_pairs`` pairs solved once at build time, sampled per batch).
    num_pairs: the size of the pregenerated set (unused online).
    teacher_steps: steps of the teacher's ODE grid.
    teacher_sampler: a flow sampler for the teacher's ODE (:data:`~diffjax.samplers.
      FLOW_SAMPLERS`).
    time_sampler: a :data:`diffjax.losses.TIME_SAMPLERS` name.
    label_dropout: the fraction of labels replaced by the null label (guidance training).
  """
  problems = check(
    teacher_workdir=teacher_workdir,
    mode=mode,
    num_pairs=num_pairs,
    teacher_steps=teacher_steps,
    teacher_sampler=teacher_sampler,
    time_sampler=time_sampler,
    label_dropout=label_dropout,
  )
  if not teacher_workdir:
    problems.append(
      "objective.teacher_workdir is empty: reflow trains on a teacher's pairs; "
      + _train_teacher("runs/rf1")
    )
  if context.load_workdir is None:
    problems.append(
      "objective reflow reads its teacher through ObjectiveContext.load_workdir, which this "
      "context lacks; build the experiment with diffjax.train.experiment.build_experiment"
    )
  if problems:
    raise ValueError("; ".join(problems))
  teacher = context.load_workdir(teacher_workdir)
  endpoints = teacher_endpoints(teacher, sampler=teacher_sampler, steps=teacher_steps)
  num_classes = context.num_classes
  path = paths_lib.get_path("linear", sigma_min=0.0)
  sample_time = losses_lib.get_time_sampler(time_sampler)

  if mode == "online":

    def pair_fn(key, batch):
      """``x0`` from the source, ``x1`` the teacher's ODE end (the loader's ``x`` sets only the
      batch size and sharding; its labels condition the teacher)."""
      x = batch["x"]
      x0 = _tie(context.source(key, x.shape[0]), x)
      labels = batch.get("label") if num_classes else None
      paired = {"x0": x0, "x": endpoints(x0, labels)}
      if labels is not None:
        paired["label"] = labels
      return paired

  else:
    pairs = coupling_set(
      endpoints, context.source, seed=context.seed, num_pairs=num_pairs, num_classes=num_classes
    )

    def pair_fn(key, batch):
      """Pairs drawn uniformly from the fixed set (the loader's batch sets only their count)."""
      x = batch["x"]
      index = _tie(jax.random.randint(key, (x.shape[0],), 0, num_pairs), x)
      return jax.tree.map(lambda a: a[index], pairs)

  def make_example(key, batch, labels):
    return losses_lib.flow_matching_example(
      key, x0=batch["x0"], x1=batch["x"], path=path, time_sampler=sample_time, cond=labels
    )

  loss_fn = base.regression_loss_fn(context, make_example, label_dropout=label_dropout)
  generate = samplers_lib.flow_generator(
    apply=context.apply,
    source=context.source,
    data_shape=context.data_shape,
    num_classes=num_classes,
  )
  log_likelihood = None
  if context.source_is_normal:
    log_likelihood = base.flow_likelihood(context)
  return base.Objective(
    loss_fn=loss_fn,
    pair_fn=pair_fn,
    host_pairing=None,
    generate=generate,
    log_likelihood=log_likelihood,
  )


SPEC = base.ObjectiveSpec(
  build=reflow,
  check=check,
  samplers=samplers_lib.FLOW_SAMPLERS,
  default_sampler="euler",
  output="velocity",
  summary="Reflow: k-rectified flow on a teacher's ODE pairs (x0, Z_1(x0)), linear path "
  "(Liu et al. 2022)",
  any_source=True,
)
