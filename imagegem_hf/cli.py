"""The `imagegem` command line. Each area registers its own subcommands (in `<area>/cli.py`); the handlers
there only parse arguments and call the library, so everything a command does is also one Python call away.

Building the parser imports only the area of the command being run: `imagegem --help` lists the commands from
`COMMANDS` without importing any area, and `imagegem dataset build ...` never imports torch, transformers or
diffusers (the recommenders, DPO, W2W and preference areas pull them in when their packages are imported).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (command, module whose `register(subparsers)` adds it, its line in `imagegem --help`), in help order.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "imagegem_hf.data.cli", "Build, inspect and publish ImageGem-format datasets."),
    ("recommend", "imagegem_hf.recsys.cli", "Fit and evaluate recommenders (leave-one-last, full ranking)."),
    ("dpo", "imagegem_hf.dpo.cli", "Diffusion-DPO: evaluate a tuned pipeline against its base."),
    ("w2w", "imagegem_hf.w2w.cli", "LoRA weight spaces (weights2weights): build, direction, edit, grid."),
    ("preference", "imagegem_hf.preference.cli", "Personal preference prediction (preference prototypes)."),
    ("demo", "imagegem_hf.demo", "Run the whole loop on the bundled sample (writes demo_output/)."),
)


def top_level_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `imagegem` parser and its (still empty) group of commands."""
    parser = argparse.ArgumentParser(
        prog="imagegem", description="imagegem_hf: datasets, recommenders, preference models and LoRA editing."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, subparsers


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `imagegem` parser for the command line `argv`.

    Only the area of the command named in `argv` (its first word that is not an option) is imported and
    registers its subcommands; every other command is listed with its help line from `COMMANDS`.

    Args:
        argv: The arguments after `imagegem`; `None` or no command gives the parser of `imagegem --help`.

    Returns:
        The parser.
    """
    command = next((arg for arg in argv or () if not arg.startswith("-")), None)
    parser, subparsers = top_level_parser()
    for name, module_name, help_line in COMMANDS:
        if name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imagegem` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        status = int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # User errors: one clear line, no traceback (use -v for the stack).
        if args.verbose:
            raise
        print(f"imagegem {args.command}: error: {err}", file=sys.stderr)
        return 2
    if "torch" in sys.modules:  # a process group needs torch; the commands that never import it skip the check
        from imagegem_hf.distributed import end_distributed

        end_distributed()
    return status


if __name__ == "__main__":
    sys.exit(main())
