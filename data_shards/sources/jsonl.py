"""Your own data as JSON Lines: one object per line naming a media file (relative to --media-root) and its text.

    {"media": "imgs/1.jpg", "caption": "a dog on grass"}                          caption (str or [str])
    {"media": "clips/7.mp4", "question": "what moves?", "answers": ["a car"]}     QA (answers: [str] or
                                                                                  [{"answer", "score"}])
Optional keys: "id" (str or int), "modality" ("image" | "video" | "audio"; else from the file extension).
A file holds one split (--split) of one kind: the (task, modality) of most lines; other lines are skipped.
Caption lines of one media file are grouped: a train split gets one sample per caption, others one per file.

Read line by line with `json.loads` so that one bad line is counted and skipped (`jsonlines` and
`pandas.read_json(lines=True)` stop at the first bad line). The extension table is explicit because
`mimetypes` answers from the machine's own mime.types (".mkv" or ".flac" differ between systems).
"""

from __future__ import annotations

import json
import posixpath
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_shards.sources.base import (
    AnnotationError,
    Loaded,
    Record,
    base_meta,
    caption_groups,
    captions_of,
    scored_answers,
    text,
)

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "video": (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg"),
    "audio": (".wav", ".flac", ".mp3", ".ogg"),
}
MEDIA_KEYS = {
    "image": ("image_id", "image_path"),
    "video": ("video_id", "video_path"),
    "audio": ("audio_id", "audio_path"),
}
# why a line is skipped (counted in the manifest's `skipped`, like every source's malformed records)
MALFORMED = "malformed_record"  # not JSON, not an object, a missing field or a wrong type
UNKNOWN_MEDIA = "unknown_media_type"  # no "modality" and an extension outside EXTENSIONS
MIXED = "mixed_kind"  # a caption line in a QA file (or the reverse), or another modality than the file's
MAX_NOTES = 5  # bad lines reported on stderr, with their line numbers


class BadLine(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, for messages and the default question id
    task: str
    modality: str
    media: str
    obj: dict


def modality_of(obj: dict, media: str) -> str:
    if "modality" in obj:
        if not isinstance(obj["modality"], str) or obj["modality"] not in EXTENSIONS:
            raise BadLine(UNKNOWN_MEDIA, f"modality {obj['modality']!r} is not one of {sorted(EXTENSIONS)}")
        return obj["modality"]
    ext = posixpath.splitext(media)[1].lower()
    for modality, exts in EXTENSIONS.items():
        if ext in exts:
            return modality
    raise BadLine(UNKNOWN_MEDIA, f'cannot tell the modality of {media!r}: give "modality"')


def parse_line(number: int, raw: bytes) -> Line:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadLine(MALFORMED, f"not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BadLine(MALFORMED, f"expected an object, found {type(obj).__name__}")
    try:
        media = text(obj.get("media"))
    except ValueError as e:
        raise BadLine(MALFORMED, '"media" must be a non-empty path') from e
    if ("caption" in obj) == ("question" in obj):
        raise BadLine(MALFORMED, 'give either "caption" or "question" + "answers"')
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
        raise BadLine(MALFORMED, '"id" must be a string or an integer')
    try:  # the text is checked here so that a bad line never decides the file's kind
        if "caption" in obj:
            captions_of(obj["caption"])
        else:
            text(obj["question"])
            answers_of(obj["answers"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadLine(MALFORMED, f"bad text: {type(e).__name__}: {e}") from e
    task = "caption" if "caption" in obj else "qa"
    return Line(number, task, modality_of(obj, media), media, obj)


def answers_of(value: object) -> list[dict]:
    """[str] -> each distinct answer scores 1.0 (as eval.qa reads `"answers": [str]`), most frequent first;
    [{"answer", "score"}] -> as given, best first; [] -> a split without ground truth."""
    if not isinstance(value, list):
        raise TypeError('"answers" must be a list')
    if all(isinstance(a, str) for a in value):
        return [{"answer": a, "score": 1.0} for a, _ in Counter(text(a) for a in value).most_common()]
    scores: dict[str, float] = {}
    for a in value:
        score = float(a.get("score", 1.0))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"answer score {score} outside [0, 1]")
        scores[text(a["answer"])] = max(score, scores.get(text(a["answer"]), 0.0))
    return scored_answers(scores)


def media_id(line: Line) -> str | int:
    return line.obj.get("id", posixpath.splitext(line.media)[0])


def caption_records(lines: list[Line], split: str) -> list[Record]:
    by_media: dict[str, list[Line]] = {}
    for line in lines:
        by_media.setdefault(line.media, []).append(line)
    out = []
    for media, group in by_media.items():
        first = group[0]
        captions = [c for line in group for c in captions_of(line.obj["caption"])]
        groups = caption_groups(split, captions)
        id_key, path_key = MEDIA_KEYS[first.modality]
        for j, caps in enumerate(groups):
            sample_id = f"{media_id(first)}_{j}" if len(groups) > 1 else media_id(first)
            meta = base_meta("jsonl", split, "caption", first.modality, sample_id)
            meta.update({"captions": caps, id_key: media_id(first), path_key: media})
            out.append(Record(meta=meta, modality=first.modality, media=media))
    return out


def qa_record(line: Line, split: str) -> Record:
    qid = line.obj.get("id", line.number)
    id_key, path_key = MEDIA_KEYS[line.modality]
    meta = base_meta("jsonl", split, "qa", line.modality, qid)
    meta.update(
        {
            "question_id": qid,
            "question": text(line.obj["question"]),
            "answers": answers_of(line.obj["answers"]),
            id_key: posixpath.splitext(line.media)[0],
            path_key: line.media,
        }
    )
    return Record(meta=meta, modality=line.modality, media=line.media)


def load(annotations: Path, split: str, questions: Path | None = None) -> Loaded:
    try:
        with open(annotations, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise AnnotationError(annotations, f"{type(e).__name__}: {e}") from e
    out, lines, notes = Loaded(), [], []  # notes: (line number, message)

    def skip(number: int, reason: str, detail: str) -> None:
        out.skipped[reason] += 1
        notes.append((number, f"{annotations}:{number}: skipped ({reason}): {detail}"))

    for number, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            lines.append(parse_line(number, raw))
        except BadLine as e:
            skip(number, e.reason, str(e))
    # the file's kind: that of most lines (ties: the first seen), so one stray line cannot decide it
    kinds = Counter((line.task, line.modality) for line in lines)
    kind = kinds.most_common(1)[0][0] if kinds else ("qa", "image")
    owner: dict[object, str] = {}  # id -> the media (captions) or line (QA) that holds it
    kept = []
    for line in lines:
        if (line.task, line.modality) != kind:
            skip(line.number, MIXED, f"a {line.modality} {line.task} line in a {kind[1]} {kind[0]} file")
            continue
        key = media_id(line) if line.task == "caption" else line.obj.get("id", line.number)
        holder = line.media if line.task == "caption" else f"line {line.number}"
        if owner.setdefault(key, holder) != holder:
            skip(line.number, MALFORMED, f"id {key!r} is already used by {owner[key]!r}")
            continue
        kept.append(line)
    if kind[0] == "caption":
        out.records = caption_records(kept, split)
    else:
        out.records = [qa_record(line, split) for line in kept]
    notes.sort(key=lambda note: note[0])
    for _, note in notes[:MAX_NOTES]:
        print(note, file=sys.stderr)
    if len(notes) > MAX_NOTES:
        print(f"{annotations}: {len(notes) - MAX_NOTES} more skipped line(s)", file=sys.stderr)
    return out
