"""Checkpoint integrity: a digest of every array and file, written last as the commit marker.

Orbax (0.12.8) checks nothing on restore: flipped bytes come back as wrong values, a stray empty
step directory becomes ``latest_step()``, an asynchronous step is listed before it commits, and a
restore into another dtype casts silently. So each finished step gets ``diffjax_commit.json``,
written atomically after orbax has committed the step. It holds

* ``files``: size and SHA-256 of every file of the step (checked before orbax reads anything, so
  a damaged file is never parsed);
* ``arrays``: dtype, shape and SHA-256 of every array of the state (checked after the restore,
  which catches a silent cast or anything the file check let through);
* ``config``: :func:`diffjax.train.config.resume_fingerprint` of the run that wrote it.

A step without a valid marker is moved aside into ``WORKDIR/checkpoints_quarantine/`` (never
deleted) and the newest valid step is used instead, with one warning naming the step and reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np

__all__ = [
  "COMMIT_FILE",
  "TMP_MARKER",
  "array_digests",
  "state_digest",
  "array_spec",
  "spec_differences",
  "file_digests",
  "write_commit",
  "read_commit",
  "verify_files",
  "step_dirs",
  "remove_tmp_dirs",
  "quarantine",
]

COMMIT_FILE = "diffjax_commit.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
_CHUNK = 1 << 20


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Another process holds part of it; every process takes part in this gather.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _key_data(x):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def array_digests(tree: Any) -> dict[str, str]:
  """``{path: "dtype shape sha256"}`` of every leaf: the bytes in C order with their dtype and
  shape, so a cast or a reshape changes the digest as surely as a flipped bit."""
  digests = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    host = np.asarray(_host_array(_key_data(leaf)))
    sha = hashlib.sha256(host.tobytes(order="C")).hexdigest()
    digests[jax.tree_util.keystr(path)] = f"{host.dtype.name} {list(host.shape)} {sha}"
  return digests


def state_digest(tree: Any) -> str:
  """One SHA-256 over :func:`array_digests` (two states are bit-equal iff these match)."""
  return hashlib.sha256(json.dumps(array_digests(tree), sort_keys=True).encode()).hexdigest()


def array_spec(tree: Any) -> dict[str, str]:
  """``{path: "dtype shape"}`` of an abstract or concrete state (what a restore must match)."""
  return {
    jax.tree_util.keystr(path): f"{np.dtype(leaf.dtype).name} {list(leaf.shape)}"
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def spec_differences(saved: dict[str, str], new: dict[str, str]) -> list[str]:
  """``path: saved -> new`` for every array whose dtype or shape differs, or that exists in
  one state only."""
  return [
    f"{k}: {saved.get(k, '<absent>')} -> {new.get(k, '<absent>')}"
    for k in sorted(set(saved) | set(new))
    if saved.get(k) != new.get(k)
  ]


def _sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      h.update(block)
  return h.hexdigest()


def file_digests(step_dir: pathlib.Path) -> dict[str, list]:
  """``{relative path: [size, sha256]}`` of every file under ``step_dir`` but the marker."""
  out = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.name != COMMIT_FILE:
      out[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, _sha256_file(path)]
  return out


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_commit(
  step_dir: pathlib.Path, *, step: int, arrays: dict[str, str], config: dict[str, Any]
) -> None:
  """Writes the marker last, atomically (tmp file, fsync, rename, fsync of the folder): a kill
  leaves either no marker (the step is not trusted) or a whole one."""
  record = {
    "format": 1,
    "step": int(step),
    "files": file_digests(step_dir),
    "arrays": arrays,
    "config": config,
  }
  tmp = step_dir / (COMMIT_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, sort_keys=True, default=list)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / COMMIT_FILE)
  _fsync_dir(step_dir)


def read_commit(step_dir: pathlib.Path) -> tuple[dict | None, str | None]:
  """``(record, None)`` or ``(None, reason)`` when the marker is missing or unreadable."""
  path = step_dir / COMMIT_FILE
  if not step_dir.is_dir():
    return None, "not a directory"
  if not path.is_file():
    return None, "no commit marker (an interrupted save or a stray directory)"
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return None, f"unreadable commit marker ({type(e).__name__})"
  if not (
    isinstance(record, dict)
    and isinstance(record.get("files"), dict)
    and isinstance(record.get("arrays"), dict)
    and isinstance(record.get("config"), dict)
    and isinstance(record.get("step"), int)
  ):
    return None, "malformed commit marker"
  return record, None


def verify_files(step_dir: pathlib.Path, record: dict) -> str | None:
  """``None`` when every file listed in the marker is present with its size and digest and no
  other file was added; otherwise the first problem found."""
  if record["step"] != int(step_dir.name):
    return f"commit marker is for step {record['step']}"
  try:
    present = {
      p.relative_to(step_dir).as_posix()
      for p in step_dir.rglob("*")
      if p.is_file() and p.name != COMMIT_FILE
    }
    for name, expected in sorted(record["files"].items()):
      path = step_dir / name
      if not path.is_file():
        return f"missing file {name}"
      size = path.stat().st_size
      if not isinstance(expected, list) or len(expected) != 2:
        return "malformed commit marker"
      if size != expected[0]:
        return f"file {name} has {size} bytes, expected {expected[0]} (truncated or zeroed)"
      if _sha256_file(path) != expected[1]:
        return f"file {name} does not match its digest (corrupted bytes)"
    extra = sorted(present - set(record["files"]))
    if extra:
      return f"unexpected file {extra[0]}"
  except OSError as e:
    return f"unreadable ({type(e).__name__}: {e})"
  return None


def step_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
  """The entries of ``directory`` named by a step number, newest first."""
  if not directory.is_dir():
    return []
  return sorted(
    (p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True
  )


def remove_tmp_dirs(directory: pathlib.Path) -> list[str]:
  """Deletes the ``*.orbax-checkpoint-tmp*`` folders an interrupted save leaves (never a
  committed step: orbax renames a step only once it is complete)."""
  removed = []
  if directory.is_dir():
    for path in directory.iterdir():
      if TMP_MARKER in path.name:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(True)
        removed.append(path.name)
  return removed


def quarantine(step_dir: pathlib.Path, *, into: pathlib.Path, reason: str) -> pathlib.Path:
  """Moves ``step_dir`` to ``into/<step>-<time>`` with a ``REASON.txt`` beside its files."""
  into.mkdir(parents=True, exist_ok=True)
  target = into / f"{step_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
  suffix = 0
  while target.exists():
    suffix += 1
    target = target.with_name(f"{target.name}.{suffix}")
  os.replace(step_dir, target)
  (target.parent / f"{target.name}.REASON.txt").write_text(reason + "\n", encoding="utf-8")
  return target
