"""Evaluation of a trained adapter: generate over an eval loader, gather per-sample records across ranks,
build the official reference files from shard metadata, and score with `epalm.metrics`.

About 310 lines: predict, gather, score and write are the one evaluation path `eval.run` and the
trainer share; the reference files are `epalm.references`'.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from epalm.config import Config, EvalConfig
from epalm.data import schema
from epalm.data.length_order import length_sorted
from epalm.decoding import decode_generated, generate
from epalm.references import media_id, reference_files, write_references


@dataclass(frozen=True)
class EvalTask:
    kind: str  # the loader's task: "qa" | "caption"
    modalities: tuple[str, ...]
    metric: str  # "vqa" (official VQA v2), "qa" (normalised exact match), "caption" (pycocoevalcap)


TASKS: dict[str, EvalTask] = {
    "vqav2": EvalTask("qa", ("image",), "vqa"),
    "gqa": EvalTask("qa", ("image",), "qa"),
    "video_qa": EvalTask("qa", ("video",), "qa"),
    "caption": EvalTask("caption", ("image", "video", "audio"), "caption"),
    "audio_caption": EvalTask("caption", ("audio",), "caption"),
}
# the number each metric is judged by, on the paper's scale (percent; CIDEr x 100 as papers print it)
PRIMARY = {"vqa": "vqa_accuracy", "qa": "accuracy", "vqa_label_score": "accuracy", "caption": "cider"}
CAPTION_KEYS = {"cider": "CIDEr", "bleu4": "Bleu_4", "meteor": "METEOR"}
METRIC_ORDER = ("vqa_accuracy", "accuracy", "cider", "bleu4", "meteor")  # how logs and reports list them
RESULTS, SCORES = "{prefix}_results.json", "scores.json"  # the files `write_outputs` leaves


def load_eval_model(
    adapter: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, Config]:
    """(model in eval mode on `device`, tokenizer, config) from an adapter export directory.

    The frozen LM and encoder are loaded as the adapter's config.yaml says (real weights, or random
    ones under `train.seed` as the trainer builds them, so random-weight test models match training).
    """
    from epalm.checkpoint import load_adapter
    from epalm.data.text import build_tokenizer
    from epalm.model.epalm import build_model

    state, cfg = load_adapter(adapter, list(overrides))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, with_encoder=not cfg.data.use_features)
    model.load_adapter_state_dict(state)
    model.eval().to(device)
    tokenizer = build_tokenizer(cfg.model.lm.tokenizer or cfg.model.lm.name)
    return model, tokenizer, cfg


def task_for(kind: str, modality: str, metas: Sequence[dict] | None = None) -> str:
    """The `TASKS` entry for a training config's task kind and modality: official VQA v2 needs raw answers."""
    if kind == "caption":
        return "audio_caption" if modality == "audio" else "caption"
    if modality == "video":
        return "video_qa"
    return "vqav2" if metas is None or all(m.get("raw_answers") for m in metas) else "gqa"


def headline(metric: str, scores: dict) -> dict[str, float]:
    """The logged numbers of a scores dict, primary first, on the paper's scale."""
    if metric == "vqa":
        return {"vqa_accuracy": float(scores["overall"])}
    if metric in ("qa", "vqa_label_score"):
        return {"accuracy": float(scores["accuracy"])}
    return {k: 100.0 * float(scores[v]) for k, v in CAPTION_KEYS.items() if v in scores}


def sample_key(kind: str, modality: str, meta: dict) -> Hashable:
    """The id a sample's prediction is scored under: question_id (QA) or its media id (captions)."""
    return meta["question_id"] if kind == "qa" else media_id(meta, modality)


def record_key(record: dict) -> Hashable:
    """The id a prediction record is scored under: question_id (QA) or image_id (COCO results)."""
    return record["question_id"] if "question_id" in record else record["image_id"]


def _to_records(kind: str, modality: str, metas: Sequence[dict], texts: Sequence[str]) -> list[dict]:
    if kind == "qa":
        return [{"question_id": m["question_id"], "answer": t} for m, t in zip(metas, texts)]
    # COCO results name the id `image_id` whatever the media, so eval.caption reads video and audio too
    return [{"image_id": media_id(m, modality), "caption": t} for m, t in zip(metas, texts)]


def _num_steps(local: int, synced_gpus: bool, device: torch.device) -> int:
    """Generate calls every rank must make: the most batches any rank has (ZeRO-3 lockstep)."""
    if not (synced_gpus and dist.is_available() and dist.is_initialized()):
        return local
    count = torch.tensor([local], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Collection[dict],
    tokenizer: Any,
    *,
    task: str,
    decoding: EvalConfig | None = None,
    synced_gpus: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Generate for every batch of `loader` (this rank's part) and return one record per sample.

    `task` is an eval task (`TASKS`) or a loader task ("qa" / "caption"). QA records are
    `{"question_id", "answer"}`, caption records `{"image_id", "caption"}` (the media id). With
    `synced_gpus` (ZeRO-3), a rank with fewer batches repeats generation on its last batch, output
    discarded, until every rank has made the same number of generate calls. `decoding` (the config's
    `eval` section) gives beams, sampling and the KV cache. Batches are re-cut by prompt length
    `decoding.sort_window` loader batches at a time (`epalm.data.length_order`); records keep the loader's
    order. Sampling draws from one `torch.Generator` seeded with `decoding.seed` for the whole run.
    """
    kind = TASKS[task].kind if task in TASKS else task
    if kind not in schema.TASKS:
        raise ValueError(f"task {task!r}: expected one of {sorted(TASKS)} or {schema.TASKS}")
    device = next(model.parameters()).device
    steps = _num_steps(len(loader), synced_gpus, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="generate", unit="batch")
    inputs: dict | None = None
    done = 0
    generator = None
    d = decoding or EvalConfig()
    if d.do_sample and d.seed is not None:
        generator = torch.Generator(device=device).manual_seed(d.seed)

    def run(batch: dict) -> torch.Tensor:
        return generate(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            media=batch["media"].to(device) if "media" in batch else None,
            encoder_states=batch["encoder_states"].to(device) if "encoder_states" in batch else None,
            num_beams=d.num_beams,
            max_new_tokens=d.max_new_tokens,
            use_cache=d.use_cache,
            synced_gpus=synced_gpus,
            do_sample=d.do_sample,
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p,
            generator=generator,
        )

    positioned: list[tuple[int, dict]] = []
    for batch, positions in length_sorted(loader, d.sort_window, tokenizer.pad_token_id):
        texts = decode_generated(tokenizer, run(batch))
        positioned += zip(positions, _to_records(kind, batch["modality"], batch["meta"], texts))
        inputs, done = batch, done + 1
        if bar is not None:
            bar.update()
    if done < steps:
        if inputs is None:
            raise RuntimeError(
                "this rank has no eval batch to keep ZeRO-3 generation in step: fewer samples than ranks"
            )
        for _ in range(steps - done):
            run(inputs)  # collectives only; the output is a repeat and is dropped
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return [r for _, r in sorted(positioned, key=lambda pr: pr[0])]  # the loader's order


def gather_predictions(records: list[dict], expected: int | None = None) -> list[dict]:
    """Every rank's records on every rank (rank order), each id exactly once, else ValueError.

    Ranks read disjoint slices, so a repeated id means overlapping shards or a loader bug;
    `expected` (the manifest's sample count) also catches samples no rank generated for.
    """
    merged = list(records)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        merged = [r for part in parts for r in part or []]
    seen: set = set()
    repeated = []
    for r in merged:
        key = record_key(r)
        if key in seen:
            repeated.append(key)
        seen.add(key)
    if repeated:
        raise ValueError(f"{len(repeated)} id(s) predicted more than once (e.g. {repeated[:5]})")
    if expected is not None and len(merged) != expected:
        raise ValueError(f"gathered {len(merged)} predictions, expected {expected} (one per sample)")
    return merged


def build_references(task: str, metas: list[dict], split: str = "eval") -> dict[str, Any]:
    """`task`'s reference files (name -> JSON object) built from shard metadata; {} without ground truth."""
    spec = TASKS[task]
    return reference_files(spec.kind, metas, split, official_vqa=spec.metric == "vqa")


def metric_name(task: str, references: dict[str, Any]) -> str:
    """What `score` computes for these references (VQA v2 shards without raw answers fall back)."""
    metric = TASKS[task].metric
    if metric == "vqa" and "annotations" not in references:
        return "vqa_label_score"
    return metric


def score(
    task: str, predictions: list[dict], references: dict[str, Any], *, spice: bool | None = None
) -> dict:
    """Dispatch to the official scorer of `task` (epalm.metrics); `references` as `build_references` gives."""
    metric = metric_name(task, references)
    if metric == "vqa":
        from epalm.metrics.vqa import score_vqa

        return score_vqa(predictions, references["questions"], references["annotations"])
    if metric in ("qa", "vqa_label_score"):
        from epalm.metrics.qa import score_qa

        return score_qa(predictions, references["references"])
    from epalm.metrics.caption import score_captions

    return score_captions(predictions, references["references"], spice=spice)


# --------------------------------------------------------------------------- one output path


@dataclass
class Scored:
    """One split's predictions in manifest order, the references built for them, and their scores."""

    task: str
    split: str
    predictions: list[dict]
    references: dict[str, Any]
    metric: str | None  # None: no ground truth (the predictions are a submission file)
    scores: dict | None


def score_split(
    task: str,
    predictions: list[dict],
    metas: Sequence[dict],
    split: str,
    modality: str,
    *,
    subset: bool = False,
    spice: bool | None = None,
) -> Scored:
    """Sort `predictions` into manifest order (files independent of world size and worker interleaving),
    build the references (only the predicted samples' with `subset`, as `eval.vqa --subset`) and score."""
    kind = TASKS[task].kind
    position = {sample_key(kind, modality, m): i for i, m in enumerate(metas)}
    predictions = sorted(predictions, key=lambda r: position.get(record_key(r), len(position)))
    if subset:
        keys = {record_key(r) for r in predictions}
        metas = [m for m in metas if sample_key(kind, modality, m) in keys]
    references = build_references(task, list(metas), split)
    if not references:
        return Scored(task, split, predictions, {}, None, None)
    metric = metric_name(task, references)
    return Scored(
        task, split, predictions, references, metric, score(task, predictions, references, spice=spice)
    )


def write_outputs(scored: Scored, out_dir: str | Path, settings: dict, headline_prefix: str = "") -> dict:
    """Write `<task>_<split>_results.json`, the reference files and `scores.json` (settings + scores);
    return that summary. Its `headline` (primary metric first, paper scale) keys get `headline_prefix`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{scored.task}_{scored.split}"
    results = out / RESULTS.format(prefix=prefix)
    results.write_text(json.dumps(scored.predictions))
    paths = write_references(scored.references, out, prefix)
    summary = {
        "task": scored.task,
        "split": scored.split,
        **settings,
        "num_samples": len(scored.predictions),
        "results": results.name,
        "references": {k: p.name for k, p in paths.items()},
        "metric": scored.metric,
        "scores": scored.scores,
    }
    if scored.scores is not None:
        summary["headline"] = {
            f"{headline_prefix}{k}": v for k, v in headline(scored.metric, scored.scores).items()
        }
    (out / SCORES).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
