"""Evaluate a trained adapter on eval shards, on one process or many:

    python -m eval.run --adapter runs/x/adapter --shards shards/vqav2/val --task vqav2 [key=value ...]
    torchrun --nproc_per_node 2 -m eval.run --adapter ... --shards ... --task caption

Writes `<task>_<split>_results.json` (VQA / COCO results format; the EvalAI submission file when the shards
have no answers), the references built from the shards, and `scores.json`; prints a table and the scores JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from epalm.data.loader import DatasetSpec, build_eval_loader, io_options
from epalm.data.stream import load_manifest
from epalm.distributed import exit_process, get_dist_info, shutdown_distributed
from epalm.evaluate import (
    ENCODER_MODALITY,
    MEDIA_ID,
    TASKS,
    build_references,
    gather_predictions,
    load_eval_model,
    load_shard_metas,
    metric_name,
    predict,
    record_key,
    score,
    write_references,
)
from epalm.metrics.caption import spice_status
from epalm.metrics.vqa import MetricsInputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--adapter", required=True, type=Path, help="adapter export dir (adapter.safetensors + config.yaml)"
    )
    p.add_argument("--shards", required=True, help="one split's shard dir or URL (with manifest.json)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--num-beams", type=int, help="default: the config's eval.num_beams")
    p.add_argument("--max-new-tokens", type=int, help="default: the config's eval.max_new_tokens")
    p.add_argument("--batch-size", type=int, help="per rank; default: the config's eval.batch_size")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers per rank")
    p.add_argument("--out", type=Path, help="default: <adapter>/eval/<task>_<split>")
    p.add_argument("--device", help="default: cuda:<local rank> when CUDA is available, else cpu")
    p.add_argument("--synced-gpus", action="store_true", help="lockstep generation (what ZeRO-3 needs)")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE even when it is installed")
    p.add_argument("--no-progress", action="store_true")
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


def report(args: argparse.Namespace, predictions: list[dict], settings: dict) -> int:
    """Rank 0: write predictions, references and scores.json; print the table and the JSON."""
    task, split = args.task, settings["split"]
    out = args.out or args.adapter / "eval" / f"{task}_{split}"
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{task}_{split}"
    _, metas = load_shard_metas(args.shards)
    modality = settings["modality"]
    ids = [
        m["question_id"] if TASKS[task].kind == "qa" else m.get(MEDIA_ID[modality], m["id"]) for m in metas
    ]
    position = {k: i for i, k in enumerate(ids)}
    # manifest order: deterministic files whatever the world size and worker interleaving
    predictions = sorted(predictions, key=lambda r: position.get(record_key(r), len(position)))
    results = out / f"{prefix}_results.json"
    results.write_text(json.dumps(predictions))
    try:
        references = build_references(task, metas, split)
        paths = write_references(references, out, prefix)
        summary = dict(settings, results=results.name, references={k: p.name for k, p in paths.items()})
        if references:
            summary["metric"] = metric_name(task, references)
            if summary["metric"] == "caption" and not args.no_spice:
                available, reason = spice_status()
                if not available:
                    print(reason, file=sys.stderr)
            summary["scores"] = score(task, predictions, references, spice=False if args.no_spice else None)
        else:
            summary["metric"], summary["scores"] = None, None
    except (ValueError, MetricsInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{task} {split}: {len(predictions)} samples, {settings['world_size']} rank(s), beams "
        f"{settings['num_beams']}, max_new_tokens {settings['max_new_tokens']} -> {out}"
    )
    if summary["scores"] is None:
        print(f"no ground truth in {args.shards}: {results} is the submission file (EvalAI format for vqav2)")
    else:
        width = max(len(k) for k, _ in _flatten(summary["scores"]))
        print(f"{'metric':<{width}}  value ({summary['metric']})")
        for k, v in _flatten(summary["scores"]):
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = get_dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # gloo handles the CPU object gather and CUDA all_reduce alike
    device = torch.device(args.device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, tokenizer, cfg = load_eval_model(args.adapter, args.overrides, device)
    spec = TASKS[args.task]
    modality = cfg.data.modality if cfg.data.use_features else ENCODER_MODALITY[cfg.model.encoder.kind]
    if modality not in spec.modalities:
        print(
            f"error: task {args.task} needs {'/'.join(spec.modalities)} input; this adapter's is {modality}",
            file=sys.stderr,
        )
        return 2
    manifest, _ = load_manifest(args.shards)
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
    loader = build_eval_loader(
        DatasetSpec(args.shards, spec.kind, modality, use_features=cfg.data.use_features),
        tokenizer,
        batch_size=args.batch_size or cfg.eval.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=args.num_workers,
        image_size=cfg.data.image_size,
        normalization=cfg.data.normalization,
        double_question_mark=cfg.model.double_question_mark,
        **io_options(cfg.data),
    )
    records = predict(
        model,
        loader,
        tokenizer,
        task=args.task,
        num_beams=settings["num_beams"],
        max_new_tokens=settings["max_new_tokens"],
        synced_gpus=args.synced_gpus,
        use_cache=cfg.eval.use_cache,
        progress=info.rank == 0 and not args.no_progress,
    )
    predictions = gather_predictions(records, expected=settings["num_samples"])
    code = report(args, predictions, settings) if info.rank == 0 else 0
    shutdown_distributed()
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exit_process(main())
