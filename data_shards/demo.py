"""`python -m data_shards.demo --out DIR`: small learnable tasks written in the real dataset formats
(digits as COCO-Karpathy captions and VQA v2, moving shapes as MSRVTT-QA, tones as AudioCaps CSV),
then shards for every split through `data_shards.build`. Runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_shards import build
from data_shards.demo_media import write_video, write_wav
from epalm.data import schema

SPLITS = ("train", "val", "test")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
PITCHES = {"low": (150.0, 300.0), "mid": (700.0, 1200.0), "high": (2500.0, 4000.0)}
DIGIT_QUESTION = "what digit is this?"
SHAPE_QUESTION = "which way does the shape move?"
SEED = 0


def split_ids(n: int, num_heldout: int, seed: int = SEED) -> dict[str, list[int]]:
    """A fixed seeded partition of range(n): val and test hold `num_heldout` each, never seen in training."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return {
        "test": sorted(order[:num_heldout]),
        "val": sorted(order[num_heldout : 2 * num_heldout]),
        "train": sorted(order[2 * num_heldout :]),
    }


def shape_direction(video_id: str) -> int:
    """The class index (into sorted DIRECTIONS) that write_shapes gave clip `clipNNNNN`: the generator's label."""
    return int(video_id.removeprefix("clip")) % len(DIRECTIONS)


def tone_pitch(audio_id: str) -> int:
    """The class index (into sorted PITCHES) that write_tones gave `toneNNNNN`: the generator's label."""
    return int(audio_id.removeprefix("tone")) % len(PITCHES)


def write_digit_image(path: Path, pixels: np.ndarray, size: int = 32) -> None:
    """An 8x8 scikit-learn digit (0..16, ink high) as dark ink on white paper, upscaled to size x size."""
    gray = (255 - pixels.astype(np.float32) * (255 / 16)).clip(0, 255).astype(np.uint8)
    Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(
        path, quality=95
    )


def shape_clip(
    direction: str, rng: np.random.Generator, size: int = 32, num_frames: int = 8
) -> list[np.ndarray]:
    """A coloured square crossing a dark frame in `direction`, 2-3 pixels per frame, always fully inside."""
    side, speed = int(rng.integers(6, 10)), int(rng.integers(2, 4))
    travel = speed * (num_frames - 1)
    start = []
    for d in DIRECTIONS[direction]:  # (dy, dx): the moving axis starts where the whole path fits
        lo, hi = (0, size - side - travel) if d > 0 else (travel, size - side) if d < 0 else (0, size - side)
        start.append(int(rng.integers(lo, hi + 1)))
    colour = rng.integers(128, 256, size=3).astype(np.uint8)
    (dy, dx), (y0, x0) = DIRECTIONS[direction], start
    frames = []
    for t in range(num_frames):
        frame = np.full((size, size, 3), 16, dtype=np.uint8)
        y, x = y0 + dy * speed * t, x0 + dx * speed * t
        frame[y : y + side, x : x + side] = colour
        frames.append(frame)
    return frames


def tone(pitch: str, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """A sine of a random frequency in the pitch band, 1-2 s, with a short fade and faint noise."""
    freq = rng.uniform(*PITCHES[pitch])
    n = int(sample_rate * rng.uniform(1.0, 2.0))
    t = np.arange(n) / sample_rate
    x = rng.uniform(0.3, 0.8) * np.sin(2 * math.pi * freq * t + rng.uniform(0, 2 * math.pi))
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    return (x * fade + rng.normal(0, 0.01, n)).astype(np.float32)


def write_digits(raw: Path, image_size: int) -> None:
    """Digits as COCO-Karpathy (one dataset_coco.json) and VQA v2 (questions + annotations per split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (raw / "images").mkdir(parents=True, exist_ok=True)
    splits = split_ids(len(digits.target), num_heldout=180)
    karpathy, subtype = [], "digits"
    for split, ids in splits.items():
        questions, annotations = [], []
        for i in ids:
            image_id, word = i + 1, NUMBERS[int(digits.target[i])]
            filename = f"COCO_{subtype}_{image_id:012d}.jpg"
            write_digit_image(raw / "images" / filename, digits.images[i], image_size)
            sentences = [f"a handwritten digit {word}", f"a picture of the number {word}"]
            karpathy.append(
                {"filepath": "images", "filename": filename, "split": split, "cocoid": image_id, "imgid": i}
                | {"sentences": [{"raw": s, "tokens": s.split(), "imgid": i} for s in sentences]}
            )
            qid = image_id * 10
            questions.append({"image_id": image_id, "question": DIGIT_QUESTION, "question_id": qid})
            answers = [{"answer": word, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
            annotations.append(
                {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": "number"}
                | {"multiple_choice_answer": word, "answers": answers}
            )
        common = {
            "data_subtype": subtype,
            "data_type": "mscoco",
            "license": {},
            "info": {"description": "demo"},
        }
        _dump(
            raw / f"v2_OpenEnded_mscoco_{split}_questions.json",
            common | {"questions": questions, "task_type": "Open-Ended"},
        )
        _dump(raw / f"v2_mscoco_{split}_annotations.json", common | {"annotations": annotations})
    _dump(raw / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})


def write_shapes(raw: Path, num_clips: int = 240) -> None:
    """Moving squares as MSRVTT-QA: videos/clipNNNNN.mp4 plus msrvtt_qa_<split>.json."""
    (raw / "videos").mkdir(parents=True, exist_ok=True)
    names = sorted(DIRECTIONS)
    for split, ids in split_ids(num_clips, num_heldout=40).items():
        entries = []
        for i in ids:
            direction = names[i % len(names)]
            video = f"clip{i:05d}.mp4"
            write_video(raw / "videos" / video, shape_clip(direction, np.random.default_rng([SEED, i])))
            entries.append(
                {"video": video, "question_id": i, "question": SHAPE_QUESTION, "answer": direction}
            )
        _dump(raw / f"msrvtt_qa_{split}.json", entries)


def write_tones(raw: Path, num_clips: int = 210) -> None:
    """Tones as AudioCaps: audios/<youtube_id>.wav plus <split>.csv (val/test: two captions per clip)."""
    (raw / "audios").mkdir(parents=True, exist_ok=True)
    names = sorted(PITCHES)
    for split, ids in split_ids(num_clips, num_heldout=30).items():
        lines = ["audiocap_id,youtube_id,start_time,caption"]
        for i in ids:
            pitch, ytid = names[i % len(names)], f"tone{i:05d}"
            write_wav(raw / "audios" / f"{ytid}.wav", tone(pitch, np.random.default_rng([SEED, i])))
            captions = [f"a {pitch} pitched tone"] + (
                [] if split == "train" else [f"a tone with a {pitch} pitch"]
            )
            lines += [f"{i * 10 + k},{ytid},0,{c}" for k, c in enumerate(captions)]
        (raw / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj))


def tasks(raw: Path) -> dict[str, dict]:
    """Demo task name -> the data_shards.build arguments per split."""
    d, s, t = raw / "digits", raw / "shapes", raw / "tones"
    return {
        "digits_caption": {
            sp: ["--source", "coco_karpathy", "--annotations", d / "dataset_coco.json", "--media-root", d]
            for sp in SPLITS
        },
        "digits_vqa": {
            sp: ["--source", "vqav2", "--questions", d / f"v2_OpenEnded_mscoco_{sp}_questions.json"]
            + ["--annotations", d / f"v2_mscoco_{sp}_annotations.json", "--media-root", d / "images"]
            for sp in SPLITS
        },
        "shapes_qa": {
            sp: [
                "--source",
                "msrvtt_qa",
                "--annotations",
                s / f"msrvtt_qa_{sp}.json",
                "--media-root",
                s / "videos",
            ]
            for sp in SPLITS
        },
        "tones_caption": {
            sp: ["--source", "audiocaps", "--annotations", t / f"{sp}.csv", "--media-root", t / "audios"]
            for sp in SPLITS
        },
    }


def main(argv: list[str] | None = None) -> int:
    from epalm.cli.common import HelpFormatter, fail

    p = argparse.ArgumentParser(
        prog="python -m data_shards.demo", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="folder for raw/ (the source formats) and shards/")
    p.add_argument("--image-size", type=int, default=32, help="digit images and video frames are this size")
    p.add_argument("--workers", type=int, default=2, help="data_shards.build encoding processes")
    p.add_argument("--shards-per-split", type=int, default=4, help="at least ranks x loader workers")
    p.add_argument(
        "--tasks", nargs="+", choices=sorted(tasks(Path("raw"))), help="shards to build (none given: all)"
    )
    args = p.parse_args(argv)
    raw = args.out / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"--out {args.out}: cannot create the directory: {e.strerror or e}")
    write_digits(raw / "digits", args.image_size)
    write_shapes(raw / "shapes")
    write_tones(raw / "tones")
    rows = []
    for task, per_split in tasks(raw).items():
        if args.tasks and task not in args.tasks:
            continue
        for split, source_args in per_split.items():
            out = args.out / "shards" / task / split
            size = _num_records(source_args, split)
            build_args = [str(a) for a in source_args] + [
                "--split",
                split,
                "--out",
                str(out),
                "--no-progress",
            ]
            build_args += ["--workers", str(args.workers), "--image-size", str(args.image_size)]
            build_args += ["--samples-per-shard", str(max(1, math.ceil(size / args.shards_per_split)))]
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                code = build.main(build_args)
            if code != 0:
                print(log.getvalue(), file=sys.stderr)
                return code
            manifest = json.loads((out / schema.MANIFEST).read_text())
            rows.append(
                (
                    task,
                    split,
                    manifest["num_samples"],
                    len(manifest["shards"]),
                    sum(manifest["skipped"].values()),
                )
            )
    print(f"demo data in {args.out}: raw formats under raw/, shards under shards/<task>/<split>/")
    print(f"{'task':<16}{'split':<7}{'samples':>8}{'shards':>8}{'skipped':>9}")
    for task, split, n, shards, skipped in rows:
        print(f"{task:<16}{split:<7}{n:>8}{shards:>8}{skipped:>9}")
    return 0


def _num_records(source_args: list, split: str) -> int:
    """How many samples a split will have, to size its shards (parsing is cheap)."""
    from data_shards.sources import SOURCES

    opts = dict(zip(source_args[::2], source_args[1::2]))
    loaded = SOURCES[opts["--source"]](opts.get("--annotations"), split, questions=opts.get("--questions"))
    return len(loaded.records)


if __name__ == "__main__":
    sys.exit(main())
