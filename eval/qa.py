"""Normalised exact-match accuracy for GQA / MSRVTT-QA / MSVD-QA: `python -m eval.qa --predictions P --references R`.

Prints {"accuracy" (percent, 2 decimals), "num_questions"} as JSON on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epalm.cli.common import HelpFormatter
from epalm.metrics.qa import score_qa
from epalm.metrics.vqa import load_json

from . import prog, run_scorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("qa"), description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--predictions", required=True, help='JSON list: [{"question_id", "answer"}]')
    parser.add_argument(
        "--references",
        required=True,
        help='JSON list of {"question_id", and "label": {ans: score} | "answers": [...] | "answer": str}',
    )
    parser.add_argument("--out", type=Path, help="also write the scores JSON here")
    args = parser.parse_args(argv)
    return run_scorer(lambda: score_qa(load_json(args.predictions), load_json(args.references)), args.out)


if __name__ == "__main__":
    sys.exit(main())
