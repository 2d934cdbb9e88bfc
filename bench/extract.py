"""Feature extraction throughput on CPU: `data_shards.extract` on 2 torchrun ranks (1 DataLoader worker each)
against the builder's in-worker cache (`data_shards.build --encoder --workers 2`), same samples, same run."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._launch import VENV_BIN, bench_env, machine_load
from epalm.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CASES = {  # name: (encoder tree, modality, samples, samples per shard)
    "ViT-B/16, 224x224": ({"kind": "vit", "name": "vit_base_patch16_224"}, "image", 32, 4),
    "TimeSformer-B, 8 frames": (
        {"kind": "timesformer", "name": "facebook/timesformer-base-finetuned-k600"},
        "video",
        4,
        1,
    ),
}


def _raw(root: Path, modality: str, n: int) -> list[str]:
    """n random 320x240 JPEGs or 16-frame mp4s, and the build arguments for them (GQA / MSRVTT-QA formats)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    media = root / "media_raw"
    media.mkdir(parents=True)
    if modality == "image":
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(media / f"n{i}.jpg")
        ann = {str(i): {"imageId": f"n{i}", "question": "what?", "answer": "a"} for i in range(n)}
        source = "gqa"
    else:
        import av

        for i in range(n):
            with av.open(str(media / f"v{i}.mp4"), "w") as container:
                stream = container.add_stream("mpeg4", rate=8)
                stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
                for _ in range(16):
                    frame = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        ann = [{"video": f"v{i}.mp4", "question_id": i, "question": "what?", "answer": "a"} for i in range(n)]
        source = "msrvtt_qa"
    (root / "ann.json").write_text(json.dumps(ann))
    return ["--source", source, "--annotations", str(root / "ann.json"), "--media-root", str(media)]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def measure(name: str, tmp: Path) -> dict:
    import yaml

    enc, modality, n, per_shard = CASES[name]
    root = tmp / modality
    build = _raw(root, modality, n) + [
        "--split",
        "val",
        "--samples-per-shard",
        str(per_shard),
        "--no-progress",
    ]
    config = root / "enc.yaml"
    tree = {
        "model": {"encoder": {**enc, "pretrained": False, "num_states": 6}},
        "data": {"image_size": 224, "modality": modality},
    }
    config.write_text(yaml.safe_dump(tree))
    _timed([PY, "-m", "data_shards.build", *build, "--out", str(root / "media"), "--workers", "2"])
    builder = _timed(
        [PY, "-m", "data_shards.build", *build, "--out", str(root / "built"), "--workers", "2",
         "--encoder", str(config)]
    )  # fmt: skip
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    extract = _timed(
        [*torchrun, "-m", "data_shards.extract", "--shards", str(root / "media"), "--encoder", str(config),
         "--out", str(root / "extracted"), "--workers", "1", "--no-progress"]
    )  # fmt: skip
    same = all(
        (root / "built" / p.name).read_bytes() == p.read_bytes() for p in (root / "extracted").glob("*.tar")
    )
    return {"n": n, "builder": builder, "extract": extract, "same": same}


def main() -> str:
    load = machine_load()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: measure(name, Path(tmp)) for name in CASES}
    rows = [
        f"| {name} | {r['n']} | {r['n'] / r['builder']:.2f} | {r['n'] / r['extract']:.2f} "
        f"| {r['builder'] / r['extract']:.2f}x | {'yes' if r['same'] else '**no**'} |"
        for name, r in results.items()
    ]
    return f"""## Feature extraction: data_shards.extract vs the builder's in-worker cache

Command: `python -m bench.run extract`. Random-weight encoders (6 states, fp32, batch 16), 224x224 input.
*builder*: `data_shards.build --encoder CONFIG --workers 2` from the raw files (media extraction + encoder in
2 worker processes). *extract*: `torchrun --nproc_per_node 2 -m data_shards.extract --workers 1` over media
shards built beforehand from the same files (not timed). Both are wall times of the whole command, process
start-up, imports and encoder builds included, so small sets favour neither. *same bytes*: every extracted
tar equals the builder's. {load} at the start; the development machine is shared, numbers move from run to
run. On CPU both are bound by the same encoder arithmetic; extract's point is the GPU (tests/gpu/check_extract.py).

| encoder | samples | builder samples/s | extract samples/s | extract / builder | same bytes |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    print(main())
