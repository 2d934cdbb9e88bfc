"""Conceptual Captions 3M: img2dataset tars (<key>.jpg + <key>.txt [+ <key>.json]) or a `caption<TAB>path` TSV."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

from data_shards.sources.base import AnnotationError, Loaded, Record, base_meta, parse_each, text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
TSV_HEADERS = {"path", "filepath", "file", "filename", "image", "image_path"}


def load(annotations: Path, split: str, questions: Path | None = None) -> Loaded:
    if Path(annotations).is_dir():
        return _load_tars(Path(annotations), split)
    return _load_tsv(Path(annotations), split)


def _meta(split: str, key: str, caption: str, path: str) -> dict:
    meta = base_meta("cc3m", split, "caption", "image", key)
    meta.update(captions=[caption], image_id=key, image_path=path)
    return meta


def _load_tars(folder: Path, split: str) -> Loaded:
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise AnnotationError(folder, "no .tar files (expected img2dataset output)")
    out = Loaded()
    for tar_path in tars:
        try:
            with tarfile.open(tar_path) as tf:
                members = [m for m in tf.getmembers() if m.isfile()]
                texts = {
                    m.name.rsplit(".", 1)[0]: tf.extractfile(m).read()
                    for m in members
                    if m.name.endswith(".txt")
                }
                extras = {
                    m.name.rsplit(".", 1)[0]: tf.extractfile(m).read()
                    for m in members
                    if m.name.endswith(".json")
                }
        except (OSError, tarfile.TarError) as e:
            raise AnnotationError(tar_path, f"{type(e).__name__}: {e}") from e
        for m in members:
            stem, dot, ext = m.name.rpartition(".")
            if not dot or "." + ext.lower() not in IMAGE_EXTS:
                continue
            try:
                caption = text(texts[stem].decode("utf-8"))
                extra = json.loads(extras[stem]) if stem in extras else {}
                key = str(extra.get("key") or Path(stem).name)
            except (KeyError, ValueError):
                out.skipped["malformed_record"] += 1
                continue
            meta = _meta(split, key, caption, f"{tar_path.name}:{m.name}")
            if isinstance(extra.get("url"), str):
                meta["url"] = extra["url"]
            out.records.append(
                Record(
                    meta=meta,
                    modality="image",
                    media=str(tar_path),
                    tar_offset=m.offset_data,
                    tar_size=m.size,
                )
            )
    return out


def _load_tsv(path: Path, split: str) -> Loaded:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(path, f"{type(e).__name__}: {e}") from e
    if rows and len(rows[0]) == 2 and rows[0][1].strip().lower() in TSV_HEADERS:
        rows = rows[1:]

    def parse(row: list[str]) -> list[Record]:
        caption, rel = row  # ValueError unless exactly two columns
        rel = text(rel)
        return [Record(meta=_meta(split, rel, text(caption), rel), modality="image", media=rel)]

    return parse_each(rows, parse)
