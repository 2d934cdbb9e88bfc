"""Non-finite steps on real engines (ZeRO-0 and ZeRO-3, 2 ranks, cached features with a NaN): the update is
skipped on every rank, metrics.jsonl stays valid JSON (null plus a count), no checkpoint or export holds a NaN,
and steps that are all NaN stop the run with exit 1 and a clear message. Plus the pieces alone: the metrics
writer, and `verify_checkpoint` refusing an adapter with a NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from epalm.config import load_config
from epalm.data import schema
from epalm.run import layout
from epalm.run.manifest import verify_checkpoint, write_manifest
from epalm.train.tracking import MetricWriter
from testing.shard_fixtures import npy_bytes, write_dataset
from tests.training_fixtures import ROOT, launch, write_setup

FEATURES = (2, 24)  # the tiny ViT's 2 injected states of width 24 (testing.support.TINY_VIT)


def _strict(line: str) -> dict:
    """json.loads that refuses NaN/Infinity (Python's accepts them; JSON does not)."""

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def _features_setup(tmp: Path, nan: set[int], **train) -> Path:
    """write_setup's run on cached features (32 samples), sample i's features all NaN for i in `nan`."""
    from epalm.train.setup import expected_fingerprint

    config = write_setup(tmp, eval_every=0, **train)
    tree = yaml.safe_load(config.read_text())
    tree["data"]["use_features"] = True
    del tree["data"]["val"]
    config.write_text(yaml.safe_dump(tree))
    fingerprint = expected_fingerprint(load_config(config))
    feats = {
        i: {schema.FEATURES: npy_bytes(np.full(FEATURES, np.nan if i in nan else 0.1 * i, dtype=np.float16))}
        for i in range(32)
    }
    write_dataset(tmp / "feats", [16, 16], fingerprint=fingerprint, extra=feats)
    tree["data"]["train"] = [{"path": str(tmp / "feats")}]
    config.write_text(yaml.safe_dump(tree))
    return config


def _finite_file(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero0.json", "zero3_small.json"])
def test_a_nan_sample_skips_its_step_and_nothing_non_finite_is_written(tmp_path, ds):
    ds_args = ("--precision", "fp32", "--ds_config", str(ROOT / "ds_configs" / ds))
    config = _features_setup(tmp_path / "one", {3}, max_steps=6, save_every=2, keep_last=0)
    r = launch("deepspeed", config, *ds_args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "one" / "run"
    rows = [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [row for row in rows if row["nonfinite_steps"]]
    assert len(skipped) == 1 and skipped[0]["loss"] is None and skipped[0]["nonfinite"] == ["loss"]
    assert all(math.isfinite(row["loss"]) for row in rows if row is not skipped[0])
    assert "non-finite loss on rank" in r.stderr and "feats/s00003" in r.stderr  # the sample is named
    exports = [run / "adapter", *sorted((run / "checkpoints").glob("step_*/adapter"))]
    assert len(exports) == 4  # the final export and steps 2, 4 and 6
    assert all(_finite_file(d / layout.ADAPTER_WEIGHTS) for d in exports)

    config = _features_setup(
        tmp_path / "all", set(range(32)), max_steps=6, save_every=2, max_nonfinite_steps=2
    )
    r = launch("deepspeed", config, *ds_args)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "steps 1..2: 2 optimizer steps in a row" in errors[0], r.stderr[-3000:]
    assert "train.max_nonfinite_steps=2" in errors[0] and "Traceback" not in r.stderr
    run = tmp_path / "all" / "run"
    assert not list(run.glob("checkpoints/step_*")) and not (run / "adapter").exists()
    assert [_strict(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [None]


def test_metric_rows_with_nan_are_json_with_a_flag(tmp_path):
    writer = MetricWriter(tmp_path, True, total_steps=2, start_step=0)
    writer.log(1, {"loss": float("nan"), "nonfinite_steps": 1.0, "tokens_per_s": 3.0}, {"lr/connector": 0.1})
    writer.log_eval(2, {"val/loss": float("inf")})
    writer.close()
    rows = [_strict(line) for line in (tmp_path / layout.METRICS).read_text().splitlines()]
    assert rows[0]["loss"] is None and rows[0]["nonfinite"] == ["loss"] and rows[0]["tokens_per_s"] == 3.0
    assert rows[1]["val/loss"] is None and rows[1]["nonfinite"] == ["val/loss"]


def test_verify_checkpoint_refuses_an_adapter_with_nan(tmp_path):
    step = tmp_path / "step_00000004"
    (step / layout.ADAPTER).mkdir(parents=True)
    (step / layout.TRAINER_STATE).write_text(json.dumps({"step": 4}))
    weights = {"connector.0.weight": torch.ones(2, 3), "prompt.embedding": torch.zeros(3)}
    save_file(weights, str(step / layout.ADAPTER / layout.ADAPTER_WEIGHTS))
    write_manifest(step)
    assert verify_checkpoint(step) == []
    weights["connector.0.weight"][1, 2] = float("nan")
    save_file(weights, str(step / layout.ADAPTER / layout.ADAPTER_WEIGHTS))
    write_manifest(step)  # a manifest that matches: only the values are wrong
    assert verify_checkpoint(step) == [
        f"{step / layout.ADAPTER / layout.ADAPTER_WEIGHTS}: non-finite values (NaN/inf) in connector.0.weight"
    ]
