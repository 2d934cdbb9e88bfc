"""Build WebDataset shards from a dataset in its real on-disk format.

    python -m data_shards.build --source coco_karpathy --annotations dataset_coco.json \\
        --media-root /data/coco/images --split train --out shards/coco/train --workers 16

Exit status: 0 built; 2 bad input, one `error:` line naming it: bad arguments, annotations (or questions)
missing or unparseable, a --media-root that is not a directory, an --out that cannot be created, an
--encoder that cannot be built; 3 too many samples skipped (no manifest is written). An annotation file
that exists but cannot be parsed is the user's to fix, as a missing one is, hence 2 for both; 1 (with a
traceback) is left to errors in the build itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_shards import writer
from data_shards.sources import SOURCES, AnnotationError
from epalm import atomic
from epalm.cli.common import HelpFormatter, fail
from epalm.data import schema


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_shards.build",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="the dataset's on-disk format")
    p.add_argument("--annotations", type=Path, help="annotation file (or img2dataset folder for cc3m)")
    p.add_argument("--questions", type=Path, help="vqav2: the official questions JSON")
    p.add_argument("--media-root", help="folder the annotations' media paths are relative to")
    p.add_argument("--split", required=True, help="split name (also selects the Karpathy split)")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder for <split>-NNNNNN.tar + manifest.json"
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="encoding processes (one per CPU unless given)",
    )
    p.add_argument("--image-size", type=int, default=224, help="shorter side of stored images and frames")
    p.add_argument("--num-frames", type=int, default=8, help="video frames per clip")
    p.add_argument("--encoder", help="feature cache: a run config YAML (model.encoder) or a timm ViT name")
    p.add_argument(
        "--encoder-layers", type=int, help="feature cache: number of last blocks K (default: config)"
    )
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=0.05,
        help="of the records, skipped ones allowed before the build refuses to write a manifest (exit 3)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.annotations is None and not (args.source == "vqav2" and args.questions):
        p.error("--annotations is required (vqav2 test splits may give only --questions)")
    for name in ("samples_per_shard", "workers", "image_size", "num_frames"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def recorded_args(args: argparse.Namespace) -> dict:
    """The arguments that decide the output (not --out, --workers or the progress bar)."""
    keep = ("source", "annotations", "questions", "media_root", "split", "samples_per_shard", "image_size")
    keep += ("num_frames", "encoder", "encoder_layers", "max_skip_fraction")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in keep}


def summary(manifest: dict, stats: dict, workers: int, out: Path) -> str:
    skipped = manifest["skipped"]
    total = manifest["num_records"]
    lines = [
        f"{manifest['source']}/{manifest['split']}: {manifest['num_samples']} samples in "
        f"{len(manifest['shards'])} shards -> {out} ({stats['resumed_shards']} shards already done)",
        f"skipped {sum(skipped.values())} of {total} records ({100 * sum(skipped.values()) / max(total, 1):.2f}%)"
        + "".join(f", {k}={v}" for k, v in skipped.items()),
        f"{stats['built_samples']} samples built in {stats['seconds']:.1f} s: "
        f"{stats['built_samples'] / max(stats['seconds'], 1e-9):.1f} samples/s with {workers} worker(s)",
    ]
    examples = [s for d in stats["done"] for s in d["skipped_samples"]][:5]
    lines += [f"  skipped {sid!r}: {reason} {detail}" for sid, reason, detail in examples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded = SOURCES[args.source](args.annotations, args.split, questions=args.questions)
    except AnnotationError as e:
        return fail(str(e))
    if args.media_root and not Path(args.media_root).is_dir():
        return fail(f"--media-root {args.media_root}: no such directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"--out {args.out}: cannot create the directory: {e.strerror or e}")
    # no manifest while shards change: a half-built folder never looks usable
    (args.out / schema.MANIFEST).unlink(missing_ok=True)
    encoder = None
    if args.encoder and loaded.records:
        from data_shards.features import make_spec

        modality = loaded.records[0].modality
        try:
            encoder, _ = make_spec(
                args.encoder, args.encoder_layers, modality, args.image_size, args.num_frames
            )
        except Exception as e:  # a bad config, unknown model name, weights not downloadable offline, ...
            return fail(f"cannot build the encoder {args.encoder!r}: {type(e).__name__}: {e}")
    options = writer.ShardOptions(
        out=str(args.out),
        split=args.split,
        media_root=args.media_root,
        image_size=args.image_size,
        num_frames=args.num_frames,
        samples_per_shard=args.samples_per_shard,
        encoder=encoder,
    )
    tasks = writer.plan(loaded.records, options)
    done, stats = writer.build(tasks, args.workers, progress=not args.no_progress)
    writer.remove_stale(args.out, args.split, len(tasks))
    fp = encoder["fingerprint"] if encoder else None
    manifest = writer.make_manifest(done, loaded.skipped, args.source, args.split, recorded_args(args), fp)
    print(summary(manifest, {**stats, "done": done}, args.workers, args.out))
    num_skipped = sum(manifest["skipped"].values())
    if num_skipped > args.max_skip_fraction * manifest["num_records"]:
        print(
            f"error: {num_skipped}/{manifest['num_records']} records skipped, more than --max-skip-fraction "
            f"{args.max_skip_fraction}; no manifest written (finished shards are kept for a re-run)",
            file=sys.stderr,
        )
        return 3
    atomic.write_json_atomic(args.out / schema.MANIFEST, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
