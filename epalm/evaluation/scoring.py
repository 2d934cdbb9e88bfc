"""Scoring a split: the official reference files built from shard metadata, the official scorer of each
task (`epalm.metrics`), and the one output path (results, references, scores.json) that `eval.run` and
the trainer share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epalm.evaluation.references import reference_files, write_references
from epalm.evaluation.tasks import TASKS, headline, metric_name, record_key, sample_key
from epalm.run.layout import SCORES

RESULTS = "{prefix}_results.json"  # beside SCORES and the reference files in an evaluation's directory


def build_references(task: str, metas: list[dict], split: str = "eval") -> dict[str, Any]:
    """`task`'s reference files (name -> JSON object) built from shard metadata; {} without ground truth."""
    spec = TASKS[task]
    return reference_files(spec.kind, metas, split, official_vqa=spec.metric == "vqa")


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
