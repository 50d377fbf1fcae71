"""Command line: ``geodite <command>``; each command family lives in its own module of this package.

A module listed in ``_COMMAND_MODULES`` exposes ``add_commands(subparsers)`` and keeps heavy imports (jax)
inside its command functions, so that ``geodite --help`` stays fast.

Errors: :func:`main` is the one place that turns a user error (:data:`USER_ERRORS`: bad values, missing or
unwritable files, a missing optional dependency) into ``geodite <command>: error: ...`` and exit status 2.
Any other exception is a bug: its traceback is printed with a line asking to report it (exit status 1).
Options are never abbreviated (``--epoch`` is not ``--epochs``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Sequence

_COMMAND_MODULES = ("core", "train", "simulate", "bench", "lammps")


# User errors: reported in one line, exit status 2. A KeyError counts only when raised with a sentence
# (``KeyError("no RDF for pair ...")``); a bare ``KeyError('energy')`` is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
REPORT_URL = "the geodite_jax issue tracker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geodite", description="Geodite interatomic potentials in JAX.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}").add_commands(sub)
    for p in _all_parsers(parser):
        p.allow_abbrev = False  # read at parse time: no prefix matching in any (sub)command
    return parser


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_all_parsers(child))
    return found


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    return isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str) and " " in err.args[0]


def error_message(err: BaseException) -> str:
    """One line for a user error: an ``OSError`` as "reason: file", a KeyError without quotes."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.strerror}: {err.filename}"
    if isinstance(err, KeyError):
        return str(err.args[0])
    return str(err)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"geodite {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if is_user_error(err):
            print(f"geodite {args.command}: error: {error_message(err)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"geodite {args.command}: internal error (a bug in geodite_jax, not in your input): please report it "
              f"to {REPORT_URL} with the command line and the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
