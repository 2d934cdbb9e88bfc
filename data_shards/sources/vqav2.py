"""VQA v2 from the official questions + annotations pair; images COCO_<subtype>_<image_id:012d>.jpg
(test-dev's questions name their test2015 images).

Without --annotations (test-dev / test-std) the samples carry questions only (`answers: []`).
"""

from __future__ import annotations

from pathlib import Path

from data_shards.sources.base import (
    AnnotationError,
    Loaded,
    Record,
    base_meta,
    expect,
    parse_each,
    read_json,
    text,
    vqa_soft_answers,
)

IMAGE_SUBTYPE = {"test-dev2015": "test2015"}


def load(annotations: Path | None, split: str, questions: Path | None = None) -> Loaded:
    if questions is None:
        raise AnnotationError(
            annotations or "<none>", "vqav2 needs --questions (the official questions JSON)"
        )
    qdata = expect(read_json(questions), dict, questions, 'an object {"questions": [...]}')
    qlist = expect(qdata.get("questions"), list, questions, 'a "questions" list')
    by_qid: dict | None = None
    subtype = qdata.get("data_subtype")
    if annotations is not None:
        adata = expect(read_json(annotations), dict, annotations, 'an object {"annotations": [...]}')
        alist = expect(adata.get("annotations"), list, annotations, 'an "annotations" list')
        by_qid = {a.get("question_id"): a for a in alist if isinstance(a, dict)}
        subtype = subtype or adata.get("data_subtype")
    if not isinstance(subtype, str):
        raise AnnotationError(questions, 'no "data_subtype" (e.g. "train2014") to name the image files')
    # test-dev is a subset of test2015: its questions file says "test-dev2015", its images are COCO_test2015_*
    image_subtype = IMAGE_SUBTYPE.get(subtype, subtype)

    def parse(q: dict) -> list[Record]:
        qid, image_id = q["question_id"], int(q["image_id"])
        rel = f"COCO_{image_subtype}_{image_id:012d}.jpg"
        meta = base_meta("vqav2", split, "qa", "image", qid)
        meta.update(
            question_id=qid, image_id=image_id, question=text(q["question"]), image_path=rel, answers=[]
        )
        if by_qid is not None:
            ann = by_qid[qid]  # a question without its annotation is a malformed record
            raw = [a["answer"] for a in ann["answers"]]
            meta.update(
                answers=vqa_soft_answers(raw),
                raw_answers=raw,
                multiple_choice_answer=ann.get("multiple_choice_answer"),
                answer_type=ann.get("answer_type"),
                question_type=ann.get("question_type"),
            )
            if not meta["answers"]:
                raise ValueError("no answers")
        return [Record(meta=meta, modality="image", media=rel)]

    return parse_each(qlist, parse)
