"""Evaluation on 2 ranks (torchrun, gloo, CPU) with uneven batch counts: ZeRO-3 style lockstep generation
does not hang, every sample is predicted exactly once, and the predictions equal a single process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epalm.data.resumable import eval_batches_per_rank
from testing.length_fixtures import write_vqa_eval_shards
from tests.test_eval_run import make_adapter

NUM_SAMPLES, BATCH = 5, 2  # ranks get samples [0, 2) and [2, 5): 1 and 2 batches


def write_vqa_shards(root: Path, counts: list[int]) -> Path:
    """VQA v2 style samples (10 raw answers each), the same question so no batch needs padding."""
    return write_vqa_eval_shards(
        root,
        counts,
        question=lambda i: "what digit is this?",
        shade=lambda i: 40 * i,
        extra_meta=lambda answer: {
            "raw_answers": [answer] * 10,
            "multiple_choice_answer": answer,
            "question_type": "what",
            "answer_type": "number",
        },
    )


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore::FutureWarning",
        PYTHONPATH=str(cwd),
    )
    # a hang in the collectives (a rank skipping its dummy generate calls) fails here, not at pytest's limit
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_uneven_batches_predict_every_sample_once(tmp_path):
    assert eval_batches_per_rank(NUM_SAMPLES, 2, BATCH) == [1, 2]
    repo = Path(__file__).resolve().parents[1]
    adapter = make_adapter(tmp_path)
    shards = write_vqa_shards(tmp_path / "shards", [2, 3])
    common = [
        "-m",
        "eval.run",
        "--adapter",
        str(adapter),
        "--shards",
        str(shards),
        "--task",
        "vqav2",
        "--batch-size",
        str(BATCH),
        "--no-progress",
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = _run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            *common,
            "--synced-gpus",
            "--out",
            str(tmp_path / "two"),
        ],
        repo,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run([sys.executable, *common, "--out", str(tmp_path / "one")], repo)
    assert one.returncode == 0, one.stderr[-3000:]

    results = json.loads((tmp_path / "two/vqav2_val_results.json").read_text())
    assert [r["question_id"] for r in results] == [1000 + i for i in range(NUM_SAMPLES)]
    assert results == json.loads((tmp_path / "one/vqav2_val_results.json").read_text())
    summary = json.loads((tmp_path / "two/scores.json").read_text())
    assert summary["world_size"] == 2 and summary["num_samples"] == NUM_SAMPLES
    assert summary["scores"] == json.loads((tmp_path / "one/scores.json").read_text())["scores"]
    assert two.stdout.count('"scores"') == 1  # only rank 0 reports
