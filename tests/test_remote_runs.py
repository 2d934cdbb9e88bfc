"""End to end from remote shards: eval.run over HTTP and `pipe:` scores as from local disk; 2-rank ZeRO-3 training
from http:// (a 500 twice on the way, a garbage jpg skipped), killed with kill -9 and resumed from `pipe:cat`,
ends with the adapter of an uninterrupted run from local paths."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from epalm.data import schema
from tests.remote_fixtures import replace_member, serve
from tests.test_eval_run import build_digit_shards, make_adapter, run_eval
from tests.test_training import DS, _run, _same_adapter
from tests.training_fixtures import read_jsonl, write_setup


def _scores(capsys, adapter, shards, out) -> tuple[dict, list]:
    argv = ["--adapter", str(adapter), "--shards", shards, "--task", "vqav2", "--out", str(out)]
    code, printed, _ = run_eval(capsys, *argv, "--batch-size", "64")
    assert code == 0, printed
    results = json.loads((out / "vqav2_val_results.json").read_text())
    return json.loads((out / "scores.json").read_text())["scores"], sorted(
        results, key=lambda r: r["question_id"]
    )


def test_eval_run_over_http_and_pipe_scores_as_local(tmp_path, capsys):
    adapter = make_adapter(tmp_path)
    data = build_digit_shards(tmp_path / "data", {"digits_vqa": "val"})
    local = _scores(capsys, adapter, str(data / "digits_vqa/val"), tmp_path / "local")
    with serve(data) as server:
        http = _scores(capsys, adapter, f"{server.url}/digits_vqa/val", tmp_path / "http")
    pipe = _scores(capsys, adapter, f"pipe:cat {data}/digits_vqa/val/{{name}}", tmp_path / "pipe")
    assert local == http == pipe
    assert len(local[1]) == 180


def _with_data(config, path: str, out_name: str):
    tree = yaml.safe_load(config.read_text())
    tree["data"]["train"] = [{"path": path}]
    tree["data"]["max_skip_fraction"] = 0.1  # a rank's 16 samples hold the one bad jpg
    out = config.with_name(out_name)
    out.write_text(yaml.safe_dump(tree))
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_http_kill9_resume_from_pipe_equals_local_run(tmp_path):
    config = write_setup(tmp_path)
    train = tmp_path / "train"
    replace_member(train / schema.shard_name("train", 0), "s00005.jpg", b"not a JPEG at all")
    ds = ["--ds_config", str(DS / "zero3.json")]
    _run("torchrun", _with_data(config, str(train), "local.yaml"), *ds)
    shutil.move(tmp_path / "run", tmp_path / "straight")
    records = read_jsonl(tmp_path / "straight/metrics.jsonl")
    assert any(r.get("data/skipped/corrupt_media", 0) >= 1 for r in records)  # counted in the metrics log

    with serve(tmp_path) as server:
        server.fail["train/train-000001.tar"] = 2  # retried, and training goes on
        r = _run(
            "torchrun",
            _with_data(config, f"{server.url}/train", "http.yaml"),
            *ds,
            fault="kill_after_step:4",
            expect=None,
        )
        assert r.returncode != 0
        assert server.requests["train/train-000001.tar"] >= 3
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000003"
    _run("torchrun", _with_data(config, f"pipe:cat {train}/{{name}}", "pipe.yaml"), *ds, "--resume", "auto")
    assert _same_adapter(tmp_path / "run", tmp_path / "straight")
