"""GPU check of data_shards.extract: ViT-L/16 images/s and TimeSformer-B (8 frames) clips/s in bf16 through the
real extraction loop (DataLoader decode workers + BatchEncoder + shard writes) against the encoder's pure
forward throughput on the same batch, already on the GPU. Target: extraction >= 70% of the pure forward.
NOT YET RUN ON A GPU. `--dry-run` runs the same code on CPU with tiny shapes.

    python tests/gpu/check_extract.py [--out DIR] [--batch-size 64] [--workers 12]
    python tests/gpu/check_extract.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TARGET = 0.70
CASES = {  # name: (encoder, modality, samples, tiny overrides for --dry-run)
    "vit_l16": (
        {"kind": "vit", "name": "vit_large_patch16_224"},
        "image",
        2048,
        {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2},
    ),
    "timesformer_b8": (
        {"kind": "timesformer", "name": "facebook/timesformer-base-finetuned-k600"},
        "video",
        256,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "image_size": 32, "patch_size": 16, "num_frames": 8},
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(12, len(os.sched_getaffinity(0))))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: exercise the code path")
    return p.parse_args(argv)


def media_shards(root: Path, modality: str, n: int, size: int, num_frames: int) -> Path:
    """n random samples stored as the builder stores them (JPEG, shorter side `size`)."""
    from collections import Counter

    from data_shards import writer
    from epalm import atomic
    from epalm.data import schema
    from epalm.data.media import encode_image

    rng = np.random.default_rng(0)
    out, per_shard, done = root / "media", 256, []
    out.mkdir(parents=True)
    frames = [encode_image(_png(rng, size), size) for _ in range(32)]  # a pool: encoding is not measured
    for index, start in enumerate(range(0, n, per_shard)):
        samples = []
        for i in range(start, min(n, start + per_shard)):
            meta = {"id": str(i), "task": "qa", "modality": modality, "question": "q?", "answers": []}
            members = {schema.JSON: json.dumps(meta).encode()}
            if modality == "image":
                members[schema.IMAGE] = frames[i % 32]
            else:
                members.update({schema.frame_member(f): frames[(i + f) % 32] for f in range(num_frames)})
            samples.append((f"{i:09d}", members))
        name = schema.shard_name("val", index)
        writer.write_tar(out / name, samples)
        done.append({"name": name, "num_samples": len(samples), "skipped": {}})
    args = {"image_size": size, "num_frames": num_frames}
    manifest = writer.make_manifest(done, Counter(), "check", "val", args, None)
    atomic.write_json_atomic(out / schema.MANIFEST, manifest)
    return out


def _png(rng, size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size * 4 // 3, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def measure(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    import torch
    import yaml

    from data_shards import extract, extract_io
    from data_shards.features import make_spec
    from epalm.data.stream import load_manifest

    enc, modality, n, tiny = CASES[name]
    size = 32 if args.dry_run else 224
    n = 64 if args.dry_run else n
    device = "cpu" if args.dry_run else "cuda:0"
    dtype = "bfloat16"
    tree = {"model": {"encoder": {**enc, "pretrained": False, "num_states": 6 if not args.dry_run else 2}}}
    if args.dry_run:
        tree["model"]["encoder"]["config_overrides"] = tiny
    tree["data"] = {"image_size": size}
    root = tmp / name
    root.mkdir()
    config = root / "enc.yaml"
    config.write_text(yaml.safe_dump(tree))
    shards_dir = media_shards(root, modality, n, size, 8)
    spec, encoder = make_spec(str(config), None, modality, size, 8, dtype)
    encoder = encoder.to(device)

    # pure forward on a batch already on the device
    shape = (args.batch_size, *((8,) if modality == "video" else ()), 3, size, size)
    x = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            encoder(x)
        sync()
        reps = 3 if args.dry_run else 20
        start = time.perf_counter()
        for _ in range(reps):
            encoder(x)
        sync()
    forward = reps * args.batch_size / (time.perf_counter() - start)

    # the extraction loop: decode workers -> batches -> encoder -> feature shards
    manifest, shards = load_manifest(shards_dir)
    kind = torch.device(device).type
    ids = [extract_io.build_id(manifest, shards, j, spec["fingerprint"], args.batch_size, kind) for j in range(len(shards.names))]  # fmt: skip
    ns = argparse.Namespace(
        batch_size=args.batch_size, workers=args.workers, out=root / "feats", no_progress=True
    )
    ns.out.mkdir()
    start = time.perf_counter()
    extract.run_shards(ns, shards, list(range(len(shards.names))), ids, spec, encoder, device, True, 1, {"signal": None})  # fmt: skip
    sync()
    extracted = n / (time.perf_counter() - start)
    return {"forward_per_s": forward, "extract_per_s": extracted, "ratio": extracted / forward, "samples": n}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("SKIP check_extract: no CUDA")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: measure(name, args, Path(tmp)) for name in CASES}
    ok = all(r["ratio"] >= TARGET for r in results.values())
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    report = {"device": device, "batch_size": args.batch_size, "workers": args.workers, "target": TARGET,
              "results": results, "pass": ok}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_extract.json").write_text(json.dumps(report, indent=1) + "\n")
    parts = [
        f"{k} {r['extract_per_s']:.1f}/s extract vs {r['forward_per_s']:.1f}/s forward ({r['ratio']:.0%})"
        for k, r in results.items()
    ]
    print(
        f"{'PASS' if ok else 'FAIL'} check_extract on {device}, bf16 batch {args.batch_size}: "
        + "; ".join(parts)
    )
    return 0 if ok or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
