"""MSR-VTT captioning JSON: [{"video": "video1000.mp4", "caption": str or [str]}]; videos under --media-root."""

from __future__ import annotations

import posixpath
from pathlib import Path

from data_shards.sources.base import (
    Loaded,
    Record,
    base_meta,
    caption_groups,
    captions_of,
    expect,
    parse_each,
    read_json,
    text,
)


def load(annotations: Path, split: str, questions: Path | None = None) -> Loaded:
    entries = expect(read_json(annotations), list, annotations, "a list of videos")

    def parse(e: dict) -> list[Record]:
        rel = text(e["video"])
        video_id = posixpath.splitext(posixpath.basename(rel))[0]
        groups = caption_groups(split, captions_of(e["caption"]))
        out = []
        for j, group in enumerate(groups):
            meta = base_meta(
                "msrvtt_caption",
                split,
                "caption",
                "video",
                f"{video_id}_{j}" if len(groups) > 1 else video_id,
            )
            meta.update(captions=group, video_id=video_id, video_path=rel)
            out.append(Record(meta=meta, modality="video", media=rel))
        return out

    return parse_each(entries, parse)
