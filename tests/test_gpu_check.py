"""The GPU check's scripts: run.sh --dry-run drives check_train.py through the deepspeed launcher on CPU with a
tiny model through the same code path as on the GPU (every measurement attempted); prepare.sh's wheel set."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.training_fixtures import ROOT, env


def test_gpu_scripts_parse_and_wheels_dir_is_ignored():
    for script in ("run.sh", "prepare.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "tests" / "gpu" / script)]).returncode == 0
    # wheels are built into .whl/ and never committed
    assert subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT).returncode == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_check_dry_run_on_cpu(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "tests" / "gpu" / "run.sh"), "--dry-run"],
        cwd=ROOT, env=env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], (tmp_path / "gpu_train.log").read_text()[-3000:])
    doc = json.loads((tmp_path / "gpu_train.json").read_text())
    assert doc["dry_run"] is True
    by_name = {m["name"]: m for m in doc["measurements"]}
    # one summary line per measurement
    assert sum(
        line.startswith("RESULT zero") or line.startswith("RESULT fp16") for line in r.stdout.splitlines()
    ) == len(by_name)
    for name in ("zero0-mb16", "zero0-mb64", "zero2-mb16", "zero2-mb64", "zero3-mb16", "zero3-mb64"):
        m = by_name[name]
        assert "error" not in m, (name, m.get("traceback"))
        assert m["samples_per_s"] > 0 and 0 < m["mfu"] < 1 and len(m["losses"]) == m["steps"] >= 2
        assert m["planned_last_line"].startswith("frozen_bytes_per_gpu=")
    assert by_name["zero3-mb64"]["micro_batch"] > by_name["zero3-mb16"]["micro_batch"]
    assert "skipped" in by_name["fp16-zero2-mb16-one-step"]  # fp16 needs CUDA; the product refuses it on CPU
    assert json.loads((tmp_path / "gpu_check.json").read_text())["gpu_train"] == doc
