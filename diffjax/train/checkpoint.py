"""Orbax checkpoints of the whole train state plus the data iterator's state.

The only module that touches orbax. A checkpoint at step ``s`` holds two items: ``state`` (the
:class:`~diffjax.train.state.TrainState` pytree) and ``data`` (JSON: the data iterator's state,
or the step for data generated on device). Restoring goes into an abstract target that carries
the shardings, so arrays come back already laid out over the mesh.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["make_checkpoint_manager", "save", "restore_latest", "abstract_with_shardings"]


def make_checkpoint_manager(directory: str | pathlib.Path, *, keep: int,
                            async_save: bool) -> ocp.CheckpointManager:
  """A manager keeping the newest ``keep`` steps; async saves overlap the next train steps.

  ``cleanup_tmp_directories`` removes the ``*.orbax-checkpoint-tmp`` folders a kill during a save
  leaves behind (orbax keeps them otherwise).
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
      create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, *,
         force: bool = False) -> bool:
  """Saves ``state`` and ``data_state`` at ``step``; returns whether a save started."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, dict] | None:
  """Restores the newest step into ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with
  shardings); ``None`` when the directory holds no checkpoint."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return step, restored["state"], dict(restored["data"])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves carrying the given shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
