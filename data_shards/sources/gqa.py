"""GQA from the official questions JSON ({qid: {"imageId", "question", "answer", ...}}); images <imageId>.jpg."""

from __future__ import annotations

from pathlib import Path

from data_shards.sources.base import Loaded, Record, base_meta, expect, parse_each, read_json, text


def load(annotations: Path, split: str, questions: Path | None = None) -> Loaded:
    data = expect(read_json(annotations), dict, annotations, "an object {question_id: question}")

    def parse(item: tuple[str, dict]) -> list[Record]:
        qid, q = item
        image_id = text(q["imageId"])
        rel = f"{image_id}.jpg"
        meta = base_meta("gqa", split, "qa", "image", qid)
        # the challenge test file has no answers
        answers = [{"answer": text(q["answer"]), "score": 1.0}] if "answer" in q else []
        meta.update(
            question_id=qid, image_id=image_id, question=text(q["question"]), answers=answers, image_path=rel
        )
        if isinstance(q.get("fullAnswer"), str):
            meta["full_answer"] = q["fullAnswer"]
        return [Record(meta=meta, modality="image", media=rel)]

    return parse_each(data.items(), parse)
