"""What a source yields (`Record`), the errors it raises, and helpers shared by the source parsers."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


class AnnotationError(Exception):
    """The annotation file (or directory) cannot be used at all; the build stops with this message."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read annotations {str(path)!r}: {reason}")


@dataclass(frozen=True)
class Record:
    """One future sample: its JSON member (`meta`) and where its media lies.

    `media` is relative to --media-root, except for media inside a tar (`tar_offset` set), where it
    is the tar's own path and (tar_offset, tar_size) locate the member's bytes.
    """

    meta: dict
    modality: str
    media: str
    alt_media: tuple[str, ...] = ()  # tried in order when `media` does not exist
    tar_offset: int | None = None
    tar_size: int | None = None


@dataclass
class Loaded:
    records: list[Record] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def read_json(path: str | Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(path, f"{type(e).__name__}: {e}") from e


def expect(obj: object, kind: type, path: str | Path, what: str) -> object:
    if not isinstance(obj, kind):
        raise AnnotationError(path, f"expected {what}, found {type(obj).__name__}")
    return obj


def parse_each(entries: Iterable, parse: Callable[[object], list[Record]]) -> Loaded:
    """Apply `parse` to every entry; an entry that fails to parse is counted, not fatal."""
    out = Loaded()
    for entry in entries:
        try:
            out.records.extend(parse(entry))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            out.skipped["malformed_record"] += 1
    return out


def text(value: object) -> str:
    """A non-empty stripped string, or ValueError (a malformed record)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def captions_of(value: object) -> list[str]:
    """`caption` fields are a string or a list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("caption must be a string or a non-empty list")
    return [text(c) for c in items]


def is_train_split(split: str) -> bool:
    """Training splits ('train', 'karpathy_train', 'train7k') get one sample per caption."""
    return "train" in split.lower()


def caption_groups(split: str, captions: list[str]) -> list[list[str]]:
    """One sample per caption when training (as the original), else one sample with every reference."""
    return [[c] for c in captions] if is_train_split(split) else [captions]


def scored_answers(label: dict) -> list[dict]:
    """{answer: score} -> [{"answer", "score"}], best first, ties by answer text (deterministic)."""
    if not isinstance(label, dict):
        raise TypeError("label must be a dict")
    items = [(text(a), float(s)) for a, s in label.items()]
    return [{"answer": a, "score": s} for a, s in sorted(items, key=lambda x: (-x[1], x[0]))]


def vqa_soft_answers(answers: list[str]) -> list[dict]:
    """VQA soft score per unique answer: min(1, count / 3)."""
    counts = Counter(a.strip() for a in answers if isinstance(a, str) and a.strip())
    return scored_answers({a: min(1.0, n / 3) for a, n in counts.items()})


def base_meta(source: str, split: str, task: str, modality: str, sample_id: object) -> dict:
    return {"id": str(sample_id), "source": source, "split": split, "task": task, "modality": modality}
