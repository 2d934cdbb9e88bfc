"""VQA v2 style eval shards, among them shards whose questions differ in length (the demo's all share one
question).

Separate because a benchmark (bench/eval_padding.py) imports it as well as tests (test_length_order.py,
test_distributed_eval.py); it builds on shard_fixtures.py's tar writers.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from epalm.data import schema
from testing.shard_fixtures import add_member, jpeg_bytes

WORDS = [
    "what",
    "which",
    "where",
    "is",
    "are",
    "the",
    "a",
    "of",
    "on",
    "in",
    "color",
    "shape",
    "left",
    "right",
    "man",
    "dog",
    "this",
    "that",
    "there",
]


def varied_question(rng: random.Random, min_words: int = 3, max_words: int = 18) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "?"


def write_vqa_eval_shards(
    root: Path,
    counts: list[int],
    question: Callable[[int], str],
    shade: Callable[[int], int],
    extra_meta: Callable[[str], dict] = lambda answer: {},
) -> Path:
    """VQA v2 style val shards of `counts` samples: sample i asks `question(i)` about a grey image of
    `shade(i)`, answer "seven" or "one" in turn, plus `extra_meta(answer)` in its JSON."""
    root.mkdir(parents=True)
    shards, index = [], 0
    for s, count in enumerate(counts):
        name = schema.shard_name("val", s)
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                key = f"{index:09d}"
                answer = ["seven", "one"][index % 2]
                meta = {
                    "id": key,
                    "source": "vqav2",
                    "split": "val",
                    "task": "qa",
                    "modality": "image",
                    "question_id": 1000 + index,
                    "image_id": index,
                    "question": question(index),
                    "answers": [{"answer": answer, "score": 1.0}],
                    **extra_meta(answer),
                }
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
                add_member(tar, f"{key}.jpg", jpeg_bytes(shade=shade(index)))
                index += 1
        shards.append({"name": name, "num_samples": count})
    manifest = {"num_samples": index, "shards": shards, "split": "val", "fingerprint": None}
    (root / schema.MANIFEST).write_text(json.dumps(manifest))
    return root


def write_varied_vqa_shards(root: Path, counts: list[int], seed: int = 0) -> Path:
    """Shards of `counts` samples; sample i asks a question of 3..18 words (uniform) about a grey image."""
    rng = random.Random(seed)
    return write_vqa_eval_shards(root, counts, lambda i: varied_question(rng), lambda i: (37 * i) % 256)
