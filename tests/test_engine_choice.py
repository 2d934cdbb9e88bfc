"""`--ds_config auto` (epalm/train/engine_choice.py): the decisions for pt-L on 8 x 12 / 24 / 80 GB from the memory
planner's numbers, every JSON it can produce valid for DeepSpeed and equal to its shipped file, `describe`'s last
line, one-line errors, and exact resume (kill -9, --resume auto, bit-identical adapter) under every engine it can
choose that the 2-rank tests in test_training.py do not already run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from epalm.config import ConfigError, build_config, load_config
from epalm.train.ds_config import build_ds_config, load_ds_config
from epalm.train.engine_choice import ENGINES, MARGIN, choose_engine, device_memory_bytes, engine_config
from testing.support import tiny_tree
from tests.training_fixtures import ROOT, launch, write_setup

PT_L = "launch/configs/image/vqa_v2_pt_L.yaml"
GB = 10**9
LAST = re.compile(r"^engine=(\w+) planned_bytes=(\d+) device_bytes=(\d+) margin=([\d.]+)$")


@pytest.fixture(scope="module")
def pt_l():
    return load_config(ROOT / PT_L)


@pytest.mark.parametrize(("gb", "expected"), [(12, "zero3_whole_frozen"), (24, "zero0"), (80, "zero0")])
def test_pt_l_decisions_on_8_gpus(pt_l, gb, expected):
    choice = choose_engine(pt_l, 8, gb * GB)
    assert choice.name == expected
    usable = gb * GB * (1 - MARGIN)
    assert choice.plan.planned_bytes_per_gpu <= usable  # the chosen plan fits with the margin
    faster = [c for c in choice.candidates if c.name != choice.name]
    assert [c.name for c in choice.candidates] == list(ENGINES[: len(choice.candidates)])
    for c in faster:  # every faster engine was planned and did not fit
        assert c.plan is not None and c.plan.planned_bytes_per_gpu > usable and not c.fits
    assert choice.candidates[-1].name == choice.name
    # ZeRO-0/2 hold pt-L's 13.9 GB of frozen weights whole; 12 GB cannot, 24 GB can
    assert (choice.plan.frozen_bytes_per_gpu >= 13 * GB) == (gb > 12)


def test_whole_frozen_budget_is_the_room_left_in_whole_layers(pt_l):
    choice = choose_engine(pt_l, 8, 12 * GB)
    zc = choice.ds_config["zero_optimization"]
    live = zc["stage3_max_live_parameters"]
    assert zc["stage3_max_reuse_distance"] == live > 1_000_000_000  # more than sharded zero3's own budget
    layer = 4 * 4096 * 4096 + 2 * 4096 * 16384 + 4 * 4096 + 4096 + 16384 + 4 * 4096  # OPT-6.7B decoder layer
    assert live % layer == 0
    # one more layer would not fit
    assert choice.plan.planned_bytes_per_gpu + 2 * layer > 12 * GB * (1 - MARGIN)
    # with 4 x 12 GB the shards are twice as large: less room, fewer layers kept
    smaller = choose_engine(pt_l, 4, 12 * GB).ds_config["zero_optimization"].get("stage3_max_live_parameters")
    assert smaller < live


def test_nothing_fits_is_a_config_error_and_describe_says_it_in_one_line(pt_l, capsys):
    from epalm.cli.describe import main

    with pytest.raises(ConfigError, match="no engine fits"):
        choose_engine(pt_l, 8, 2 * GB)
    assert main([PT_L, "--gpus", "8", "--gpu-memory", "2GB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no engine fits" in err[0]


def test_zero0_is_skipped_under_bf16_gradient_accumulation(pt_l):
    import dataclasses

    cfg = dataclasses.replace(pt_l, train=dataclasses.replace(pt_l.train, global_batch_size=64))  # 4 steps
    choice = choose_engine(cfg, 8, 80 * GB)
    assert choice.name == "zero2" and "accumulation" in choice.candidates[0].note
    assert choose_engine(cfg, 8, 80 * GB, precision="fp32").name == "zero0"  # fp32 accumulates in fp32


@pytest.mark.parametrize("name", ENGINES)
def test_every_resolved_json_is_valid_for_deepspeed(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = build_config(tiny_tree())
    base = engine_config(name, 2_000_000_000)
    for precision in ("bf16", "fp32"):
        resolved = build_ds_config(base, cfg.train, world_size=1, precision=precision)
        ds = DeepSpeedConfig(resolved)  # pydantic: unknown or mistyped knobs raise
        assert ds.zero_optimization_stage == base["zero_optimization"]["stage"]
        if ds.zero_optimization_stage == 3:
            assert ds.zero_config.param_persistence_threshold == 0
            assert (
                "transformers.models.opt.modeling_opt.OPTDecoderLayer" in ds.zero_config.leaf_module.classes
            )


def test_engines_mirror_the_shipped_json_files():
    ds = ROOT / "ds_configs"
    assert engine_config("zero0") == load_ds_config(ds / "zero0.json")
    assert engine_config("zero2") == load_ds_config(ds / "zero2.json")
    assert engine_config("zero3") == load_ds_config(ds / "zero3_frozen.json")
    offload = engine_config("zero3_offload")
    assert offload["zero_optimization"].pop("offload_param") == {"device": "cpu", "pin_memory": True}
    assert offload == engine_config("zero3")
    cpu = engine_config("zero3", prefetch=False)["zero_optimization"]
    assert cpu.pop("stage3_prefetch_bucket_size") == 0
    assert engine_config("zero3")["zero_optimization"].pop("stage3_prefetch_bucket_size") > 0


def test_describe_prints_the_decision_last(capsys):
    from epalm.cli.describe import main

    assert main([PT_L, "--gpus", "8", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    m = LAST.match(out[-1])
    assert m and m.group(1) == "zero0" and int(m.group(3)) == 24 * GB, out[-1]
    assert main([PT_L, "--gpus", "8", "--gpu-memory", "11.18GiB"]) == 0
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last.startswith("engine=zero3_whole_frozen ") and f"device_bytes={int(11.18 * 2**30)}" in last


def test_cpu_rule_is_host_memory_shared_by_the_local_ranks(monkeypatch):
    import psutil

    total = psutil.virtual_memory().total
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert device_memory_bytes() == total // 2
    assert device_memory_bytes(local_world_size=4) == total // 4


# --------------------------------------------------------------------------- 2-rank runs, exact resume


def _adapter(run: Path) -> bytes:
    return (run / "adapter" / "adapter.safetensors").read_bytes()


def _kill_and_resume(config: Path, ds: list[str]) -> Path:
    run = config.parent / "run"
    r = launch("torchrun", config, "--precision", "fp32", *ds, fault="kill_after_step:4")
    assert r.returncode != 0
    assert (run / "checkpoints/latest").read_text() == "step_00000003"
    r = launch("torchrun", config, "--precision", "fp32", *ds, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.distributed
@pytest.mark.slow
def test_auto_on_cpu_chooses_zero0_logs_why_and_resumes_exactly_after_kill9(tmp_path):
    config = write_setup(tmp_path)
    r = launch("torchrun", config, "--precision", "fp32", "--ds_config", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "--ds_config auto:" in x)
    assert "engine=zero0 planned_bytes=" in line and "device_bytes=" in line
    written = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert written["zero_optimization"] == engine_config("zero0")["zero_optimization"]
    shutil.move(tmp_path / "run", tmp_path / "straight")
    run = _kill_and_resume(config, ["--ds_config", "auto"])
    assert _adapter(run) == _adapter(tmp_path / "straight")


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_engines_resume_exactly_and_train_alike(tmp_path):
    """auto's three ZeRO-3 engines (CPU knobs), one straight run: each killed at step 4 and resumed ends with
    that run's adapter, bit for bit (same losses: the settings change when weights are gathered, not values)."""
    config = write_setup(tmp_path)
    files = {}
    for name in ("zero3", "zero3_whole_frozen", "zero3_offload"):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(engine_config(name, 50_000, prefetch=False)))
    r = launch("torchrun", config, "--precision", "fp32", "--ds_config", str(files["zero3"]))
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.move(tmp_path / "run", tmp_path / "straight")
    for name, path in files.items():
        run = _kill_and_resume(config, ["--ds_config", str(path)])
        assert _adapter(run) == _adapter(tmp_path / "straight"), name
        shutil.rmtree(run)
