"""Metrics to WORKDIR/metrics.jsonl (append-only, one JSON object per line) and TensorBoard.

The file is strict JSON (RFC 8259 has no NaN or Infinity): a non-finite value is written as
``null`` and its name listed under ``"nonfinite"``, e.g. ``{"step": 8, "loss": null,
"nonfinite": ["loss"]}``; TensorBoard gets the finite values only. Besides scalars, TensorBoard
gets text (the config, once per run) and images (the sample plots).

The side files are the user's to read, move and damage. A line that is not a UTF-8 JSON row (a
flipped byte, garbage pasted in) is skipped with one warning and the good lines are kept; a
metrics.jsonl or tensorboard/ deleted during the run is recreated at the next write, with a
warning; a metrics.jsonl that is not a file, or a tensorboard/ that is not a folder, fails with
one line (:class:`~diffjax.train.workdir_lock.WorkdirError`), never a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pathlib
import stat

import numpy as np

from diffjax.train import atomic_write
from diffjax.train.workdir_lock import WorkdirError

__all__ = ["MetricsWriter", "read_metrics", "check_side_files", "strict_row"]

log = logging.getLogger("diffjax")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"


def strict_row(row: dict) -> dict:
  """``row`` with every non-finite number, alone or in a list, replaced by ``None`` and the
  names holding one added to ``row["nonfinite"]`` (kept sorted); other values unchanged."""
  earlier = row.get("nonfinite")  # a row read back: keep its flags (strings only, if damaged)
  flagged = {x for x in earlier if isinstance(x, str)} if isinstance(earlier, list) else set()
  out = {}
  for name, value in row.items():
    if name == "nonfinite":
      continue
    if isinstance(value, float) and not math.isfinite(value):
      value = None
      flagged.add(name)
    elif isinstance(value, list) and any(
      isinstance(x, float) and not math.isfinite(x) for x in value
    ):
      value = [None if isinstance(x, float) and not math.isfinite(x) else x for x in value]
      flagged.add(name)
    out[name] = value
  if flagged:
    out["nonfinite"] = sorted(flagged)
  return out


def _dumps(row: dict) -> str:
  # allow_nan=False: a value strict_row missed fails here rather than as invalid JSON on disk.
  return json.dumps(strict_row(row), allow_nan=False)


def _move_away(path: pathlib.Path, what: str) -> WorkdirError:
  return WorkdirError(f"{path} is {what}; move it out of the workdir and run again")


def check_side_files(workdir: str | pathlib.Path, *, plots: bool = False) -> None:
  """Raises :class:`WorkdirError` when WORKDIR/metrics.jsonl exists but is not a file (or a
  link, which the writer replaces), WORKDIR/tensorboard exists but is not a folder, or (with
  ``plots``: the run writes intermediate plots) WORKDIR/plots exists but is not a folder."""
  workdir = pathlib.Path(workdir)
  plots_dir = workdir / PLOTS_DIR
  if plots and os.path.lexists(plots_dir) and not plots_dir.is_dir():
    raise _move_away(plots_dir, "not a folder (the plots of train.plot_every go there)")
  path = workdir / METRICS_FILE
  try:
    mode = os.lstat(path).st_mode
  except FileNotFoundError:
    mode = None
  if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
    what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise _move_away(path, f"{what}, not diffjax's metrics log")
  tb_dir = workdir / TENSORBOARD_DIR
  if os.path.lexists(tb_dir) and not tb_dir.is_dir():
    raise _move_away(tb_dir, "not a folder (TensorBoard's event files go there)")


def _remove_stale(path: pathlib.Path) -> None:
  """Removes a file or a symbolic link left at ``path`` (the link, never its target)."""
  try:
    mode = os.lstat(path).st_mode
  except FileNotFoundError:
    return
  if stat.S_ISLNK(mode):
    log.warning("%s was a symbolic link; removed the link (its target is untouched)", path)
  elif not stat.S_ISREG(mode):
    raise _move_away(path, "in the way (diffjax writes its temporary file there)")
  path.unlink()


def _replace_contents(path: pathlib.Path, data: bytes) -> None:
  """``path`` holds ``data`` afterwards, atomically (a kill leaves the old or the new file
  whole), through a temporary file created exclusively; the fixed-name ``.tmp`` an older
  version or someone else left is removed first (a link, never its target)."""
  _remove_stale(path.with_name(path.name + ".tmp"))
  atomic_write.write_atomic(path, data)


class MetricsWriter:
  """Appends ``{"step": s, name: value, ...}`` lines; only process 0 writes.

  On resume, lines at or beyond the resumed step are dropped first (they belong to steps that
  will be recomputed), with a truncated last line left by a kill and any damaged line, so the
  file never holds a step twice nor loses one. A metrics.jsonl or tensorboard/ that vanishes
  during the run is recreated at the next write.
  """

  def __init__(
    self,
    workdir: str | pathlib.Path,
    *,
    resume_step: int,
    enabled: bool = True,
    tensorboard: bool = True,
  ):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self.tb_dir = pathlib.Path(workdir) / TENSORBOARD_DIR
    self._file = self._file_stat = None
    self._tb = self._tb_file = None
    if not enabled:
      return
    check_side_files(workdir)
    if self.path.is_symlink():
      log.warning(
        "%s was a symbolic link; replaced it with a file (its target is untouched)", self.path
      )
      self.path.unlink()
    elif self.path.exists():
      kept = {}  # by step, the last row written wins: never a step twice
      for row in read_metrics(self.path):
        if row["step"] <= resume_step:
          kept[row["step"]] = row
      data = "".join(_dumps(kept[s]) + "\n" for s in sorted(kept))
      _replace_contents(self.path, data.encode("utf-8"))
    self._open_file()
    if tensorboard:
      self._open_tensorboard()

  def _open_file(self) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
      fd = os.open(self.path, flags, 0o644)
    except OSError as e:
      if e.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
        raise _move_away(self.path, "not a regular file, not diffjax's metrics log") from None
      if e.errno == errno.ENOENT:
        raise WorkdirError(
          f"{self.path.parent} vanished during the run; restore it to resume, or start again"
        ) from None
      raise
    self._file = os.fdopen(fd, "a", encoding="utf-8")
    self._file_stat = os.fstat(fd)

  def _open_tensorboard(self) -> None:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    before = set(os.listdir(self.tb_dir)) if self.tb_dir.is_dir() else set()
    try:
      self._tb = SummaryWriter(str(self.tb_dir))
    except (FileExistsError, NotADirectoryError):
      raise _move_away(self.tb_dir, "not a folder (TensorBoard's event files go there)") from None
    new = set(os.listdir(self.tb_dir)) - before
    self._tb_file = self.tb_dir / new.pop() if len(new) == 1 else None

  def _reopen_if_gone(self) -> None:
    """Recreates metrics.jsonl or the TensorBoard event file if either vanished (deleted or
    moved away); anything else in their place stops the run with one line."""
    try:
      now = os.stat(self.path, follow_symlinks=False)
    except FileNotFoundError:
      now = None
    if now is None or not os.path.samestat(now, self._file_stat):
      if now is not None and not stat.S_ISREG(now.st_mode):
        raise _move_away(self.path, "no longer diffjax's metrics log (replaced during the run)")
      log.warning("%s vanished during the run; writing a new one from here on", self.path)
      self._file.close()
      self._open_file()
    if self._tb is None:
      return
    alive = self.tb_dir.is_dir() and (self._tb_file is None or self._tb_file.exists())
    if not alive:
      log.warning("%s vanished during the run; writing a new event file from here on", self.tb_dir)
      self._tb.close()
      self._tb = None
      check_side_files(self.path.parent)
      self._open_tensorboard()

  def write(self, step: int, metrics: dict[str, float | list[float]]) -> None:
    """One line ``{"step": ..., name: value}``; a list value (one per seed) is written as a list
    and logged to TensorBoard as ``name/0``, ``name/1``, ...; a non-finite value is written as
    ``null``, named in ``"nonfinite"``, and left out of TensorBoard."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update(
      {
        k: ([float(x) for x in v] if isinstance(v, (list, tuple)) else float(v))
        for k, v in metrics.items()
      }
    )
    self._reopen_if_gone()
    # One write call per line: a kill leaves at most a truncated last line, which readers skip
    # and a resume removes.
    self._file.write(_dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      # Finite values only (a chart has no point for NaN, and the writer warns at each one);
      # the row above keeps the flag.
      for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
          for i, x in enumerate(value):
            if math.isfinite(x):
              self._tb.add_scalar(f"{name}/{i}", float(x), int(step))
        elif math.isfinite(value):
          self._tb.add_scalar(name, float(value), int(step))

  def write_text(self, tag: str, text: str, step: int) -> None:
    """Text (Markdown) under ``tag`` in TensorBoard's text tab; nothing without TensorBoard."""
    if not self.enabled or self._tb is None:
      return
    self._reopen_if_gone()
    self._tb.add_text(tag, text, int(step))
    self._tb.flush()

  def write_image(self, tag: str, png: bytes, step: int) -> None:
    """A PNG under ``tag`` in TensorBoard's image tab; nothing without TensorBoard."""
    if not self.enabled or self._tb is None:
      return
    import io  # pylint: disable=import-outside-toplevel

    from PIL import Image  # pylint: disable=import-outside-toplevel

    with Image.open(io.BytesIO(png)) as image:
      pixels = np.asarray(image.convert("RGB"))
    self._reopen_if_gone()
    self._tb.add_image(tag, pixels, int(step), dataformats="HWC")
    self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _parse_row(raw: bytes) -> dict | None:
  """A metrics row from one line, or ``None`` when it is not UTF-8 JSON ``{"step": int, ...}``."""
  try:
    row = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError):
    return None
  ok = isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 0
  return row if ok else None


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """Parses metrics.jsonl. A truncated last line (a kill mid-write) is skipped quietly; any
  other line that is not a UTF-8 JSON row with an integer ``step`` is skipped with one warning
  counting them, and the good lines are kept."""
  lines = pathlib.Path(path).read_bytes().split(b"\n")
  rows, damaged = [], 0
  for i, raw in enumerate(lines):
    if not raw.strip():
      continue
    row = _parse_row(raw)
    if row is not None:
      rows.append(row)
    elif i < len(lines) - 1:  # the unterminated last line is a kill's fragment, not damage
      damaged += 1
  if damaged:
    log.warning(
      "%s: skipped %d damaged line(s) (not UTF-8 JSON rows with a step); kept %d",
      path,
      damaged,
      len(rows),
    )
  return rows
