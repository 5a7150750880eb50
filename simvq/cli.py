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


# ----- convert ---------------------------------------------------------------------------------------------
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, choices=["official"], help="checkpoint format to read")
    p.add_argument("checkpoint", help="official SimVQ Lightning .ckpt file")
    p.add_argument("out_dir", help="model directory to write (config.yaml + model.safetensors)")
    p.add_argument("--no-ema", action="store_true", help="take the raw weights instead of the EMA weights")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT_DIR")


def _convert_run(args: argparse.Namespace) -> int:
    from simvq.checkpoints import convert_official, read_model_metadata

    try:
        out = convert_official(args.checkpoint, args.out_dir, use_ema=not args.no_ema, overwrite=args.force)
    except FileExistsError as err:
        raise ValueError(str(err)) from err
    meta = read_model_metadata(out)
    print(f"wrote {out} ({meta.get('modality')} tokenizer, {meta.get('weights')} weights from {meta.get('source_file')})")
    return 0


COMMANDS["convert"] = ("Convert an official SimVQ checkpoint into a simvq model directory.", _convert_arguments, _convert_run)


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
