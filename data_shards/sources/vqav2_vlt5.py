"""VQA v2 in the VL-T5 JSON the original used: [{"img_id", "question_id", "sent", "label": {ans: score}}]."""

from __future__ import annotations

from pathlib import Path

from data_shards.sources.base import (
    Loaded,
    Record,
    base_meta,
    expect,
    parse_each,
    read_json,
    scored_answers,
    text,
)


def load(annotations: Path, split: str, questions: Path | None = None) -> Loaded:
    entries = expect(read_json(annotations), list, annotations, "a list of questions")

    def parse(e: dict) -> list[Record]:
        img_id = text(e["img_id"])
        rel = f"{img_id}.jpg"
        # Karpathy splits mix train2014 and val2014 images: also look in <root>/<subtype>/
        parts = img_id.split("_")
        alt = (f"{parts[1]}/{rel}",) if len(parts) == 3 else ()
        meta = base_meta("vqav2_vlt5", split, "qa", "image", e["question_id"])
        meta.update(
            question_id=e["question_id"],
            image_id=img_id,
            question=text(e["sent"]),
            answers=scored_answers(e["label"]) if "label" in e else [],
            image_path=rel,
        )
        for k in ("question_type", "answer_type"):
            if k in e:
                meta[k] = e[k]
        return [Record(meta=meta, modality="image", media=rel, alt_media=alt)]

    return parse_each(entries, parse)
