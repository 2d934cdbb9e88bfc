"""Official VQA v2 accuracy of a results file: `python -m eval.vqa --predictions P --questions Q --annotations A`.

Prints {"overall", "perQuestionType", "perAnswerType"} (percent, 2 decimals) as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epalm.metrics.vqa import MetricsInputError, load_json, score_vqa


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.vqa", description=__doc__)
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
    try:
        scores = score_vqa(
            load_json(args.predictions),
            load_json(args.questions),
            load_json(args.annotations),
            restrict_to_results=args.subset,
            rules=args.rules,
        )
    except MetricsInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
