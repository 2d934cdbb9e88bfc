"""Loader throughput: decoded + augmented 224x224 training samples/s from shards, loose JPEGs and cached features.

Generates its own inputs in a temporary directory; `python -m bench.run loader`.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

NUM_IMAGES = 384
PER_SHARD = 128
BATCH = 32
FEATURES = (6, 768)  # 6 [CLS] states of ViT-B
_FP = {"encoder": "bench", "weights_hash": "0", "layers": 6, "preprocessing": "bench", "image_size": 224}


def _jpeg(rng: np.random.Generator) -> bytes:
    # smooth random content (JPEG of pure noise is unrealistically large), 640x480 -> shorter side 256
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((640, 480), Image.BILINEAR).resize((341, 256), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_inputs(root: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    images = [_jpeg(rng) for _ in range(NUM_IMAGES)]
    loose, shards, feats = root / "loose", root / "shards", root / "feats"
    for d in (loose, shards, feats):
        d.mkdir()
    for i, data in enumerate(images):
        (loose / f"{i:05d}.jpg").write_bytes(data)
    for out, with_features in ((shards, False), (feats, True)):
        entries = []
        for s in range(0, NUM_IMAGES, PER_SHARD):
            name = f"train-{s // PER_SHARD:06d}.tar"
            with tarfile.open(out / name, "w") as tar:
                for i in range(s, s + PER_SHARD):
                    meta = {"id": f"{i:05d}", "task": "caption", "modality": "image", "captions": ["a photo"]}
                    _member(tar, f"{i:05d}.json", json.dumps(meta).encode())
                    _member(tar, f"{i:05d}.jpg", images[i])
                    if with_features:
                        buf = io.BytesIO()
                        np.save(buf, rng.standard_normal(FEATURES).astype(np.float16))
                        _member(tar, f"{i:05d}.feats.npy", buf.getvalue())
            entries.append({"name": name, "num_samples": PER_SHARD})
        manifest = {
            "num_samples": NUM_IMAGES,
            "shards": entries,
            "fingerprint": _FP if with_features else None,
        }
        (out / "manifest.json").write_text(json.dumps(manifest))
    return loose, shards, feats


_REPORT = """## Loader

Command: `python -m bench.run loader`. Best of 3 epochs of {n} training samples, batch {batch}, on
{cores} CPU cores (shared with other jobs, so treat the numbers as rough). Inputs are generated:
640x480 JPEGs resized to 341x256 (shorter side 256), quality 90, {per_shard} samples per shard;
features are float16 6x768. Shards and features include JSON parsing,
caption tokenisation and padding; the loose-file row decodes and augments images only.
Augmentation: RandomResizedCrop(224, scale 0.5-1, bicubic) + flip + CLIP normalisation.
Each epoch is timed from its first batch, so worker start-up (once per epoch) is excluded. torch
uses 1 intra-op thread in every process, as in DataLoader workers.

| source | workers | samples/s |
|---|---|---|
{table}
"""


class _LooseJpegs(Dataset):
    """The original project's way: one JPEG file per sample, PIL, then the same transform."""

    def __init__(self, folder: Path) -> None:
        from epalm.data.transforms import ImageTransform

        self.paths = sorted(folder.glob("*.jpg"))
        self.transform = ImageTransform(224, train=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            pixels = pil_to_tensor(image.convert("RGB"))
        return self.transform(pixels, random.Random(i))


def _rate(make) -> float:
    """Steady state: timed from the first batch of an epoch (worker start-up excluded), best of 3 epochs."""
    rates = []
    for _ in range(3):
        start, n = None, 0
        for batch in make():
            if start is None:
                start = time.perf_counter()
                continue
            n += len(batch["keys"]) if isinstance(batch, dict) else len(batch)
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def main() -> str:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DataLoader workers run torch with 1 thread; do the same in-process, where 2 threads on a busy
    # 2-core machine made the per-sample ops up to 100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _measure()
    finally:
        torch.set_num_threads(threads)
    table = "\n".join(f"| {name} | {w} | {rate:,.0f} |" for name, w, rate in rows)
    return _REPORT.format(table=table, cores=os.cpu_count(), n=NUM_IMAGES, batch=BATCH, per_shard=PER_SHARD)


def _measure() -> list[tuple[str, int, float]]:
    from epalm.data.loader import DatasetSpec, build_train_loader
    from epalm.data.text import build_tokenizer
    from epalm.tokenizer_trainer import save_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loose, shards, feats = _write_inputs(root)
        tokenizer = build_tokenizer(str(save_tokenizer(["a photo"] * 20, root / "tok", vocab_size=280)))
        image = DatasetSpec(shards, "caption", "image")
        cached = DatasetSpec(feats, "caption", "image", use_features=True, expected_fingerprint=_FP)
        for workers in (0, 2):
            common = dict(batch_size=BATCH, rank=0, world_size=1, num_workers=workers, image_size=224)
            shard_loader = build_train_loader([image], tokenizer, **common)
            rows.append(("(a) tar shards, streaming loader", workers, _rate(lambda ld=shard_loader: ld)))
            files = DataLoader(_LooseJpegs(loose), batch_size=BATCH, shuffle=True, num_workers=workers)
            rows.append(("(b) loose JPEG files, PIL + same transform", workers, _rate(lambda ld=files: ld)))
            feat_loader = build_train_loader([cached], tokenizer, **common)
            rows.append(
                ("(c) feature cache (feats.npy), no media", workers, _rate(lambda ld=feat_loader: ld))
            )
    return rows


if __name__ == "__main__":
    print(main())
