"""The GPU check's scripts: run.sh --dry-run drives check_train.py through the deepspeed launcher on CPU with a
tiny model through the same code path as on the GPU (every measurement attempted); prepare.sh's wheel set;
check_generation.py --dry-run on its own (every decoding path, the same tokens)."""

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


def test_gpu_generation_check_dry_run(tmp_path, capsys):
    from tests.gpu import check_generation

    argv = ["--dry-run", "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path)]
    assert check_generation.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT generation-")]
    result = json.loads((tmp_path / "gpu_generation.json").read_text())
    assert result["same_tokens"] is True
    rows = {(r["decoding"], r["path"]): r for r in result["results"]}
    paths = {"default", "static", "compiled", "hf"}
    assert set(rows) == {(d, p) for d in ("greedy", "beam3") for p in paths}
    assert len(lines) == len(rows)
    for row in rows.values():
        assert row["new_tokens_per_s"] == pytest.approx(2 * 4 / row["seconds"])
        assert row["of_roofline"] == pytest.approx(row["new_tokens_per_s"] / row["roofline_tokens_per_s"])
    assert any(line.startswith("RESULT generation-beam3-compiled: batch 2") for line in lines)
