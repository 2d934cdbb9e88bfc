"""The demo's tokenizer: a byte-level BPE trained on the *train* split's questions, answers and captions,
saved in OPT's format (vocab.json + merges.txt), standing in for OPT's own tokenizer offline.

    python launch/demo/tokenizer.py --raw demo_out/raw/digits --out demo_out/tokenizer
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from epalm.data.tokenizer_trainer import save_tokenizer


def train_texts(raw: Path) -> list[str]:
    texts = []
    for entry in json.loads((raw / "dataset_coco.json").read_text())["images"]:
        if entry["split"] == "train":
            texts += [s["raw"] for s in entry["sentences"]]
    questions = json.loads((raw / "v2_OpenEnded_mscoco_train_questions.json").read_text())["questions"]
    annotations = json.loads((raw / "v2_mscoco_train_annotations.json").read_text())["annotations"]
    texts += [q["question"] for q in questions]
    texts += [a["multiple_choice_answer"] for a in annotations]
    # the video and audio demo tasks' train texts, when written next to the digits (data_shards.demo)
    shapes, tones = raw.parent / "shapes" / "msrvtt_qa_train.json", raw.parent / "tones" / "train.csv"
    if shapes.is_file():
        texts += [t for e in json.loads(shapes.read_text()) for t in (e["question"], e["answer"])]
    if tones.is_file():
        texts += [row["caption"] for row in csv.DictReader(tones.read_text().splitlines())]
    return texts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="the demo's raw/digits directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=400)
    args = p.parse_args(argv)
    path = save_tokenizer(train_texts(args.raw), args.out, vocab_size=args.vocab_size)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
