"""`imagegem` subcommands of imagegem_hf.dpo."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register this area's subcommands (none yet)."""
