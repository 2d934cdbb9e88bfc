"""The memory planner (`python -m epalm.cli.describe CONFIG --gpus N --zero S`): frozen bytes from the meta-device
model, trainable state per ZeRO stage, and the activation model checked against the tensors autograd saves."""

from __future__ import annotations

import math
import re

import pytest
import torch

from epalm.config import build_config, load_config
from epalm.train.memory_plan import lm_activation_bytes, plan_memory, trainable_state_bytes
from testing.support import tiny_tree

PT_L = "launch/configs/image/vqa_v2_pt_L.yaml"
LAST = re.compile(
    r"^frozen_bytes_per_gpu=(\d+) trainable_bytes_per_gpu=(\d+) activation_bytes_per_gpu=(\d+)$"
)


def _meta_frozen_count(cfg) -> int:
    from epalm.model.epalm import build_model

    model = build_model(cfg.model, device="meta")
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in trainable)


def test_describe_plan_pt_l_on_8_gpus_zero3(capsys):
    from epalm.cli.describe import main

    main([PT_L, "--gpus", "8", "--zero", "3"])
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    m = LAST.match(last)
    assert m, last
    frozen = _meta_frozen_count(load_config(PT_L))
    assert frozen + 4_239_360 == 6_966_014_976  # the paper's pt-L: 4.24M of 6.97B train
    assert int(m.group(1)) == math.ceil(frozen / 8) * 2  # bf16, partitioned 8 ways
    assert 0 < int(m.group(2)) < 4_239_360 * 16 and int(m.group(3)) > 0


def test_frozen_bytes_replicated_below_zero3_and_trainable_state_by_stage():
    cfg = load_config(PT_L)
    frozen = _meta_frozen_count(cfg)
    z2 = plan_memory(cfg, gpus=8, zero=2, micro_batch=2)
    assert z2.frozen_bytes_per_gpu == frozen * 2
    n = z2.trainable_params
    assert n == 4_239_360
    # bf16 mixed precision: 2 (param) + 2 (grad) + 8 (Adam m, v) + 4 (fp32 master) bytes per trainable parameter
    assert sum(b for _, b in trainable_state_bytes(n, 1, 0, "bf16")) == 16 * n
    assert sum(b for _, b in trainable_state_bytes(n, 8, 2, "bf16")) == 2 * n + math.ceil(
        2 * n / 8
    ) + math.ceil(8 * n / 8) + math.ceil(4 * n / 8)
    assert sum(b for _, b in trainable_state_bytes(n, 1, 0, "fp32")) == 16 * n  # no separate masters
    # activations grow linearly with the micro-batch
    z2_64 = plan_memory(cfg, gpus=8, zero=2, micro_batch=64)
    assert z2_64.activation_bytes_per_gpu == 32 * z2.activation_bytes_per_gpu


@pytest.mark.parametrize("prompt_tokens", [3, 0])
def test_activation_model_matches_what_autograd_saves(prompt_tokens):
    """Bytes autograd keeps for backward in a frozen LM with a trainable prompt / injected tokens (weights
    excluded) against the planner: the layers' stored tensors plus log-softmax's fp32 output."""
    from epalm.model.epalm import build_model

    tree = tiny_tree(prompt_tokens=prompt_tokens)
    for part in ("lm", "encoder"):
        tree["model"][part]["dtype"] = "bfloat16"
    cfg = build_config(tree)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    b, t = 4, 20
    ids = torch.randint(4, 300, (b, t))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = model(ids, torch.ones_like(ids), labels=ids, media=torch.randn(b, 3, 16, 16))
    out.loss.backward()
    assert model.connector.layers[0].weight.grad is not None
    (_, stored), _ = lm_activation_bytes(cfg, model.lm.config, b, t, "bf16")
    expected = stored + b * (t - 1) * model.lm.config.vocab_size * 4
    measured = sum(saved.values())
    assert abs(expected / measured - 1) < 0.15, (expected, measured)
