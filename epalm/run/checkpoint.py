"""Resumable training state: DeepSpeed's trainable-only files, optimizer, scheduler, loader position, per-rank
RNG states and the step, a manifest of sizes and checksums written last, committed through a `latest`
pointer (`save_training_state` / `load_training_state`). Beside DeepSpeed's per-rank ZeRO files, which load
only on the world size and ZeRO stage that wrote them, each step holds the adapter's training state in one
world-size-independent file (`PORTABLE`), loaded instead when either differs. DeepSpeed's own answer,
universal checkpoints, needs an offline conversion of every checkpoint (ds_to_universal.py) and the module
files our trainable-only saves leave out. Which checkpoint to resume from is `epalm.run.resume`'s business;
the adapter export inside each step is `epalm.run.adapter`'s."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from epalm.atomic import write_text_atomic
from epalm.config import Config
from epalm.run.adapter import save_adapter
from epalm.run.layout import ADAPTER, LATEST, PORTABLE, TAG, TRAINER_STATE, tag_for
from epalm.run.manifest import read_trainer_state, verify_checkpoint, write_manifest
from epalm.run.resume import read_latest

# inside a step directory, beside DeepSpeed's files (to move to epalm.run.layout with the other names)


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
    portable: dict | None = None,
) -> Path:
    """Write a checkpoint for `step` on every rank; it becomes visible only once complete everywhere.

    All ranks write into `.tmp-<tag>`; after a barrier rank 0 renames it to `<tag>` and replaces `latest`
    atomically. A crash at any point leaves `latest` naming the previous checkpoint. Frozen weights
    are never written. `portable` (rank 0's `epalm.train.engine.gather_trainable_state`) is written as
    `PORTABLE`, for a resume on another world size. Needs a filesystem shared by all ranks.
    """
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a crash: never committed
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    tmp = root / tmp_tag
    with _writing(tmp):
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0 and adapter_state is not None and cfg is not None:
            save_adapter(adapter_state, cfg, tmp / ADAPTER)
        if rank == 0 and portable is not None:
            torch.save(portable, tmp / PORTABLE)
    if rank == 0:
        with _writing(tmp):
            write_text_atomic(tmp / TRAINER_STATE, json.dumps({**trainer_state, "step": step}, indent=1))
    barrier()
    if rank == 0:
        final = root / tag
        if final.exists():
            if read_latest(root) == tag:
                raise FileExistsError(f"{final} is the committed checkpoint; refusing to overwrite it")
            shutil.rmtree(final)  # a leftover that `latest` never pointed to
        with _writing(tmp):
            write_manifest(tmp)  # last: a directory with a manifest that verifies is complete
        os.replace(tmp, final)
        with _writing(root / LATEST):
            write_text_atomic(root / LATEST, tag)
        _prune(root, keep_last, keep=tag)
    barrier()
    return root / tag


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the message names the path, and says so when the disk is full)."""


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failed write (torch says only `basic_ios::clear: iostream error`) into one naming `path`."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as e:
        where = path if path.exists() else path.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        chain, err = [], e
        while err is not None:
            chain.append(err)
            err = err.__cause__ or err.__context__
        full = any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in chain) or any(
            "No space left" in str(x) or "quota" in str(x).lower() for x in chain
        )
        if full or (free is not None and free < _NEARLY_FULL):
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"writing the checkpoint {path} failed: no space left on device ({free} bytes free there). "
                f"The previous checkpoint (`latest`) is intact; free space and resume with --resume auto "
                f"(original error: {e})",
            ) from e
        raise CheckpointWriteError(f"writing the checkpoint {path} failed: {type(e).__name__}: {e}") from e


_NEARLY_FULL = 1 << 20  # bytes: a failed write with less than this left is a full disk


def needs_portable(path: str | Path, world_size: int, zero_stage: int) -> bool:
    """Whether the checkpoint at `path` was written on another world size or ZeRO stage than this run's, so
    that DeepSpeed's per-rank files cannot load and `PORTABLE` must."""
    state = read_trainer_state(Path(path))
    saved = (state.get("world_size"), state.get("zero_stage", zero_stage))
    return saved != (world_size, zero_stage)


def load_training_state(
    engine, path: str | Path, *, rank: int, restore_portable: Callable[[dict], None] | None = None
) -> dict:
    """Restore engine (trainable weights, optimizer, scheduler) and this rank's RNGs; return the trainer state.

    With `restore_portable` the engine is restored from `PORTABLE` through it (another world size or ZeRO
    stage; a rank the checkpoint has no RNG file for takes rank 0's). `path` should have passed
    `verify_checkpoint` (rank 0 does it in `epalm.run.resume`); any failure here is still reported with the
    checkpoint's path and the problems a verification finds.
    """
    path = Path(path)
    if restore_portable is not None:
        return _load_portable(path, rank, restore_portable)
    try:
        state = read_trainer_state(path)
        load_path, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,  # frozen weights are not in the checkpoint: they come from their source
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError("DeepSpeed found no checkpoint files")
        rng_file = path / f"rng_rank{rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        problems = "; ".join(verify_checkpoint(path, checksums=False)) or "no file problem found"
        raise RuntimeError(f"cannot load the checkpoint {path}: {e} ({problems})") from e
    return state


def _load_portable(path: Path, rank: int, restore: Callable[[dict], None]) -> dict:
    state = read_trainer_state(path)
    if not (path / PORTABLE).is_file():
        raise RuntimeError(
            f"cannot resume {path} on another number of ranks or ZeRO stage: it has no {PORTABLE} (written "
            f"before world-size-independent checkpoints, or by an optimizer it does not know); resume it on "
            f"{state.get('world_size')} ranks with the DeepSpeed config it was saved with"
        )
    try:
        portable = torch.load(path / PORTABLE, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        problems = "; ".join(verify_checkpoint(path, checksums=False)) or "no file problem found"
        raise RuntimeError(f"cannot load {path / PORTABLE}: {e} ({problems})") from e
    restore(portable)
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_rank00000.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))
    for name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)
