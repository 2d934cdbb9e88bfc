"""The registry of annotation sources: name -> load(annotations, split, questions) -> Loaded."""

from __future__ import annotations

from data_shards.sources import (
    audiocaps,
    cc3m,
    coco_karpathy,
    gqa,
    jsonl,
    msrvtt_caption,
    video_qa,
    vqav2,
    vqav2_vlt5,
)
from data_shards.sources.base import AnnotationError, Loaded, Record

SOURCES = {
    "coco_karpathy": coco_karpathy.load,
    "vqav2": vqav2.load,
    "vqav2_vlt5": vqav2_vlt5.load,
    "gqa": gqa.load,
    "cc3m": cc3m.load,
    "msrvtt_caption": msrvtt_caption.load,
    "msrvtt_qa": video_qa.load_msrvtt_qa,
    "msvd_qa": video_qa.load_msvd_qa,
    "audiocaps": audiocaps.load,
    "jsonl": jsonl.load,
}

__all__ = ["SOURCES", "AnnotationError", "Loaded", "Record"]
