"""AudioCaps: the official CSV (audiocap_id,youtube_id,start_time,caption; wavs <youtube_id>.wav)
or the original project's JSON ([{"audio": <path>, "caption": str or [str]}]), chosen by extension."""

from __future__ import annotations

import csv
import posixpath
from pathlib import Path

from data_shards.sources.base import (
    AnnotationError,
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
    if Path(annotations).suffix.lower() == ".csv":
        return _load_csv(Path(annotations), split)
    entries = expect(read_json(annotations), list, annotations, "a list of audio clips")

    def parse(e: dict) -> list[Record]:
        rel = text(e["audio"])
        audio_id = posixpath.splitext(posixpath.basename(rel))[0]
        return _records(split, audio_id, rel, captions_of(e["caption"]), {})

    return parse_each(entries, parse)


def _records(split: str, audio_id: str, rel: str, captions: list[str], extra: dict) -> list[Record]:
    groups = caption_groups(split, captions)
    out = []
    for j, group in enumerate(groups):
        meta = base_meta(
            "audiocaps", split, "caption", "audio", f"{audio_id}_{j}" if len(groups) > 1 else audio_id
        )
        meta.update(captions=group, audio_id=audio_id, audio_path=rel, **extra)
        out.append(Record(meta=meta, modality="audio", media=rel))
    return out


def _load_csv(path: Path, split: str) -> Loaded:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(path, f"{type(e).__name__}: {e}") from e
    if rows and not {"youtube_id", "caption"} <= set(rows[0]):
        raise AnnotationError(path, "expected columns audiocap_id,youtube_id,start_time,caption")
    # val/test list five captions per clip, one row each: group them by clip, in file order
    clips: dict[str, list[dict]] = {}
    bad = 0
    for row in rows:
        if not isinstance(row.get("youtube_id"), str) or not row["youtube_id"].strip():
            bad += 1
            continue
        clips.setdefault(row["youtube_id"].strip(), []).append(row)

    def parse(item: tuple[str, list[dict]]) -> list[Record]:
        ytid, clip_rows = item
        captions = [text(r["caption"]) for r in clip_rows]
        extra = {
            "audiocap_ids": [r.get("audiocap_id") for r in clip_rows],
            "start_time": clip_rows[0].get("start_time"),
        }
        return _records(split, ytid, f"{ytid}.wav", captions, extra)

    out = parse_each(clips.items(), parse)
    out.skipped["malformed_record"] += bad
    return out
