"""Checkpoints. The adapter export: trainable weights only, safetensors + the resolved config, written atomically
(`save_adapter` / `load_adapter`, HF-style directories of a few megabytes, shareable)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from epalm.config import Config, load_config, save_config

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "config.yaml"


def save_adapter(state: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path) -> Path:
    """Write `out_dir/{adapter.safetensors, config.yaml}`; a crash mid-write leaves any old export intact."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        save_config(cfg, tmp / ADAPTER_CONFIG)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_adapter(path: str | Path, overrides: list[str] = ()) -> tuple[dict[str, torch.Tensor], Config]:
    """Read an adapter export directory: (state dict, its config with `overrides` applied)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}; not an adapter export directory")
    return load_file(str(weights)), load_config(path / ADAPTER_CONFIG, overrides)
