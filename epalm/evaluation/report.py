"""A run directory's `report.md`: best/last/test metrics next to the paper's numbers where the setting
matches, and PNG plots of the training loss and the eval metric, all read from the run's own files
(`python -m epalm.cli.report RUN_DIR` writes it again for any run directory)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from epalm.evaluation.tasks import METRIC_ORDER
from epalm.run import layout

REFERENCE = "the eP-ALM paper (arXiv:2303.11403) and its README (github.com/mshukor/eP-ALM)"


@dataclass(frozen=True)
class PaperNumber:
    key: str  # the run's metric name (val/<key>, test/<key>)
    value: float  # percent; CIDEr x 100
    what: str  # dataset, split, model
    section: str  # where in REFERENCE the number is printed


# Keyed by config name (a shipped config's file stem, which is also its run_dir's name).
PAPER: dict[str, list[PaperNumber]] = {
    "vqa_v2_pt_L": [PaperNumber("vqa_accuracy", 54.78, "VQA v2 val, eP-ALM_pt-L", "Table 1")],
    "vqa_v2": [
        PaperNumber("vqa_accuracy", 52.77, "VQA v2 val, eP-ALM, 100% of the data", "README few-shot figure")
    ],
    "gqa_pt_L": [PaperNumber("accuracy", 42.91, "GQA test-dev, eP-ALM_pt-L", "Table 1")],
    "caption_coco_pt_L": [
        PaperNumber("cider", 111.63, "COCO CIDEr, eP-ALM_pt-L", "Table 1"),
        PaperNumber("bleu4", 33.35, "COCO B@4, eP-ALM_pt-L", "Table 1"),
    ],
    "caption_coco": [
        PaperNumber("cider", 97.0, "COCO CIDEr, fp32 OPT-2.7B/ViT-B (102 re-evaluated)", "README SoTA table")
    ],
    "msrvtt_qa": [PaperNumber("accuracy", 35.90, "MSRVTT-QA, eP-ALM_pt-L (OPT-6.7B)", "Table 1")],
    "msvd_qa": [PaperNumber("accuracy", 38.40, "MSVD-QA, eP-ALM_pt-L (OPT-6.7B)", "Table 1")],
    "msrvtt_caption": [
        PaperNumber("cider", 48.79, "MSR-VTT CIDEr, eP-ALM_pt-L (OPT-6.7B)", "Table 1"),
        PaperNumber("bleu4", 38.51, "MSR-VTT B@4, eP-ALM_pt-L (OPT-6.7B)", "Table 1"),
    ],
    "audiocaps": [
        PaperNumber(
            "cider", 61.86, "AudioCaps CIDEr, eP-ALM_pt-L (0.9% model: 63.61, README audio figure)", "Table 1"
        ),
        PaperNumber("bleu4", 20.81, "AudioCaps B@4, eP-ALM_pt-L", "Table 1"),
    ],
    "cc3m_pt_L": [
        PaperNumber(
            "cider", 42.47, "zero-shot COCO CIDEr after CC3M, no CLIP", "README CC3M zero-shot figure"
        ),
        PaperNumber("bleu4", 11.50, "zero-shot COCO B@4 after CC3M, no CLIP", "README CC3M zero-shot figure"),
        PaperNumber(
            "meteor", 15.44, "zero-shot COCO METEOR after CC3M, no CLIP", "README CC3M zero-shot figure"
        ),
    ],
}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill -9; the rest is still worth reporting
            continue
    return records


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; a resumed run logs some steps twice, and the later record wins."""
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r and "step" in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def eval_metrics(records: list[dict]) -> list[str]:
    """The generation metrics the log holds (val/<name>), primary first."""
    found = {k.split("/", 1)[1] for r in records for k in r if k.startswith("val/") and k != "val/loss"}
    return [m for m in METRIC_ORDER if m in found] + sorted(found - set(METRIC_ORDER))


def plot(path: Path, curves: dict[str, tuple[list[int], list[float]]], ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _results_table(
    metrics: list[str], records: list[dict], best: dict | None, test: dict, paper
) -> list[str]:
    rows = [
        "| metric | best val (step) | last val (step) | test | paper | paper setting |",
        "|---|---|---|---|---|---|",
    ]
    paper_by_key = {p.key: p for p in paper}
    for m in dict.fromkeys([*metrics, *test, *paper_by_key]):
        steps, values = series(records, f"val/{m}")
        best_cell = "–"
        if values:
            i = max(range(len(values)), key=lambda j: (values[j], -steps[j]))  # ties: the earlier step
            best_cell = f"{values[i]:.2f} ({steps[i]})"
            if best and best.get("metric") == m:
                best_cell += " → `best/`"
        last_cell = f"{values[-1]:.2f} ({steps[-1]})" if values else "–"
        p = paper_by_key.get(m)
        setting = f"{p.what} ({p.section})" if p else ""
        rows.append(
            f"| {m} | {best_cell} | {last_cell} | {_fmt(test.get(m))} | {_fmt(p and p.value)} | {setting} |"
        )
    return rows


def write_report(run_dir: str | Path, config_name: str | None = None) -> Path:
    """Write `run_dir/report.md` (+ loss.png, eval_metric.png) from the run's files; returns its path."""
    run = Path(run_dir)
    cfg = yaml.safe_load((run / layout.CONFIG).read_text()) if (run / layout.CONFIG).is_file() else {}
    name = config_name or Path(cfg.get("run_dir") or run).name
    records = read_jsonl(run / layout.METRICS)
    best, summary = _read_json(run / layout.BEST_RECORD), _read_json(run / layout.SUMMARY) or {}
    scores = _read_json(run / layout.EVAL / layout.SCORES) or {}
    test = {k.split("/", 1)[1]: v for k, v in (scores.get("headline") or {}).items()}
    metrics = eval_metrics(records)
    paper = PAPER.get(name, [])
    data, model = cfg.get("data", {}), cfg.get("model", {})
    lines = [
        f"# Run report: {name}",
        "",
        f"- run directory: `{run}`",
        f"- task: {data.get('task', '?')} / {data.get('modality', '?')}; LM `{model.get('lm', {}).get('name', '?')}`, "
        f"encoder `{model.get('encoder', {}).get('name', '?')}`",
        f"- steps: {summary.get('step', '?')} (ZeRO stage {summary.get('zero_stage', '?')}, "
        f"optimizer {summary.get('optimizer', '?')}); val: `{data.get('val')}`, test: `{data.get('test')}`",
    ]
    if best:
        lines.append(
            f"- best checkpoint: `best/` at step {best['step']}, {best['metric']} = {best['value']:.2f}"
        )
    if scores:
        lines.append(
            f"- test evaluation: {scores.get('task')} on `{scores.get('shards')}` "
            f"({scores.get('num_samples')} samples, beams {scores.get('num_beams')}) -> `eval/`"
        )
    lines += ["", "## Results", ""]
    if metrics or test or paper:
        lines += _results_table(metrics, records, best, test, paper)
        lines += [
            "",
            "Scale: percent; CIDEr, BLEU-4 and METEOR ×100 as papers print them. In-training numbers are on "
            "`data.val` (capped at `eval.max_samples` samples; decoding as `eval.*` says); "
            "the paper's are on the split its setting names.",
        ]
        if paper:
            lines.append(f"Paper numbers: {REFERENCE} {', '.join(sorted({p.section for p in paper}))}.")
        elif metrics:
            lines.append(f"No paper number for config `{name}` (known: {', '.join(sorted(PAPER))}).")
    else:
        lines.append(
            "No generation metric was logged (no `data.val` with ground truth, or no evaluation yet)."
        )
    lines += ["", "## Curves", ""]
    steps, loss = series(records, "loss")
    if steps:
        curves = {"train loss": (steps, loss)}
        val_steps, val_loss = series(records, "val/loss")
        if val_steps:
            curves["val loss"] = (val_steps, val_loss)
        plot(run / layout.LOSS_PNG, curves, "loss", f"{name}: loss")
        lines.append(f"![loss]({layout.LOSS_PNG})")
    if metrics:
        plot(
            run / layout.METRIC_PNG,
            {f"val/{metrics[0]}": series(records, f"val/{metrics[0]}")},
            metrics[0],
            f"{name}: {metrics[0]} on val",
        )
        lines.append(f"![{metrics[0]}]({layout.METRIC_PNG})")
    if not steps and not metrics:
        lines.append(f"No `{layout.METRICS}` records.")
    out = run / layout.REPORT
    out.write_text("\n".join(lines) + "\n")
    return out
