"""Checkpoints. The adapter export: trainable weights only, safetensors + the resolved config, written atomically
(`save_adapter` / `load_adapter`, HF-style directories of a few megabytes, shareable). And the resumable training
state (`save_training_state` / `load_training_state` / `find_latest`): DeepSpeed's trainable-only files, optimizer,
scheduler, loader position, per-rank RNG states and the step, committed atomically through a `latest` pointer."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from epalm.atomic import write_text_atomic
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


# --------------------------------------------------------------------------- resumable training state

LATEST = "latest"  # a file holding the tag of the newest complete checkpoint (same format as DeepSpeed's)
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def find_latest(root: str | Path) -> Path | None:
    """The newest committed checkpoint under `root`, or None. Uncommitted (temporary) directories never count."""
    tag = _read_latest(Path(root))
    if tag is None:
        return None
    pointer, path = Path(root) / LATEST, Path(root) / tag
    if not _TAG.match(tag) or not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {tag!r}, which is not a complete checkpoint")
    return path


def _read_latest(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.copy()),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def save_training_state(
    engine,
    root: str | Path,
    step: int,
    trainer_state: dict,
    *,
    rank: int,
    barrier: Callable[[], None],
    adapter_state: dict[str, torch.Tensor] | None = None,
    cfg: Config | None = None,
    keep_last: int = 0,
) -> Path:
    """Write a checkpoint for `step` on every rank; it becomes visible only once complete everywhere.

    All ranks write into `.tmp-<tag>`; after a barrier rank 0 renames it to `<tag>` and replaces `latest`
    atomically. A crash at any point leaves `latest` naming the previous checkpoint. Frozen weights
    are never written. Needs a filesystem shared by all ranks.
    """
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a crash: never committed
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
    tmp = root / tmp_tag
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0 and adapter_state is not None and cfg is not None:
        save_adapter(adapter_state, cfg, tmp / "adapter")
    if rank == 0:
        write_text_atomic(tmp / TRAINER_STATE, json.dumps({**trainer_state, "step": step}, indent=1))
    barrier()
    if rank == 0:
        final = root / tag
        if final.exists():
            if _read_latest(root) == tag:
                raise FileExistsError(f"{final} is the committed checkpoint; refusing to overwrite it")
            shutil.rmtree(final)  # a leftover that `latest` never pointed to
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, tag)
        _prune(root, keep_last, keep=tag)
    barrier()
    return root / tag


def load_training_state(engine, path: str | Path, *, rank: int) -> dict:
    """Restore engine (trainable weights, optimizer, scheduler) and this rank's RNGs; return the trainer state."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=False,  # frozen weights are not in the checkpoint: they come from their source
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
    state = json.loads((path / TRAINER_STATE).read_text())
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))
    for name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)
