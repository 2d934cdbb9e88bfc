"""Loader throughput: decoded + augmented 224x224 training samples/s from shards (local disk and HTTP on
127.0.0.1), loose JPEGs and cached features; local shards also with the loader of BASELINE, in the same run.

Generates its own inputs in a temporary directory; `python -m bench.run loader`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
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
ROOT = Path(__file__).resolve().parent.parent
BASELINE = "c575083"  # the last commit whose loader read tars by hand with tarfile, before it moved to webdataset's tar iterator
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

The HTTP row streams the same shards from a `http.server` on 127.0.0.1 (curl through webdataset's
`gopen`). The baseline rows run the loader of commit `{baseline}` (its `epalm/` checked out with
`git archive` into a temporary directory) on the same shards, in a subprocess, alternating with the
current loader in the same run; both are best of 2 rounds x 3 epochs.

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
    return _REPORT.format(
        table=table, cores=os.cpu_count(), n=NUM_IMAGES, batch=BATCH, per_shard=PER_SHARD, baseline=BASELINE
    )


def shard_rates(shards: str, tok: str) -> dict[int, float]:
    """Samples/s of `build_train_loader` over `shards` at 0 and 2 workers (whichever epalm is importable)."""
    from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
    from epalm.data.text import build_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer(tok)
    out = {}
    for workers in (0, 2):
        common = dict(batch_size=BATCH, rank=0, world_size=1, num_workers=workers, image_size=224)
        loader = build_train_loader(
            [DatasetSpec(shards, "caption", "image")], tokenizer, LoaderSettings(**common)
        )
        out[workers] = _rate(lambda ld=loader: ld)
    return out


def _rates_in_subprocess(pythonpath: str, shards: Path, tok: Path) -> dict[int, float]:
    code = f"import json, bench.loader as b; print(json.dumps(b.shard_rates({str(shards)!r}, {str(tok)!r})))"
    env = dict(os.environ, PYTHONPATH=f"{pythonpath}{os.pathsep}{ROOT}", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _old_and_new(root: Path, shards: Path, tok: Path) -> tuple[dict, dict]:
    old_tree = root / "baseline"
    old_tree.mkdir()
    archive = subprocess.run(["git", "archive", BASELINE, "epalm"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    best_old, best_new = {0: 0.0, 2: 0.0}, {0: 0.0, 2: 0.0}
    for _ in range(2):  # alternate, so both see the same machine load
        for best, path in ((best_old, old_tree), (best_new, ROOT)):
            for w, r in _rates_in_subprocess(str(path), shards, tok).items():
                best[w] = max(best[w], r)
    return best_old, best_new


class _Server:
    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _measure() -> list[tuple[str, int, float]]:
    from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
    from epalm.data.text import build_tokenizer
    from epalm.data.tokenizer_trainer import save_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loose, shards, feats = _write_inputs(root)
        tok = save_tokenizer(["a photo"] * 20, root / "tok", vocab_size=280)
        tokenizer = build_tokenizer(str(tok))
        old, new = _old_and_new(root, shards, tok)
        cached = DatasetSpec(feats, "caption", "image", use_features=True, expected_fingerprint=_FP)
        with _Server(root) as url:
            for workers in (0, 2):
                common = dict(batch_size=BATCH, rank=0, world_size=1, num_workers=workers, image_size=224)
                rows.append(("(a) tar shards, local disk", workers, new[workers]))
                rows.append((f"(a0) tar shards, local disk, baseline {BASELINE}", workers, old[workers]))
                http = build_train_loader(
                    [DatasetSpec(f"{url}/shards", "caption", "image")], tokenizer, LoaderSettings(**common)
                )
                rows.append(("(a1) tar shards over HTTP (127.0.0.1)", workers, _rate(lambda ld=http: ld)))
                files = DataLoader(_LooseJpegs(loose), batch_size=BATCH, shuffle=True, num_workers=workers)
                rows.append(
                    ("(b) loose JPEG files, PIL + same transform", workers, _rate(lambda ld=files: ld))
                )
                feat_loader = build_train_loader([cached], tokenizer, LoaderSettings(**common))
                rows.append(
                    ("(c) feature cache (feats.npy), no media", workers, _rate(lambda ld=feat_loader: ld))
                )
    return rows


if __name__ == "__main__":
    print(main())
