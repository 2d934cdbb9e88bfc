"""The time plan (`describe --gpus N --gpu h100|h200|a100`, epalm/train/time_plan.py): docs/training.md's worked
example (CC3M on 64 H100s) is what the command prints, and its arithmetic redone here by hand from the model's
parameter counts and the stated assumptions; overrides move the prediction the way they should."""

from __future__ import annotations

import dataclasses
import re

import pytest

from epalm.config import load_config
from epalm.model.epalm import build_model
from tests.training_fixtures import ROOT

DOC = ROOT / "docs" / "training.md"
LAST = re.compile(r"^samples_per_s_per_gpu=([\d.e+-]+) hours_per_epoch=([\d.e+-]+)$")


def _example() -> tuple[list[str], list[str]]:
    """The worked example's command (argv after the module) and its printed block, from docs/training.md."""
    text = DOC.read_text()
    section = text[text.index("**Worked example: CC3M pretraining") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    lines = block.splitlines()
    command = lines[0].removeprefix("$ python -m epalm.cli.describe ").split()
    return command, lines[1:]


def _run(capsys, argv: list[str]) -> list[str]:
    from epalm.cli.describe import main

    assert main(argv) == 0
    return capsys.readouterr().out.rstrip("\n").splitlines()


def test_worked_example_is_what_describe_prints(capsys):
    command, printed = _example()
    assert command[:3] == ["launch/configs/pretrain/cc3m_pt_L.yaml", "train.micro_batch_size=4", "--gpus"]
    assert _run(capsys, command) == printed


def test_worked_example_arithmetic_by_hand():
    """samples/s per GPU and hours per epoch from the counts and the stated assumptions, independently."""
    command, printed = _example()
    m = LAST.match(printed[-1])
    assert m, printed[-1]
    cfg = load_config(ROOT / command[0], [command[1]])
    model = build_model(cfg.model, device="meta")
    n_lm = sum(p.numel() for n, p in model.lm.named_parameters() if "embed_positions" not in n)
    vit = model.encoder.model
    n_enc = sum(p.numel() for n, p in vit.named_parameters() if "pos_embed" not in n)
    trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    assert (n_lm, n_enc, trainable) == (6_650_077_184, 303_099_904, 4_239_360)  # the numbers the doc quotes
    gpus, micro, tokens, dataset = 64, 4, 32 + 10, 3_300_000
    flops = 4 * n_lm * tokens + 2 * n_enc * 197 + 24 * 4 * 197**2 * 1024
    mfu_step = micro * flops / (989e12 * 0.40)
    backward_path = sum(p.numel() for layer in model.lm.model.decoder.layers for p in layer.parameters())
    backward_path += model.lm.lm_head.weight.numel()
    weights_step = (frozen + backward_path) * 2 / 3.35e12
    comm = 2 * (gpus - 1) / gpus * trainable * 4 / (400e9 / 8)  # fp32 gradients, NDR between nodes
    sps = micro / (max(mfu_step, weights_step) + comm)
    hours = dataset / (sps * gpus) / 3600
    assert float(m.group(1)) == pytest.approx(sps, rel=1e-3)
    assert float(m.group(2)) == pytest.approx(hours, rel=1e-3)
    assert f"{sps:.1f}" in DOC.read_text() and f"{hours:.4f}" in DOC.read_text()


def test_overrides_move_the_prediction(capsys):
    command, _ = _example()

    def last(*extra: str) -> tuple[float, float]:
        m = LAST.match(_run(capsys, [*command, *extra])[-1])
        return float(m.group(1)), float(m.group(2))

    base = last()
    assert last("--mfu", "0.2")[0] < base[0]  # compute bound at 0.4: half the MFU, slower
    slow_net = last("--engine", "zero3", "--interconnect-gbps", "100")
    fast_net = last("--engine", "zero3", "--interconnect-gbps", "3200")
    assert slow_net[0] < fast_net[0] < base[0]  # ZeRO-3 gathers cost time; a faster link costs less
    h200 = last("--gpu", "h200")  # same peak FLOP/s as the H100: the same plan here (compute bound)
    assert h200 == pytest.approx(base)
    a100 = last("--gpu", "a100")
    assert a100[0] < base[0]
    # hours scale with the dataset
    assert last("--dataset-size", "6600000")[1] == pytest.approx(2 * base[1], rel=1e-3)


def test_time_plan_without_a_dataset_size_reads_the_shards_or_says_why(tmp_path, capsys):
    from epalm.cli.describe import main

    command, _ = _example()
    without = [a for a in command if a not in ("--dataset-size", "3300000")]
    assert main(without) == 2  # shards/cc3m/train is not here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dataset-size")


def test_accumulation_and_cached_features_enter_the_plan():
    from epalm.train.engine_choice import engine_config
    from epalm.train.time_plan import GPUS, plan_time

    cfg = load_config(ROOT / "launch/configs/pretrain/cc3m_pt_L.yaml", ["train.micro_batch_size=2"])
    z0 = engine_config("zero0")
    two = plan_time(cfg, 64, GPUS["h100"], "zero0", z0, 1000)  # accumulation 2: twice the compute per step
    one = plan_time(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=128)), 64,
                    GPUS["h100"], "zero0", z0, 1000)  # fmt: skip
    assert two.samples_per_s_per_gpu == pytest.approx(one.samples_per_s_per_gpu, rel=0.05)  # per sample alike
    feats = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, use_features=True))
    assert (
        plan_time(feats, 64, GPUS["h100"], "zero0", z0, 1000).samples_per_s_per_gpu
        > two.samples_per_s_per_gpu
    )
