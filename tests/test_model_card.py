"""`python -m epalm.cli.push`: the model card made from a real tiny training run (2 ranks) holds that run's
own numbers (best.json, metrics.jsonl; eval/scores.json when there is one) and parameter counts, in YAML that
huggingface_hub reads back; the upload goes through huggingface_hub's `HfApi` (recorded here, never the real
Hub) with the adapter's files and the card; bad input is one `error:` line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from epalm.cli.push import main
from tests.training_fixtures import ROOT, launch, read_jsonl, write_setup

pytestmark = pytest.mark.slow  # the module trains one tiny run (about 30 s on 2 CPU cores)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("card")
    config = write_setup(tmp)  # 6 steps, val loss and accuracy at steps 3 and 6
    r = launch("torchrun", config, "--ds_config", str(ROOT / "ds_configs" / "zero2.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _adapter_numbers(adapter: Path) -> tuple[int, int]:
    """(trainable, total) parameters counted here: the export's tensors, and the model on the meta device."""
    from safetensors.torch import load_file

    from epalm.model.epalm import build_model
    from epalm.run.adapter import load_adapter

    _, cfg = load_adapter(adapter)
    trainable = sum(t.numel() for t in load_file(adapter / "adapter.safetensors").values())
    return trainable, sum(p.numel() for p in build_model(cfg.model, device="meta").parameters())


def test_the_card_holds_the_runs_own_numbers(run, tmp_path, capsys):
    out = tmp_path / "upload"
    assert main([str(run / "adapter"), "--repo", "org/tiny-vqa", "--dry-run", str(out)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    assert _files(out) == sorted([*_files(run / "adapter"), "README.md"])
    assert "README.md" not in _files(run / "adapter")  # the export itself is left as it was

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "epalm" and card.data.pipeline_tag == "visual-question-answering"
    assert card.data.base_model is None  # random-weight LM and encoder: nothing on the Hub to name
    found = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    best = json.loads((run / "best.json").read_text())
    assert found[(best["metric"], f"{best['metric']} (best, step {best['step']})")] == best["value"]
    val_loss = [(r["step"], r["val/loss"]) for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    step, loss = val_loss[-1]
    assert step == 6 and found[("loss", f"loss (last, step {step})")] == loss
    assert all(
        r.task_type == "visual-question-answering" and r.dataset_split == "val"
        for r in card.data.eval_results
    )
    trainable, total = _adapter_numbers(run / "adapter")
    assert f"trainable parameters: {trainable:,} of {total:,}" in card.text
    assert (
        "--adapter org/tiny-vqa --image FILE --question" in card.text
        and "@article{shukor2023ep," in card.text
    )


def test_the_card_takes_the_final_test_scores(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "eval").mkdir()
    scores = {
        "task": "vqav2",
        "shards": "shards/vqav2/karpathy_test",
        "headline": {"test/vqa_accuracy": 61.25},
    }
    (copy / "eval" / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "upload"
    assert (
        main([str(copy / "best"), "--repo", "org/tiny-vqa", "--dry-run", str(out)]) == 0
    )  # run dir: best/'s parent
    (test,) = [r for r in ModelCard.load(out / "README.md").data.eval_results if r.dataset_split == "test"]
    assert (test.metric_type, test.metric_value, test.dataset_name) == (
        "vqa_accuracy",
        61.25,
        "vqav2/karpathy_test",
    )


def test_push_uploads_the_adapter_and_card_through_hfapi(run, monkeypatch, capsys):
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)  # a temporary folder: look at it now
        calls.append(
            (
                "upload_folder",
                repo_id,
                {**kw, "files": _files(folder), "card": (folder / "README.md").read_text()},
            )
        )
        return "https://huggingface.co/org/tiny-vqa/commit/0123abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    code = main(
        [
            str(run / "adapter"),
            "--repo",
            "org/tiny-vqa",
            "--private",
            "--revision",
            "dev",
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0 and "commit/0123abc" in capsys.readouterr().out
    (_, repo, created), (_, _, branch), (_, uploaded_to, upload) = calls
    assert repo == uploaded_to == "org/tiny-vqa" and created == {"private": True, "exist_ok": True}
    assert branch == {"branch": "dev", "exist_ok": True} and upload["revision"] == "dev"
    assert upload["files"] == sorted([*_files(run / "adapter"), "README.md"])
    assert upload["card"].startswith("---\nlibrary_name: epalm") and "model-index:" in upload["card"]


def test_push_failure_and_bad_input(run, tmp_path, monkeypatch, capsys):
    def refuse(self, *args, **kw):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main([str(run / "adapter"), "--repo", "org/tiny-vqa"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: upload to org/tiny-vqa failed: 401 Client Error: Unauthorized"
    )
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    bad = {
        ("--repo", "tiny-vqa"): "expected a Hub repo id org/name",
        ("--repo", "org/tiny@dev"): "expected a Hub repo id org/name",
        ("--repo", "org/tiny", "--run-dir", str(tmp_path / "none")): "no such directory",
        ("--repo", "org/tiny", "--dry-run", str(taken)): "exists and is not empty",
    }
    for args, message in bad.items():
        assert main([str(run / "adapter"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert main([str(tmp_path), "--repo", "org/tiny"]) == 2
    assert "not an adapter export directory" in capsys.readouterr().err
