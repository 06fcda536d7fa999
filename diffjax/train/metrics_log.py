"""Metrics to WORKDIR/metrics.jsonl (append-only, one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import pathlib

__all__ = ["MetricsWriter", "read_metrics"]


def _json_number(value) -> float | str:
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Appends ``{"step": s, name: value, ...}`` lines; only process 0 writes.

  On resume, lines at or beyond the resumed step are dropped first (they belong to steps that
  will be recomputed) and a truncated last line left by a kill is removed, so the file never
  holds a step twice nor loses one.
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
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    if self.path.exists():
      kept = {}  # by step, the last row written wins: never a step twice
      for row in read_metrics(self.path):
        if isinstance(row["step"], int) and row["step"] <= resume_step:
          kept[row["step"]] = row
      kept = [kept[s] for s in sorted(kept)]
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      os.replace(tmp, self.path)  # atomic: a kill here leaves the old or the new file whole
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float | list[float]]) -> None:
    """One line ``{"step": ..., name: value}``; a list value (one per seed) is written as a list
    and logged to TensorBoard as ``name/0``, ``name/1``, ..."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update(
      {
        k: ([_json_number(x) for x in v] if isinstance(v, (list, tuple)) else _json_number(v))
        for k, v in metrics.items()
      }
    )
    # One write call per line: a kill leaves at most a truncated last line, which readers skip
    # and a resume removes.
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
          for i, x in enumerate(value):
            self._tb.add_scalar(f"{name}/{i}", float(x), int(step))
        else:
          self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """Parses metrics.jsonl, skipping a truncated last line (a kill mid-write)."""
  rows = []
  for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and "step" in row:
      rows.append(row)
  return rows
