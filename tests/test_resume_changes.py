"""Config changes on resume are explicit: a lowered lr (and the rest of the schedule, and weight decay) takes
effect at the resumed step and the differences are logged; a changed global batch is refused with a message
naming --allow-inexact-resume, and applied with it. Plus the rules and the schedule rebuild alone."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from epalm.config import build_config
from epalm.run.resume_changes import FLAG, apply_schedule, compare
from epalm.train.optimizer import build_scheduler
from testing.support import tiny_tree
from tests.training_fixtures import ROOT, VENV_BIN, env, read_jsonl, write_setup

CONSTANT = dict(lr=1e-2, prompt_lr=1e-2, warmup_steps=0, warmup_lr=1e-2, min_lr=1e-2)  # lr(step) = lr


def _train(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "python"), "launch/train.py", "--config", str(config), "--precision", "fp32"]
    cmd += ["--ds_config", str(ROOT / "ds_configs" / "zero0.json"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def _optimizer_groups(step_dir: Path) -> list[dict]:
    """The optimizer's param groups as the ZeRO-0 checkpoint holds them."""
    saved = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
    return saved["param_groups"]


@pytest.mark.slow
def test_a_lowered_lr_takes_effect_at_the_resumed_step(tmp_path):
    config = write_setup(tmp_path, max_steps=4, save_every=2, eval_every=0, **CONSTANT)
    run = tmp_path / "run"
    assert _train(config).returncode == 0
    r = _train(config, "--resume", "auto", "train.lr=1e-3", "train.min_lr=1e-3", "train.max_steps=6",
               "train.weight_decay=0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["step"]: row for row in read_jsonl(run / "metrics.jsonl") if "loss" in row}
    assert [rows[s]["lr/connector"] for s in range(1, 7)] == [1e-2] * 4 + [1e-3] * 2
    assert [rows[s]["lr/prompt"] for s in range(1, 7)] == [1e-2] * 6  # prompt_lr did not change
    assert "train.lr: 0.01 -> 0.001 (applied: the lr schedule is rebuilt at the resumed step)" in r.stderr
    assert "train.max_steps: 4 -> 6" in r.stderr and "train.weight_decay: 0.02 -> 0.5" in r.stderr
    assert {g["weight_decay"] for g in _optimizer_groups(run / "checkpoints" / "step_00000006")} == {0.5}


@pytest.mark.slow
def test_a_changed_global_batch_is_refused_unless_the_flag_says_so(tmp_path):
    config = write_setup(tmp_path, max_steps=2, save_every=2, eval_every=0)
    run = tmp_path / "run"
    assert _train(config).returncode == 0
    metrics = (run / "metrics.jsonl").read_text()

    r = _train(config, "--resume", "auto", "train.global_batch_size=4", "train.max_steps=4")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert "train.global_batch_size: 8 -> 4" in r.stderr and FLAG in r.stderr
    assert (run / "metrics.jsonl").read_text() == metrics and not (run / "checkpoints/step_00000004").exists()

    r = _train(config, "--resume", "auto", "train.global_batch_size=4", "train.max_steps=4", FLAG)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.global_batch_size: 8 -> 4 (breaks the exact resume; applied under" in r.stderr
    steps = {row["step"]: row for row in read_jsonl(run / "metrics.jsonl") if "loss" in row}
    assert sorted(steps) == [1, 2, 3, 4] and steps[3]["micro_batches/image"] == 2  # 4 = 2 x 2: accumulation 2


def test_each_kind_of_change_has_its_rule():
    old = build_config(tiny_tree())
    new = dataclasses.replace(
        old,
        run_dir="elsewhere",  # the run directory itself is not compared
        train=dataclasses.replace(old.train, lr=1.0, seed=7),
        eval=dataclasses.replace(old.eval, num_beams=1),
        model=dataclasses.replace(old.model, lm_loss_weight=0.5),
    )
    changes = compare(dataclasses.asdict(old), new)
    assert set(changes.changed) == {"train.lr", "train.seed", "eval.num_beams", "model.lm_loss_weight"}
    assert sorted(changes.inexact) == ["model.lm_loss_weight", "train.seed"]
    assert changes.fresh_loader  # a new seed: the saved data order does not apply
    lr_only = dataclasses.replace(old, train=dataclasses.replace(old.train, lr=1.0))
    assert not compare(dataclasses.asdict(old), lr_only).fresh_loader  # the loader's position still fits


def test_new_paths_to_the_same_shards_are_no_change():
    """http -> pipe: (or a mirror): when the manifests' digests agree the resume stays exact; a weight change
    or other shards are still a data change."""
    tree = tiny_tree()
    tree["data"] = {"train": [{"path": "http://127.0.0.1:8000/a"}, {"path": "/data/b", "weight": 2.0}]}
    old = build_config(tree)
    moved = [
        dataclasses.replace(d, path=f"pipe:cat /mirror/{i}/{{name}}") for i, d in enumerate(old.data.train)
    ]
    new = dataclasses.replace(old, data=dataclasses.replace(old.data, train=moved))
    assert not compare(dataclasses.asdict(old), new, same_data=True).changed
    assert compare(dataclasses.asdict(old), new, same_data=False).inexact == ["data.train"]
    reweighted = [dataclasses.replace(d, weight=d.weight * 2) for d in moved]
    other = dataclasses.replace(old, data=dataclasses.replace(old.data, train=reweighted))
    assert compare(dataclasses.asdict(old), other, same_data=True).inexact == ["data.train"]


def test_apply_schedule_rebuilds_the_lr_at_the_restored_step():
    def engine(train):
        groups = [{"name": "connector", "params": [torch.nn.Parameter(torch.zeros(2))], "lr": train.lr},
                  {"name": "prompt", "params": [torch.nn.Parameter(torch.zeros(2))], "lr": train.prompt_lr}]  # fmt: skip
        opt = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
        return opt, build_scheduler(opt, train, total_steps=100)

    before = build_config({"train": {"lr": 1e-2, "prompt_lr": 5e-3, "warmup_steps": 10}}).train
    opt, sched = engine(before)
    for _ in range(30):
        opt.step()
        sched.step()
    saved = sched.state_dict()

    same_opt, same = engine(before)  # an unchanged config: the lrs come back bit for bit
    same.load_state_dict(saved)
    apply_schedule(same_opt, same, build_config({"train": dataclasses.asdict(before)}))
    assert same.get_last_lr() == sched.get_last_lr() == [g["lr"] for g in same_opt.param_groups]

    lower = dataclasses.replace(before, lr=1e-3, prompt_lr=5e-4, weight_decay=0.5)
    new_opt, new = engine(lower)
    new.load_state_dict(saved)
    assert new.get_last_lr() == sched.get_last_lr()  # what a plain restore keeps: the checkpoint's lr
    apply_schedule(new_opt, new, build_config({"train": dataclasses.asdict(lower)}))
    factor = new.lr_lambdas[0](30)  # the new schedule's factor at the restored step
    assert new.get_last_lr() == pytest.approx([1e-3 * factor, 5e-4 * factor])
    assert [g["lr"] for g in new_opt.param_groups] == new.get_last_lr()
    assert {g["weight_decay"] for g in new_opt.param_groups} == {0.5}
