"""Evaluation inside training: best-value selection and its resume, capped and final (test-split) generation
evaluation on a tiny model, and a 2-rank ZeRO-3 run whose ranks have different eval batch counts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from epalm.config import build_config
from epalm.distributed import DistInfo
from epalm.evaluation import hook as eval_hook
from epalm.evaluation.hook import (
    BestTracker,
    EvalContext,
    GenerationEval,
    build_eval_split,
    build_generation_eval,
    eval_task,
    evaluate_to_dir,
)
from epalm.evaluation.scoring import Scored
from epalm.evaluation.tasks import headline
from testing.shard_fixtures import one_torch_thread, write_dataset
from testing.support import tiny_tree
from tests.test_distributed_eval import write_vqa_shards
from tests.training_fixtures import ROOT, launch, read_jsonl, write_setup

# --------------------------------------------------------------------------- best value, unit level


def test_best_tracker_keeps_the_highest_and_the_earlier_of_ties():
    best = BestTracker()
    assert best.update("cider", 10.0, 100)
    assert not best.update("cider", 9.0, 200) and not best.update("cider", 10.0, 300)
    assert not best.update("cider", math.nan, 400)
    assert best.update("cider", 12.5, 500) and (best.value, best.step) == (12.5, 500)
    assert BestTracker.from_dict(best.state_dict()) == best
    assert BestTracker.from_dict(None) == BestTracker()


def test_headline_scales_and_task_choice():
    assert headline("vqa", {"overall": 54.78, "perQuestionType": {}}) == {"vqa_accuracy": 54.78}
    assert headline("vqa_label_score", {"accuracy": 40.0, "num_questions": 3}) == {"accuracy": 40.0}
    caption = headline("caption", {"Bleu_4": 0.3335, "CIDEr": 1.1163, "METEOR": 0.2})
    assert list(caption) == ["cider", "bleu4", "meteor"]  # primary first
    assert caption["cider"] == pytest.approx(111.63) and caption["bleu4"] == pytest.approx(33.35)
    cfg = build_config({"data": {"task": "qa", "modality": "image"}})
    assert eval_task(cfg, [{"raw_answers": ["a"] * 10}]) == "vqav2"
    assert eval_task(cfg, [{"answers": [{"answer": "a", "score": 1.0}]}]) == "gqa"
    assert (
        eval_task(
            build_config(
                {"data": {"task": "qa", "modality": "video"}, "model": {"encoder": {"kind": "timesformer"}}}
            )
        )
        == "video_qa"
    )
    assert (
        eval_task(
            build_config(
                {"data": {"task": "caption", "modality": "audio"}, "model": {"encoder": {"kind": "ast"}}}
            )
        )
        == "audio_caption"
    )


def _stub_ctx(run_dir: Path, step: int) -> EvalContext:
    cfg = build_config({"run_dir": str(run_dir)})
    adapter = {"w": torch.full((2,), float(step))}
    return EvalContext(None, None, cfg, run_dir, 0, 1, 0, gather_adapter=lambda: adapter)  # type: ignore[arg-type]


def test_hook_writes_best_only_on_improvement_and_resume_keeps_the_best(tmp_path, monkeypatch):
    """Scores 30 -> 50 -> 40: best/ holds step 20's adapter; a resume at step 20 keeps 50 as the bar."""
    scores = iter([30.0, 50.0, 40.0, 45.0])
    monkeypatch.setattr(
        eval_hook,
        "predict_and_score",
        lambda ctx, es: Scored(
            "vqav2", "val", [], {"questions": [], "annotations": []}, "vqa", {"overall": next(scores)}
        ),
    )
    val = SimpleNamespace(split="val", num_samples=5, path="val")
    hook = GenerationEval(val)  # type: ignore[arg-type]
    for step, expected in ((10, 30.0), (20, 50.0), (30, 40.0)):
        assert hook(_stub_ctx(tmp_path, step), step) == {"val/vqa_accuracy": expected}
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["step"], best["metric"], best["value"]) == (20, "vqa_accuracy", 50.0)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "best" / "adapter.safetensors"))["w"].tolist() == [20.0, 20.0]
    assert (tmp_path / "best" / "config.yaml").is_file()

    resumed = GenerationEval(val)  # type: ignore[arg-type]
    resumed.load_state_dict(hook.state_dict(), 30, tmp_path)  # what the step-30 checkpoint holds
    assert resumed.best == BestTracker("vqa_accuracy", 50.0, 20)
    resumed(_stub_ctx(tmp_path, 40), 40)  # 45 < 50: best/ is not replaced
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 20

    # a checkpoint from before this feature: best.json counts if it is not newer than the checkpoint
    old = GenerationEval(val)  # type: ignore[arg-type]
    old.load_state_dict(None, 25, tmp_path)
    assert old.best.value == 50.0
    old.load_state_dict(None, 15, tmp_path)
    assert old.best == BestTracker()


# --------------------------------------------------------------------------- generation on a tiny model, 1 process


def _tiny_cfg(tmp: Path, task: str, **eval_cfg) -> object:
    from epalm.data.tokenizer_trainer import save_tokenizer

    texts = ["what digit is this? seven one", "a handwritten digit seven", "a picture of a digit"] * 20
    tree = tiny_tree()
    tree["model"]["lm"]["tokenizer"] = str(save_tokenizer(texts, tmp / "tok", vocab_size=300))
    tree["data"] = {"task": task, "modality": "image", "image_size": 16, "num_workers": 0}
    tree["eval"] = {"num_beams": 2, "max_new_tokens": 4, "batch_size": 2, **eval_cfg}
    tree["run_dir"] = str(tmp / "run")
    return build_config(tree)


def _tiny_ctx(cfg) -> EvalContext:
    from epalm.data.text import build_tokenizer
    from epalm.model.epalm import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    tok = build_tokenizer(cfg.model.lm.tokenizer)
    return EvalContext(model, tok, cfg, Path(cfg.run_dir), 0, 1, 0, gather_adapter=dict)


def test_capped_vqa_eval_scores_the_generated_subset(tmp_path):
    cfg = _tiny_cfg(tmp_path, "qa")
    ctx = _tiny_ctx(cfg)
    shards = write_vqa_shards(tmp_path / "val", [3, 4])
    es = build_eval_split(cfg, str(shards), ctx.tokenizer, DistInfo(0, 0, 1, "single"), 4)
    assert es.capped and len(es.loader) == 2 and es.num_samples == 7
    with one_torch_thread():
        scored = eval_hook.predict_and_score(ctx, es)
    task, predictions, references, scores = scored.task, scored.predictions, scored.references, scored.scores
    assert task == "vqav2" and [p["question_id"] for p in predictions] == [1000, 1001, 1002, 1003]
    assert len(references["annotations"]["annotations"]) == 4 and 0.0 <= scores["overall"] <= 100.0


def test_final_caption_eval_writes_predictions_and_scores(tmp_path):
    """The zero-shot path: a captioning run's `data.test`, all of it, scored with CIDEr into run_dir/eval/."""
    cfg = _tiny_cfg(tmp_path, "caption")
    ctx = _tiny_ctx(cfg)
    shards = write_dataset(tmp_path / "test", [3, 2], task="caption", modality="image", prefix="t")
    es = build_eval_split(cfg, str(shards), ctx.tokenizer, DistInfo(0, 0, 1, "single"), None)
    out = tmp_path / "run" / "eval"
    with one_torch_thread():
        metrics = evaluate_to_dir(ctx, es, out, "test", step=7)
    assert set(metrics) == {"test/cider", "test/bleu4", "test/meteor"}
    summary = json.loads((out / "scores.json").read_text())
    assert summary["metric"] == "caption" and summary["num_samples"] == 5 and summary["step"] == 7
    assert summary["headline"]["test/cider"] == pytest.approx(100 * summary["scores"]["CIDEr"])
    results = json.loads((out / summary["results"]).read_text())
    assert [r["image_id"] for r in results] == [f"t{i:05d}" for i in range(5)]
    assert (out / summary["references"]["references"]).is_file()


def test_too_small_val_split_is_refused_before_training(tmp_path):
    cfg = _tiny_cfg(tmp_path, "qa")
    tok = _tiny_ctx(cfg).tokenizer
    shards = write_vqa_shards(tmp_path / "val", [1])
    with pytest.raises(ValueError, match="cannot give each of 2 ranks"):
        build_eval_split(cfg, str(shards), tok, DistInfo(0, 0, 2, "env"), None)
    # QA samples without question_id cannot be scored: no generation metric, training goes on
    plain = write_dataset(tmp_path / "plain", [4], task="qa", modality="image", question_ids=False)
    assert build_eval_split(cfg, str(plain), tok, DistInfo(0, 0, 1, "single"), None).problem
    no_val = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=str(plain)))
    assert build_generation_eval(no_val, tok, DistInfo(0, 0, 1, "single")) is None


# --------------------------------------------------------------------------- 2 ranks, ZeRO-3, real launcher


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_two_ranks_generation_eval_with_uneven_batches(tmp_path):
    """5 val samples, eval batch 2: rank 0 generates 1 batch, rank 1 two (plus lockstep dummies on rank 0)."""
    from epalm.data.resumable import eval_batches_per_rank

    config = write_setup(tmp_path, max_steps=4, eval_every=2, save_every=2)
    val = write_vqa_shards(tmp_path / "vqa_val", [2, 3])
    tree = yaml.safe_load(config.read_text())
    tree["data"]["val"] = str(val)
    tree["eval"] = {"num_beams": 2, "max_new_tokens": 6, "batch_size": 2}
    config.write_text(yaml.safe_dump(tree))
    assert eval_batches_per_rank(5, 2, 2) == [1, 2]

    ds = str(ROOT / "ds_configs" / "zero3.json")
    r = launch("torchrun", config, "--ds_config", ds, "--precision", "fp32", timeout=280)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    run = tmp_path / "run"
    evals = [rec for rec in read_jsonl(run / "metrics.jsonl") if "val/vqa_accuracy" in rec]
    assert [rec["step"] for rec in evals] == [2, 4]
    assert all(0.0 <= rec["val/vqa_accuracy"] <= 100.0 and "val/loss" in rec for rec in evals)
    best = json.loads((run / "best.json").read_text())
    values = {rec["step"]: rec["val/vqa_accuracy"] for rec in evals}
    assert best["metric"] == "vqa_accuracy" and best["value"] == max(values.values())
    assert values[best["step"]] == best["value"] and (best["step"] == 2 or values[2] < values[4])
    assert (run / "best" / "adapter.safetensors").is_file() and (run / "best" / "config.yaml").is_file()
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["eval_state"]["generation"]["value"] == best["value"]
    report = (run / "report.md").read_text()
    assert "vqa_accuracy" in report and (run / "loss.png").is_file() and (run / "eval_metric.png").is_file()
