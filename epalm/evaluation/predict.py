"""Generation over an eval loader: load an adapter for inference, generate on every rank (ZeRO-3
lockstep), and gather per-sample records across ranks, each sample exactly once."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from epalm.config import Config, EvalConfig
from epalm.data import schema
from epalm.data.length_order import length_sorted
from epalm.evaluation.decoding import Decoding, decode_generated, generate
from epalm.evaluation.tasks import TASKS, media_id, record_key


def load_eval_model(
    adapter: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, Config]:
    """(model in eval mode on `device`, tokenizer, config) from an adapter export directory.

    The frozen LM and encoder are loaded as the adapter's config.yaml says (real weights, or random
    ones under `train.seed` as the trainer builds them, so random-weight test models match training).
    """
    from epalm.data.text import build_tokenizer
    from epalm.model.epalm import build_model
    from epalm.run.adapter import load_adapter

    state, cfg = load_adapter(adapter, list(overrides))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, with_encoder=not cfg.data.use_features)
    model.load_adapter_state_dict(state)
    model.eval().to(device)
    tokenizer = build_tokenizer(cfg.model.lm.tokenizer or cfg.model.lm.name)
    return model, tokenizer, cfg


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
    decoding_ = Decoding.from_config(d)

    def run(batch: dict) -> torch.Tensor:
        return generate(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            media=batch["media"].to(device) if "media" in batch else None,
            encoder_states=batch["encoder_states"].to(device) if "encoder_states" in batch else None,
            decoding=decoding_,
            synced_gpus=synced_gpus,
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
