"""report.md from a synthetic run directory: best/last/test metrics next to the paper's numbers, valid PNG
plots, a resumed run's repeated steps, and the `python -m epalm.cli.report` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from epalm.cli.report import main
from epalm.evaluation.report import PAPER, series, write_report

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(run: Path, name: str, task: str, metric: str, values: dict[int, float]) -> Path:
    run.mkdir(parents=True)
    cfg = {"data": {"task": task, "modality": "image", "val": "shards/x/val"}, "run_dir": f"runs/{name}"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"step": s, "loss": 5.0 / s, "lr/connector": 1e-4} for s in range(1, 11)]
    lines += [{"step": s, f"val/{metric}": v, "val/loss": 4.0 / s} for s, v in values.items()]
    # a resumed run logs steps 9 and 10 again; the later record wins
    lines += [{"step": 9, "loss": 0.7}, {"step": 10, "loss": 0.6}]
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 11, "lo'  # a line cut by kill -9
    (run / "metrics.jsonl").write_text(text)
    best_step = max(values, key=values.get)
    best = {"metric": metric, "value": values[best_step], "step": best_step, "adapter": "best"}
    (run / "best.json").write_text(json.dumps(best))
    (run / "summary.json").write_text(json.dumps({"step": 10, "zero_stage": 3, "optimizer": "torch"}))
    return run


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG" and im.size[0] > 100


def test_report_for_vqa_pt_l_shows_the_paper_number_and_plots(tmp_path):
    run = _fake_run(tmp_path / "run", "vqa_v2_pt_L", "qa", "vqa_accuracy", {5: 41.5, 10: 40.25})
    out = write_report(run)
    text = out.read_text()
    assert out == run / "report.md" and text.startswith("# Run report: vqa_v2_pt_L")
    row = next(line for line in text.splitlines() if line.startswith("| vqa_accuracy |"))
    assert "41.50 (5) → `best/`" in row and "40.25 (10)" in row and "54.78" in row and "(Table 1)" in row
    assert "best checkpoint: `best/` at step 5" in text
    assert "![loss](loss.png)" in text and "![vqa_accuracy](eval_metric.png)" in text
    assert _is_png(run / "loss.png") and _is_png(run / "eval_metric.png")
    assert series([{"step": 2, "loss": 1.0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 0.5}], "loss") == (
        [1, 2],
        [3.0, 0.5],
    )


def test_report_for_cc3m_reads_the_zero_shot_test_scores(tmp_path):
    run = _fake_run(tmp_path / "run", "cc3m_pt_L", "caption", "cider", {5: 20.0, 10: 25.0})
    (run / "eval").mkdir()
    headline = {"test/cider": 30.5, "test/bleu4": 8.25, "test/meteor": 12.0}
    scores = {"task": "caption", "shards": "shards/coco/test", "num_samples": 5000, "num_beams": 3}
    (run / "eval" / "scores.json").write_text(json.dumps({**scores, "headline": headline}))
    text = write_report(run).read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert (
        "30.50" in rows["cider"]
        and "42.47" in rows["cider"]
        and "(README CC3M zero-shot figure)" in rows["cider"]
    )
    assert "8.25" in rows["bleu4"] and "11.50" in rows["bleu4"]
    assert "12.00" in rows["meteor"] and "15.44" in rows["meteor"]
    assert "test evaluation: caption on `shards/coco/test`" in text


def test_report_without_paper_number_or_metric(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    text = write_report(run, config_name="digits_vqa").read_text()
    assert "No generation metric was logged" in text and _is_png(run / "loss.png")
    assert not (run / "eval_metric.png").exists()
    assert main([str(tmp_path / "missing")]) == 2


def test_paper_table_matches_the_shipped_configs():
    shipped = {p.stem for p in (ROOT / "launch" / "configs").glob("*/*.yaml")}
    assert set(PAPER) <= shipped
    for name in PAPER:
        cfg = yaml.safe_load(next((ROOT / "launch" / "configs").glob(f"*/{name}.yaml")).read_text())
        assert Path(cfg["run_dir"]).name == name  # the report finds the table entry through run_dir


def test_command_line_rewrites_the_report(tmp_path):
    run = _fake_run(tmp_path / "run", "msvd_qa", "qa", "accuracy", {10: 30.0})
    r = subprocess.run(
        [sys.executable, "-m", "epalm.cli.report", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(run / "report.md") and "38.40" in (run / "report.md").read_text()
