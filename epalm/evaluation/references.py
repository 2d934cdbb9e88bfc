"""Reference files in the official formats (VQA v2 questions + annotations, QA answers, COCO captions),
built from the shards' per-sample metadata, so a split scores without its original annotation files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from epalm.data import schema
from epalm.data.stream import iter_range, load_manifest
from epalm.evaluation.tasks import media_id


def load_shard_metas(shard_dir: str | Path) -> tuple[dict, list[dict]]:
    """(manifest, every sample's JSON in manifest order); other members are seeked over, not read."""
    manifest, shards = load_manifest(shard_dir)
    pieces = [(i, 0, n) for i, n in enumerate(shards.counts)]
    metas = [
        json.loads(sample.members[schema.JSON])
        for _, sample in iter_range(shards, pieces, lambda ext: ext == schema.JSON)
    ]
    return manifest, metas


def _vqa_files(metas: list[dict], split: str) -> dict[str, Any]:
    info = {"description": "built by epalm.evaluation.references from shard metadata", "split": split}
    common = {"data_type": "mscoco", "data_subtype": split, "info": info, "license": {}}
    questions = [
        {"question_id": m["question_id"], "image_id": m.get("image_id"), "question": m["question"]}
        for m in metas
    ]
    annotations = [
        {
            "question_id": m["question_id"],
            "image_id": m.get("image_id"),
            "question_type": m.get("question_type") or "unknown",
            "answer_type": m.get("answer_type") or "unknown",
            "multiple_choice_answer": m.get("multiple_choice_answer"),
            # answer_id makes each annotator record distinct: the official leave-one-out compares whole dicts
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(m["raw_answers"])
            ],
        }
        for m in metas
    ]
    return {
        "questions": common | {"task_type": "Open-Ended", "questions": questions},
        "annotations": common | {"annotations": annotations},
    }


def reference_files(kind: str, metas: list[dict], split: str, official_vqa: bool) -> dict[str, Any]:
    """Reference files (name -> JSON object) in the official formats; {} when the split has no ground truth.

    QA with `official_vqa`: `questions` + `annotations` (VQA v2 files; needs the 10 `raw_answers` of
    `--source vqav2` shards; shards with soft labels only get `references` scored as label-score exact match);
    other QA: `references` `[{"question_id", "answers"}]`; captions: `references`, a COCO caption
    file whose image ids are the media ids.
    """
    if kind == "qa":
        if not any(m.get("answers") for m in metas):
            return {}  # test-dev / test-std: a submission, not a score
        missing = [m["question_id"] for m in metas if not m.get("answers")]
        if missing:
            raise ValueError(f"{len(missing)} question(s) have no answers (e.g. {missing[:5]})")
        if official_vqa and all(m.get("raw_answers") for m in metas):
            return _vqa_files(metas, split)
        return {"references": [{"question_id": m["question_id"], "answers": m["answers"]} for m in metas]}
    if not any(m.get("captions") for m in metas):
        return {}
    images, annotations, seen = [], [], set()
    for m in metas:
        mid = media_id(m, m.get("modality", "image"))
        if mid in seen:
            raise ValueError(f"media {mid!r} appears in several samples (a train split? use val/test)")
        seen.add(mid)
        images.append({"id": mid})
        annotations += [
            {"image_id": mid, "id": len(annotations) + k, "caption": c} for k, c in enumerate(m["captions"])
        ]
    return {
        "references": {
            "info": {"split": split},
            "type": "captions",
            "images": images,
            "annotations": annotations,
        }
    }


def write_references(references: dict[str, Any], out_dir: str | Path, prefix: str) -> dict[str, Path]:
    """Write each reference object as `<out_dir>/<prefix>_<name>.json`; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, obj in references.items():
        paths[name] = out / f"{prefix}_{name}.json"
        paths[name].write_text(json.dumps(obj))
    return paths
