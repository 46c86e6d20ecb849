"""``vne`` command line: argument parsing only; every subcommand lives in ``vne/commands/``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (:class:`vne.errors.InputError`, missing files) are printed as one line, exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import InputError

COMMANDS = ("simulate", "t1map", "prepare", "infer", "serve", "stream", "train", "export", "evaluate", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's promise: a bad argument is one line ``vne CMD: error: ...``, exit 2
    (argparse's own would print the usage first). Subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _load(name: str):
    return importlib.import_module(f"vne.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vne", description="Virtual native enhancement (virtual LGE) for cardiac MR.")
    parser.add_argument("--version", action="version", version=f"vne {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("vne.commands"):
                continue  # command not built yet
            raise
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"vne {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vne {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
