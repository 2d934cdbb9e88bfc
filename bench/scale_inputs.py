"""The inputs of the full-size CPU run (bench/scale.py): random OPT-6.7B weights in the hub's sharded
safetensors layout, written one tensor at a time, and a small tokenizer with image-QA shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHARD_BYTES = 2 * 2**30


SMOKE_LM = dict(
    hidden_size=64, ffn_dim=256, num_attention_heads=4, word_embed_proj_dim=64
)  # EPALM_SCALE_SMOKE=1


def write_random_opt(out: Path, overrides: dict | None = None, arch: str = "6.7b") -> Path:
    """Random OPT-`arch` (std 0.02, LayerNorms at 1/0) in bf16 as `model-0000k-of-0000n.safetensors` + index,
    written one tensor at a time (peak ~1 shard in memory). Reused when the index is there."""
    import torch
    from safetensors.torch import save_file

    from epalm.config import LMConfig
    from epalm.model.language_model import build_language_model

    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        return out
    lm = build_language_model(
        LMConfig(name=arch, pretrained=False, dtype="bfloat16", config_overrides=overrides or {}),
        device="meta",
    )
    names = [(k, tuple(v.shape)) for k, v in lm.state_dict().items() if k != "lm_head.weight"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm.config.save_pretrained(tmp)
    groups, current, size = [], [], 0
    for name, shape in names:
        n = 2 * int(torch.Size(shape).numel())
        if current and size + n > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if "layer_norm" in name:
                t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
                t = t.to(torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            tensors[name] = t
            total += t.numel() * 2
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    tmp.rename(out)
    return out


def write_data(out: Path) -> tuple[Path, Path]:
    """A small tokenizer (ids < OPT's vocab) and 2 image-QA shards of 16 samples."""
    from epalm.data.tokenizer_trainer import save_tokenizer
    from testing.shard_fixtures import write_dataset

    tok = out / "tok"
    if not (out / ".done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        save_tokenizer([f"what digit is {i}? seven one" for i in range(64)] * 4, tok, vocab_size=300)
        write_dataset(out / "train", [16, 16], task="qa", modality="image")
        (out / ".done").write_text("ok")
    return tok, out / "train"
