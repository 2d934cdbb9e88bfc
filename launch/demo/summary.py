"""The end of `make demo`: the results table from eval.run's scores.json, then one machine-readable line
`demo: vqa_accuracy=<percent> chance=<percent>` (chance = one over the number of distinct answers).

    python launch/demo/summary.py --scores demo_out/eval/digits_vqa/scores.json --num-answers 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", type=Path, required=True, help="scores.json written by python -m eval.run")
    p.add_argument("--num-answers", type=int, required=True, help="distinct answers: chance = 1 / this")
    p.add_argument("--seconds", type=int, help="wall time of the whole demo, for the table")
    args = p.parse_args(argv)
    summary = json.loads(args.scores.read_text())
    scores = summary["scores"]
    accuracy = float(scores["overall"])
    chance = 100.0 / args.num_answers
    rows = [
        ("task", f"{summary.get('task', 'vqav2')} on the held-out {summary.get('split', 'test')} split"),
        ("metric", f"VQA v2 accuracy ({summary.get('metric')}), official rules"),
        ("samples", str(summary.get("num_samples", "?"))),
        ("accuracy", f"{accuracy:.2f}%"),
        ("chance", f"{chance:.2f}%"),
    ]
    rows += [(f"  answer type {k}", f"{v:.2f}%") for k, v in sorted(scores.get("perAnswerType", {}).items())]
    if args.seconds is not None:
        rows.append(("demo wall time", f"{args.seconds} s"))
    print("\n== results")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"demo: vqa_accuracy={accuracy:.2f} chance={chance:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
