"""Orbax checkpoints of the whole train state plus the data iterator's state.

The only module that touches orbax. A checkpoint at step ``s`` holds two items: ``state`` (the
:class:`~diffjax.train.state.TrainState` pytree) and ``data`` (JSON: the data iterator's state,
or the step for data generated on device). Restoring goes into an abstract target that carries
the shardings, so arrays come back already laid out over the mesh.

:func:`save_step` / :func:`commit_step` / :func:`restore_verified` add what orbax lacks
(:mod:`diffjax.train.integrity`): a step is trusted only once its digest marker is written, which
happens only after orbax has opened the step back, and a damaged or foreign step is moved aside
in favour of the newest valid one. :func:`check_directory` refuses what orbax would mishandle
before anything is written: a path with characters it treats as a pattern or a separator, and
symbolic links in ``checkpoints/`` or as the quarantine folder. A reader (``sample``,
``evaluate``) opens the manager ``read_only`` and changes nothing in ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffjax.train import atomic_write, integrity
from diffjax.train import config as config_lib

__all__ = [
  "make_checkpoint_manager",
  "save",
  "restore_latest",
  "abstract_with_shardings",
  "CheckpointMismatchError",
  "CheckpointUnreadableError",
  "CheckpointPathError",
  "UNSAFE_PATH_CHARACTERS",
  "check_directory",
  "PendingCommit",
  "save_step",
  "commit_step",
  "restore_verified",
  "NoUsableCheckpointError",
  "read_newest_step",
  "prepare_directory",
  "commit_if_done",
  "config_mismatch",
  "QUARANTINE",
]

log = logging.getLogger("diffjax")

# Bad steps are moved here, beside checkpoints/ (orbax never lists it), never deleted.
QUARANTINE = "checkpoints_quarantine"
# In a step of a multi-process run: each other process's digests of its shards, for the lead.
DIGESTS_DIR = "diffjax_digests"


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint holds arrays of other shapes or dtypes than the config builds."""


class CheckpointUnreadableError(CheckpointMismatchError):
  """Orbax wrote a step it cannot open back; no marker was written, so the step is never
  trusted. (A :class:`CheckpointMismatchError`: the run stops with the reason, whatever it is
  told to do on a checkpoint it cannot use.)"""


class CheckpointPathError(config_lib.ConfigError):
  """A checkpoint folder diffjax refuses to use (its path, or a symbolic link in it)."""


# Orbax finds the per-process files of a save with a glob of the step's full path, so ``[...]``
# makes it miss them (the step cannot be restored) and ``*`` or ``?`` can match another run's
# folder; tensorstore reads a backslash as a path separator and writes outside the workdir.
UNSAFE_PATH_CHARACTERS = "[]*?\\"


def check_directory(directory: str | pathlib.Path) -> None:
  """Raises :class:`CheckpointPathError` (one line, naming the problem and the fix) when orbax
  cannot be trusted with ``directory``: a character of :data:`UNSAFE_PATH_CHARACTERS` in its
  absolute path (the working directory included), a symbolic link among its entries, or a
  ``checkpoints_quarantine`` beside it that is a link or a file. Reads only."""
  directory = pathlib.Path(directory)
  absolute = str(directory.absolute())
  bad = sorted({c for c in absolute if c in UNSAFE_PATH_CHARACTERS})
  if bad:
    shown = " ".join(repr(c) for c in bad)
    fixed = "".join("_" if c in UNSAFE_PATH_CHARACTERS else c for c in absolute)
    raise CheckpointPathError(
      f"checkpoint folder {absolute!r} contains {shown}, which orbax/tensorstore read as a "
      "pattern or a path separator (its checkpoints could not be restored); choose a "
      f"--workdir without any of []*?\\, e.g. {str(pathlib.Path(fixed).parent)!r}"
    )
  links = integrity.links_in(directory)
  if links:
    raise CheckpointPathError(
      f"{links[0]} is a symbolic link (to {_readlink(links[0])}); diffjax never follows "
      f"links in {directory}: remove it, or copy what it points to in its place"
    )
  try:
    integrity.check_quarantine(directory.parent / QUARANTINE)
  except NotADirectoryError as e:
    raise CheckpointPathError(str(e)) from None


def _readlink(path: pathlib.Path) -> str:
  try:
    return os.readlink(path)
  except OSError:
    return "?"


def make_checkpoint_manager(
  directory: str | pathlib.Path, *, keep: int, async_save: bool, read_only: bool = False
) -> ocp.CheckpointManager:
  """A manager keeping the newest ``keep`` steps; async saves overlap the next train steps.

  ``cleanup_tmp_directories`` removes the ``*.orbax-checkpoint-tmp`` folders a kill during a save
  leaves behind (orbax keeps them otherwise). ``read_only`` (``sample``, ``evaluate``): the
  manager creates, deletes and writes nothing, so a reader never disturbs a running trainer.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=not read_only,
    create=not read_only,
    read_only=read_only,
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
  """A save started by :func:`save_step`: ``step``, and ``local``, the future of this process's
  digests of the shards it holds (hashed in the background while training goes on)."""


def save_step(
  manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict
) -> PendingCommit:
  """Starts digesting ``state`` (each process the shards it holds; the step loop waits only
  for their host copy, taken before the next step may donate the buffers) and the (possibly
  asynchronous) orbax save of step ``step``."""
  local = integrity.start_local_array_digests(state)
  save(manager, step, state, data_state, force=True)
  return PendingCommit(step=int(step), local=local)


def _check_restorable(step_dir: pathlib.Path, arrays: dict[str, str]) -> None:
  """Raises :class:`CheckpointUnreadableError` unless orbax opens every array of the step's
  ``state`` item back (metadata only: no array data is read) with the shapes and dtypes saved."""
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / "state"))
    opened = sorted(
      f"{np.dtype(m.dtype).name} {list(m.shape)}"
      for m in jax.tree.leaves(getattr(tree, "tree", tree))
    )
  except Exception as e:  # noqa: BLE001 -- any failure means the step cannot be restored
    problem = _first_line(e)
  else:
    saved = sorted(v.rsplit(" ", 1)[0] for v in arrays.values())
    if opened == saved:
      return
    problem = f"it opens {len(opened)} arrays, {len(saved)} were saved"
  raise CheckpointUnreadableError(
    f"checkpoint step {step_dir.name} in {step_dir.parent} was saved but orbax cannot open "
    f"it back ({problem}); no commit marker written, so it will never be restored. Check "
    "the workdir's file system and path, then run the same command to resume from the "
    "last committed step"
  )


def _report_path(step_dir: pathlib.Path, process: int) -> pathlib.Path:
  return step_dir / DIGESTS_DIR / f"process_{process}.json"


def _report(step_dir: pathlib.Path, pending: PendingCommit) -> None:
  """A process other than the lead hands its digests to the lead: a file in the step."""
  if pending.get("reported"):
    return
  path = _report_path(step_dir, jax.process_index())
  path.parent.mkdir(exist_ok=True)
  atomic_write.write_atomic(path, json.dumps(pending["local"].result()))
  pending["reported"] = True


def _collect(step_dir: pathlib.Path, pending: PendingCommit, *, wait_s: float) -> dict | None:
  """The lead's view: every process's digests merged, or ``None`` when some process has not
  reported within ``wait_s`` seconds."""
  parts = [pending["local"].result()]
  deadline = time.monotonic() + wait_s
  for process in range(1, jax.process_count()):
    path = _report_path(step_dir, process)
    while not path.is_file():
      if time.monotonic() >= deadline:
        return None
      time.sleep(0.05)
    parts.append(json.loads(path.read_text(encoding="utf-8")))
  return integrity.merge_digests(parts)


def _write_marker(step_dir: pathlib.Path, step: int, arrays: dict, config: dict) -> None:
  _check_restorable(step_dir, arrays)
  integrity.write_commit(step_dir, step=step, arrays=arrays, config=config)


def _wait_for(path: pathlib.Path, timeout_s: float) -> bool:
  deadline = time.monotonic() + timeout_s
  while not path.is_dir():
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.05)
  return True


def commit_step(
  manager: ocp.CheckpointManager,
  pending: PendingCommit | None,
  *,
  config: dict,
  is_lead: bool,
  timeout_s: float = 600.0,
) -> None:
  """Waits for orbax to commit ``pending`` on every process; each other process reports its
  digests, and the lead, once all have reported (within ``timeout_s``), writes the digest
  marker that makes the step trusted."""
  manager.wait_until_finished()
  if pending is None:
    return
  step_dir = pathlib.Path(manager.directory) / str(pending["step"])
  if not is_lead:
    if _wait_for(step_dir, timeout_s):  # the lead's rename may reach this host later
      _report(step_dir, pending)
    return
  if (step_dir / integrity.COMMIT_FILE).exists():
    return
  arrays = _collect(step_dir, pending, wait_s=timeout_s)
  if arrays is None:
    raise RuntimeError(
      f"checkpoint step {pending['step']} in {manager.directory}: not every process reported "
      f"its digests within {timeout_s:g} s; the step stays untrusted (a resume uses the one "
      "before)"
    )
  _write_marker(step_dir, pending["step"], arrays, config)


def prepare_directory(
  directory: pathlib.Path,
  *,
  config: dict | None = None,
  config_differences: Callable[[dict, dict], list[str]] | None = None,
) -> list[str]:
  """The lead process's clean-up before any process creates its manager: removes the
  temporary folders of interrupted saves and, given ``config``, moves aside every step newer
  than the newest one whose marker, files and config check out (the other processes then see
  only trusted steps). Raises :class:`CheckpointPathError` first when :func:`check_directory`
  does. Returns the names removed or moved."""
  check_directory(directory)
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
  if manager.is_saving_in_progress() or not pending["local"].done():
    return pending
  step_dir = pathlib.Path(manager.directory) / str(pending["step"])
  if not step_dir.is_dir():  # not committed by orbax (yet): check again later
    return pending
  if not is_lead:
    _report(step_dir, pending)
    return pending  # only the lead writes markers; the others wait at the next save
  arrays = _collect(step_dir, pending, wait_s=0.0)
  if arrays is None:  # another process has not reported yet
    return pending
  _write_marker(step_dir, pending["step"], arrays, config)
  return None


class NoUsableCheckpointError(ValueError):
  """A reader found no step it can use: none written, every one damaged, or each vanished
  while it was read."""


def read_newest_step(
  checkpoints: pathlib.Path,
  target: Any,
  *,
  config: dict,
  config_differences: Callable[[dict, dict], list[str]],
  attempts: int = 5,
) -> tuple[int, Any]:
  """``(step, state)`` of the newest step in ``checkpoints`` whose digests verify, read without
  changing anything there (a damaged step is reported, not moved).

  Raises :class:`CheckpointMismatchError` (a step of other arrays than ``target``) or
  :class:`NoUsableCheckpointError`, each one line naming the folder and the fix.
  """

  # A trainer may delete old steps (train.keep_checkpoints) while they are read, and write new
  # ones: a read that fails on a vanished file, or finds no usable step while the steps
  # changed under it, starts over (the newest step is then a newer one).
  def rotating(how: str) -> NoUsableCheckpointError:
    return NoUsableCheckpointError(
      f"the checkpoints in {checkpoints} kept {how}; a trainer is rotating them faster than "
      "they can be read: try again, or raise train.keep_checkpoints"
    )

  for attempt in range(attempts):
    listed = [p.name for p in integrity.step_dirs(checkpoints)]
    manager = make_checkpoint_manager(checkpoints, keep=1000, async_save=False, read_only=True)
    try:
      restored = restore_verified(
        manager, target, config=config, move_bad=False, config_differences=config_differences
      )
    except FileNotFoundError as e:
      if attempt == attempts - 1:
        raise rotating(f"vanishing while being read ({e.filename})") from None
      continue
    finally:
      manager.close()
    if restored is not None or [p.name for p in integrity.step_dirs(checkpoints)] == listed:
      break
    if attempt == attempts - 1:
      raise rotating("changing while being read")
  if restored is None:
    found = len(integrity.step_dirs(checkpoints))
    if found:
      raise NoUsableCheckpointError(
        f"none of the {found} checkpoint steps in {checkpoints} is usable (see "
        "the warnings above); train again to write a new one"
      )
    raise NoUsableCheckpointError(f"no checkpoint in {checkpoints}; train first")
  step, state, _ = restored
  return step, state


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _agreed(problems: list[str]) -> list[str]:
  """Every process's problems (each checks the blocks it holds), so all decide alike."""
  if jax.process_count() == 1:
    return problems
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  counts = multihost_utils.process_allgather(np.array([len(problems)], np.int32))
  return problems or (["(found by another process)"] if np.any(counts) else [])


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
        bad = _agreed(integrity.array_problems(restored["state"], record["arrays"]))
        if not bad:
          return step, restored["state"], dict(restored["data"] or {})
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
