"""COCO captions in Karpathy's `dataset_coco.json`; images at <media-root>/<filepath>/<filename>."""

from __future__ import annotations

import posixpath
from pathlib import Path

from data_shards.sources.base import (
    AnnotationError,
    Loaded,
    Record,
    base_meta,
    caption_groups,
    expect,
    parse_each,
    read_json,
    text,
)

# Karpathy's "restval" images (the rest of COCO val2014) are training data, as in the original.
SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",)}


def load(annotations: Path, split: str, questions: Path | None = None) -> Loaded:
    if split not in SPLITS:
        raise AnnotationError(annotations, f"unknown Karpathy split {split!r}; use one of {sorted(SPLITS)}")
    data = expect(read_json(annotations), dict, annotations, 'an object {"images": [...]}')
    images = expect(data.get("images"), list, annotations, 'an "images" list')
    wanted = SPLITS[split]

    def parse(img: dict) -> list[Record]:
        if img["split"] not in wanted:
            return []
        rel = posixpath.join(img.get("filepath", ""), text(img["filename"]))
        image_id = img.get("cocoid", img.get("imgid"))
        if image_id is None:
            raise KeyError("cocoid")
        captions = [text(s["raw"]) for s in img["sentences"]]
        groups = caption_groups(split, captions)
        out = []
        for j, group in enumerate(groups):
            sample_id = f"{image_id}_{j}" if len(groups) > 1 else image_id
            meta = base_meta("coco_karpathy", split, "caption", "image", sample_id)
            meta.update(captions=group, image_id=image_id, image_path=rel)
            out.append(Record(meta=meta, modality="image", media=rel))
        return out

    return parse_each(images, parse)
