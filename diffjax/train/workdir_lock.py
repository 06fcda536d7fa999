"""One trainer per workdir: an advisory lock on ``WORKDIR/train.lock`` held for the whole run.

The lock is ``fcntl.flock`` on a file kept open until the run returns. The kernel drops it when
the process ends however it ends (``kill -9``, the OOM killer, a preempted machine), so a lock
file left behind never blocks a resume: only a live holder does. The file's body is JSON naming
the holder (host, pid, start time), read only to word the refusal; the decision is the kernel's.
The file is never deleted (deleting a lock file races with a process about to lock it).

Several processes (``jax.distributed``): only process 0 locks. Their workdir is one shared
folder (orbax writes every process's shards into it), so a lock per process on the same file
would refuse the run's own peers; when process 0 of a second run is refused, its peers end at
the next barrier or heartbeat. On NFS (v4, or v3 with the lock daemon) Linux implements
``flock`` with NFS byte-range locks, which other clients see; a file system without locks
(``ENOLCK``, ``EOPNOTSUPP``) gets a warning and an unlocked run rather than no run.

Readers (``diffjax sample``, ``evaluate``) never lock: they only read committed checkpoints.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import time

from diffjax.train.config import ConfigError

__all__ = ["LOCK_FILE", "WorkdirError", "WorkdirLock"]

log = logging.getLogger("diffjax")

LOCK_FILE = "train.lock"

# How long a refused trainer waits for the holder's body to appear (it is written just after
# the lock is taken, so an empty body means the holder is between the two).
_BODY_WAIT_S = 1.0


class WorkdirError(ConfigError):
  """The workdir cannot be used as it is: another run holds it, or a file of the wrong kind is
  in the way. A :class:`ConfigError`, so the command line prints one line and exits 2."""


def _holder_body() -> dict:
  now = datetime.datetime.now(datetime.timezone.utc).astimezone()
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": now.isoformat(timespec="seconds"),
    "command": " ".join(sys.argv)[:500],
  }


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe_holder(path: pathlib.Path) -> str:
  """``host H, pid P, started S`` from the lock file's body, waiting briefly for a holder that
  has the lock but has not written its body yet."""
  deadline = time.monotonic() + _BODY_WAIT_S
  while True:
    try:
      fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
      try:
        body = json.loads(os.read(fd, 65536).decode("utf-8"))
      finally:
        os.close(fd)
      host, pid, started = body["host"], int(body["pid"]), body["started"]
      break
    except (OSError, ValueError, KeyError, TypeError):
      if time.monotonic() > deadline:
        return "a process that has not recorded itself"
      time.sleep(0.05)
  text = f"host {host}, pid {pid}, started {started}"
  if host == socket.gethostname() and not _pid_alive(pid):
    # The recorded process is gone but the lock is held: a child that inherited its open file.
    text += f"; pid {pid} has exited, a process it started still holds the lock (`fuser {path}`)"
  return text


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds ``WORKDIR/train.lock`` or raises :class:`WorkdirError`
  at once naming the holder; ``enabled=False`` (processes other than 0) does nothing.

  Creates the workdir if needed. The lock is released when the context exits, or by the kernel
  when the process dies.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.enabled = enabled
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _open(self) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
      return os.open(self.path, flags, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise WorkdirError(
          f"{self.path} is a symbolic link; remove it (diffjax keeps its lock file inside the "
          "workdir) and run again"
        ) from None
      if e.errno == errno.EISDIR:
        raise WorkdirError(
          f"{self.path} is a directory; move it out of the workdir (diffjax keeps its lock "
          "file there) and run again"
        ) from None
      raise

  def acquire(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    while True:
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise WorkdirError(
            f"--workdir {self.workdir} is in use by another `diffjax train` "
            f"({_describe_holder(self.path)}); wait for it to end or stop it, or choose "
            "another --workdir"
          ) from None
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          log.warning(
            "%s: this file system has no file locks (%s); training without the workdir "
            "lock, so make sure no other `diffjax train` uses this workdir",
            self.path,
            e.strerror,
          )
          return
        raise
      # The file may have been replaced between open and flock; lock the one at the path.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    body = json.dumps(_holder_body()).encode("utf-8") + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)
    self._fd = fd

  def release(self) -> None:
    """Unlocks; the file stays, with the last holder's body."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)
