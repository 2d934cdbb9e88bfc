"""Test support shared by the tests and the benchmarks (never imported by the library): the tiny model shapes
and config tree the tests build, and the environment for child processes. Pytest fixtures live in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_HOOK = ROOT / "tests" / "fault_hook"

_RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "EPALM_FAULT",
)  # EPALM_FAULT: tests/fault_hook


def cpu_child_env(**extra: str) -> dict[str, str]:
    """The environment for launching ranks as child processes on a CPU host (tests, benchmarks, the demo).

    Offline hub, DeepSpeed's CPU accelerator, one thread per process (several ranks share few cores),
    this checkout and its venv first on the paths, and no rank variables leaked from a parent job.
    """
    root = ROOT
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".cache" / "torch_extensions"))
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore::FutureWarning",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(root),
        PATH=f"{root / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    env.update(extra)
    return env


def fault_env(fault: str) -> dict[str, str]:
    """The variables that inject `fault` (kind:step[:rank]) into a child process through tests/fault_hook,
    for `cpu_child_env(**fault_env(...))`; none when `fault` is empty."""
    if not fault:
        return {}
    return {"EPALM_FAULT": fault, "PYTHONPATH": f"{FAULT_HOOK}:{ROOT}"}


# Tiny, random, offline shapes: a 6-layer OPT and a 4-block ViT (the `tiny_*` fixtures in conftest.py build them).
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
TINY_HF = dict(hidden_size=24, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48)


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


def generate_loose(model, input_ids, attention_mask, **kwargs):
    """epalm's `generate` with the decoding options given as loose keywords, the way transformers'
    `generate` takes them, so a test can hand one dict of options to both and compare."""
    import dataclasses

    from epalm.evaluation.decoding import Decoding, generate

    names = {f.name for f in dataclasses.fields(Decoding)}
    decoding = Decoding(**{k: v for k, v in kwargs.items() if k in names})
    rest = {k: v for k, v in kwargs.items() if k not in names}
    return generate(model, input_ids, attention_mask, decoding=decoding, **rest)
