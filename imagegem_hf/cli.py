"""The `imagegem` command line. Each area registers its own subcommands (in `<area>/cli.py`); the handlers
there only parse arguments and call the library, so everything a command does is also one Python call away.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Areas in the order they appear in `imagegem --help`.
_AREA_CLIS: tuple[str, ...] = (
    "imagegem_hf.data.cli",
    "imagegem_hf.recsys.cli",
    "imagegem_hf.dpo.cli",
    "imagegem_hf.w2w.cli",
    "imagegem_hf.preference.cli",
    "imagegem_hf.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The full `imagegem` parser, with every area's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="imagegem", description="imagegem_hf: datasets, recommenders, preference models and LoRA editing."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _AREA_CLIS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imagegem` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # User errors: one clear line, no traceback (use -v for the stack).
        if args.verbose:
            raise
        print(f"imagegem {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
