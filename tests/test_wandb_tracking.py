"""W&B tracking that survives a kill -9 and a requeue, in W&B's offline mode (no network).

The sink alone: a second attempt of the same run id sends only steps past the first one's, a step's train
and eval records make one row, a late record goes to the summary, another run id starts from scratch. End to
end: a 2-rank run killed inside step 6's checkpoint (so `--resume auto` restarts from step 3 and redoes 4..6)
and resumed to step 8: one run id in every checkpoint and every offline run directory, each step logged once,
with the values metrics.jsonl holds.

wandb 0.31 has no Python reader of its `.wandb` files any more (`wandb.sdk.internal.datastore` is gone), so
`read_history` reads the format itself: a LevelDB-style log (a 7-byte header ':W&B' 0xBEE1 version 0, 32 KiB
blocks of records with a CRC32 seeded by the record type, FULL/FIRST/MIDDLE/LAST fragments), each record
checked against its CRC and parsed with wandb's own protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from tests.training_fixtures import ROOT, launch, read_jsonl, write_setup

pytest.importorskip("wandb")

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """wandb's `Record` protobufs from one `.wandb` transaction log, every fragment's CRC checked."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:HEADER] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path}: not a W&B log"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            offset += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0 and length == 0:  # zero padding: the end of what was written
            break
        chunk = data[offset + HEADER : offset + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at byte {offset}"
        offset += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_history(wandb_dir: Path) -> tuple[dict[str, list[tuple[int, dict]]], dict]:
    """({run id: [(step, row)]}, last summary) of every offline run directory under `wandb_dir`."""
    runs: dict[str, list[tuple[int, dict]]] = {}
    summary: dict = {}
    for log in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        rows = None
        for record in read_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                rows = runs.setdefault(record.run.run_id, [])
            elif kind == "history":
                row = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                rows.append((record.history.step.num, row))
            elif kind == "summary":
                summary.update(
                    {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update}
                )
    return runs, summary


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, writing its files promptly, with its config and cache dirs in tmp (never in $HOME).

    An in-process `wandb.init` puts its service's address in WANDB_SERVICE, which child processes would
    inherit and share: a killed rank's run id then stays "in use" in that service. Each test starts without
    it and leaves without it, so every training process starts its own service, as a real job does."""
    monkeypatch.setenv("WANDB_SERVICE", "")
    monkeypatch.delenv("WANDB_SERVICE")  # recorded as absent: removed again at teardown
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.01",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(name, value)


def _attempt(run_dir: Path, run_id: str, steps: range, eval_at: tuple[int, ...] = ()) -> None:
    from epalm.train.tracking import MetricWriter, WandbSink

    sink = WandbSink(run_dir, run_id, "epalm-test", {"attempt": steps.start})
    writer = MetricWriter(run_dir, True, total_steps=10, start_step=steps.start - 1, wandb=sink)
    for step in steps:
        writer.log(step, {"loss": 1.0 / step}, {"lr/connector": 1e-3})
        if step in eval_at:
            writer.log_eval(step, {"val/loss": 2.0 / step})
        writer.flush()
    writer.log_eval(steps.stop - 1, {"test/cider": 42.0})  # after the loop, as the final test evaluation
    writer.close()


def test_a_second_attempt_sends_only_later_steps(tmp_path, offline):
    run = tmp_path / "run"
    run.mkdir()
    _attempt(run, "run-a", range(1, 6), eval_at=(3,))
    _attempt(run, "run-a", range(3, 9), eval_at=(6,))  # resumed from a step-2 checkpoint: 3..5 again
    runs, summary = read_history(run / "wandb")
    assert list(runs) == ["run-a"]
    assert sorted(step for step, _ in runs["run-a"]) == list(range(1, 9))  # each step once
    by_step = dict(runs["run-a"])
    assert by_step[3]["val/loss"] == pytest.approx(2 / 3) and by_step[3]["train/loss"] == pytest.approx(1 / 3)
    assert by_step[6]["val/loss"] == pytest.approx(2 / 6) and "val/loss" not in by_step[5]
    assert summary["test/cider"] == 42.0 and not any("test/cider" in r for r in by_step.values())
    assert json.loads((run / "tracker.json").read_text()) == {"run_id": "run-a", "step": 8}
    # another run in the same directory is a new W&B run and starts from its first step
    _attempt(run, "run-b", range(1, 3))
    runs, _ = read_history(run / "wandb")
    assert sorted(runs) == ["run-a", "run-b"] and [step for step, _ in runs["run-b"]] == [1, 2]


@pytest.mark.slow
def test_kill_9_then_resume_auto_logs_each_step_once(tmp_path, offline):
    config = write_setup(tmp_path, max_steps=8, save_every=3, eval_every=3, keep_last=3, tracker="wandb")
    ds = ["--ds_config", str(ROOT / "ds_configs" / "zero2.json")]
    killed = launch("torchrun", config, *ds, fault="kill_in_save:6")
    assert killed.returncode != 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"  # step 6's save never finished
    assert json.loads((run / "tracker.json").read_text())["step"] == 6  # ... but steps 4..6 reached W&B
    resumed = launch("torchrun", config, *ds, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    states = [json.loads(p.read_text()) for p in sorted(run.glob("checkpoints/step_*/trainer_state.json"))]
    (run_id,) = {s["run_id"] for s in states}
    assert [s["step"] for s in states] == [3, 6, 8]
    runs, _ = read_history(run / "wandb")
    assert list(runs) == [run_id] and len(list((run / "wandb").glob("offline-run-*"))) == 2
    rows = runs[run_id]
    assert sorted(step for step, _ in rows) == list(range(1, 9))  # 4..6 from the killed attempt, not again
    # exact resume: the killed attempt's rows hold the numbers the resumed run wrote to metrics.jsonl
    jsonl = {}
    for record in read_jsonl(run / "metrics.jsonl"):
        jsonl.setdefault(record["step"], {}).update(record)
    assert sorted(jsonl) == list(range(1, 9))
    for step, row in rows:
        assert row["train/loss"] == jsonl[step]["loss"], step
        assert row.get("val/loss") == jsonl[step].get("val/loss"), step
