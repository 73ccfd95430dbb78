"""``cachedit-fx`` command line: demo | tune | diff | trace | metrics | export, one module each in
``commands/``."""
from __future__ import annotations

import argparse
import os
import sys

from .commands import demo, diff, export, metrics, trace, tune
from .commands.common import NothingCached

COMMANDS = (demo, tune, diff, trace, metrics, export)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr (exit 2)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cachedit-fx",
                     description="``cachedit-fx`` command line: demo | tune | diff | trace | metrics | export.",
                     epilog="Errors print one line on stderr; set CACHEDIT_FX_TRACEBACK=1 for the traceback of an "
                            "unexpected one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,tune,diff,trace,metrics,export}")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _root_error(e: BaseException) -> BaseException:
    """The user-facing cause of an error wrapped by Dynamo (BackendCompilerFailed) or re-raised."""
    seen = set()
    cur = e
    while id(cur) not in seen:
        seen.add(id(cur))
        inner = getattr(cur, "inner_exception", None) or cur.__cause__
        if inner is None:
            break
        cur = inner
    return cur


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and text.startswith("'"):
        text = text.strip("'")
    first = text.splitlines()[0] if text else type(e).__name__
    return first


def main(argv=None) -> int:
    from ..errors import MissingDependency
    from .metrics import MetricError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    prog = f"cachedit-fx {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is one line on stderr, no traceback
        if os.environ.get("CACHEDIT_FX_TRACEBACK"):
            raise
        root = _root_error(e)
        if isinstance(root, MissingDependency):
            print(f"{prog}: {_one_line(root)}", file=sys.stderr)
            return 3
        if isinstance(root, NothingCached):
            print(f"{prog}: {_one_line(root)}", file=sys.stderr)
            return 1
        if isinstance(root, (MetricError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                             IsADirectoryError, PermissionError)):
            print(f"{prog}: {_one_line(root)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(root).__name__}: {_one_line(root)} "
              f"(set CACHEDIT_FX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
