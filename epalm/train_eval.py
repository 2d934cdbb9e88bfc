"""Generation metrics inside a training run: the task metric on `data.val` every `train.eval_every` steps
(with the best adapter kept in `run_dir/best/`), and the final evaluation on `data.test` after a captioning
run (the zero-shot COCO numbers of a CC3M-pretrained adapter). Every function here runs on every rank."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from epalm import checkpoint as ckpt
from epalm.config import Config
from epalm.data.loader import DatasetSpec, ResumableLoader, build_eval_loader, io_options
from epalm.data.resumable import eval_batches_per_rank
from epalm.data.stream import load_manifest
from epalm.distributed import DistInfo
from epalm.evaluate import (
    MEDIA_ID,
    build_references,
    gather_predictions,
    load_shard_metas,
    metric_name,
    predict,
    record_key,
    score,
    write_references,
)

if TYPE_CHECKING:
    from epalm.trainer import Trainer

log = logging.getLogger(__name__)

BEST_DIR, BEST_FILE, EVAL_DIR = "best", "best.json", "eval"
# the number each metric is judged by, on the paper's scale (percent; CIDEr x 100 as papers print it)
PRIMARY = {"vqa": "vqa_accuracy", "qa": "accuracy", "vqa_label_score": "accuracy", "caption": "cider"}
CAPTION_KEYS = {"cider": "CIDEr", "bleu4": "Bleu_4", "meteor": "METEOR"}


def eval_task(cfg: Config, metas: list[dict] | None = None) -> str:
    """The `epalm.evaluate.TASKS` entry for a training config: official VQA v2 only with 10 raw answers."""
    d = cfg.data
    if d.task == "caption":
        return "audio_caption" if d.modality == "audio" else "caption"
    if d.modality == "video":
        return "video_qa"
    return "vqav2" if metas is None or all(m.get("raw_answers") for m in metas) else "gqa"


def headline(metric: str, scores: dict) -> dict[str, float]:
    """The logged numbers of a scores dict, primary first, on the paper's scale."""
    if metric == "vqa":
        return {"vqa_accuracy": float(scores["overall"])}
    if metric in ("qa", "vqa_label_score"):
        return {"accuracy": float(scores["accuracy"])}
    return {k: 100.0 * float(scores[v]) for k, v in CAPTION_KEYS.items() if v in scores}


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
    path = Path(run_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_best(run_dir: str | Path, best: BestTracker, extra: dict | None = None) -> None:
    """Atomic write of best.json (after the adapter export, so it never names a missing one)."""
    path = Path(run_dir) / BEST_FILE
    tmp = path.with_name(f".{BEST_FILE}.tmp")
    tmp.write_text(json.dumps({**best.state_dict(), "adapter": BEST_DIR, **(extra or {})}, indent=1))
    os.replace(tmp, path)


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
    """Raises ValueError/OSError on a bad split, so `prepare` can refuse it before training."""
    manifest, _ = load_manifest(path)
    n = int(manifest["num_samples"])
    bs = cfg.eval.batch_size
    if min(eval_batches_per_rank(min(n, max_samples or n), info.world_size, bs)) == 0:
        raise ValueError(f"{path}: {n} samples cannot give each of {info.world_size} ranks an eval batch")
    d = cfg.data
    loader = build_eval_loader(
        DatasetSpec(path, d.task, d.modality, use_features=d.use_features),
        tokenizer,
        batch_size=bs,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=0,  # a worker pool per evaluation would be forked from a process holding the model
        image_size=d.image_size,
        normalization=d.normalization,
        double_question_mark=cfg.model.double_question_mark,
        **io_options(d),
    )
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


def _predict_and_score(trainer: Trainer, es: EvalSplit) -> tuple[str, list[dict], dict, dict | None]:
    """Generate on every rank (ZeRO-3 lockstep), gather; rank 0 scores. (task, predictions, refs, scores)."""
    cfg = trainer.cfg
    records = predict(
        trainer.eng.model,
        es.loader,
        trainer.prep.tokenizer,
        task=cfg.data.task,
        num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens,
        synced_gpus=trainer.eng.stage == 3,  # pitfalls: ZeRO-3 generation deadlocks without it
        use_cache=cfg.eval.use_cache,
    )
    predictions = gather_predictions(records, expected=None if es.capped else es.num_samples)
    if es.metas is None:
        return "", [], {}, None
    metas = es.metas
    task = eval_task(cfg, metas)
    position = {_sample_key(cfg, m): i for i, m in enumerate(metas)}
    if es.capped:  # score against the samples that were generated, as `eval.vqa --subset` would
        keys = {record_key(r) for r in predictions}
        metas = [m for m in metas if _sample_key(cfg, m) in keys]
    predictions.sort(key=lambda r: position.get(record_key(r), len(position)))  # manifest order
    references = build_references(task, metas, es.split)
    if not references:
        return task, predictions, {}, None
    return task, predictions, references, score(task, predictions, references, spice=False)


def _sample_key(cfg: Config, meta: dict) -> Any:
    if cfg.data.task == "qa":
        return meta["question_id"]
    return meta.get(MEDIA_ID[cfg.data.modality], meta["id"])


def _broadcast(obj: Any) -> Any:
    box = [obj]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class GenerationEval:
    """Eval hook (`Prepared.eval_hooks`): the task metric on `data.val`, best adapter kept by it.

    Its `state_dict` rides in each checkpoint's trainer state, so `--resume auto` keeps the best so far.
    """

    name = "generation"

    def __init__(self, val: EvalSplit | None, test: EvalSplit | None = None):
        self.val, self.test = val, test
        self.best = BestTracker()

    def __call__(self, trainer: Trainer, step: int) -> dict[str, float]:
        if self.val is None:  # a captioning run with data.test but no data.val: only `final` has work
            return {}
        task, _, references, scores = _predict_and_score(trainer, self.val)
        metrics, metric = {}, None
        if scores is not None:
            metric = metric_name(task, references)
            metrics = {f"val/{k}": v for k, v in headline(metric, scores).items()}
        elif trainer.main:
            log.warning("%s has no ground truth: no generation metric, no best checkpoint", self.val.path)
        metrics, metric = _broadcast((metrics, metric))
        if metric is None:
            return metrics
        primary = PRIMARY[metric]
        if self.best.update(primary, metrics[f"val/{primary}"], step):
            adapter = _gather_adapter(trainer)  # collective under ZeRO-3: every rank takes part
            if trainer.main:
                ckpt.save_adapter(adapter, trainer.cfg, trainer.prep.run_dir / BEST_DIR)
                extra = {"split": self.val.split, "num_samples": self.val.num_samples}
                save_best(trainer.prep.run_dir, self.best, extra | {"metrics": metrics})
                log.info("step %d: new best %s %.4f -> %s", step, primary, self.best.value, BEST_DIR)
        return metrics

    def state_dict(self) -> dict:
        return self.best.state_dict()

    def load_state_dict(self, state: dict | None, step: int, run_dir: Path) -> None:
        """From the checkpoint; a checkpoint without it falls back to best.json if that is not newer."""
        if state is None:
            found = load_best(run_dir)
            state = found if found and (found.get("step") or 0) <= step else None
        self.best = BestTracker.from_dict(state)

    def final(self, trainer: Trainer) -> dict[str, float]:
        """Evaluate on `data.test` and write predictions, references and scores to `run_dir/eval/`."""
        if self.test is None:
            return {}
        return evaluate_to_dir(trainer, self.test, trainer.prep.run_dir / EVAL_DIR, "test")


def _gather_adapter(trainer: Trainer) -> dict:
    from epalm.engine import gather_adapter_state

    return gather_adapter_state(trainer.eng.model)


def evaluate_to_dir(trainer: Trainer, es: EvalSplit, out: Path, prefix: str) -> dict[str, float]:
    """Generate + score `es`; rank 0 writes `<task>_<split>_results.json`, references, scores.json."""
    task, predictions, references, scores = _predict_and_score(trainer, es)
    metrics: dict[str, float] = {}
    if trainer.main:
        out.mkdir(parents=True, exist_ok=True)
        name = f"{task}_{es.split}"
        (out / f"{name}_results.json").write_text(json.dumps(predictions))
        paths = write_references(references, out, name)
        metric = metric_name(task, references) if references else None
        if scores is not None:
            metrics = {f"{prefix}/{k}": v for k, v in headline(metric, scores).items()}
        summary = {
            "task": task,
            "split": es.split,
            "shards": es.path,
            "step": trainer.step,
            "num_samples": len(predictions),
            "num_beams": trainer.cfg.eval.num_beams,
            "max_new_tokens": trainer.cfg.eval.max_new_tokens,
            "world_size": trainer.world,
            "results": f"{name}_results.json",
            "references": {k: p.name for k, p in paths.items()},
            "metric": metric,
            "scores": scores,
            "headline": metrics,
        }
        (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return _broadcast(metrics)


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


def final_outputs(trainer: Trainer) -> None:
    """After a completed run: the test split of a captioning run, then report.md. Every rank calls it."""
    final = trainer.prep.final_eval
    if final is not None and final.test is not None:
        trainer.eng.engine.eval()
        trainer.metrics.log_eval(trainer.step, final.final(trainer))
    if trainer.main:
        from epalm.report import write_report

        try:  # a plotting problem must not turn a finished run into a failed job
            log.info("report: %s", write_report(trainer.prep.run_dir))
        except Exception as e:  # noqa: BLE001
            log.warning("report.md not written: %s", e)
