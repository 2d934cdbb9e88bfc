"""What a complete checkpoint holds: a manifest of every file's size and SHA-256, written last at save time,
and `verify_checkpoint`, which lists what is wrong with a step directory (missing, truncated, altered,
unreadable files, an adapter with NaN/inf values) before anything is loaded from it. hashlib does the
hashing; no library checks a directory against a manifest in a way we could use (DeepSpeed verifies
nothing on load)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from epalm.digest import file_sha256
from epalm.run.layout import ADAPTER, ADAPTER_WEIGHTS, TRAINER_STATE
from epalm.run.layout import CHECKPOINT_MANIFEST as MANIFEST


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: str | Path) -> Path:
    """Record size and SHA-256 of every file under `step_dir` in `MANIFEST` (write + fsync + rename)."""
    step_dir = Path(step_dir)
    files = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _files(step_dir)
    }
    path = step_dir / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_trainer_state(step_dir: Path) -> dict:
    """`trainer_state.json` of a step directory; ValueError naming the file when it is missing or invalid."""
    path = step_dir / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable or truncated ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: no integer 'step' in it")
    return state


def verify_checkpoint(step_dir: str | Path, checksums: bool = True) -> list[str]:
    """Every problem with `step_dir`, one string each naming the file; [] when it can be loaded.

    With a manifest: every listed file must exist with the recorded size (and SHA-256). Without one (a
    checkpoint written before manifests existed) only structural checks run: trainer_state.json parses and
    every `.pt` file is a complete archive.
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir}: no such directory"]
    problems = []
    manifest = step_dir / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"{manifest}: unreadable or truncated ({e})"]
        for name, want in files.items():
            path = step_dir / name
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif (size := path.stat().st_size) != want["size"]:
                problems.append(f"{path}: {size} bytes, the manifest records {want['size']} (truncated?)")
            elif checksums and file_sha256(path) != want["sha256"]:
                problems.append(f"{path}: SHA-256 differs from the manifest (the file was altered)")
    else:
        problems += [
            f"{p}: not a complete torch archive (truncated?)"
            for p in _files(step_dir)
            if p.suffix == ".pt" and not zipfile.is_zipfile(p)
        ]
    try:
        read_trainer_state(step_dir)
    except ValueError as e:
        problems.append(str(e))
    if not problems:
        problems += nonfinite_adapter(step_dir / ADAPTER / ADAPTER_WEIGHTS)
    return list(dict.fromkeys(problems))


def nonfinite_adapter(path: Path) -> list[str]:
    """A problem naming `path` and its tensors holding NaN or inf ([] when all are finite, or no such file):
    such a step must never be resumed from, whatever its manifest says."""
    if not path.is_file():
        return []
    import torch
    from safetensors.torch import load_file

    try:
        bad = [name for name, t in load_file(str(path)).items() if not torch.isfinite(t).all()]
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        return [f"{path}: unreadable ({e})"]
    return [f"{path}: non-finite values (NaN/inf) in {', '.join(sorted(bad))}"] if bad else []
