"""Evaluation of a trained adapter: generate over an eval loader, gather per-sample records across ranks,
build the official reference files from shard metadata, and score with `epalm.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from epalm.config import Config
from epalm.data import schema
from epalm.data.length_order import length_sorted
from epalm.data.stream import iter_range, load_manifest
from epalm.generation import decode_generated, generate


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
MEDIA_ID = {"image": "image_id", "video": "video_id", "audio": "audio_id"}
ENCODER_MODALITY = {"vit": "image", "timesformer": "video", "ast": "audio"}


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


def record_key(record: dict) -> Hashable:
    """The id a prediction record is scored under: question_id (QA) or image_id (COCO results)."""
    return record["question_id"] if "question_id" in record else record["image_id"]


def media_id(meta: dict, modality: str) -> Any:
    """The media's own id (COCO `image_id`, MSR-VTT `video_id`, AudioCaps `audio_id`), else the sample id."""
    return meta.get(MEDIA_ID[modality], meta["id"])


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
    num_beams: int = 3,
    max_new_tokens: int = 30,
    synced_gpus: bool = False,
    use_cache: bool = True,
    progress: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int | None = 0,
    sort_window: int = 16,
) -> list[dict]:
    """Generate for every batch of `loader` (this rank's part) and return one record per sample.

    `task` is an eval task (`TASKS`) or a loader task ("qa" / "caption"). QA records are
    `{"question_id", "answer"}`, caption records `{"image_id", "caption"}` (the media id). With
    `synced_gpus` (ZeRO-3), a rank with fewer batches repeats generation on its last batch, output
    discarded, until every rank has made the same number of generate calls. Batches are re-cut by prompt
    length `sort_window` loader batches at a time (`epalm.data.length_order`); records keep the loader's order.
    Sampling (`do_sample`) draws from one `torch.Generator` seeded with `seed` for the whole run.
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
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    def run(batch: dict) -> torch.Tensor:
        return generate(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            media=batch["media"].to(device) if "media" in batch else None,
            encoder_states=batch["encoder_states"].to(device) if "encoder_states" in batch else None,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            synced_gpus=synced_gpus,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )

    positioned: list[tuple[int, dict]] = []
    for batch, positions in length_sorted(loader, sort_window, tokenizer.pad_token_id):
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


# --------------------------------------------------------------------------- references from shards


def load_shard_metas(shard_dir: str | Path) -> tuple[dict, list[dict]]:
    """(manifest, every sample's JSON in manifest order); other members are seeked over, not read."""
    manifest, shards = load_manifest(shard_dir)
    pieces = [(i, 0, n) for i, n in enumerate(shards.counts)]
    metas = [
        json.loads(sample.members[schema.JSON])
        for _, sample in iter_range(shards, pieces, lambda ext: ext == schema.JSON)
    ]
    return manifest, metas


def _vqa_files(metas: list[dict], split: str) -> dict[str, Any]:
    info = {"description": "built by epalm.evaluate from shard metadata", "split": split}
    common = {"data_type": "mscoco", "data_subtype": split, "info": info, "license": {}}
    questions = [
        {"question_id": m["question_id"], "image_id": m.get("image_id"), "question": m["question"]}
        for m in metas
    ]
    annotations = [
        {
            "question_id": m["question_id"],
            "image_id": m.get("image_id"),
            "question_type": m.get("question_type") or "unknown",
            "answer_type": m.get("answer_type") or "unknown",
            "multiple_choice_answer": m.get("multiple_choice_answer"),
            # answer_id makes each annotator record distinct: the official leave-one-out compares whole dicts
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(m["raw_answers"])
            ],
        }
        for m in metas
    ]
    return {
        "questions": common | {"task_type": "Open-Ended", "questions": questions},
        "annotations": common | {"annotations": annotations},
    }


def build_references(task: str, metas: list[dict], split: str = "eval") -> dict[str, Any]:
    """Reference files (name -> JSON object) in the official formats; {} when the split has no ground truth.

    vqav2: `questions` + `annotations` (VQA v2 files; needs the 10 `raw_answers` of `--source vqav2`
    shards; shards with soft labels only get `references` scored as label-score exact match);
    gqa / video_qa: `references` `[{"question_id", "answers"}]`; captions: `references`, a COCO caption
    file whose image ids are the media ids.
    """
    spec = TASKS[task]
    if spec.kind == "qa":
        if not any(m.get("answers") for m in metas):
            return {}  # test-dev / test-std: a submission, not a score
        missing = [m["question_id"] for m in metas if not m.get("answers")]
        if missing:
            raise ValueError(f"{len(missing)} question(s) have no answers (e.g. {missing[:5]})")
        if spec.metric == "vqa" and all(m.get("raw_answers") for m in metas):
            return _vqa_files(metas, split)
        return {"references": [{"question_id": m["question_id"], "answers": m["answers"]} for m in metas]}
    if not any(m.get("captions") for m in metas):
        return {}
    images, annotations, seen = [], [], set()
    for m in metas:
        mid = media_id(m, m.get("modality", "image"))
        if mid in seen:
            raise ValueError(f"media {mid!r} appears in several samples (a train split? use val/test)")
        seen.add(mid)
        images.append({"id": mid})
        annotations += [
            {"image_id": mid, "id": len(annotations) + k, "caption": c} for k, c in enumerate(m["captions"])
        ]
    return {
        "references": {
            "info": {"split": split},
            "type": "captions",
            "images": images,
            "annotations": annotations,
        }
    }


def write_references(references: dict[str, Any], out_dir: str | Path, prefix: str) -> dict[str, Path]:
    """Write each reference object as `<out_dir>/<prefix>_<name>.json`; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, obj in references.items():
        paths[name] = out / f"{prefix}_{name}.json"
        paths[name].write_text(json.dumps(obj))
    return paths


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
