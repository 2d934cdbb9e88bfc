"""Damaged checkpoints: a truncated optimizer file or trainer_state.json, `latest` naming a deleted step, an
explicit resume from an older step, a full disk during a save; and the adapter export (umask, paths) and
metrics.jsonl after a resume. The training state is written by `save_training_state` around a stand-in
for the DeepSpeed engine that writes and reads its files as DeepSpeed does (torch.save / torch.load)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from epalm.config import ConfigError, build_config, load_config
from epalm.distributed import DistInfo
from epalm.run.checkpoint import load_training_state, save_training_state
from epalm.train.ds_config import load_ds_config
from testing.support import tiny_tree
from tests.training_fixtures import ROOT, write_setup

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """Writes and reads a step's files the way DeepSpeed's engine does."""

    def __init__(self, size: int = 64):
        self.size = size

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(4)}}, d / "mp_rank_00_model_states.pt")
        torch.save({"exp_avg": torch.arange(self.size, dtype=torch.float32)}, d / OPTIM)

    def load_checkpoint(self, load_dir, tag, **kw):
        d = Path(load_dir) / tag
        for name in ("mp_rank_00_model_states.pt", OPTIM):
            torch.load(d / name, weights_only=True)
        return str(d), {}


def _save(root: Path, step: int, engine=None) -> Path:
    return save_training_state(
        engine or FakeEngine(), root, step, {"loader": {}}, rank=0, barrier=lambda: None, keep_last=0
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_setup(tmp_path_factory.mktemp("setup"))


def _resume(config: Path, run_dir: Path, resume: str):
    from epalm.train.setup import build_train_setup

    cfg = load_config(config, [f"run_dir={run_dir}"])
    ds = load_ds_config(ROOT / "ds_configs" / "zero2.json")
    return build_train_setup(cfg, ds, DistInfo(0, 0, 2, "env"), resume, "fp32").resume_from


def test_auto_resume_falls_back_past_truncated_files_and_logs_why(setup, tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    for step in (3, 6, 9):
        _save(root, step)
    _truncate(root / "step_00000009" / OPTIM)
    _truncate(root / "step_00000006" / "trainer_state.json")
    with caplog.at_level(logging.WARNING):
        chosen = _resume(setup, tmp_path / "run", "auto")
    assert chosen == root / "step_00000003"
    log = caplog.text
    assert f"step_00000009/{OPTIM}" in log and "step_00000006/trainer_state.json" in log
    # the chosen step is the head now; the bad ones are kept aside, out of the line
    assert (root / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in (root / "set_aside").iterdir()) == ["step_00000006", "step_00000009"]
    _save(root, 6)  # the next save takes the place of the bad one
    assert (root / "latest").read_text() == "step_00000006"


def test_latest_naming_a_deleted_step_falls_back(setup, tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 3)
    _save(root, 6)
    shutil.rmtree(root / "step_00000006")
    with caplog.at_level(logging.WARNING):
        assert _resume(setup, tmp_path / "run", "auto") == root / "step_00000003"
    assert "names 'step_00000006', which does not exist" in caplog.text


def test_explicit_resume_from_previous_step_then_save(setup, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 3)
    _save(root, 6)
    _truncate(root / "step_00000006" / OPTIM)
    with pytest.raises(ConfigError, match=f"step_00000006/{OPTIM}: .* bytes, the manifest records"):
        _resume(setup, tmp_path / "run", str(root / "step_00000006"))
    assert _resume(setup, tmp_path / "run", "3") == root / "step_00000003"  # a step number works too
    _save(root, 6)  # used to be FileExistsError: `latest` still named the bad step
    assert (root / "latest").read_text() == "step_00000006"
    assert load_training_state(FakeEngine(), root / "step_00000006", rank=0)["step"] == 6


def test_nothing_usable_is_one_clear_error(setup, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 3)
    (root / "step_00000003" / "trainer_state.json").write_text('{"step": 3, "loa')
    with pytest.raises(ConfigError, match="no usable checkpoint") as e:
        _resume(setup, tmp_path / "run", "auto")
    assert "step_00000003/trainer_state.json" in str(e.value)


def test_loading_a_damaged_checkpoint_names_it(tmp_path):
    """Without verification (a checkpoint that went bad after it was chosen): no bare JSONDecodeError."""
    step = _save(tmp_path, 3)
    (step / "trainer_state.json").write_text('{"step": 3, "lo')
    with pytest.raises(RuntimeError, match=r"step_00000003/trainer_state.json: unreadable or truncated"):
        load_training_state(FakeEngine(), step, rank=0)


# --------------------------------------------------------------------------- a full disk


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def test_full_disk_during_a_save_names_the_path(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        _save(disk, 3)
        with pytest.raises(OSError, match="no space left on device") as e:
            _save(disk, 6, FakeEngine(size=1 << 20))  # a 4 MiB optimizer file on a 1 MiB disk
        assert str(disk / ".tmp-step_00000006") in str(e.value)
        assert (disk / "latest").read_text() == "step_00000003"  # the previous checkpoint is intact
    finally:
        subprocess.run(
            ["umount", "-l", str(disk)], check=False
        )  # lazy: an open handle must not leave it mounted


def test_full_disk_message_without_errno(tmp_path, monkeypatch):
    """torch's writer reports a full disk as `basic_ios::clear: iostream error`, with no errno."""

    class Full(FakeEngine):
        def save_checkpoint(self, *a, **kw):
            raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(OSError, match=r"\.tmp-step_00000003 failed: no space left on device"):
        _save(tmp_path, 3, Full())


# --------------------------------------------------------------------------- the adapter export and metrics


def test_adapter_export_respects_the_umask(tmp_path):
    from epalm.run.adapter import save_adapter

    cfg = build_config(tiny_tree())
    old = os.umask(0o022)
    try:
        out = save_adapter({"w": torch.zeros(2)}, cfg, tmp_path / "adapter")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o644)}


def test_adapter_export_works_from_another_directory(tmp_path, monkeypatch, tiny_model):
    from epalm.data.tokenizer_trainer import save_tokenizer
    from epalm.evaluation.predict import load_eval_model
    from epalm.run.adapter import save_adapter

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    save_tokenizer(["what digit is this? seven"] * 20, work / "tok", vocab_size=300)
    tree = tiny_tree()
    tree["model"]["lm"]["tokenizer"] = "tok"  # relative to where training ran
    cfg = build_config(tree)
    out = save_adapter(tiny_model.adapter_state_dict(), cfg, "exports/adapter")
    monkeypatch.chdir(tmp_path)
    _, tokenizer, loaded = load_eval_model(work / out, [], "cpu")
    # the tokenizer travels inside the export (portable exports), named relative to it
    assert loaded.model.lm.tokenizer == str(work / out / "frozen" / "tokenizer") and tokenizer is not None
    assert (work / out / "frozen" / "tokenizer" / "vocab.json").read_bytes() == (
        work / "tok" / "vocab.json"
    ).read_bytes()


def test_metrics_after_resume_do_not_repeat_steps(tmp_path):
    from epalm.run.layout import METRICS as METRICS_FILE
    from epalm.train.tracking import MetricWriter

    rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 7)]
    (tmp_path / METRICS_FILE).write_text("\n".join(rows) + '\n{"step": 7, "lo')  # killed mid-line
    writer = MetricWriter(tmp_path, True, total_steps=10, start_step=3)  # resumed from step 3
    writer.log(4, {"loss": 0.5}, {"lr/connector": 1e-3})
    writer.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
