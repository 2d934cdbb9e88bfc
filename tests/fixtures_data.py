"""Inputs and outputs of the shard builder (`data_shards`), for its tests: tiny source datasets in their real
on-disk formats (JPEG, mp4, MSVD's .avi, wav, annotation JSON), `run_build` (the builder's CLI in-process), and
readers that open the shards and manifest it wrote.

Separate from shard_fixtures.py, which writes shards directly (no builder) for the loader and training tests:
those must not depend on the builder tool, and this module imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_shards import build
from data_shards.demo_media import write_video, write_wav
from epalm.data import schema


def jpeg(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A smooth random-colour JPEG of (width, height) `size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(path, quality=95)
    return path


def video(path: Path, num_frames: int = 12, size: tuple[int, int] = (48, 32)) -> Path:
    """An mp4 whose frame i is uniformly grey level 20 * i, so the sampled indices can be read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    write_video(path, [np.full((h, w, 3), (20 * i) % 256, dtype=np.uint8) for i in range(num_frames)])
    return path


def avi(path: Path, num_frames: int = 10, size: tuple[int, int] = (32, 32)) -> Path:
    """An MPEG-4 Part 2 .avi (as MSVD ships)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = np.full((size[1], size[0], 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def wav(path: Path, seconds: float = 1.0, sample_rate: int = 16000, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    write_wav(path, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sample_rate)
    return path


def dump(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def run_build(*args: object, workers: int = 1) -> int:
    argv = [str(a) for a in args] + ["--no-progress", "--workers", str(workers)]
    return build.main(argv)


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar as (key, {member: bytes}), in file order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return list(samples.items())


def read_split(out: Path) -> tuple[dict, list[dict[str, bytes]]]:
    """The manifest and every sample of a built split directory."""
    manifest = json.loads((out / schema.MANIFEST).read_text())
    samples = []
    for shard in manifest["shards"]:
        got = read_shard(out / shard["name"])
        assert len(got) == shard["num_samples"]
        samples += [members for _, members in got]
    assert len(samples) == manifest["num_samples"]
    return manifest, samples


def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample[schema.JSON])


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return img.size


def mean_level(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as img:
        return float(np.asarray(img.convert("L")).mean())


def hashes(out: Path) -> dict[str, str]:
    """sha256 of every shard and the manifest of a split directory."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix == ".tar" or p.name == schema.MANIFEST
    }
