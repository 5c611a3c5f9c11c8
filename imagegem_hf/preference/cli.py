"""`imagegem` subcommands of imagegem_hf.preference."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register this area's subcommands (none yet)."""
