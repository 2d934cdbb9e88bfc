"""Tiny shards written straight with `tarfile` in the layout of `epalm.data.schema` (image / video / audio, QA or
caption, optional cached features), for the loader, training and evaluation tests; `one_torch_thread`, and
`take` (the next n batches of a loader).

Separate from fixtures_data.py: no shard builder (`data_shards`) is involved, so a loader test fails only for
the loader. training_fixtures.py and length_fixtures.py build on the writers here.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from epalm.data import schema


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Small tensor ops on a busy 2-core machine run far slower with 2 intra-op threads than with 1."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@cache
def jpeg_bytes(size: int = 16, shade: int = 128) -> bytes:
    pixels = np.full((size, size + 4, 3), shade, dtype=np.uint8)
    pixels[:, : size // 2, 0] = 255  # a non-uniform image, so a flip is visible
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample_meta(key: str, task: str, modality: str, index: int, question_id: bool = True) -> dict:
    meta = {"id": key, "source": "tiny", "split": "train", "task": task, "modality": modality}
    if task == "qa":
        meta["question"] = f"what digit is {index}?"
        if question_id:  # as the builder's QA sources write it; eval.run scores by it
            meta["question_id"] = index
        meta["answers"] = [{"answer": "seven", "score": 0.9}, {"answer": "one", "score": 0.3}]
    else:
        meta["captions"] = [f"a handwritten digit {index}"]
    return meta


def write_dataset(
    root: str | Path,
    counts: list[int],
    *,
    task: str = "qa",
    modality: str = "image",
    prefix: str = "s",
    features: tuple[int, int] | None = None,
    fingerprint: dict | None = None,
    num_frames: int = 3,
    extra: dict[int, dict[str, bytes]] | None = None,
    question_ids: bool = True,
) -> Path:
    """One shard per entry of `counts`; sample i's key is f"{prefix}{i:05d}"; `extra[i]` adds members."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for s, count in enumerate(counts):
        name = schema.shard_name("train", s)
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                key = f"{prefix}{index:05d}"
                add_member(
                    tar,
                    f"{key}.json",
                    json.dumps(sample_meta(key, task, modality, index, question_ids)).encode(),
                )
                if modality == "image":
                    add_member(tar, f"{key}.jpg", jpeg_bytes())
                elif modality == "video":
                    for f in range(num_frames):
                        add_member(tar, f"{key}.{schema.frame_member(f)}", jpeg_bytes(shade=40 * f))
                else:
                    fbank = np.full((1024, 128), -4.0, dtype=np.float16)
                    add_member(tar, f"{key}.{schema.AUDIO}", npy_bytes(fbank))
                if features is not None:
                    feats = np.full(features, index, dtype=np.float16)
                    add_member(tar, f"{key}.{schema.FEATURES}", npy_bytes(feats))
                for ext, data in (extra or {}).get(index, {}).items():
                    add_member(tar, f"{key}.{ext}", data)
                index += 1
        shards.append({"name": name, "num_samples": count})
    manifest = {"num_samples": index, "shards": shards, "fingerprint": fingerprint}
    (root / schema.MANIFEST).write_text(json.dumps(manifest))
    return root


def all_keys(prefix: str, n: int) -> set[str]:
    return {f"{prefix}{i:05d}" for i in range(n)}


def take(loader, n: int) -> list[dict]:
    """The next n batches of a loader, across epoch ends, as a trainer consumes them."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out
