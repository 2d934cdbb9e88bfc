"""Fast checks of the training benchmarks' pure parts: the FLOP model (against real parameter counts on the meta
device), the resident-bytes count and the ZeRO table, and the GPU check script's CPU dry run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench import features, zero, zero_rank
from bench._launch import bench_env, machine_load, model_tree, proc_status_kib
from epalm.config import EncoderConfig, LMConfig
from epalm.model.encoders import build_encoder
from epalm.model.language_model import build_language_model

ROOT = Path(__file__).resolve().parents[1]


def _count(module: torch.nn.Module, skip: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


@pytest.mark.parametrize("size", ["125m", "2.7b", "6.7b"])
def test_opt_params_match_the_built_architecture(size):
    lm = build_language_model(LMConfig(name=size, pretrained=False), device="meta")
    assert features.opt_params(*features.OPT[size]) == _count(lm, ("embed_positions",))


@pytest.mark.parametrize(
    "name, depth, dim", [("vit_base_patch16_224", 12, 768), ("vit_large_patch16_224", 24, 1024)]
)
def test_vit_params_match_timm(name, depth, dim):
    enc = build_encoder(EncoderConfig(name=name, pretrained=False), device="meta")
    assert features.vit_params(depth, dim) == _count(enc, ("pos_embed",))


def test_timesformer_params_match_transformers():
    enc = build_encoder(EncoderConfig(kind="timesformer", name="x", pretrained=False), device="meta")
    assert features.timesformer_params() == _count(enc, ("position_embeddings", "time_embeddings"))


def test_flop_model_by_hand():
    assert features.lm_train_flops(10, 4) == 160
    # ViT: 2 N n + depth * 4 n^2 d, n = 197
    assert features.vit_forward_flops(100, depth=2, dim=8, patches=196) == 2 * 100 * 197 + 2 * 4 * 197**2 * 8
    # TimeSformer, 2 frames: 393 tokens; spatial 2 x 197^2, temporal 196 x 2^2 per layer
    got = features.timesformer_forward_flops(100, depth=1, dim=8, frames=2)
    assert got == 2 * 100 * 393 + 4 * 8 * (2 * 197**2 + 196 * 4)
    assert features.cache_speedup(3.0, 1.0) == pytest.approx(4 / 3)


def test_paper_estimates_say_when_the_cache_pays():
    by_name = {e.name: e for e in features.paper_estimates()}
    image = by_name["OPT-6.7b + ViT-L/16 (224)"]
    video = by_name["OPT-2.7b + TimeSformer-B, 16 frames"]
    # 4 x 6.65e9 x 40 tokens; ViT-L forward ~ 2 x 303M x 197 (+3% attention)
    assert image.lm_flops == pytest.approx(4 * 6_650_077_184 * 40)
    assert image.encoder_flops == pytest.approx(2 * 303_099_904 * 197, rel=0.04)
    assert 1.05 < image.speedup < 1.2
    assert 2.5 < video.speedup < 3.2  # 3137 encoder tokens against 40 text tokens
    assert features.estimate("2.7b", "timesformer_b", frames=8).speedup < video.speedup


def test_frozen_resident_bytes_counts_shards_and_tied_weights_once():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4, dtype=torch.bfloat16)
            self.head = torch.nn.Linear(4, 10, bias=False, dtype=torch.bfloat16)
            self.head.weight = self.emb.weight  # tied, listed once
            self.frozen = torch.nn.Parameter(torch.zeros(6), requires_grad=False)
            self.frozen.ds_tensor = torch.zeros(3)  # a ZeRO-3 partition: only the shard counts
            self.adapter = torch.nn.Linear(4, 4)

        def trainable_named_parameters(self):
            return list(self.adapter.named_parameters())

    assert zero_rank.frozen_resident_bytes(Tiny()) == 10 * 4 * 2 + 3 * 4


def test_zero_table_ratios_and_floor():
    def rank(step0, step3, bw):
        gathered = {"forward": [3, 2e9], "backward": [0, 0], "step": [131, 1e6]}
        none = {"forward": [0, 0], "backward": [0, 0], "step": [0, 0]}
        return {
            "allgather_bytes_per_s": bw,
            "ZeRO-0": {"step_s": step0, "frozen_bytes": 2**28, "gathers": none},
            "ZeRO-3": {"step_s": step3, "frozen_bytes": 2**27, "gathers": gathered},
        }

    text, f = zero.table([rank(1.0, 4.0, 1e9), rank(0.5, 2.0, 2e9)], ["ZeRO-0", "ZeRO-3"])
    row3 = next(line for line in text.splitlines() if line.startswith("| ZeRO-3 |"))
    assert "| 4.000 | 4.00x | 128 | 3 / 0 / 131 | 2000 / 0 / 1 |" in row3
    assert f["floor"]["ZeRO-3"] == pytest.approx(1.0 + 2.001e9 / 1e9)


def test_zero_larger_micro_batch_table_takes_the_worse_rank():
    ranks = [
        {"ZeRO-0": {"step_s": 1.0, "larger_step_s": 2.0}, "ZeRO-3": {"step_s": 3.0, "larger_step_s": 2.5}},
        {"ZeRO-0": {"step_s": 1.0, "larger_step_s": 2.0}, "ZeRO-3": {"step_s": 2.0, "larger_step_s": 3.0}},
    ]
    text, ratio = zero.larger_table(ranks, ["ZeRO-0", "ZeRO-3"])
    assert ratio == {"ZeRO-0": 1.0, "ZeRO-3": 1.5}
    assert "| ZeRO-3 | 3.00x | 3.000 | 1.50x |" in text


def test_helpers():
    assert bench_env()["OMP_NUM_THREADS"] == "1"
    assert "load" in machine_load()
    assert model_tree()["model"]["lm"]["name"] == "125m"
    if Path("/proc/self/status").exists():
        assert proc_status_kib("VmRSS") > 0
    assert math.isfinite(features.H100_BF16_PEAK)


# the GPU check's scripts and their CPU dry run: tests/test_gpu_check.py


def test_profile_by_category_counts_operators_into_their_category():
    import torch

    from bench._launch import profile_by_category

    a = torch.randn(64, 64)
    out, wall = profile_by_category(lambda: [a @ a for _ in range(3)], {"mm": ("aten::mm",), "none": ("no::op",)})
    assert set(out) == {"mm", "none"} and out["none"] == 0.0
    assert 0 < out["mm"] <= wall
