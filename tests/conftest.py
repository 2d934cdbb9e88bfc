"""Tiny, random, offline models shared by the tests. Nothing downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from epalm.config import build_config  # noqa: E402

TINY_LM = dict(
    hidden_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    ffn_dim=64,
    vocab_size=320,
    max_position_embeddings=128,
    word_embed_proj_dim=32,
)
TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=24, depth=4, num_heads=2)


def tiny_tree(**adapter) -> dict:
    """A config mapping for a 6-layer OPT and a 4-block ViT, 2 states injected into layers 1..4 (layer 5, the last, is not: as the original)."""
    return {
        "model": {
            "lm": {"name": "125m", "pretrained": False, "config_overrides": dict(TINY_LM)},
            "encoder": {
                "kind": "vit",
                "name": "vit_base_patch16_224",
                "pretrained": False,
                "num_states": 2,
                "config_overrides": dict(TINY_VIT),
            },
            "adapter": {"start_layer": 1, "end_layer": 5, "prompt_tokens": 3, **adapter},
        }
    }


@pytest.fixture
def tiny_config():
    return build_config(tiny_tree())


@pytest.fixture
def tiny_model(tiny_config):
    from epalm.model.epalm import build_model

    torch.manual_seed(0)
    return build_model(tiny_config.model)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from epalm.data.text import build_tokenizer
    from epalm.tokenizer_trainer import save_tokenizer

    texts = [
        "what digit is this?",
        "a handwritten digit seven",
        "zero one two three four five six eight nine",
    ]
    path = save_tokenizer(texts * 20, tmp_path_factory.mktemp("tok"), vocab_size=300)
    return build_tokenizer(str(path))
