"""`simvq <command>`: a thin command line over the library.

Subcommands register themselves in ``COMMANDS``: each entry is ``(help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import sys

from simvq import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simvq", description="Collapse-free vector quantization (SimVQ).")
    parser.add_argument("--version", action="version", version=f"simvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


COMMANDS: dict = {}


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _, _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        # user errors: one clear line, no traceback
        print(f"simvq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
