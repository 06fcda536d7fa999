"""Files replaced atomically through a temporary file nobody could have planted.

A workdir is shared: a fixed temporary name such as ``config.json.tmp`` can be a symbolic link
planted by someone else, and ``open(tmp, "w")`` would follow it and overwrite its target. Here
the temporary file gets a random name and is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so
an existing file or link is never opened, and ``os.replace`` renames it over the destination
(replacing a link at the destination itself, never writing through it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import IO

__all__ = ["create_exclusive", "atomic_open", "write_atomic", "fsync_dir"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_FLAGS |= getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str | pathlib.Path) -> None:
  """Makes a rename or creation inside directory ``path`` durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def create_exclusive(path: str | pathlib.Path, mode: str = "wb", **kwargs) -> IO:
  """Opens a new file at ``path`` for writing; fails (``FileExistsError``) if anything, a
  symbolic link included, is already there. ``kwargs`` go to :func:`os.fdopen`."""
  fd = os.open(path, _FLAGS, 0o666)
  try:
    return os.fdopen(fd, mode, **kwargs)
  except BaseException:
    os.close(fd)
    raise


@contextlib.contextmanager
def atomic_open(
  path: str | pathlib.Path, mode: str = "wb", *, durable: bool = True, **kwargs
) -> Iterator[IO]:
  """A file whose contents replace ``path`` when the block ends without an exception.

  The file is ``<name>.<random>.tmp`` beside ``path``, created exclusively; on an exception it
  is removed and ``path`` is untouched. ``durable``: fsync the file before the rename and the
  folder after it (a crash leaves the old or the new contents, never a torn file). Works with
  writers that take a file object (``json.dump``, ``np.savez``, ``PIL.Image.save``).

  Example::

    with atomic_open(workdir / "config.json", "w", encoding="utf-8") as f:
      f.write(text)
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
  f = create_exclusive(tmp, mode, **kwargs)
  try:
    with f:
      yield f
      f.flush()
      if durable:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  if durable:
    fsync_dir(path.parent)


def write_atomic(path: str | pathlib.Path, data: str | bytes, *, durable: bool = True) -> None:
  """Replaces ``path`` by ``data`` (``str`` is written as UTF-8) through :func:`atomic_open`."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  with atomic_open(path, "wb", durable=durable) as f:
    f.write(data)
