"""The ``c3dzoo`` command line: ``info``, ``check``, ``train``, ``predict``, ``evaluate``, ``export``,
``bench``, ``features`` and ``linear-probe``.

``main(argv)`` returns the exit status: 0 on success, 1 when a check fails, training diverges or a
command hits an unexpected error, 2 for bad arguments (including a missing, unreadable or mismatched
checkpoint), 130 when interrupted; errors are one line on stderr, no traceback unless ``--debug``.
Each command lives in its own module, which adds its subparser (``add_parser``) and runs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import c3dzoo
from c3dzoo import checkpoint as ckpt

from . import bench, check, evaluate, features, info, predict, train
from ._common import PROG, CommandError, UsageError, _Parser

COMMANDS = ("info", "check", "train", "predict", "evaluate", "export", "bench", "features", "linear-probe")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="3D-CNN video models with fused Conv3d+BN+ReLU kernels.")
    parser.add_argument("--version", action="version", version=f"{PROG} {c3dzoo.__version__}")
    # --debug is accepted before or after the command
    debug = dict(action="store_true", help="show tracebacks")
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = [info.add_parser(sub), check.add_parser(sub), train.add_parser(sub),
                predict.add_parser(sub), evaluate.add_parser(sub), predict.add_export_parser(sub),
                bench.add_parser(sub),
                features.add_parser(sub), features.add_probe_parser(sub)]
    for command in commands:
        command.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    parser.subparsers = dict(zip(COMMANDS, commands))
    return parser


def _given_options(argv: Sequence[str]) -> set:
    """The ``train`` options named on the command line (argparse fills in the others' defaults)."""
    parser = build_parser()
    for action in parser.subparsers["train"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func", "debug"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``c3dzoo`` command. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"choose a command: {', '.join(COMMANDS)} (c3dzoo --help for details)")
        if args.command == "train":
            args.given = _given_options(argv)
        return args.func(args)
    except (UsageError, ckpt.CheckpointError) as exc:  # a bad --checkpoint/--resume is a bad argument
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
