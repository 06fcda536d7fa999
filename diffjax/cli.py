"""The ``diffjax`` command: ``train``, ``sample`` and ``evaluate``.

Thin by design: each subcommand parses its arguments and calls one library function. A user's
mistake ends with one line on stderr naming the value and the fix, and exit status 2; a run that
stops itself (non-finite losses, a checkpoint of another model) with one line and status 3; a
preempted run (SIGTERM/SIGINT) checkpoints and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys

__all__ = ["main"]

_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="diffjax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
  train.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
  train.add_argument("--workdir", required=True)

  sample = sub.add_parser("sample", help="draw samples from a trained workdir")
  sample.add_argument("--workdir", required=True)
  sample.add_argument("--num", type=int, default=1000)
  sample.add_argument("--out", required=True, help="output .npz file")
  sample.add_argument("--steps", type=int, default=None)
  sample.add_argument("--sampler", default=None, help="sampler name (default: per objective)")
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
    help="classifier-free guidance scale (conditional models)",
  )

  evaluate = sub.add_parser("evaluate", help="print JSON metrics of a trained workdir")
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--num", type=int, default=2000)
  evaluate.add_argument("--steps", type=int, default=None)
  evaluate.add_argument("--sampler", default=None)
  evaluate.add_argument("--seed", type=int, default=0)
  evaluate.add_argument(
    "--seed-index",
    type=int,
    default=None,
    help="with train.num_seeds > 1: the trained seed to evaluate (default: "
    "each, with mean and std)",
  )
  return parser


def _fail(message: str) -> int:
  print(f"diffjax: error: {message}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("diffjax").setLevel(logging.INFO)

  from diffjax import run  # pylint: disable=import-outside-toplevel
  from diffjax.train import config as config_lib  # light: no JAX compile

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
      out = run.sample_from_workdir(
        args.workdir,
        num=args.num,
        out=args.out,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        seed_index=args.seed_index,
        guidance=args.guidance,
      )
      print(json.dumps(out))
      return 0
    if args.command == "evaluate":
      print(
        json.dumps(
          run.evaluate_workdir(
            args.workdir,
            num=args.num,
            steps=args.steps,
            sampler=args.sampler,
            seed=args.seed,
            seed_index=args.seed_index,
          )
        )
      )
      return 0
  except (config_lib.ConfigError, run.UsageError) as e:
    return _fail(str(e))
  except run.RunFailed as e:  # the run stopped for a reason the message explains
    print(f"diffjax: error: {e}", file=sys.stderr)
    return 3
  except OSError as e:  # a full disk, a read-only or vanished workdir: one line, no traceback
    if e.errno not in _DISK_ERRORS:
      raise
    print(
      f"diffjax: error: {e.strerror or e} ({getattr(e, 'filename', '') or ''}); free space "
      "or fix the workdir's permissions, then run the same command: the last committed "
      "checkpoint is kept",
      file=sys.stderr,
    )
    return 3
  return _fail(f"unknown command {args.command!r}")


if __name__ == "__main__":
  sys.exit(main())
