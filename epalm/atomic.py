"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary name in the same directory, fsync, then `os.replace`. (fsspec's transactions and
`atomicwrites`, archived upstream, were considered; neither is needed for one local file.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically (durable once this returns)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: object) -> None:
    """`obj` as indented, key-sorted JSON (stable bytes for the same content), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
