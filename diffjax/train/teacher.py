"""A trained velocity model read from another workdir: the teacher of reflow and distillation.

:func:`load_teacher` reads ``WORKDIR/config.json`` and the EMA parameters of the newest verified
checkpoint, read-only (the reader of ``diffjax sample``: a trainer may still be writing there),
after checking what would make the teacher's pairs meaningless for the student: a model whose
output is not a velocity, data (source, target, shape, classes) other than the student's, a run
of several seeds. Only the teacher's model is built, never its objective, so a teacher that was
itself trained from a teacher (a reflow run) loads without its own teacher. Every problem is one
:class:`TeacherError` line naming the value and the fix.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections

from diffjax import objectives as objectives_lib
from diffjax.objectives import Teacher
from diffjax.train import checkpoint as ckpt
from diffjax.train import config as config_lib
from diffjax.train import sharding as sharding_lib
from diffjax.train.optim import make_optimizer
from diffjax.train.state import init_train_state

__all__ = ["TeacherError", "DATA_KEYS", "FREE_DATA_KEYS", "load_teacher", "data_differences"]

DATA_KEYS = ("kind", "source", "target", "shape", "num_classes")
"""The ``config.data`` keys a teacher must share with its student; for data read from files,
every other data key too (the file, the array's name, its layout and range) but
:data:`FREE_DATA_KEYS`."""

FREE_DATA_KEYS = ("augment_flip", "device_resident", "device_resident_max_mb")
"""Data keys that change the training batches, not the distributions the pairs join."""

log = logging.getLogger("diffjax")


class TeacherError(config_lib.ConfigError):
  """A teacher workdir that cannot teach this experiment (one line: the value and the fix)."""


def data_differences(teacher: ml_collections.ConfigDict, student: ml_collections.ConfigDict):
  """``data.key: teacher -> student`` for each :data:`DATA_KEYS` entry (and, unless both are 2D
  toys generated on device, each other key but :data:`FREE_DATA_KEYS`) that differs."""
  keys = list(DATA_KEYS)
  if teacher.kind != "toy2d" or student.kind != "toy2d":
    others = set(teacher.keys()) | set(student.keys())
    keys += sorted(others - set(DATA_KEYS) - set(FREE_DATA_KEYS))
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return [
    f"data.{key}: {norm(teacher.get(key))!r} -> {norm(student.get(key))!r}"
    for key in keys
    if norm(teacher.get(key)) != norm(student.get(key))
  ]


def _read_config(workdir: str, path: pathlib.Path) -> ml_collections.ConfigDict:
  """The teacher's config.json, parsed without validating its own objective's inputs (a reflow
  teacher's teacher may be gone)."""
  where = f"objective.teacher_workdir={workdir!r}"
  fix = "train the teacher again, or pass another teacher workdir"
  if not path.parent.is_dir():
    raise TeacherError(f"{where} does not exist; {fix}")
  if not path.is_file():
    raise TeacherError(
      f"{where} holds no config.json, so `diffjax train` did not write it; pass the workdir of a "
      "trained run"
    )
  try:
    return config_lib.config_from_json(path.read_text(encoding="utf-8"))
  except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
    first = " ".join(str(e).split())[:200]
    raise TeacherError(
      f"{where}: {path} is unreadable ({type(e).__name__}: {first}); {fix}"
    ) from None


def _check_teacher(workdir: str, config, student_data) -> None:
  where = f"objective.teacher_workdir={workdir!r}"
  spec = objectives_lib.OBJECTIVES[config.objective.name]
  if spec.output != "velocity":
    velocity = sorted(n for n, s in objectives_lib.OBJECTIVES.items() if s.output == "velocity")
    raise TeacherError(
      f"{where} holds a {config.objective.name!r} model (its output: {spec.output}), not a "
      f"velocity model; the teacher's ODE needs a velocity in flow time: pass a run of one of "
      f"{velocity}"
    )
  differences = data_differences(config.data, student_data)
  if differences:
    raise TeacherError(
      f"{where} was trained on other data than this run ({'; '.join(differences)}, teacher -> "
      "student); the pairs must join this run's source to its target: pass a teacher trained "
      "on the same data, or set those data keys to the teacher's"
    )
  if config.train.num_seeds != 1:
    raise TeacherError(
      f"{where} trained train.num_seeds={config.train.num_seeds} seeds at once; a teacher is "
      "one model: pass a run of one seed"
    )


def load_teacher(workdir: str, *, data: ml_collections.ConfigDict, mesh) -> Teacher:
  """The trained velocity model of ``workdir`` (its EMA parameters, replicated over ``mesh``).

  Args:
    workdir: a directory written by ``diffjax train`` with a flow-time velocity objective.
    data: the student's ``config.data``; the teacher's must match on :data:`DATA_KEYS`.
    mesh: the student's mesh (the parameters are placed replicated on it).

  Returns:
    A :class:`~diffjax.objectives.Teacher` whose ``apply(params, x, t, cond)`` is the teacher's
    model.

  Raises:
    TeacherError: no such workdir, no checkpoint, not a velocity model, other data, several
      seeds, or a checkpoint that does not match its config.
  """
  # experiment builds its objectives with this module's loader: imported here, not above.
  from diffjax.train import experiment  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(workdir)
  config = _read_config(workdir, root / "config.json")
  _check_teacher(workdir, config, data)
  checkpoints = root / "checkpoints"
  ckpt.check_directory(checkpoints)
  model = experiment.create_model(config)
  optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
  init = lambda key: init_train_state(key=key, init_params=model.init, optimizer=optimizer)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  replicated = sharding_lib.replicated(mesh)
  target = ckpt.abstract_with_shardings(abstract, jax.tree.map(lambda _: replicated, abstract))
  try:
    step, state = ckpt.read_newest_step(
      checkpoints,
      target,
      config=config_lib.resume_fingerprint(config),
      config_differences=config_lib.fingerprint_differences,
    )
  except (ckpt.CheckpointMismatchError, ckpt.NoUsableCheckpointError) as e:
    raise TeacherError(f"objective.teacher_workdir={workdir!r}: {e}") from None
  log.info("teacher: %s, a %r model at step %d", root, config.objective.name, int(step))
  return Teacher(
    apply=model.apply, params=state.ema_params, config=config, step=int(step), workdir=str(root)
  )
