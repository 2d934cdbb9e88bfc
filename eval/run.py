"""Evaluate a trained adapter on eval shards, on one process or many:

    python -m eval.run --adapter runs/x/adapter --shards shards/vqav2/val --task vqav2 [key=value ...]
    torchrun --nproc_per_node 2 -m eval.run --adapter ... --shards ... --task caption

Writes `<task>_<split>_results.json` (VQA / COCO results format; the EvalAI submission file when the shards
have no answers), the references built from the shards, and `scores.json`; prints a table and the scores JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from epalm.cli.common import HelpFormatter, fail
from epalm.config import ENCODER_MODALITY
from epalm.data.loader import DatasetSpec, LoaderSettings, build_eval_loader
from epalm.distributed import exit_process, get_dist_info, shutdown_distributed
from epalm.evaluation.predict import gather_predictions, load_eval_model, predict
from epalm.evaluation.references import load_shard_metas
from epalm.evaluation.scoring import score_split, write_outputs
from epalm.evaluation.tasks import TASKS
from epalm.metrics.caption import spice_status
from epalm.metrics.vqa import MetricsInputError
from epalm.run import layout

from . import prog


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("run"),
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--adapter",
        required=True,
        type=Path,
        help="adapter export directory (adapter.safetensors + config.yaml), or a Hub id org/name[@revision]",
    )
    p.add_argument("--shards", required=True, help="one split's shard dir or URL (with manifest.json)")
    p.add_argument(
        "--task",
        required=True,
        choices=sorted(TASKS),
        help="what to score: the metric and the input it needs",
    )
    p.add_argument("--num-beams", type=int, help="default: the config's eval.num_beams")
    p.add_argument("--max-new-tokens", type=int, help="default: the config's eval.max_new_tokens")
    p.add_argument("--batch-size", type=int, help="per rank; default: the config's eval.batch_size")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers per rank")
    p.add_argument("--out", type=Path, help="default: <adapter>/eval/<task>_<split>")
    p.add_argument("--device", help="default: cuda:<local rank> when CUDA is available, else cpu")
    p.add_argument(
        "--synced-gpus",
        action="store_true",
        help="keep ranks generating in lockstep (each rank loads the whole model here; the flag is for parity "
        "with sharded runs and costs a few dummy steps)",
    )
    p.add_argument("--no-spice", action="store_true", help="skip SPICE even when it is installed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to the adapter's config")
    return p.parse_args(argv)


def _flatten(scores: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in scores.items():
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}/")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def report(args: argparse.Namespace, predictions: list[dict], metas: list[dict], settings: dict) -> int:
    """Rank 0: write predictions, references and scores.json; print the table and the JSON."""
    task, split = args.task, settings["split"]
    out = args.out or args.adapter / layout.EVAL / f"{task}_{split}"
    if TASKS[task].metric == "caption" and not args.no_spice:
        available, reason = spice_status()
        if not available:
            print(reason, file=sys.stderr)
    try:
        scored = score_split(
            task, predictions, metas, split, settings["modality"], spice=False if args.no_spice else None
        )
    except (ValueError, MetricsInputError) as e:
        return fail(str(e))
    fields = {k: v for k, v in settings.items() if k not in ("task", "split", "num_samples")}
    try:
        summary = write_outputs(scored, out, fields)
    except OSError as e:
        return fail(f"cannot write the results to {out}: {e}")
    print(
        f"{task} {split}: {len(predictions)} samples, {settings['world_size']} rank(s), beams "
        f"{settings['num_beams']}, max_new_tokens {settings['max_new_tokens']} -> {out}"
    )
    if summary["scores"] is None:
        print(
            f"no ground truth in {args.shards}: {summary['results']} is the submission file (EvalAI format for vqav2)"
        )
    else:
        width = max(len(k) for k, _ in _flatten(summary["scores"]))
        print(f"{'metric':<{width}}  value ({summary['metric']})")
        for k, v in _flatten(summary["scores"]):
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(summary, indent=2))
    return 0


def check_shards(shards: Path, task: str) -> tuple[dict, list[dict]]:
    """(manifest, sample metadata) of `shards`, refused (ValueError) if they cannot be scored as `task`.

    Runs before the model is loaded, so a wrong --shards or --task costs seconds, not a model load.
    """
    manifest, metas = load_shard_metas(shards)
    spec = TASKS[task]
    kinds = {m.get("task") for m in metas} - {None}
    if kinds and kinds != {spec.kind}:
        raise ValueError(
            f"{shards} holds {'/'.join(sorted(kinds))} samples; --task {task} scores {spec.kind}"
        )
    modalities = {m.get("modality") for m in metas} - {None}
    if modalities - set(spec.modalities):
        raise ValueError(
            f"--task {task} needs {'/'.join(spec.modalities)} input; "
            f"these shards hold {'/'.join(sorted(modalities))} samples"
        )
    return manifest, metas


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest, metas = check_shards(args.shards, args.task)
    except (OSError, ValueError) as e:
        return fail(f"--shards {args.shards}: {e}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out}: exists and is not a directory")
    if (
        args.out is None and not args.adapter.is_dir()
    ):  # a Hub id: <adapter>/eval would be a relative org/name
        return fail(f"--adapter {args.adapter} is not a local directory (a Hub id?): give --out")
    info = get_dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # gloo handles the CPU object gather and CUDA all_reduce alike
    device = torch.device(args.device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        model, tokenizer, cfg = load_eval_model(args.adapter, args.overrides, device)
    except (OSError, ValueError, SafetensorError) as e:  # missing or unreadable files, a bad override
        return fail(f"--adapter {args.adapter}: {e}")
    spec = TASKS[args.task]
    modality = cfg.data.modality if cfg.data.use_features else ENCODER_MODALITY[cfg.model.encoder.kind]
    if modality not in spec.modalities:
        return fail(f"task {args.task} needs {'/'.join(spec.modalities)} input; this adapter's is {modality}")
    settings = {
        "task": args.task,
        "split": manifest.get("split") or Path(args.shards).name,
        "modality": modality,
        "adapter": str(args.adapter),
        "shards": str(args.shards),
        "num_samples": int(manifest["num_samples"]),
        "num_beams": args.num_beams or cfg.eval.num_beams,
        "max_new_tokens": args.max_new_tokens or cfg.eval.max_new_tokens,
        "world_size": info.world_size,
    }
    loader_settings = LoaderSettings.from_config(
        cfg,
        batch_size=args.batch_size or cfg.eval.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=args.num_workers,
    )
    dataset = DatasetSpec.from_config(cfg, args.shards, modality=modality, task=spec.kind)
    loader = build_eval_loader(dataset, tokenizer, loader_settings)
    records = predict(
        model,
        loader,
        tokenizer,
        task=args.task,
        decoding=dataclasses.replace(
            cfg.eval, num_beams=settings["num_beams"], max_new_tokens=settings["max_new_tokens"]
        ),
        synced_gpus=args.synced_gpus,
        progress=info.rank == 0 and not args.no_progress,
    )
    predictions = gather_predictions(records, expected=settings["num_samples"])
    code = report(args, predictions, metas, settings) if info.rank == 0 else 0
    shutdown_distributed()
    return code


def entry() -> NoReturn:
    """The process's way out (also the `epalm-eval` console script): `main`, then `exit_process`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exit_process(main())  # every file is written: skip the gloo teardown that can abort (distributed.py)


if __name__ == "__main__":
    entry()
