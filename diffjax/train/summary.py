"""What a training run says in words: the plain progress line and the end-of-run summary.

Pure formatting: the loop and the CLI gather the values (steps, losses, paths) and print or log
the text; nothing here reads a file, a clock or a config.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence

__all__ = ["format_duration", "progress_line", "format_summary"]


def format_duration(seconds: float) -> str:
  """``H:MM:SS`` (whole seconds, rounded up so a short positive time never reads 0:00:00);
  ``?`` when ``seconds`` is negative or not finite (no rate measured yet)."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  whole = math.ceil(seconds)
  return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def progress_line(*, step: int, total: int, loss: float, steps_per_second: float) -> str:
  """One line of progress for a log that is not a terminal (a file, a cluster job):
  ``train step 200/1000 (20%)  loss 0.1234  560 steps/s  ETA 0:00:02``, where the ETA is
  ``(total - step) / steps_per_second`` at the rate of the last logging interval."""
  rate = float(steps_per_second)
  eta = (total - step) / rate if rate > 0 else math.inf
  percent = 100 * step // max(total, 1)
  return (
    f"train step {step}/{total} ({percent}%)  loss {loss:.4g}  {rate:.3g} steps/s  "
    f"ETA {format_duration(eta)}"
  )


def _loss_text(final_losses: Sequence[float] | None, logged_step: int | None) -> str:
  if not final_losses or logged_step is None:
    return "none logged by this run"
  at = f" (step {logged_step})"
  if len(final_losses) == 1:
    return f"{final_losses[0]:.6g}{at}"
  finite = [x for x in final_losses if math.isfinite(x)]
  mean = sum(final_losses) / len(final_losses)
  spread = f"range {min(finite):.6g} .. {max(finite):.6g}" if finite else "none finite"
  bad = len(final_losses) - len(finite)
  if finite and bad:
    spread += f" ({bad} non-finite)"
  return f"mean {mean:.6g} over {len(final_losses)} seeds, {spread}{at}"


def _series_text(files: Sequence[str]) -> str:
  if len(files) == 1:
    return files[0]
  last = files[-1].rsplit("/", 1)[-1]
  return f"{files[0]} .. {last} ({len(files)} pictures)"


def format_summary(
  *,
  workdir: str,
  step: int,
  total: int,
  start_step: int,
  wall_s: float,
  final_losses: Sequence[float] | None,
  logged_step: int | None,
  preempted: str | None,
  samples: str | None,
  plots: Sequence[str],
  program: str = "diffjax",
) -> str:
  """The block ``diffjax train`` prints when it ends.

  Args:
    workdir: the run's folder (printed as given; pass an absolute path for commands that work
      from anywhere).
    step: the step the run reached; ``total``: ``train.steps``; ``start_step``: the step it
      resumed from (0: a fresh run).
    wall_s: the run's wall-clock time, compilation included.
    final_losses: the loss of each seed at ``logged_step``, the last logged step (one value
      without ``train.num_seeds``; ``None`` when the run logged nothing).
    preempted: the signal's name when a signal stopped the run.
    samples: the end-of-run picture (``None`` when the run drew none: preempted, or no plot
      for its data).
    plots: the series of pictures the run wrote every ``train.plot_every`` steps, in order
      (no line when empty).
    program: how the user runs diffjax, for the sample and evaluate commands.

  Returns:
    Lines: the outcome, the final loss (mean and range over seeds), where the samples, plots,
    checkpoints, metrics and TensorBoard logs are, and the commands that sample and evaluate
    this workdir.
  """
  quoted = shlex.quote(workdir)
  join = lambda *parts: "/".join([workdir.rstrip("/"), *parts])
  outcome = f"stopped by {preempted} at step" if preempted else "done, step"
  resumed = f" (resumed from step {start_step})" if start_step else ""
  then = "; run the same command to resume" if preempted else ""
  rows = [
    ("final loss", _loss_text(final_losses, logged_step)),
    ("samples", samples or "none drawn by this run"),
    *([("plots", _series_text(plots))] if plots else []),
    ("checkpoints", join("checkpoints")),
    ("metrics", join("metrics.jsonl")),
    ("tensorboard", f"tensorboard --logdir {shlex.quote(join('tensorboard'))}"),
    # Not WORKDIR/samples.npz: `sample` draws a picture beside its output, and samples.png is
    # the run's own.
    (
      "sample",
      f"{program} sample --workdir {quoted} --num 1000 --out {shlex.quote(join('generated.npz'))}",
    ),
    ("evaluate", f"{program} evaluate --workdir {quoted}"),
  ]
  width = max(len(name) for name, _ in rows)
  took = f"{format_duration(wall_s)} ({wall_s:.1f} s)"
  lines = [f"diffjax train: {outcome} {step} of {total}{resumed}, {took}{then}"]
  lines += [f"  {name.ljust(width)}  {text}" for name, text in rows]
  return "\n".join(lines)
