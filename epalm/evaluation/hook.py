"""The trainer's evaluation hook: the task metric on `data.val` every `train.eval_every` steps (with the best
adapter kept in `run_dir/best/`), and the final evaluation on `data.test` after a captioning run (the
zero-shot COCO numbers of a CC3M-pretrained adapter). Every function here runs on every rank.

It sees the run only through an `EvalContext`, never the trainer; generation, references, scoring and the
output files are `epalm.evaluation.predict` and `epalm.evaluation.scoring`'s, shared with `eval.run`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from epalm.atomic import write_text_atomic
from epalm.config import Config
from epalm.data.loader import DatasetSpec, LoaderSettings, ResumableLoader, build_eval_loader
from epalm.data.resumable import eval_batches_per_rank
from epalm.data.stream import load_manifest
from epalm.distributed import DistInfo, broadcast_from_rank0
from epalm.evaluation.predict import gather_predictions, predict
from epalm.evaluation.references import load_shard_metas
from epalm.evaluation.scoring import Scored, score_split, write_outputs
from epalm.evaluation.tasks import PRIMARY, headline, task_for
from epalm.run.adapter import save_adapter
from epalm.run.layout import BEST, BEST_RECORD, EVAL

log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What an evaluation needs from a training run, passed in explicitly."""

    model: torch.nn.Module
    tokenizer: Any
    cfg: Config
    run_dir: Path
    rank: int
    world_size: int
    zero_stage: int
    gather_adapter: Callable[[], dict[str, torch.Tensor]]  # collective under ZeRO: every rank calls it

    @property
    def main(self) -> bool:
        return self.rank == 0


def eval_task(cfg: Config, metas: list[dict] | None = None) -> str:
    """The `epalm.evaluation.tasks.TASKS` entry for a training config: official VQA v2 only with 10 raw answers."""
    return task_for(cfg.data.task, cfg.data.modality, metas)


@dataclass
class BestTracker:
    """The best value of one metric seen so far (higher is better for every metric here)."""

    metric: str | None = None
    value: float | None = None
    step: int | None = None

    def update(self, metric: str, value: float, step: int) -> bool:
        """Record `value` if it beats the best (ties keep the earlier step); True when it did."""
        if math.isnan(value) or (self.value is not None and value <= self.value):
            return False
        self.metric, self.value, self.step = metric, value, step
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict | None) -> BestTracker:
        state = state or {}
        return cls(state.get("metric"), state.get("value"), state.get("step"))


def load_best(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / BEST_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def save_best(run_dir: str | Path, best: BestTracker, extra: dict | None = None) -> None:
    """Atomic write of best.json (after the adapter export, so it never names a missing one)."""
    record = {**best.state_dict(), "adapter": BEST, **(extra or {})}
    write_text_atomic(Path(run_dir) / BEST_RECORD, json.dumps(record, indent=1))


class _FirstBatches:
    """The first `num_batches` batches of an eval loader, with the `len` predict's lockstep count needs."""

    def __init__(self, loader: ResumableLoader, num_batches: int):
        self.loader, self.num_batches = loader, min(len(loader), num_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        return itertools.islice(iter(self.loader), self.num_batches)


@dataclass
class EvalSplit:
    """One split's generation loader on this rank, and (rank 0) its samples' metadata for the references."""

    path: str
    split: str
    loader: _FirstBatches
    num_samples: int  # in the whole split
    capped: bool
    metas: list[dict] | None  # rank 0 only
    problem: str | None = None  # why no metric can come out of it (the same on every rank)


def build_eval_split(
    cfg: Config, path: str, tokenizer: Any, info: DistInfo, max_samples: int | None
) -> EvalSplit:
    """Raises ValueError/OSError on a bad split, so the run setup can refuse it before training."""
    manifest, _ = load_manifest(path)
    n = int(manifest["num_samples"])
    bs = cfg.eval.batch_size
    if min(eval_batches_per_rank(min(n, max_samples or n), info.world_size, bs)) == 0:
        raise ValueError(f"{path}: {n} samples cannot give each of {info.world_size} ranks an eval batch")
    # no workers: a worker pool per evaluation would be forked from a process holding the model
    settings = LoaderSettings.from_config(
        cfg, batch_size=bs, rank=info.rank, world_size=info.world_size, num_workers=0
    )
    loader = build_eval_loader(DatasetSpec.from_config(cfg, path), tokenizer, settings)
    capped = max_samples is not None and n > max_samples
    # every rank reads a contiguous slice: its first batches are its share of the first ~max_samples
    num_batches = math.ceil(max_samples / (info.world_size * bs)) if capped else len(loader)
    metas = load_shard_metas(path)[1]  # on every rank, so every rank reaches the same `problem`
    split = manifest.get("split") or Path(path).name
    first = _FirstBatches(loader, num_batches)
    return EvalSplit(path, split, first, n, capped, metas if info.rank == 0 else None, _problem(cfg, metas))


def _problem(cfg: Config, metas: list[dict]) -> str | None:
    if cfg.data.task == "qa":
        if not all("question_id" in m for m in metas):
            return "samples without question_id (QA results are keyed by it)"
        if not any(m.get("answers") for m in metas):
            return "no answers (a test-dev/test-std split?)"
    elif not any(m.get("captions") for m in metas):
        return "no reference captions"
    return None


def predict_and_score(ctx: EvalContext, es: EvalSplit) -> Scored | None:
    """Generate on every rank (ZeRO-3 lockstep), gather; rank 0 scores (None on the other ranks)."""
    cfg = ctx.cfg
    records = predict(
        ctx.model,
        es.loader,
        ctx.tokenizer,
        task=cfg.data.task,
        decoding=cfg.eval,
        # ZeRO-3 shards every layer: a rank that stops generating early leaves the others waiting in
        # its all-gathers (HF generate's `synced_gpus` exists for the same reason)
        synced_gpus=ctx.zero_stage == 3,
    )
    predictions = gather_predictions(records, expected=None if es.capped else es.num_samples)
    if es.metas is None:
        return None
    task = eval_task(cfg, es.metas)
    # capped: score against the samples that were generated, as `eval.vqa --subset` would
    return score_split(
        task, predictions, es.metas, es.split, cfg.data.modality, subset=es.capped, spice=False
    )


class GenerationEval:
    """The eval hook: the task metric on `data.val`, best adapter kept by it; the final test evaluation.

    Its `state_dict` rides in each checkpoint's trainer state, so `--resume auto` keeps the best so far.
    """

    name = "generation"

    def __init__(self, val: EvalSplit | None, test: EvalSplit | None = None):
        self.val, self.test = val, test
        self.best = BestTracker()

    def __call__(self, ctx: EvalContext, step: int) -> dict[str, float]:
        if self.val is None:  # a captioning run with data.test but no data.val: only `final` has work
            return {}
        scored = predict_and_score(ctx, self.val)
        metrics, metric = {}, None
        if scored is not None and scored.scores is not None:
            metric = scored.metric
            metrics = {f"val/{k}": v for k, v in headline(metric, scored.scores).items()}
        elif ctx.main:
            log.warning("%s has no ground truth: no generation metric, no best checkpoint", self.val.path)
        metrics, metric = broadcast_from_rank0((metrics, metric))
        if metric is None:
            return metrics
        primary = PRIMARY[metric]
        if self.best.update(primary, metrics[f"val/{primary}"], step):
            adapter = ctx.gather_adapter()  # collective under ZeRO-3: every rank takes part
            if ctx.main:
                save_adapter(adapter, ctx.cfg, ctx.run_dir / BEST)
                extra = {"split": self.val.split, "num_samples": self.val.num_samples}
                save_best(ctx.run_dir, self.best, extra | {"metrics": metrics})
                log.info("step %d: new best %s %.4f -> %s", step, primary, self.best.value, BEST)
        return metrics

    def state_dict(self) -> dict:
        return self.best.state_dict()

    def load_state_dict(self, state: dict | None, step: int, run_dir: Path) -> None:
        """From the checkpoint; a checkpoint without it falls back to best.json if that is not newer."""
        if state is None:
            found = load_best(run_dir)
            state = found if found and (found.get("step") or 0) <= step else None
        self.best = BestTracker.from_dict(state)

    def final(self, ctx: EvalContext, step: int) -> dict[str, float]:
        """Evaluate on `data.test` and write predictions, references and scores to `run_dir/eval/`."""
        if self.test is None:
            return {}
        return evaluate_to_dir(ctx, self.test, ctx.run_dir / EVAL, "test", step)


def evaluate_to_dir(ctx: EvalContext, es: EvalSplit, out: Path, prefix: str, step: int) -> dict[str, float]:
    """Generate + score `es`; rank 0 writes `<task>_<split>_results.json`, references, scores.json."""
    scored = predict_and_score(ctx, es)
    metrics: dict[str, float] = {}
    if scored is not None:
        settings = {
            "shards": es.path,
            "step": step,
            "num_beams": ctx.cfg.eval.num_beams,
            "max_new_tokens": ctx.cfg.eval.max_new_tokens,
            "world_size": ctx.world_size,
        }
        summary = write_outputs(scored, out, settings, headline_prefix=f"{prefix}/")
        metrics = summary.get("headline", {})
    return broadcast_from_rank0(metrics)


def build_generation_eval(cfg: Config, tokenizer: Any, info: DistInfo) -> GenerationEval | None:
    """The hook for a config: None without `data.val` or `train.eval_every`; a captioning run with
    `data.test` also gets the final test evaluation (all of `data.test`, never capped)."""
    val = None
    if cfg.data.val and cfg.train.eval_every:
        val = build_eval_split(cfg, cfg.data.val, tokenizer, info, cfg.eval.max_samples)
        if val.problem is not None:
            if info.rank == 0:
                log.warning("%s: %s; no generation metric during training", cfg.data.val, val.problem)
            val = None
    test = None
    if cfg.data.task == "caption" and cfg.data.test:
        test = build_eval_split(cfg, cfg.data.test, tokenizer, info, None)
    if val is None and test is None:
        return None
    return GenerationEval(val, test)
