"""Orbax checkpoints of the whole train state plus the data iterator's state.

The only module that touches orbax. A checkpoint at step ``s`` holds two items: ``state`` (the
:class:`~diffjax.train.state.TrainState` pytree) and ``data`` (JSON: the data iterator's state,
or the step for data generated on device). Restoring goes into an abstract target that carries
the shardings, so arrays come back already laid out over the mesh.

:func:`save_step` / :func:`commit_step` / :func:`restore_verified` add what orbax lacks
(:mod:`diffjax.train.integrity`): a step is trusted only once its digest marker is written, and a
damaged or foreign step is moved aside in favour of the newest valid one.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffjax.train import integrity

__all__ = [
  "make_checkpoint_manager",
  "save",
  "restore_latest",
  "abstract_with_shardings",
  "CheckpointMismatchError",
  "PendingCommit",
  "save_step",
  "commit_step",
  "restore_verified",
  "prepare_directory",
  "commit_if_done",
  "config_mismatch",
  "QUARANTINE",
]

log = logging.getLogger("diffjax")

# Bad steps are moved here, beside checkpoints/ (orbax never lists it), never deleted.
QUARANTINE = "checkpoints_quarantine"


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint holds arrays of other shapes or dtypes than the config builds."""


def make_checkpoint_manager(
  directory: str | pathlib.Path, *, keep: int, async_save: bool
) -> ocp.CheckpointManager:
  """A manager keeping the newest ``keep`` steps; async saves overlap the next train steps.

  ``cleanup_tmp_directories`` removes the ``*.orbax-checkpoint-tmp`` folders a kill during a save
  leaves behind (orbax keeps them otherwise).
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
    create=True,
  )
  return ocp.CheckpointManager(
    pathlib.Path(directory).absolute(), options=options, item_names=("state", "data")
  )


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, *, force: bool = False
) -> bool:
  """Saves ``state`` and ``data_state`` at ``step``; returns whether a save started."""
  return manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
    force=force,
  )


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict] | None:
  """Restores the newest step into ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with
  shardings); ``None`` when the directory holds no checkpoint."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    ),
  )
  return step, restored["state"], dict(restored["data"])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves carrying the given shardings (the restore target)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


class PendingCommit(dict):
  """A save started by :func:`save_step`: ``step`` and the ``arrays`` digests taken before it."""


def save_step(
  manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict
) -> PendingCommit:
  """Digests ``state`` (host copy, before the next step may donate its buffers), then starts
  the (possibly asynchronous) orbax save of step ``step``."""
  arrays = integrity.array_digests(state)
  save(manager, step, state, data_state, force=True)
  return PendingCommit(step=int(step), arrays=arrays)


def commit_step(
  manager: ocp.CheckpointManager, pending: PendingCommit | None, *, config: dict, is_lead: bool
) -> None:
  """Waits for orbax to commit ``pending`` on every process, then the lead process writes the
  digest marker that makes the step trusted."""
  manager.wait_until_finished()
  if pending is None or not is_lead:
    return
  step_dir = pathlib.Path(manager.directory) / str(pending["step"])
  if (step_dir / integrity.COMMIT_FILE).exists():
    return
  integrity.write_commit(step_dir, step=pending["step"], arrays=pending["arrays"], config=config)


def prepare_directory(
  directory: pathlib.Path,
  *,
  config: dict | None = None,
  config_differences: Callable[[dict, dict], list[str]] | None = None,
) -> list[str]:
  """The lead process's clean-up before any process creates its manager: removes the
  temporary folders of interrupted saves and, given ``config``, moves aside every step newer
  than the newest one whose marker, files and config check out (the other processes then see
  only trusted steps). Returns the names removed or moved."""
  removed = integrity.remove_tmp_dirs(directory)
  for name in removed:
    log.warning("removed %s/%s left by an interrupted save", directory, name)
  if config is None:
    return removed
  for step_dir in integrity.step_dirs(directory):
    reason = _file_problem(step_dir, config, config_differences)
    if reason is None:
      break
    moved = integrity.quarantine(step_dir, into=directory.parent / QUARANTINE, reason=reason)
    log.warning(
      "checkpoint step %s in %s is not usable: %s; moved to %s; falling back to the "
      "newest valid step",
      step_dir.name,
      directory,
      reason,
      moved,
    )
    removed.append(step_dir.name)
  return removed


def _file_problem(step_dir, config, config_differences) -> str | None:
  """Why ``step_dir`` cannot be trusted without reading it through orbax, or ``None``."""
  record, reason = integrity.read_commit(step_dir)
  if record is not None:
    reason = integrity.verify_files(step_dir, record)
  if reason is None:
    differences = config_differences(record["config"], config)
    if differences:
      reason = "written by another config (" + "; ".join(differences[:5]) + ")"
  return reason


def config_mismatch(
  directory: str | pathlib.Path,
  *,
  config: dict,
  config_differences: Callable[[dict, dict], list[str]],
) -> tuple[str, list[str]] | None:
  """``(step, differences)`` of the newest step when no step in ``directory`` was written with
  ``config`` (``key: saved -> given``); ``None`` when one was, or when no marker is readable.

  A restore skips the steps of another config as foreign, so without this a hand-edited
  WORKDIR/config.json makes a directory full of checkpoints look empty. Reads only the markers.
  """
  newest = None
  for step_dir in integrity.step_dirs(pathlib.Path(directory)):
    record, _ = integrity.read_commit(step_dir)
    if record is None:
      continue
    differences = config_differences(record["config"], config)
    if not differences:
      return None
    newest = newest or (step_dir.name, differences)
  return newest


def commit_if_done(
  manager: ocp.CheckpointManager, pending: PendingCommit | None, *, config: dict, is_lead: bool
) -> PendingCommit | None:
  """Writes the marker of ``pending`` as soon as orbax has finished it (at once for a
  synchronous save), so a kill between two saves never leaves the older one untrusted.
  Returns what is still pending."""
  if pending is None:
    return None
  if not is_lead:
    return pending  # only the lead writes markers; the others wait at the next save
  if manager.is_saving_in_progress():
    return pending
  step_dir = pathlib.Path(manager.directory) / str(pending["step"])
  if not step_dir.is_dir():  # not committed by orbax (yet): check again later
    return pending
  integrity.write_commit(step_dir, step=pending["step"], arrays=pending["arrays"], config=config)
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def restore_verified(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  *,
  config: dict,
  move_bad: bool,
  config_differences: Callable[[dict, dict], list[str]],
) -> tuple[int, Any, dict] | None:
  """Restores the newest step whose marker, files, config and arrays all check out.

  Every step tried and found bad is named in one warning with its reason and, when
  ``move_bad`` (the lead process of a training run), moved into ``WORKDIR/checkpoints_quarantine``.
  A step whose arrays have other shapes or dtypes than ``abstract_state`` (a changed model or
  optimizer) raises :class:`CheckpointMismatchError` instead: falling back would silently drop
  the run's progress.

  Returns:
    ``(step, state, data_state)``, or ``None`` when no valid step exists.
  """
  directory = pathlib.Path(manager.directory)
  spec = integrity.array_spec(abstract_state)
  for step_dir in integrity.step_dirs(directory):
    reason = _file_problem(step_dir, config, config_differences)
    if reason is None:
      record, _ = integrity.read_commit(step_dir)
      saved_spec = {k: v.rsplit(" ", 1)[0] for k, v in record["arrays"].items()}
      differences = integrity.spec_differences(saved_spec, spec)
      if differences:
        raise CheckpointMismatchError(
          f"checkpoint step {step_dir.name} in {directory} holds other arrays than this "
          f"config builds (orbax would cast or fail): {'; '.join(differences[:20])}. Start a "
          "new --workdir or restore the original model/optimizer config"
        )
      step = int(step_dir.name)
      try:
        restored = manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # noqa: BLE001 -- any failure means: try the next older step
        reason = f"orbax could not restore it ({_first_line(e)})"
      else:
        digests = integrity.array_digests(restored["state"])
        if digests == record["arrays"]:
          return step, restored["state"], dict(restored["data"] or {})
        bad = [k for k in record["arrays"] if digests.get(k) != record["arrays"][k]]
        reason = f"restored arrays differ from their digest ({', '.join(bad[:3])})"
    where = ""
    if move_bad:
      moved = integrity.quarantine(step_dir, into=directory.parent / QUARANTINE, reason=reason)
      where = f"; moved to {moved}"
      manager.reload()
    log.warning(
      "checkpoint step %s in %s is not usable: %s%s; falling back to the newest valid step",
      step_dir.name,
      directory,
      reason,
      where,
    )
  return None
