"""MSRVTT-QA and MSVD-QA JSON: [{"video", "question_id", "sent" or "question", "label": {ans: score} or "answer"}]."""

from __future__ import annotations

import posixpath
from functools import partial
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


def load(annotations: Path, split: str, questions: Path | None = None, source: str = "msrvtt_qa") -> Loaded:
    entries = expect(read_json(annotations), list, annotations, "a list of questions")

    def parse(item: tuple[int, dict]) -> list[Record]:
        index, e = item
        rel = text(e["video"])
        qid = e.get("question_id", index)
        question = text(e["sent"] if "sent" in e else e["question"])
        if "label" in e:
            answers = scored_answers(e["label"])
        elif "answer" in e:
            answers = [{"answer": text(e["answer"]), "score": 1.0}]
        else:
            answers = []
        meta = base_meta(source, split, "qa", "video", qid)
        video_id = posixpath.splitext(posixpath.basename(rel))[0]
        meta.update(question_id=qid, video_id=video_id, question=question, answers=answers, video_path=rel)
        return [Record(meta=meta, modality="video", media=rel)]

    return parse_each(enumerate(entries), parse)


load_msrvtt_qa = partial(load, source="msrvtt_qa")
load_msvd_qa = partial(load, source="msvd_qa")
