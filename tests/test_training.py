"""Training with DeepSpeed: config injection, schedule, launcher env, bad configs, and 2-rank CPU runs
(ZeRO 0/2/3) with exact resume after kill -9, a crash inside a checkpoint write, and SIGTERM."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from epalm.config import ConfigError, build_config, load_config
from epalm.distributed import DistInfo, get_dist_info, slurm_env_exports
from epalm.train.ds_config import OWNED_KEYS, build_ds_config, load_ds_config
from epalm.train.optimizer import choose_optimizer, lr_factor
from tests.training_fixtures import ROOT, launch, read_jsonl, write_setup

DS = ROOT / "ds_configs"


# --------------------------------------------------------------------------- pure functions


def test_dist_info_from_each_launcher():
    assert get_dist_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == DistInfo(3, 1, 4, "env")
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8"}
    assert get_dist_info(ompi) == DistInfo(2, 0, 8, "mpi")
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert get_dist_info(slurm) == DistInfo(5, 1, 8, "slurm")
    assert slurm_env_exports(slurm) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert slurm_env_exports({**slurm, "RANK": "5"}) == {}  # torchrun inside srun: its values win
    assert get_dist_info({}) == DistInfo(0, 0, 1, "single")


def test_ds_config_injection_and_shipped_configs():
    train = build_config({"train": {"global_batch_size": 64, "micro_batch_size": 4}}).train
    for name in ("zero0", "zero2", "zero3", "zero3_offload", "zero3_small"):
        base = load_ds_config(DS / f"{name}.json")
        assert not set(base) & set(OWNED_KEYS), name
        zero = base["zero_optimization"]
        assert isinstance(zero.get("stage3_prefetch_bucket_size", 0), int)
        cfg = build_ds_config(base, train, world_size=2, precision="fp32")
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]) == (64, 4)
        assert cfg["gradient_accumulation_steps"] == 8 and not cfg["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="not divisible"):
        build_ds_config(base, train, world_size=3)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        build_ds_config({**base, "train_batch_size": 64}, train, world_size=2)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        build_ds_config(base, train, world_size=2, precision="fp16", cuda=False)


def test_zero3_small_is_zero3_without_persistent_parameters():
    """The demo's config differs from the default in the one knob docs/training.md explains."""
    small, default = (load_ds_config(DS / f"{name}.json") for name in ("zero3_small", "zero3"))
    assert small["zero_optimization"].pop("stage3_param_persistence_threshold") == 0
    assert default["zero_optimization"].pop("stage3_param_persistence_threshold") > 0
    assert small == default


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=2e-4, warmup_lr=1e-4, min_lr=1e-5, warmup_steps=4, total_steps=104)
    lrs = [2e-4 * lr_factor(s, **kw) for s in range(105)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(1.5e-4)
    assert lrs[4] == pytest.approx(2e-4) and lrs[54] == pytest.approx((2e-4 + 1e-5) / 2)
    assert lrs[104] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert math.isfinite(lr_factor(200, **kw))


def test_optimizer_choice():
    assert choose_optimizer("auto", cuda=False) == "torch"
    assert choose_optimizer("deepspeed", cuda=False) == "deepspeed"
    with pytest.raises(ConfigError, match="apex"):
        choose_optimizer("apex", cuda=False)


# --------------------------------------------------------------------------- bad configs fail before training


def _prepare(config: Path, overrides=(), world_size=2, ds="zero3.json"):
    from epalm.train.setup import build_train_setup

    cfg = load_config(config, list(overrides))
    return build_train_setup(cfg, load_ds_config(DS / ds), DistInfo(0, 0, world_size, "env"), None, "fp32")


def test_bad_configs_fail_before_training(tmp_path):
    from testing.shard_fixtures import write_dataset

    config = write_setup(tmp_path)
    prep = _prepare(config)
    assert prep.total_steps == 6 and prep.ds_config["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="not divisible"):
        _prepare(config, world_size=3)
    with pytest.raises(ConfigError, match="optimizer"):
        _prepare(config, ["train.optimizer=adamw"])
    with pytest.raises(ConfigError, match="manifest.json"):
        _prepare(config, [f"data.train=[{{path: {tmp_path / 'missing'}}}]"])
    feats = write_dataset(tmp_path / "feats", [8], features=(2, 24), fingerprint={"encoder": "vit:other"})
    with pytest.raises(ConfigError, match="fingerprint mismatch"):
        _prepare(config, [f"data.train=[{{path: {feats}}}]", "data.use_features=true"])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launch_reports_config_error_with_exit_code_2(tmp_path):
    import subprocess

    from tests.training_fixtures import env

    config = write_setup(tmp_path)
    cmd = [
        str(ROOT / ".venv/bin/python"),
        "launch/train.py",
        "--config",
        str(config),
        "train.micro_batch_size=3",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error:" in r.stderr and "micro_batch_size" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- 2-rank runs


def _expected_frozen_digest(config: Path) -> str:
    """The frozen weights a fresh build gives (what every rank must still hold after training)."""
    from epalm.model.epalm import build_model
    from epalm.train.engine import full_frozen_digest

    cfg = load_config(config)
    torch.manual_seed(cfg.train.seed)
    return full_frozen_digest(build_model(cfg.model))


def _check_run(run_dir: Path, frozen: str, steps: int) -> list[float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == steps and not summary["stopped_by_signal"]
    assert summary["frozen_full_digests"] == [frozen, frozen]  # identical on every rank, and unchanged
    assert len(set(summary["adapter_digests"])) == 1  # the adapter is the same on both ranks
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert any("val/loss" in r for r in records)  # eval_every=3
    return [r["loss"] for r in records if "loss" in r]


def _run(launcher, config, *args, fault="", expect=0):
    r = launch(launcher, config, "--precision", "fp32", *args, fault=fault)
    if expect is not None:
        assert r.returncode == expect, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def _same_adapter(a: Path, b: Path) -> bool:
    return (a / "adapter" / "adapter.safetensors").read_bytes() == (
        b / "adapter" / "adapter.safetensors"
    ).read_bytes()


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_ranks_kill9_and_exact_resume(tmp_path):
    """deepspeed launcher: loss falls, frozen weights intact everywhere; then kill -9 + resume under torchrun."""
    config = write_setup(tmp_path)
    frozen = _expected_frozen_digest(config)
    ds = ["--ds_config", str(DS / "zero3.json")]
    _run("deepspeed", config, *ds)
    losses = _check_run(tmp_path / "run", frozen, 6)
    assert sum(losses[:2]) > sum(losses[-2:]) + 1.0, losses
    shutil.move(tmp_path / "run", tmp_path / "straight")

    r = _run("torchrun", config, *ds, fault="kill_after_step:4", expect=None)
    assert r.returncode != 0
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000003"
    _run("torchrun", config, *ds, "--resume", "auto")
    _check_run(tmp_path / "run", frozen, 6)
    assert _same_adapter(tmp_path / "run", tmp_path / "straight")


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_crash_inside_checkpoint_write_resumes_from_previous(tmp_path):
    config = write_setup(tmp_path)
    ds = ["--ds_config", str(DS / "zero2.json")]
    _run("torchrun", config, *ds)
    shutil.move(tmp_path / "run", tmp_path / "straight")

    r = _run("torchrun", config, *ds, fault="kill_in_save:6", expect=None)
    assert r.returncode != 0
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / ".tmp-step_00000006").is_dir() and not (ckpts / "step_00000006").exists()
    _run("torchrun", config, *ds, "--resume", "auto")
    assert not (ckpts / ".tmp-step_00000006").exists()
    assert _same_adapter(tmp_path / "run", tmp_path / "straight")
    # the engine's module file holds the adapter only (not the LM head tied to the frozen embedding)
    module = torch.load(ckpts / "step_00000006/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(k.startswith(("connector.", "prompt.")) for k in module)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero0_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    from epalm.exit_codes import REQUEUE as EXIT_REQUEUE
    from epalm.run.layout import STOPPED as STOPPED_MARKER

    config = write_setup(
        tmp_path, max_steps=8, save_every=0
    )  # no periodic checkpoints: the final one and the signal's
    ds = ["--ds_config", str(DS / "zero0.json")]
    _run("deepspeed", config, *ds)
    shutil.move(tmp_path / "run", tmp_path / "straight")

    # the signal reaches rank 1 only; both ranks stop at the same step
    _run("deepspeed", config, *ds, fault="sigterm_at_step:4:1", expect=EXIT_REQUEUE)
    run = tmp_path / "run"
    assert (run / "checkpoints/latest").read_text() == "step_00000004"
    assert json.loads((run / STOPPED_MARKER).read_text())["step"] == 4
    _run("deepspeed", config, *ds, "--resume", "auto")
    assert not (run / STOPPED_MARKER).exists()
    assert _same_adapter(run, tmp_path / "straight")


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_under_mpirun(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin libopenmpi-dev)")
    config = write_setup(tmp_path)
    _run("mpirun", config, "--ds_config", str(DS / "zero3.json"))
    _check_run(tmp_path / "run", _expected_frozen_digest(config), 6)


@pytest.mark.slow
def test_two_stage_init_adapter(tmp_path):
    """Pretrain, then start a second run from its adapter export (lr 0: the export comes back unchanged)."""
    import subprocess

    from tests.training_fixtures import env

    config = write_setup(tmp_path, max_steps=2)
    base = [str(ROOT / ".venv/bin/python"), "launch/train.py", "--config", str(config), "--precision", "fp32"]
    for args in (
        ["--ds_config", str(DS / "zero2.json")],
        [
            "--ds_config",
            str(DS / "zero3.json"),
            f"train.init_adapter={tmp_path / 'run' / 'adapter'}",
            f"run_dir={tmp_path / 'finetune'}",
            "train.lr=0",
            "train.prompt_lr=0",
            "train.max_steps=1",
        ],
    ):
        r = subprocess.run(base + args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
    assert _same_adapter(tmp_path / "run", tmp_path / "finetune")
