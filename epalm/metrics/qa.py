"""Open-ended QA accuracy for GQA, MSRVTT-QA and MSVD-QA: normalised exact match.

Reproduces eP-ALM's `GQAEvaluator` / `MSRVTTVQAQAEvaluator.evaluate(normalize_answer=True)`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from epalm.metrics.vqa import MetricsInputError, check_same_ids, normalize_answer, require


def normalize_qa_answer(text: str) -> str:
    """The VQA normalisation plus removal of every comma (the original evaluators' extra step)."""
    return normalize_answer(text).replace(",", "")


def id_key(question_id: Any) -> Hashable:
    """Canonical id: digit strings become ints, as the original GQA evaluator's `int(question_id)`.

    GQA ids are zero-padded strings ("07333408"); predictions may carry them as ints.
    """
    if isinstance(question_id, bool) or not isinstance(question_id, int | str):
        raise MetricsInputError(f"question_id must be an int or a string, got {question_id!r}")
    if isinstance(question_id, str) and question_id.isascii() and question_id.isdigit():
        return int(question_id)
    return question_id


def reference_label(record: dict, what: str) -> dict[str, float]:
    """A reference record's {answer: score}, from `label`, `answers` or `answer` (first present)."""
    if "label" in record:
        label = record["label"]
        if not isinstance(label, dict):
            raise MetricsInputError(f"{what}: 'label' must be an object {{answer: score}}")
        items = list(label.items())
    elif "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list):
            raise MetricsInputError(f"{what}: 'answers' must be a list")
        items = []
        for a in answers:
            if isinstance(a, dict):
                require(a, ["answer"], f"{what} answer")
                items.append((a["answer"], a.get("score", 1.0)))
            else:
                items.append((a, 1.0))
    elif "answer" in record:
        items = [(record["answer"], 1.0)]
    else:
        raise MetricsInputError(f"{what}: needs one of 'label', 'answers' or 'answer'; has {sorted(record)}")
    for answer, score in items:
        if not isinstance(answer, str) or isinstance(score, bool) or not isinstance(score, int | float):
            raise MetricsInputError(f"{what}: bad answer/score pair {answer!r}: {score!r}")
    return dict(items)


def score_qa(predictions: list[dict], references: list[dict], *, ndigits: int = 2) -> dict:
    """{"accuracy": percent, "num_questions": N}: mean over questions of the normalised label score.

    Both sides are normalised with `normalize_qa_answer`; a prediction earns the score of the
    reference answer it equals (1.0 for plain-string answers), else 0. Ids must match exactly.
    """
    if not isinstance(predictions, list):
        raise MetricsInputError("predictions: expected a JSON list of {question_id, answer} objects")
    if not isinstance(references, list):
        raise MetricsInputError("references: expected a JSON list of records with a question_id")
    refs: dict[Hashable, dict[str, float]] = {}
    for i, r in enumerate(references):
        require(r, ["question_id"], f"reference #{i}")
        key = id_key(r["question_id"])
        if key in refs:
            raise MetricsInputError(f"references: question id {r['question_id']!r} appears twice")
        refs[key] = reference_label(r, f"reference #{i}")
    preds: dict[Hashable, str] = {}
    for i, p in enumerate(predictions):
        require(p, ["question_id", "answer"], f"prediction #{i}")
        if not isinstance(p["answer"], str):
            raise MetricsInputError(f"prediction #{i}: 'answer' must be a string")
        key = id_key(p["question_id"])
        if key in preds:
            raise MetricsInputError(f"predictions: question id {p['question_id']!r} appears twice")
        preds[key] = p["answer"]
    check_same_ids(preds, refs, "question")
    if not preds:
        raise MetricsInputError("no questions to score")

    total = 0.0
    for key, answer in preds.items():
        # Like the original, a later reference answer that normalises to the same string wins.
        label = {normalize_qa_answer(a): s for a, s in refs[key].items()}
        total += label.get(normalize_qa_answer(answer), 0.0)
    return {"accuracy": round(100 * total / len(preds), ndigits), "num_questions": len(preds)}
