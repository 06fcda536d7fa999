"""The ``diffjax`` command: ``train``, ``sample`` and ``evaluate``.

Thin by design: each subcommand parses its arguments and calls one library function. A user's
mistake ends with one line on stderr naming the value and the fix, and exit status 2; a run that
stops itself (non-finite losses, a checkpoint of another model) with one line and status 3; a
preempted run (SIGTERM/SIGINT) checkpoints and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys

__all__ = ["main"]

_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
# How libraries that wrap the error in their own (orbax, tensorstore: a ValueError) spell it.
_DISK_MESSAGES = tuple(os.strerror(code) for code in _DISK_ERRORS)
_CLOSED_LOOP = "Event loop is closed"


def _is_disk_error(exc: BaseException | None) -> bool:
  """``exc``, or an exception it was raised from or while handling, is a disk error."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
      return True
    if any(message in str(exc) for message in _DISK_MESSAGES):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


class _HeldBack(logging.Filter):
  """Holds back, while a command runs, the reports a failing disk sets off around the error
  that ends the command: error records that mention it (orbax's save threads, each with its
  traceback), exceptions that C extensions report through ``sys.excepthook``, and the
  "Event loop is closed" errors that tensorstore's future callbacks report through
  ``sys.unraisablehook`` (``PyErr_WriteUnraisable``) when orbax has closed the loop they call
  into after a failed write. If the command ends on that disk error, its one line replaces them;
  otherwise they are written when the command ends."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []
    self.reports: list[tuple] = []
    self.unraisables: list = []
    self.previous_unraisablehook = sys.unraisablehook
    self.drop = False  # set when the command ends on the disk error: discard what is held

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if record.levelno >= logging.ERROR and (
      _is_disk_error(exc) or any(m in record.getMessage() for m in _DISK_MESSAGES)
    ):
      if not any(held is record for held in self.records):  # each handler asks once
        self.records.append(record)
      return False
    return True

  def excepthook(self, *exc_info) -> None:
    self.reports.append(exc_info)

  def unraisablehook(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and _CLOSED_LOOP in str(unraisable.exc_value):
      self.unraisables.append(unraisable)
    else:
      self.previous_unraisablehook(unraisable)


@contextlib.contextmanager
def _holding_back_disk_reports():
  """Yields a :class:`_HeldBack`; set its ``drop`` to discard what it held."""
  held = _HeldBack()
  handlers = logging.getLogger().handlers
  for handler in handlers:
    handler.addFilter(held)
  previous_hook, sys.excepthook = sys.excepthook, held.excepthook
  sys.unraisablehook = held.unraisablehook
  try:
    yield held
  finally:
    sys.excepthook = previous_hook
    sys.unraisablehook = held.previous_unraisablehook
    for handler in handlers:
      handler.removeFilter(held)
    if not held.drop:
      for record in held.records:
        for handler in handlers:
          if record.levelno >= handler.level:
            handler.handle(record)
      for exc_info in held.reports:
        previous_hook(*exc_info)
      for unraisable in held.unraisables:
        held.previous_unraisablehook(unraisable)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="diffjax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
  train.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
  train.add_argument("--workdir", required=True)

  sample = sub.add_parser(
    "sample",
    help="draw samples from a trained workdir",
    description="Draws samples with the EMA parameters and writes them to --out (.npz: "
    "'samples', with 'label' for a class-conditional model and 'trajectories' with "
    "--trajectories) and a picture beside it (same name, .png): 2D samples over the data, or "
    "a grid of the first images with their labels. Prints a JSON summary.",
  )
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--num", type=int, default=1000)
  sample.add_argument("--out", required=True, help="output .npz file (the .png goes beside it)")
  sample.add_argument("--steps", type=int, default=None)
  sample.add_argument("--sampler", default=None, help="sampler name (default: per objective)")
  sample.add_argument(
    "--labels",
    default=None,
    help="class labels for a class-conditional model, e.g. 0,3,7: repeated in turn to fill "
    "--num, or one per sample (default: every class in turn)",
  )
  sample.add_argument("--label", type=int, default=None, help="one class label for every sample")
  sample.add_argument(
    "--trajectories",
    type=int,
    default=0,
    metavar="K",
    help="also save the full paths of the first K samples as 'trajectories' "
    "[steps + 1, K, ...] (source draw first) and draw them in a 2D picture",
  )
  sample.add_argument("--seed", type=int, default=0)
  sample.add_argument(
    "--seed-index",
    type=int,
    default=None,
    help="with train.num_seeds > 1: the trained seed to sample (default: all)",
  )
  sample.add_argument(
    "--guidance",
    type=float,
    default=None,
    help="classifier-free guidance scale in [0, 100] (conditional models)",
  )
  _guidance_arguments(sample)
  _chunk_size_argument(sample)

  evaluate = sub.add_parser(
    "evaluate",
    help="compare samplers on a trained workdir: one table, a plot, JSON",
    description="Scores --num samples of each sampler with each number of steps (adaptive "
    "solvers once: their error control sets the steps) against the data: 2D toys: exact W2 "
    "and MMD^2 against fresh target samples; data files: W2 (vectors), MMD^2 and, for "
    "digits, the Frechet distance in a digits classifier's features (not FID), against a "
    "random set of the data. Each metric is shown beside its two-sample floor (real data "
    "scored the same way at the same size). Prints the table on stderr and the JSON report "
    "as the last line of stdout; writes the table as JSON and a plot of each metric against "
    "NFE to WORKDIR/eval/ (or --out).",
  )
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--num", type=int, default=2000)
  evaluate.add_argument(
    "--steps",
    default=None,
    help="steps per sample, or a comma-separated list to compare, e.g. 1,2,4,8,16 "
    "(default: the config's sample.steps; ignored by adaptive solvers: dopri5, tsit5)",
  )
  evaluate.add_argument(
    "--sampler",
    default=None,
    help="sampler, or a comma-separated list to compare, e.g. euler,heun,dopri5 "
    "(default: the objective's)",
  )
  evaluate.add_argument("--seed", type=int, default=0)
  evaluate.add_argument(
    "--likelihood",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="also report the negative log-likelihood of --num data points through the "
    "probability-flow ODE, once (it does not depend on the sampler): nats per example; for "
    "images also nats and bits per dimension (default: on for 2D and vector data, where it "
    "is quick; off for images)",
  )
  evaluate.add_argument(
    "--likelihood-steps",
    type=int,
    default=None,
    help="RK4 steps of the likelihood's ODE (default: the config's sample.steps)",
  )
  evaluate.add_argument(
    "--out",
    default=None,
    help="the plot's .png path, its JSON table beside it (default: WORKDIR/eval/"
    "step_<step>_<samplers>[_steps_<steps>].png)",
  )
  evaluate.add_argument(
    "--seed-index",
    type=int,
    default=None,
    help="with train.num_seeds > 1: the trained seed to evaluate (default: "
    "each, with mean and std)",
  )
  evaluate.add_argument(
    "--guidance",
    type=float,
    default=None,
    help="guidance weight w in [0, 100] for every row (conditional models; labels drawn "
    "uniformly, scored against the whole target)",
  )
  _guidance_arguments(evaluate)
  evaluate.add_argument(
    "--sigma-rel",
    default=None,
    help="post-hoc EMA (EDM2): a comma-separated list of EMA widths, e.g. 0.05,0.08,0.12, each "
    "rebuilt from the snapshots of a run trained with train.posthoc_ema.sigma_rels and "
    "evaluated as its own rows (default: the checkpoint's EMA)",
  )
  _chunk_size_argument(evaluate)
  return parser


def _guidance_arguments(parser: argparse.ArgumentParser) -> None:
  """Guidance beyond plain CFG (each needs --guidance W; see diffjax.run_guidance)."""
  group = parser.add_argument_group(
    "guidance beyond classifier-free guidance (each needs --guidance W)"
  )
  group.add_argument(
    "--guidance-interval",
    default=None,
    metavar="LO,HI",
    help="guide only for model times LO <= t <= HI, the conditional model elsewhere "
    "(Kynkaanniemi et al. 2024); model time: flow time for flow models (data at 1), "
    "diffusion time for diffusion models (data at 0), sigma for EDM",
  )
  group.add_argument(
    "--guide-workdir",
    default=None,
    metavar="PATH",
    help="autoguidance (Karras et al. 2024): guide with the conditional model of another "
    "workdir (smaller or trained shorter, same data and objective) in place of the null "
    "label: D_guide + w (D_main - D_guide); read read-only",
  )
  group.add_argument(
    "--guidance-method",
    default=None,
    metavar="{cfg,apg}",
    help="cfg (default): ref + w (cond - ref); apg: adaptive projected guidance (Sadat et "
    "al. 2024) on the denoised (x0) prediction",
  )
  group.add_argument(
    "--apg-eta",
    type=float,
    default=None,
    help="APG: weight of the update's part parallel to the conditional x0 (default 0)",
  )
  group.add_argument(
    "--apg-norm",
    type=float,
    default=None,
    help="APG: largest norm r of the update per example (default inf: no cap)",
  )
  group.add_argument(
    "--apg-momentum",
    type=float,
    default=None,
    help="APG: reverse momentum beta in (-1, 1) of the running average over steps (default "
    "0; 'euler' sampler of flow models only)",
  )


def _guidance_flags(args):
  from diffjax.run_guidance import GuidanceFlags  # pylint: disable=import-outside-toplevel

  return GuidanceFlags(
    interval=args.guidance_interval,
    guide_workdir=args.guide_workdir,
    method=args.guidance_method,
    apg_eta=args.apg_eta,
    apg_norm=args.apg_norm,
    apg_momentum=args.apg_momentum,
  )


def _chunk_size_argument(parser: argparse.ArgumentParser) -> None:
  from diffjax.run import DEFAULT_CHUNK_SIZE  # pylint: disable=import-outside-toplevel

  parser.add_argument(
    "--chunk-size",
    type=int,
    default=DEFAULT_CHUNK_SIZE,
    help="samples drawn per compiled batch; the samples do not depend on it, memory grows "
    f"with it (default {DEFAULT_CHUNK_SIZE})",
  )


def _numbers(flag: str, text: str) -> tuple[float, ...]:
  """``"0.05,0.1"`` -> ``(0.05, 0.1)``; anything else is one line naming ``flag``."""
  try:
    return tuple(float(part) for part in text.split(","))
  except ValueError:
    raise _usage_error(
      f"{flag} {text}: must be a number or comma-separated numbers, e.g. 0.05,0.08,0.12"
    ) from None


def _integers(flag: str, text: str) -> tuple[int, ...]:
  """``"1,2,4"`` -> ``(1, 2, 4)``; anything else is one line naming ``flag``."""
  parts = [part.strip() for part in text.split(",")]
  try:
    return tuple(int(part) for part in parts)
  except ValueError:
    raise _usage_error(
      f"{flag} {text}: must be an integer or comma-separated integers, e.g. 1,2,4"
    ) from None


def _names(flag: str, text: str) -> tuple[str, ...]:
  """``"euler,heun"`` -> ``("euler", "heun")``; an empty name is one line naming ``flag``."""
  names = tuple(part.strip() for part in text.split(","))
  if not all(names):
    raise _usage_error(f"{flag} {text!r}: an empty name; write names separated by commas")
  return names


def _usage_error(message: str) -> Exception:
  from diffjax.run import UsageError  # pylint: disable=import-outside-toplevel

  return UsageError(message)


def _sample_labels(args) -> tuple[tuple[int, ...] | None, str]:
  """``--labels`` or ``--label`` (not both) as ``(labels, the flag used)``."""
  if args.labels is not None and args.label is not None:
    raise _usage_error(
      f"--labels {args.labels} and --label {args.label}: pass one of them (--label N is --labels N)"
    )
  if args.label is not None:
    return (args.label,), "--label"
  if args.labels is not None:
    return _integers("--labels", args.labels), "--labels"
  return None, "--labels"


def _fail(message: str) -> int:
  print(f"diffjax: error: {message}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  argv_is_program = argv is None  # run as the `diffjax` command, not called from Python
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("diffjax").setLevel(logging.INFO)

  from diffjax import run  # pylint: disable=import-outside-toplevel
  from diffjax.train import config as config_lib  # light: no JAX compile

  with _holding_back_disk_reports() as held:
    code = _run(args, extra, run, config_lib, held)
    if held.drop and argv_is_program:
      # The disk is full or read-only: skip the exit handlers of writers that would fail on it
      # again (tensorboardX's flush prints two more tracebacks); the one line is written. Still
      # inside the block, so a late report of a writer's thread (tensorstore's callback into a
      # closed event loop) is held back too.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  return code


def _run(args, extra, run, config_lib, held) -> int:
  """The subcommand; its exit status."""
  try:
    if args.command == "train":
      config = config_lib.load_config_file(args.config)
      config_lib.apply_overrides(config, extra)
      run.train_from_cli(config, args.workdir)
      return 0  # also after a preemption: the checkpoint is written, resume with the same line
    if extra:
      return _fail(
        f"unknown arguments {' '.join(extra)}; --config.* overrides apply to `diffjax train` only"
      )
    if args.command == "sample":
      from diffjax import run_sample  # pylint: disable=import-outside-toplevel

      labels, labels_flag = _sample_labels(args)
      out = run_sample.sample_from_workdir(
        args.workdir,
        num=args.num,
        out=args.out,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        seed_index=args.seed_index,
        guidance=args.guidance,
        chunk_size=args.chunk_size,
        labels=labels,
        labels_flag=labels_flag,
        trajectories=args.trajectories,
        guidance_flags=_guidance_flags(args),
      )
      print(json.dumps(out))
      return 0
    if args.command == "evaluate":
      from diffjax import run_evaluate  # pylint: disable=import-outside-toplevel

      report = run_evaluate.evaluate_workdir(
        args.workdir,
        num=args.num,
        steps=None if args.steps is None else _integers("--steps", args.steps),
        sampler=None if args.sampler is None else _names("--sampler", args.sampler),
        seed=args.seed,
        seed_index=args.seed_index,
        chunk_size=args.chunk_size,
        likelihood=args.likelihood,
        likelihood_steps=args.likelihood_steps,
        out=args.out,
        guidance=args.guidance,
        guidance_flags=_guidance_flags(args),
        sigma_rel=None if args.sigma_rel is None else _numbers("--sigma-rel", args.sigma_rel),
      )
      print(run_evaluate.evaluation_table(report), file=sys.stderr, flush=True)
      print(json.dumps(report))
      return 0
  except (config_lib.ConfigError, run.UsageError) as e:
    return _fail(str(e))
  except run.RunFailed as e:  # the run stopped for a reason the message explains
    print(f"diffjax: error: {e}", file=sys.stderr)
    return 3
  except Exception as e:  # a full disk, a read-only or vanished workdir: one line, no traceback
    # orbax and tensorstore report the disk's error as their own (a ValueError naming it).
    if not _is_disk_error(e):
      raise
    held.drop = True
    return _disk_failure(e, args)
  return _fail(f"unknown command {args.command!r}")


def _disk_failure(error: BaseException, args) -> int:
  """The one line for a command ended by the disk (``error`` or an exception in its chain)."""
  reason, where = None, None
  seen = set()
  while error is not None and id(error) not in seen and reason is None:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_ERRORS:
      reason, where = error.strerror, error.filename
    else:
      reason = next((m for m in _DISK_MESSAGES if m in str(error)), None)
    error = error.__cause__ or error.__context__
  where = where or (args.out if args.command == "sample" else args.workdir)
  kept = "; the last committed checkpoint is kept" if args.command == "train" else ""
  print(
    f"diffjax: error: {reason} (writing {where}); free space or fix its permissions, then run "
    f"the same command{kept}",
    file=sys.stderr,
  )
  return 3


if __name__ == "__main__":
  sys.exit(main())
