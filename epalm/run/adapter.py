"""The adapter export: trainable weights only, as safetensors beside the resolved config (paths made
absolute), written atomically with the umask's permissions. HF-style directories of a few megabytes,
shareable; `load_adapter` reads one back."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from epalm.config import Config, load_config, save_config
from epalm.run.layout import ADAPTER_WEIGHTS
from epalm.run.layout import CONFIG as ADAPTER_CONFIG


def save_adapter(state: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path) -> Path:
    """Write `out_dir/{adapter.safetensors, config.yaml}`; a crash mid-write leaves any old export intact."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        save_config(absolute_paths(cfg), tmp / ADAPTER_CONFIG)
        _apply_umask(tmp)  # mkdtemp makes 0700 and safetensors 0600: colleagues must be able to read it
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


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with every relative path that exists from here made absolute, so the export works from anywhere."""

    def fix(value: str | None) -> str | None:
        if not value or Path(value).is_absolute() or not Path(value).exists():
            return value  # also hub ids and architecture keys ("facebook/opt-2.7b", "125m")
        return str(Path(value).resolve())

    m, d, t = cfg.model, cfg.data, cfg.train
    lm = dataclasses.replace(m.lm, name=fix(m.lm.name), tokenizer=fix(m.lm.tokenizer))
    enc = dataclasses.replace(m.encoder, name=fix(m.encoder.name), checkpoint=fix(m.encoder.checkpoint))
    data = dataclasses.replace(
        d,
        train=[dataclasses.replace(x, path=fix(x.path)) for x in d.train],
        val=fix(d.val),
        test=fix(d.test),
    )
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, lm=lm, encoder=enc),
        data=data,
        train=dataclasses.replace(t, init_adapter=fix(t.init_adapter)),
        run_dir=fix(cfg.run_dir),
    )


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def load_adapter(path: str | Path, overrides: list[str] = ()) -> tuple[dict[str, torch.Tensor], Config]:
    """Read an adapter export directory: (state dict, its config with `overrides` applied)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}; not an adapter export directory")
    return load_file(str(weights)), load_config(path / ADAPTER_CONFIG, overrides)
