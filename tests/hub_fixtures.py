"""Tiny random checkpoints in the layouts the hub ships: facebook/opt-* sharded `.bin` with its index (keys
without the `model.` prefix, no tied `lm_head.weight`, fp16), `save_pretrained`'s sharded safetensors, a timm
ViT `.safetensors` file, and TimeSformer / AST `save_pretrained` directories.

Separate because it is about model files, not data: only the weight-loading tests (test_hub_formats.py and
its torchrun worker hub_worker.py) use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from testing.support import TINY_LM, TINY_VIT

BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_INDEX = "model.safetensors.index.json"


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    # a wider init than 0.02 so the cast to bf16 changes most values (the comparison is not trivially exact)
    config = OPTConfig(**TINY_LM, init_std=0.3)
    return OPTForCausalLM(config).eval()


def write_opt_bin_sharded(model, out: Path, num_shards: int = 3, dtype=torch.float16) -> Path:
    """The facebook/opt-6.7b layout: `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json`,
    keys as OPTModel names them (`decoder.layers.0...`), the LM head left out (tied to the embedding).

    Written by hand: transformers 5's save_pretrained writes safetensors only.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    state = {
        k.removeprefix("model."): v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(part, out / name)
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / BIN_INDEX).write_text(json.dumps(index, indent=2))
    return out


def write_opt_safetensors_sharded(model, out: Path, dtype=torch.float32) -> Path:
    """What `save_pretrained` writes for a newer copy: `model-0000k-of-0000n.safetensors` + its index."""
    model.to(dtype).save_pretrained(out, max_shard_size="40KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / SAFE_INDEX).is_file(), sorted(p.name for p in out.iterdir())
    return out


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint by its index, with the `model.` prefix the loaded model uses.

    `.bin` shards are read with `weights_only=True` (no arbitrary unpickling)."""
    from safetensors.torch import load_file

    if (directory / SAFE_INDEX).is_file():
        files = set(json.loads((directory / SAFE_INDEX).read_text())["weight_map"].values())
        state = {k: v for f in sorted(files) for k, v in load_file(directory / f).items()}
    else:
        files = set(json.loads((directory / BIN_INDEX).read_text())["weight_map"].values())
        state = {}
        for f in sorted(files):
            state.update(torch.load(directory / f, map_location="cpu", weights_only=True))
    return {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in state.items()}


def write_timm_vit(out: Path, seed: int = 0) -> Path:
    """A tiny timm ViT's weights as one `.safetensors` file (what the hub's timm repos ship)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, out)
    return out


TINY_HF_ENCODER = dict(
    hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48
)  # fmt: skip


def write_hf_encoder(kind: str, out: Path, seed: int = 0):
    """A tiny TimeSformer or AST saved with `save_pretrained` (config.json + model.safetensors); returns the
    model (its state_dict names can differ from the file's: transformers renames some on save and load)."""
    from transformers import ASTConfig, ASTModel, TimesformerConfig, TimesformerModel

    torch.manual_seed(seed)
    if kind == "timesformer":
        model = TimesformerModel(
            TimesformerConfig(image_size=32, patch_size=16, num_frames=2, **TINY_HF_ENCODER)
        )
    else:
        model = ASTModel(ASTConfig(max_length=64, num_mel_bins=32, **TINY_HF_ENCODER))
    model.save_pretrained(out)
    return model.eval()
