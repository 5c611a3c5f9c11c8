"""`imagegem` subcommands of imagegem_hf.data."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register this area's subcommands (none yet)."""
