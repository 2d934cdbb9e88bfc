"""`python -m eval.run` end to end on demo shards with a tiny random adapter: files in the official formats,
scores in range and equal to the metrics run on the written (and on the demo's raw official) files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from epalm.config import build_config
from epalm.run.adapter import save_adapter
from testing.support import TINY_HF, tiny_tree

TEXTS = ["what digit is this?", "a handwritten digit seven", "a picture of the number three"] * 20


TINY_ENCODERS = {  # random-weight TimeSformer / AST configs small enough for a unit test (real hub ids)
    "video": (
        "timesformer",
        "facebook/timesformer-base-finetuned-k600",
        dict(image_size=16, patch_size=8, num_frames=4),
    ),
    "audio": (
        "ast",
        "MIT/ast-finetuned-audioset-10-10-0.4593",
        dict(max_length=1024, num_mel_bins=128, patch_size=16, frequency_stride=16, time_stride=16),
    ),
}


def tiny_encoder(modality: str) -> dict:
    """The model.encoder section of a tiny random video or audio adapter (make_adapter's `encoder`); a video
    adapter also needs data num_frames=4."""
    kind, name, sizes = TINY_ENCODERS[modality]
    return {
        "kind": kind,
        "name": name,
        "pretrained": False,
        "num_states": 2,
        "config_overrides": TINY_HF | sizes,
    }


def make_adapter(root: Path, encoder: dict | None = None, **data) -> Path:
    """A tiny random model saved as an adapter export; its config.yaml names a tokenizer saved under `root`."""
    from epalm.data.tokenizer_trainer import save_tokenizer
    from epalm.model.epalm import build_model

    tree = tiny_tree()
    tree["model"]["lm"]["tokenizer"] = str(save_tokenizer(TEXTS, root / "tok", vocab_size=300))
    if encoder is not None:
        tree["model"]["encoder"] = encoder
    tree["data"] = {"image_size": 16, "num_workers": 0, **data}
    tree["eval"] = {"num_beams": 2, "max_new_tokens": 4, "batch_size": 16}
    cfg = build_config(tree)
    torch.manual_seed(cfg.train.seed)  # as the trainer builds it, so the frozen random weights match
    model = build_model(cfg.model)
    with torch.no_grad():  # a non-trivial adapter: the connector's initial output is tiny
        for _, p in model.trainable_named_parameters():
            p.normal_(0, 0.5)
    return save_adapter(model.adapter_state_dict(), cfg, root / "adapter")


def build_digit_shards(root: Path, splits: dict[str, str]) -> Path:
    """The demo's digits in raw VQA v2 / Karpathy formats and shards of `splits` ({task: split})."""
    from data_shards import build
    from data_shards.demo import tasks, write_digits

    raw = root / "raw"
    write_digits(raw / "digits", 32)
    for task, split in splits.items():
        args = [str(a) for a in tasks(raw)[task][split]]
        args += ["--split", split, "--out", str(root / task / split), "--no-progress", "--workers", "1"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert build.main(args + ["--image-size", "32", "--samples-per-shard", "50"]) == 0
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evalrun")
    return make_adapter(root), build_digit_shards(
        root / "data", {"digits_vqa": "val", "digits_caption": "val"}
    )


def run_eval(capsys, *argv: str) -> tuple[int, str, str]:
    from eval import run

    code = run.main(["--no-progress", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_model_is_the_saved_model(setup):
    from epalm.evaluation.predict import load_eval_model
    from epalm.model.epalm import build_model
    from epalm.run.adapter import load_adapter

    adapter, _ = setup
    model, tokenizer, cfg = load_eval_model(adapter)
    state, _ = load_adapter(adapter)
    torch.manual_seed(cfg.train.seed)
    reference = build_model(cfg.model).state_dict()
    for k, v in model.state_dict().items():  # frozen weights rebuilt identically, adapter loaded
        torch.testing.assert_close(v, state.get(k, reference[k]), rtol=0, atol=0, msg=k)
    assert (
        not model.training
        and tokenizer.convert_tokens_to_ids("</a>") < cfg.model.lm.config_overrides["vocab_size"]
    )


def test_vqav2_scores_match_the_official_files(setup, tmp_path, capsys):
    from epalm.metrics.vqa import score_vqa

    adapter, data = setup
    code, out, _ = run_eval(
        capsys,
        "--adapter",
        str(adapter),
        "--shards",
        str(data / "digits_vqa/val"),
        "--task",
        "vqav2",
        "--out",
        str(tmp_path),
        "--batch-size",
        "64",
    )
    assert code == 0, out
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert json.loads(out[out.index("\n{") :]) == summary  # the printed JSON is scores.json
    results = json.loads((tmp_path / "vqav2_val_results.json").read_text())
    raw = data / "raw/digits"
    questions = json.loads((raw / "v2_OpenEnded_mscoco_val_questions.json").read_text())
    annotations = json.loads((raw / "v2_mscoco_val_annotations.json").read_text())
    assert sorted(r["question_id"] for r in results) == sorted(
        q["question_id"] for q in questions["questions"]
    )
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in results)
    written = [
        json.loads((tmp_path / f"vqav2_val_{n}.json").read_text()) for n in ("questions", "annotations")
    ]
    assert summary["metric"] == "vqa" and summary["num_samples"] == 180
    assert 0 <= summary["scores"]["overall"] <= 100
    assert summary["scores"] == score_vqa(results, *written) == score_vqa(results, questions, annotations)


@pytest.mark.slow  # java (PTBTokenizer, METEOR) starts twice: ~30 s on 2 cores
def test_caption_scores_match_the_written_files(setup, tmp_path, capsys):
    from epalm.metrics.caption import score_captions

    adapter, data = setup
    code, out, _ = run_eval(
        capsys,
        "--adapter",
        str(adapter),
        "--shards",
        str(data / "digits_caption/val"),
        "--task",
        "caption",
        "--out",
        str(tmp_path),
        "--no-spice",
        "--batch-size",
        "90",
    )
    assert code == 0, out
    summary = json.loads((tmp_path / "scores.json").read_text())
    results = json.loads((tmp_path / "caption_val_results.json").read_text())
    references = json.loads((tmp_path / "caption_val_references.json").read_text())
    karpathy = json.loads((data / "raw/digits/dataset_coco.json").read_text())["images"]
    val = {img["cocoid"]: [s["raw"] for s in img["sentences"]] for img in karpathy if img["split"] == "val"}
    assert {r["image_id"] for r in results} == set(val) and len(results) == 180
    by_image: dict = {}
    for ann in references["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    assert by_image == val
    scores = summary["scores"]
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert all(0 <= v <= 1 for k, v in scores.items() if k != "CIDEr") and scores["CIDEr"] >= 0
    assert scores == score_captions(results, references, spice=False)


def test_vqa_test_split_writes_the_submission_file(setup, tmp_path, capsys):
    from data_shards import build

    adapter, data = setup
    shards = tmp_path / "shards"
    questions = data / "raw/digits/v2_OpenEnded_mscoco_test_questions.json"
    with contextlib.redirect_stdout(io.StringIO()):  # test-dev style: questions only, no annotations
        assert (
            build.main(
                [
                    "--source",
                    "vqav2",
                    "--questions",
                    str(questions),
                    "--media-root",
                    str(data / "raw/digits/images"),
                    "--split",
                    "test-dev",
                    "--out",
                    str(shards),
                    "--no-progress",
                    "--workers",
                    "1",
                    "--image-size",
                    "32",
                ]
            )
            == 0
        )
    code, out, _ = run_eval(
        capsys,
        "--adapter",
        str(adapter),
        "--shards",
        str(shards),
        "--task",
        "vqav2",
        "--out",
        str(tmp_path / "out"),
        "--batch-size",
        "90",
        "--num-beams",
        "1",
    )
    assert code == 0, out
    results = json.loads((tmp_path / "out/vqav2_test-dev_results.json").read_text())
    expected = {q["question_id"] for q in json.loads(questions.read_text())["questions"]}
    assert len(results) == len(expected) and {r["question_id"] for r in results} == expected
    summary = json.loads((tmp_path / "out/scores.json").read_text())
    assert summary["scores"] is None and summary["references"] == {} and summary["num_beams"] == 1
    assert "submission file" in out


def test_task_must_fit_the_encoder(setup, tmp_path, capsys):
    adapter, data = setup
    code, _, err = run_eval(
        capsys,
        "--adapter",
        str(adapter),
        "--shards",
        str(data / "digits_vqa/val"),
        "--task",
        "video_qa",
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "needs video input" in err


def test_references_from_shards_give_full_marks_to_the_truth(setup):
    from epalm.evaluation.references import load_shard_metas
    from epalm.evaluation.scoring import build_references, score

    _, data = setup
    manifest, metas = load_shard_metas(data / "digits_vqa/val")
    assert len(metas) == manifest["num_samples"] == 180
    truth = [{"question_id": m["question_id"], "answer": m["multiple_choice_answer"]} for m in metas]
    assert score("vqav2", truth, build_references("vqav2", metas))["overall"] == 100.0
    wrong = truth[:90] + [dict(r, answer="nope") for r in truth[90:]]
    assert score("vqav2", wrong, build_references("vqav2", metas))["overall"] == 50.0
    # soft labels only (VL-T5 style shards): label-score exact match instead of the official metric
    soft = build_references("vqav2", [{k: v for k, v in m.items() if k != "raw_answers"} for m in metas])
    assert list(soft) == ["references"] and score("vqav2", wrong, soft) == {
        "accuracy": 50.0,
        "num_questions": 180,
    }
    assert score("gqa", truth, build_references("gqa", metas))["accuracy"] == 100.0


def test_gather_rejects_repeated_and_missing_ids():
    from epalm.evaluation.predict import gather_predictions

    records = [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"}]
    assert gather_predictions(records, expected=2) == records
    with pytest.raises(ValueError, match="more than once"):
        gather_predictions(records + [{"question_id": 1, "answer": "c"}])
    with pytest.raises(ValueError, match="expected 3"):
        gather_predictions(records, expected=3)


def test_caption_references_refuse_repeated_media():
    from epalm.evaluation.scoring import build_references

    metas = [{"id": f"7_{j}", "image_id": 7, "modality": "image", "captions": ["a"]} for j in range(2)]
    with pytest.raises(ValueError, match="several samples"):
        build_references("caption", metas)
