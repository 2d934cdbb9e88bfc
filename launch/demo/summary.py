"""The end of `make demo`: one results table from eval.run's scores.json of each task, then one
machine-readable line per task, `demo: <metric>=<percent> chance=<percent>` (chance = one over the classes).

The audio task is scored as captions (pycocoevalcap, in scores.json); its line is the pitch word's
accuracy, computed here from the predictions file and the COCO-format references eval.run wrote.

    python launch/demo/summary.py --vqa demo_out/eval/digits_vqa --video demo_out/eval/shapes_qa \
        --audio demo_out/eval/tones_caption
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_shards import demo
from epalm.run import layout

PITCH_WORDS = tuple(demo.PITCHES)
NUM_DIGITS = 10  # scikit-learn's digits, the answers of digits VQA


def _summary(out: Path) -> dict:
    return json.loads((out / layout.SCORES).read_text())


def pitch_word(text: str) -> str | None:
    words = [w for w in text.lower().split() if w in PITCH_WORDS]
    return words[0] if words else None


def pitch_accuracy(out: Path) -> tuple[float, int]:
    """Percent of clips whose predicted caption names the references' pitch word, and the clip count."""
    summary = _summary(out)
    predictions = json.loads((out / summary["results"]).read_text())
    refs = json.loads((out / summary["references"]["references"]).read_text())
    truth: dict = {}
    for ann in refs["annotations"]:
        truth.setdefault(ann["image_id"], pitch_word(ann["caption"]))
    hits = sum(pitch_word(p["caption"]) == truth[p["image_id"]] for p in predictions)
    return 100.0 * hits / max(1, len(predictions)), len(predictions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vqa", type=Path, help="eval.run --out of digits VQA (10 answers)")
    p.add_argument("--video", type=Path, help="eval.run --out of shapes QA (4 answers)")
    p.add_argument("--audio", type=Path, help="eval.run --out of tones captions (3 pitches)")
    p.add_argument("--seconds", type=int, help="wall time of the whole demo, for the table")
    args = p.parse_args(argv)
    rows, lines = [], []
    if args.vqa:
        s = _summary(args.vqa)
        acc = float(s["scores"]["overall"])
        rows.append(("digits VQA (image)", f"VQA v2 accuracy {acc:.2f}%", NUM_DIGITS, s["num_samples"]))
        lines.append(f"demo: vqa_accuracy={acc:.2f} chance={100 / NUM_DIGITS:.2f}")
    if args.video:
        s = _summary(args.video)
        acc = float(s["scores"]["accuracy"])
        rows.append(
            ("shapes QA (video)", f"MSRVTT-QA accuracy {acc:.2f}%", len(demo.DIRECTIONS), s["num_samples"])
        )
        lines.append(f"demo: video_qa_accuracy={acc:.2f} chance={100 / len(demo.DIRECTIONS):.2f}")
    if args.audio:
        s = _summary(args.audio)
        acc, n = pitch_accuracy(args.audio)
        cider = 100 * float(s["scores"].get("CIDEr", float("nan")))
        rows.append(
            ("tones captions (audio)", f"pitch word {acc:.2f}% (CIDEr {cider:.1f})", len(PITCH_WORDS), n)
        )
        lines.append(f"demo: audio_pitch_accuracy={acc:.2f} chance={100 / len(PITCH_WORDS):.2f}")
    print("\n== results (held-out test splits)")
    print(f"{'task':<24}{'score':<36}{'chance':<9}samples")
    for task, score, classes, n in rows:  # chance: one over the classes
        print(f"{task:<24}{score:<36}{f'{100 / classes:.2f}%':<9}{n}")
    if args.seconds is not None:
        print(f"demo wall time {args.seconds} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
