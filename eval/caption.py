"""COCO caption metrics of a results file: `python -m eval.caption --predictions P --references R`.

Prints pycocoevalcap's keys (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE when installed) as
0-1 fractions in JSON on stdout; notes such as "SPICE unavailable" go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from epalm.cli.common import HelpFormatter
from epalm.metrics.caption import score_captions, spice_status
from epalm.metrics.vqa import load_json

from . import prog, run_scorer


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to stderr: the SPICE jar writes to the inherited stdout, below Python's reach."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("caption"), description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--predictions", required=True, help='COCO results JSON: [{"image_id", "caption"}]')
    parser.add_argument("--references", required=True, help='COCO captions JSON: {"images", "annotations"}')
    parser.add_argument("--out", type=Path, help="also write the scores JSON here")
    parser.add_argument("--no-spice", action="store_true", help="skip SPICE even when it is installed")
    args = parser.parse_args(argv)
    if not args.no_spice:
        available, reason = spice_status()
        if not available:
            print(reason, file=sys.stderr)

    def compute() -> dict:
        predictions, references = load_json(args.predictions), load_json(args.references)
        with _stdout_to_stderr():
            return score_captions(predictions, references, spice=False if args.no_spice else None)

    return run_scorer(compute, args.out)


if __name__ == "__main__":
    sys.exit(main())
