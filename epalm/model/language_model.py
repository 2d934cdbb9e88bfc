"""The frozen language model: stock `transformers.OPTForCausalLM`, from a hub id, a local directory, or the
built-in architecture table (random weights, or the meta device for counting without a download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import OPTConfig, OPTForCausalLM

if TYPE_CHECKING:
    from epalm.config import LMConfig


# The published facebook/opt-* architectures (their config.json), so a model can be built offline.
_OPT_COMMON = dict(
    vocab_size=50272,
    max_position_embeddings=2048,
    activation_function="relu",
    do_layer_norm_before=True,
    dropout=0.1,
    attention_dropout=0.0,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
    enable_bias=True,
)
OPT_ARCHITECTURES: dict[str, dict] = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
}


def _arch_key(name: str) -> str | None:
    key = name.removeprefix("facebook/").removeprefix("opt-")
    return key if key in OPT_ARCHITECTURES else None


def find_lm_config(cfg: LMConfig) -> OPTConfig | None:
    """The OPTConfig for `cfg` without any download: the table, or a local directory's config.json.

    Returns None for a hub id that is neither in the table nor on disk (resolved at load time).
    """
    local = Path(cfg.name) / "config.json"
    if local.is_file():
        base = json.loads(local.read_text())
    elif (key := _arch_key(cfg.name)) is not None:
        base = {**_OPT_COMMON, **OPT_ARCHITECTURES[key]}
        base.setdefault("word_embed_proj_dim", base["hidden_size"])
    else:
        return None
    base = {**base, **cfg.config_overrides}
    base.pop("model_type", None)
    return OPTConfig(**base)


def build_language_model(cfg: LMConfig, device: str | torch.device | None = None) -> OPTForCausalLM:
    """Load (pretrained=True) or randomly initialise (pretrained=False) a frozen OPTForCausalLM.

    `device="meta"` builds the architecture without allocating memory (parameter counts, describe).
    """
    dtype = getattr(torch, cfg.dtype)  # config names are torch dtype names
    if cfg.pretrained and device != "meta":
        model = OPTForCausalLM.from_pretrained(
            cfg.name, dtype=dtype, attn_implementation=cfg.attn_implementation, **cfg.config_overrides
        )
    else:
        config = find_lm_config(cfg)
        if config is None:
            raise ValueError(
                f"lm.name={cfg.name!r}: not an architecture key {sorted(OPT_ARCHITECTURES)}, a facebook/opt-* id "
                "of those sizes, or a local directory with config.json; cannot build it without a download"
            )
        config._attn_implementation = cfg.attn_implementation
        with torch.device(device or "cpu"):
            model = OPTForCausalLM(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
