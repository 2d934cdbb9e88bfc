"""Video (TimeSformer) and audio (AST) end to end: 2-rank ZeRO-3 training through launch/train.py under the
deepspeed launcher, the loss falls, eval.run writes official-format predictions and scores, and kill -9 +
`--resume auto` gives a bit-identical adapter. One run per modality pair (straight / killed + resumed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from testing.shard_fixtures import write_dataset
from tests.training_fixtures import ROOT, env, launch, read_jsonl, write_setup

DEMO_DS_CONFIG = "ds_configs/zero3_small.json"  # what `make demo` trains these modalities under
TINY_TIMESFORMER = dict(
    image_size=16, patch_size=8, num_frames=3, hidden_size=24, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=48,
)  # fmt: skip
TINY_AST = dict(
    patch_size=16, frequency_stride=32, time_stride=128, max_length=1024, num_mel_bins=128,
    hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
)  # fmt: skip
CASES = {
    # modality: (task, encoder kind, overrides, eval.run task)
    "video": ("qa", "timesformer", TINY_TIMESFORMER, "video_qa"),
    "audio": ("caption", "ast", TINY_AST, "audio_caption"),
}


def _setup(tmp: Path, modality: str) -> Path:
    """The image training setup of tests/training_fixtures.py, with this modality's shards and encoder."""
    task, kind, overrides, _ = CASES[modality]
    config = write_setup(tmp, max_steps=6)
    write_dataset(tmp / "train", [16, 16], task=task, modality=modality)
    write_dataset(tmp / "val", [8], task=task, modality=modality, prefix="v")
    tree = yaml.safe_load(config.read_text())
    tree["model"]["encoder"] = {
        "kind": kind,
        "name": kind,
        "pretrained": False,
        "num_states": 2,
        "config_overrides": overrides,
    }
    tree["data"].update(task=task, modality=modality, num_frames=3)
    tree["eval"] = {"num_beams": 1, "max_new_tokens": 4, "batch_size": 4}
    config.write_text(yaml.safe_dump(tree))
    return config


def _run(config: Path, *args: str, fault: str = "", expect: int | None = 0):
    r = launch("deepspeed", config, "--precision", "fp32", "--ds_config", str(ROOT / DEMO_DS_CONFIG),
               *args, fault=fault, timeout=420)  # fmt: skip
    if expect is not None:
        assert r.returncode == expect, (r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("modality", sorted(CASES))
def test_modality_trains_scores_and_resumes_exactly(tmp_path, modality):
    config = _setup(tmp_path, modality)
    _run(config)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and len(set(summary["adapter_digests"])) == 1
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and sum(losses[:2]) > sum(losses[-2:]), losses

    eval_task = CASES[modality][3]
    out = tmp_path / "eval"
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "eval.run", "--adapter", str(run / "adapter"),
           "--shards", str(tmp_path / "val"), "--task", eval_task, "--no-progress", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    predictions = json.loads((out / scores["results"]).read_text())
    assert len(predictions) == 8 and scores["modality"] == modality
    if modality == "video":  # MSRVTT-QA results: one answer per question id, accuracy scored
        assert all(set(p) == {"question_id", "answer"} for p in predictions)
        assert 0.0 <= scores["scores"]["accuracy"] <= 100.0
    else:  # COCO caption results, scored by pycocoevalcap
        assert all(set(p) == {"image_id", "caption"} for p in predictions)
        assert "CIDEr" in scores["scores"] and "Bleu_4" in scores["scores"]

    shutil.move(run, tmp_path / "straight")
    r = _run(config, fault="kill_after_step:4", expect=None)
    assert r.returncode != 0
    assert (run / "checkpoints/latest").read_text() == "step_00000003"
    _run(config, "--resume", "auto")
    adapter = "adapter/adapter.safetensors"
    assert (run / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()


@pytest.mark.slow
@pytest.mark.distributed
def test_image_and_video_datasets_mix_in_one_video_run(tmp_path):
    """A `data.train` list of a video and an image dataset (modality: image, read as still clips) under
    ZeRO-3 on 2 ranks: each micro-batch is one modality on every rank (the trainer checks it per step;
    a mismatch would hang ZeRO-3 or raise), both modalities train, and the run ends."""
    config = _setup(tmp_path, "video")
    write_dataset(tmp_path / "images", [16, 16], task="qa", modality="image", prefix="i")
    tree = yaml.safe_load(config.read_text())
    tree["data"]["train"] = [
        {"path": str(tmp_path / "train")},
        {"path": str(tmp_path / "images"), "modality": "image"},
    ]
    config.write_text(yaml.safe_dump(tree))
    _run(config)
    records = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert len(records) == 6
    per_modality = {m: sum(r.get(f"micro_batches/{m}", 0) for r in records) for m in ("image", "video")}
    # 6 steps x 2 micro-batches of accumulation, drawn from the two datasets by weight
    assert sum(per_modality.values()) == 12 and min(per_modality.values()) > 0, per_modality
