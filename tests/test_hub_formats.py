"""Pretrained weights in the layouts real users point at: facebook/opt-* sharded `.bin` + index, sharded
safetensors + index, a timm ViT `.safetensors` file, TimeSformer / AST `save_pretrained` directories.

The 2-rank test trains from both LM layouts under ZeRO-3 (one torchrun launch, tests/hub_worker.py) and checks
every gathered frozen tensor against the checkpoint, and that each rank holds ~1/world of the LM right after
loading (transformers loads into partitions while `HfDeepSpeedConfig` is alive in `build_engine`)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from tests.hub_fixtures import (
    read_checkpoint,
    tiny_opt,
    write_hf_encoder,
    write_opt_bin_sharded,
    write_opt_safetensors_sharded,
    write_timm_vit,
)
from tests.training_fixtures import ROOT, VENV_BIN, env

WORLD = 2


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    model = tiny_opt()
    return {
        "bin": write_opt_bin_sharded(model, tmp / "opt-bin"),
        "safetensors": write_opt_safetensors_sharded(model, tmp / "opt-safetensors"),
        "vit": write_timm_vit(tmp / "vit" / "model.safetensors"),
        "tmp": tmp,
    }


def _lm_cfg(name, **kw):
    from epalm.config import LMConfig

    return LMConfig(name=str(name), pretrained=True, **kw)


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_lm_loads_hub_layout_equal_to_checkpoint(hub_dirs, layout):
    from epalm.model.language_model import build_language_model

    directory = hub_dirs[layout]
    saved = read_checkpoint(directory)
    lm = build_language_model(_lm_cfg(directory, dtype="bfloat16"))
    state = dict(lm.named_parameters())
    assert set(state) == set(saved)  # the tied head is the embedding, listed once
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    for name, p in state.items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, saved[name].to(torch.bfloat16)), name


def test_bin_shards_are_loaded_without_unpickling_objects(hub_dirs, tmp_path):
    """A `.bin` shard holding a non-tensor object is refused (transformers' torch.load uses weights_only=True)."""
    import shutil

    from epalm.model.language_model import build_language_model

    bad = tmp_path / "opt-evil"
    shutil.copytree(hub_dirs["bin"], bad)
    shard = sorted(bad.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["payload"] = _Evil()
    torch.save(state, shard)
    _Evil.ran = False
    with pytest.raises((pickle.UnpicklingError, OSError, RuntimeError)):
        build_language_model(_lm_cfg(bad))
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True


def test_timm_vit_from_local_safetensors(hub_dirs):
    from safetensors.torch import load_file

    from epalm.config import EncoderConfig
    from epalm.model.encoders import build_encoder
    from testing.support import TINY_VIT

    cfg = EncoderConfig(
        kind="vit", name="vit_base_patch16_224", pretrained=True, checkpoint=str(hub_dirs["vit"]),
        num_states=2, config_overrides=TINY_VIT,
    )  # fmt: skip
    saved = load_file(hub_dirs["vit"])
    encoder = build_encoder(cfg)
    got = encoder.model.state_dict()
    assert set(got) == set(saved)
    assert all(torch.equal(got[k], saved[k]) for k in saved)


@pytest.mark.parametrize("kind", ["timesformer", "ast"])
def test_hf_encoder_from_local_save_pretrained_dir(tmp_path, kind):
    from safetensors.torch import load_file

    from epalm.config import EncoderConfig
    from epalm.model.encoders import build_encoder

    directory = tmp_path / kind
    original = write_hf_encoder(kind, directory).state_dict()
    assert load_file(directory / "model.safetensors")  # the directory holds the weights, not a reference
    encoder = build_encoder(EncoderConfig(kind=kind, name=str(directory), pretrained=True, num_states=2))
    got = encoder.model.state_dict()
    assert set(got) == set(original)
    assert all(torch.equal(got[k], original[k]) for k in original)
    media = torch.randn(1, 2, 3, 32, 32) if kind == "timesformer" else torch.randn(1, 64, 32)
    assert encoder(media).shape == (1, 2, 24)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_ranks_train_from_both_hub_layouts(hub_dirs):
    out = hub_dirs["tmp"] / "worker"
    out.mkdir()
    from epalm.distributed import free_port

    torchrun = VENV_BIN / "torchrun"
    cmd = [
        str(torchrun) if torchrun.exists() else sys.executable,
        *([] if torchrun.exists() else ["-m", "torch.distributed.run"]),
        "--nproc_per_node", str(WORLD), "--master_port", str(free_port()),
        str(ROOT / "tests" / "hub_worker.py"), "--out", str(out), "--vit", str(hub_dirs["vit"]),
        str(hub_dirs["bin"]), str(hub_dirs["safetensors"]),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(WORLD)]
    for per_rank in ranks:
        assert [res["lm_dir"] for res in per_rank] == [str(hub_dirs["bin"]), str(hub_dirs["safetensors"])]
        for res in per_rank:
            assert res["lm_mismatches"] == [] and res["lm_compared"] > 30, res["lm_mismatches"][:5]
            assert res["encoder_mismatches"] == [] and res["encoder_compared"] > 20
            assert res["lm_head_tied"]
            assert all(x == x and x > 0 for x in res["losses"])  # finite, trained two steps
            # partitioned while loading, not only by deepspeed.initialize
            assert res["lm_partitioned_at_load"]
            share = res["lm_held_at_load"] / res["lm_full_bytes"]
            assert abs(share - 1 / WORLD) < 0.02, share
            # after initialize every frozen tensor (the encoder too) is partitioned; the planner agrees
            # up to the per-tensor rounding (ceil(numel / world) per tensor)
            held, planned = res["frozen_held_after_init"], res["planned_frozen_bytes_per_gpu"]
            assert abs(held / res["frozen_full_bytes"] - 1 / WORLD) < 0.02
            assert planned <= held <= planned + 2 * res["frozen_tensors"], (held, planned)
    # the two ranks hold different halves, which together are the whole
    for a, b in zip(*ranks):
        assert a["frozen_held_after_init"] + b["frozen_held_after_init"] >= a["frozen_full_bytes"]
