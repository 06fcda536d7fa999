"""Checkpoint integrity: a digest of every array and file, written last as the commit marker.

Orbax checks nothing on restore: flipped bytes come back as wrong values, a stray empty step
directory becomes ``latest_step()``, an asynchronous step is listed before it commits, and a
restore into another dtype casts silently. So each finished step gets ``diffjax_commit.json``,
written atomically after orbax has committed the step and opened it back. It holds

* ``files``: size and SHA-256 of every file of the step (checked before orbax reads anything, so
  a damaged file is never parsed);
* ``arrays``: ``"dtype shape digest"`` of every array of the state (checked after the restore,
  which catches a silent cast or anything the file check let through). The digest is the
  SHA-256 of the array's bytes in C order when the array is stored as one block, else
  ``start:stop,...=sha256;...``: one SHA-256 per distinct shard (block) of the saved layout, each
  hashed by the one process that holds its first replica, so no process copies arrays it does
  not hold;
* ``config``: :func:`diffjax.train.config.resume_fingerprint` of the run that wrote it.

A step without a valid marker is moved aside into ``WORKDIR/checkpoints_quarantine/`` (never
deleted, never through a symbolic link) and the newest valid step is used instead, with one
warning naming the step and reason.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np

from diffjax.train import atomic_write

__all__ = [
  "COMMIT_FILE",
  "TMP_MARKER",
  "array_digests",
  "local_array_digests",
  "start_local_array_digests",
  "merge_digests",
  "array_problems",
  "state_digest",
  "array_spec",
  "spec_differences",
  "file_digests",
  "write_commit",
  "read_commit",
  "verify_files",
  "links_in",
  "step_dirs",
  "remove_tmp_dirs",
  "check_quarantine",
  "quarantine",
]

COMMIT_FILE = "diffjax_commit.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
_CHUNK = 1 << 20


def _key_data(x):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def _sha256(a: np.ndarray) -> str:
  """SHA-256 of ``a``'s bytes in C order (hashlib releases the GIL: threads hash in parallel)."""
  return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _block(index: tuple, shape: tuple) -> str:
  """``"start:stop,..."`` of a shard's index (a tuple of slices) in an array of ``shape``."""
  return ",".join("{}:{}".format(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _slices(block: str) -> tuple[slice, ...]:
  if not block:
    return ()
  return tuple(slice(*map(int, b.split(":"))) for b in block.split(","))


def _owned_blocks(x) -> list[tuple[str, Any]]:
  """``(block, data)`` of the shards whose first replica this process holds."""
  if not isinstance(x, jax.Array):
    host = np.asarray(x)
    return [(_block((slice(None),) * host.ndim, host.shape), host)]
  return [(_block(s.index, x.shape), s.data) for s in x.addressable_shards if s.replica_id == 0]


def _hash_all(arrays: list) -> list[str]:
  """SHA-256 of each array, in parallel threads. Empties ``arrays`` as it goes, so a device
  array's host copy lives only while it is hashed (at most one per thread)."""
  if not arrays:
    return []

  def take_and_hash(i):
    a, arrays[i] = arrays[i], None
    return _sha256(np.asarray(a))

  workers = min(len(arrays), os.cpu_count() or 1, 8)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(take_and_hash, range(len(arrays))))


def local_array_digests(tree: Any) -> dict[str, list]:
  """``{path: [dtype, shape, {block: sha256}]}`` of the blocks this process owns (one process
  per distinct shard: the holder of its replica 0). :func:`merge_digests` of every process's
  result is :func:`array_digests`."""
  specs, names, data = _owned(tree)
  shas = iter(_hash_all(data))
  return {
    key: [dtype, shape, {b: next(shas) for b in blocks}]
    for (key, dtype, shape), blocks in zip(specs, names, strict=True)
  }


def start_local_array_digests(tree: Any) -> concurrent.futures.Future:
  """:func:`local_array_digests` hashed in a background thread: only the host copy of the
  blocks this process owns is taken before it returns (the caller may then donate or change
  ``tree``); the copies are freed block by block as the hashing goes."""
  specs, names, data = _owned(tree)
  # Host views of the blocks: a copy from an accelerator, the buffer itself on CPU (where a
  # later donation of a buffer with such a view allocates anew instead of overwriting it).
  data = [np.asarray(d) for d in data]

  def digests():
    shas = iter(_hash_all(data))
    return {
      key: [dtype, shape, {b: next(shas) for b in blocks}]
      for (key, dtype, shape), blocks in zip(specs, names, strict=True)
    }

  future = concurrent.futures.Future()

  def run():
    try:
      future.set_result(digests())
    except BaseException as e:  # noqa: BLE001 -- handed to whoever waits on the future
      future.set_exception(e)

  threading.Thread(target=run, name="diffjax_digests", daemon=True).start()
  return future


def _owned(tree: Any) -> tuple[list, list, list]:
  """``(specs, block names, block data)`` of the blocks this process owns, leaf by leaf."""
  specs, names, data = [], [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = _key_data(leaf)
    blocks = _owned_blocks(leaf)
    specs.append((jax.tree_util.keystr(path), np.dtype(leaf.dtype).name, list(leaf.shape)))
    names.append([b for b, _ in blocks])
    data.extend(d for _, d in blocks)
  for d in data:  # start every transfer before the first is waited on (a no-op on CPU)
    if isinstance(d, jax.Array) and next(iter(d.devices())).platform != "cpu":
      d.copy_to_host_async()
  return specs, names, data


def merge_digests(parts: list[dict[str, list]]) -> dict[str, str]:
  """``{path: "dtype shape digest"}`` from every process's :func:`local_array_digests`: the
  plain SHA-256 for an array of one block (the whole array), else its blocks in order."""
  out = {}
  for key in parts[0]:
    dtype, shape, _ = parts[0][key]
    blocks = {}
    for part in parts:
      blocks.update(part[key][2])
    whole = _block((slice(None),) * len(shape), tuple(shape))
    if list(blocks) == [whole]:
      digest = blocks[whole]
    else:
      digest = ";".join(f"{b}={blocks[b]}" for b in sorted(blocks, key=_slice_order))
    out[key] = f"{dtype} {list(shape)} {digest}"
  return out


def _slice_order(block: str) -> list[int]:
  return [s.start for s in _slices(block)]


def _gather_json(obj: Any) -> list[Any]:
  """``obj`` of every process, in process order (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [
    json.loads(bytes(row[: int(n)]).decode())
    for row, n in zip(gathered.reshape(len(sizes), -1), np.ravel(sizes), strict=True)
  ]


def array_digests(tree: Any) -> dict[str, str]:
  """``{path: "dtype shape digest"}`` of every leaf (see the module docstring): the bytes in C
  order with their dtype and shape, so a cast or a reshape changes the digest as surely as a
  flipped bit. Each process hashes only its own blocks; with several processes this is a
  collective (every process calls it) that exchanges the digests, not the arrays."""
  return merge_digests(_gather_json(local_array_digests(tree)))


def array_problems(tree: Any, recorded: dict[str, str]) -> list[str]:
  """The paths of ``tree`` (restored, in any layout) whose arrays differ from the digests
  ``recorded`` by :func:`array_digests`, possibly in another layout.

  Each process checks the recorded blocks it can read from one of its shards (every block, when
  it holds whole arrays as ``sample`` and ``evaluate`` do); a block spread over several of its
  shards is read from the whole array when the process holds all of it. With several processes
  the caller must combine the answers (any process's problem is everyone's).
  """
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    leaf = _key_data(leaf)
    if key not in recorded:
      bad.append(key)
      continue
    spec, digest = recorded[key].rsplit(" ", 1)
    if spec != f"{np.dtype(leaf.dtype).name} {list(leaf.shape)}":
      bad.append(key)
      continue
    whole = _block((slice(None),) * leaf.ndim, leaf.shape)
    blocks = dict(b.split("=") for b in digest.split(";")) if "=" in digest else {whole: digest}
    todo, expected = [], []
    for block, sha in blocks.items():
      data = _read_block(leaf, block)
      if data is not None:
        todo.append(data)
        expected.append(sha)
    if _hash_all(todo) != expected:
      bad.append(key)
  return bad


def _read_block(x, block: str):
  """The data of ``block`` of ``x`` from one local shard, or the whole local array, or
  ``None`` when this process cannot read it alone."""
  slices = _slices(block)
  if not isinstance(x, jax.Array):
    return np.asarray(x)[slices]
  for s in x.addressable_shards:
    index = _slices(_block(s.index, x.shape))
    if all(o.start <= w.start and w.stop <= o.stop for o, w in zip(index, slices, strict=True)):
      if index == slices:
        return s.data
      return np.asarray(s.data)[
        tuple(slice(w.start - o.start, w.stop - o.start) for o, w in zip(index, slices))
      ]
  if x.is_fully_addressable:
    return np.asarray(x)[slices]
  return None


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


def _walk(step_dir: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """``(files, links)`` under ``step_dir`` (the marker excluded), links never followed."""
  files, links = [], []
  for root, dirs, names in os.walk(step_dir, followlinks=False):
    for name in dirs + names:
      path = pathlib.Path(root) / name
      if path.is_symlink():
        links.append(path)
      elif name in names and name != COMMIT_FILE:
        files.append(path)
  return sorted(files), sorted(links)


def file_digests(step_dir: pathlib.Path) -> dict[str, list]:
  """``{relative path: [size, sha256]}`` of every file under ``step_dir`` but the marker."""
  files, links = _walk(step_dir)
  if links:
    raise OSError(f"{links[0]} is a symbolic link; a checkpoint holds only regular files")
  return {
    path.relative_to(step_dir).as_posix(): [path.stat().st_size, _sha256_file(path)]
    for path in files
  }


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
  with atomic_write.atomic_open(step_dir / COMMIT_FILE, "w", encoding="utf-8") as f:
    json.dump(record, f, sort_keys=True, default=list)


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
    files, links = _walk(step_dir)
    if links:
      return f"symbolic link {links[0].relative_to(step_dir).as_posix()} (never followed)"
    present = {p.relative_to(step_dir).as_posix() for p in files}
    for name, expected in sorted(record["files"].items()):
      path = step_dir / name
      if name not in present:
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


def links_in(directory: pathlib.Path) -> list[pathlib.Path]:
  """The symbolic links among the entries of ``directory`` (diffjax never follows one there)."""
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.iterdir() if p.is_symlink())


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
      if TMP_MARKER in path.name and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(True)
        removed.append(path.name)
  return removed


def check_quarantine(into: pathlib.Path) -> None:
  """Raises ``NotADirectoryError`` (one line) when ``into`` exists but is not a real folder:
  a symbolic link there would move bad steps out of the workdir."""
  if into.is_symlink() or (into.exists() and not into.is_dir()):
    raise NotADirectoryError(
      f"{into} is a symbolic link or a file; bad checkpoints are moved only into a real "
      "folder inside the workdir: remove it (or replace it by a folder)"
    )


def quarantine(step_dir: pathlib.Path, *, into: pathlib.Path, reason: str) -> pathlib.Path:
  """Moves ``step_dir`` to ``into/<step>-<time>`` with a ``REASON.txt`` beside its files;
  ``into`` is never a symbolic link (:func:`check_quarantine`)."""
  check_quarantine(into)
  into.mkdir(parents=True, exist_ok=True)
  check_quarantine(into)
  target = into / f"{step_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
  suffix = 0
  while target.exists():
    suffix += 1
    target = target.with_name(f"{target.name}.{suffix}")
  os.replace(step_dir, target)
  with atomic_write.create_exclusive(into / f"{target.name}.REASON.txt", "w") as f:
    f.write(reason + "\n")
  return target
