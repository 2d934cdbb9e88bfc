"""Media pre-extraction for the shards: one record's media, found under --media-root (or inside a tar),
turned into shard members by `epalm.data.media`'s deterministic decoders.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_shards.sources.base import Record
from epalm.data import schema
from epalm.data.media import SkipSample, audio_fbank, encode_image, extract_frames, npy_bytes


def resolve_media(root: str | Path | None, rel: str) -> Path:
    """<root>/<rel>, refusing absolute paths and `..` that leave root (checked on the normalised path,
    so symlinks the dataset owner placed inside root still work)."""
    if root is None:
        raise SkipSample("missing_media", "no --media-root given")
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, rel))
    if os.path.isabs(rel) or os.path.commonpath([base, path]) != base:
        raise SkipSample("path_escapes_root", rel)
    return Path(path)


def _read_tar_member(tar_path: str, offset: int, size: int) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise SkipSample("missing_media", f"{tar_path} is shorter than its index says")
    return data


def _find(record: Record, media_root: str | None) -> Path:
    paths = [resolve_media(media_root, rel) for rel in (record.media, *record.alt_media)]
    for path in paths:
        if path.is_file():
            return path
    raise SkipSample("missing_media", record.media)


def extract(record: Record, media_root: str | None, image_size: int, num_frames: int) -> dict[str, bytes]:
    """The media members of one sample (member name -> bytes), or SkipSample."""
    if record.tar_offset is not None:
        return {
            schema.IMAGE: encode_image(
                _read_tar_member(record.media, record.tar_offset, record.tar_size), image_size
            )
        }
    path = _find(record, media_root)
    if record.modality == "image":
        return {schema.IMAGE: encode_image(path, image_size)}
    if record.modality == "video":
        frames = extract_frames(path, num_frames, image_size)
        return {schema.frame_member(i): jpg for i, jpg in enumerate(frames)}
    if record.modality == "audio":
        return {schema.AUDIO: npy_bytes(audio_fbank(path))}
    raise SkipSample("malformed_record", f"unknown modality {record.modality!r}")
