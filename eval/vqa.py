"""Official VQA v2 accuracy of a results file: `python -m eval.vqa --predictions P --questions Q --annotations A`.

Prints {"overall", "perQuestionType", "perAnswerType"} (percent, 2 decimals) as JSON on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epalm.cli.common import HelpFormatter
from epalm.metrics.vqa import load_json, score_vqa

from . import prog, run_scorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("vqa"), description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--predictions", required=True, help='results JSON: [{"question_id", "answer"}]')
    parser.add_argument("--questions", required=True, help="official v2_OpenEnded_mscoco_*_questions.json")
    parser.add_argument("--annotations", required=True, help="official v2_mscoco_*_annotations.json")
    parser.add_argument("--out", type=Path, help="also write the scores JSON here")
    parser.add_argument(
        "--subset",
        action="store_true",
        help="score only the predicted question ids (as with an annotation file filtered to them)",
    )
    parser.add_argument(
        "--rules",
        choices=["official", "legacy"],
        default="official",
        help="official: GT-Vision-Lab/VQA master; legacy: the older vqaEval.py eP-ALM's own evaluator copied",
    )
    args = parser.parse_args(argv)
    return run_scorer(
        lambda: score_vqa(
            load_json(args.predictions),
            load_json(args.questions),
            load_json(args.annotations),
            restrict_to_results=args.subset,
            rules=args.rules,
        ),
        args.out,
    )


if __name__ == "__main__":
    sys.exit(main())
