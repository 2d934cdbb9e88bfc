"""What every command line shares: one way to fail on bad input (`error: ...` on stderr, exit 2), logging
set up the same way, and argparse help that shows each option's default."""

from __future__ import annotations

import argparse
import logging
import sys

from epalm.exit_codes import USAGE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help, and the module docstring's examples kept as written."""


def fail(message: str) -> int:
    """Print one `error: <message>` line on stderr; return the bad-input exit code for `main` to return."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return USAGE


def configure_logging(rank: int = 0, verbose: bool = False) -> None:
    """INFO on rank 0 (DEBUG with `verbose`), warnings only on the other ranks; one format for every CLI."""
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s: %(message)s")
