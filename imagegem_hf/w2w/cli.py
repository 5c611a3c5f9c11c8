"""`imagegem` subcommands of imagegem_hf.w2w."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register this area's subcommands (none yet)."""
