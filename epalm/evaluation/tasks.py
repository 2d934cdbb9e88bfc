"""The evaluation tasks: which loader task, modalities and official metric each one scores with, the ids a
sample and a prediction are scored under, and the headline numbers. Pure (no torch), so the report and
light tools can import it."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvalTask:
    kind: str  # the loader's task: "qa" | "caption"
    modalities: tuple[str, ...]
    metric: str  # "vqa" (official VQA v2), "qa" (normalised exact match), "caption" (pycocoevalcap)


TASKS: dict[str, EvalTask] = {
    "vqav2": EvalTask("qa", ("image",), "vqa"),
    "gqa": EvalTask("qa", ("image",), "qa"),
    "video_qa": EvalTask("qa", ("video",), "qa"),
    "caption": EvalTask("caption", ("image", "video", "audio"), "caption"),
    "audio_caption": EvalTask("caption", ("audio",), "caption"),
}
# the number each metric is judged by, on the paper's scale (percent; CIDEr x 100 as papers print it)
PRIMARY = {"vqa": "vqa_accuracy", "qa": "accuracy", "vqa_label_score": "accuracy", "caption": "cider"}
CAPTION_KEYS = {"cider": "CIDEr", "bleu4": "Bleu_4", "meteor": "METEOR"}
METRIC_ORDER = ("vqa_accuracy", "accuracy", "cider", "bleu4", "meteor")  # how logs and reports list them


def task_for(kind: str, modality: str, metas: Sequence[dict] | None = None) -> str:
    """The `TASKS` entry for a training config's task kind and modality: official VQA v2 needs raw answers."""
    if kind == "caption":
        return "audio_caption" if modality == "audio" else "caption"
    if modality == "video":
        return "video_qa"
    return "vqav2" if metas is None or all(m.get("raw_answers") for m in metas) else "gqa"


def headline(metric: str, scores: dict) -> dict[str, float]:
    """The logged numbers of a scores dict, primary first, on the paper's scale."""
    if metric == "vqa":
        return {"vqa_accuracy": float(scores["overall"])}
    if metric in ("qa", "vqa_label_score"):
        return {"accuracy": float(scores["accuracy"])}
    return {k: 100.0 * float(scores[v]) for k, v in CAPTION_KEYS.items() if v in scores}


def sample_key(kind: str, modality: str, meta: dict) -> Hashable:
    """The id a sample's prediction is scored under: question_id (QA) or its media id (captions)."""
    return meta["question_id"] if kind == "qa" else media_id(meta, modality)


def record_key(record: dict) -> Hashable:
    """The id a prediction record is scored under: question_id (QA) or image_id (COCO results)."""
    return record["question_id"] if "question_id" in record else record["image_id"]


def metric_name(task: str, references: dict[str, Any]) -> str:
    """What `score` computes for these references (VQA v2 shards without raw answers fall back)."""
    metric = TASKS[task].metric
    if metric == "vqa" and "annotations" not in references:
        return "vqa_label_score"
    return metric


MEDIA_ID = {"image": "image_id", "video": "video_id", "audio": "audio_id"}


def media_id(meta: dict, modality: str) -> Any:
    """The media's own id (COCO `image_id`, MSR-VTT `video_id`, AudioCaps `audio_id`), else the sample id."""
    return meta.get(MEDIA_ID[modality], meta["id"])
