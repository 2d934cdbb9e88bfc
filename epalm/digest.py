"""Digests of files and tensors by exact bytes: bit-identity checks (adapters, frozen weights) and feature provenance.

hashlib over the raw bytes (so bfloat16, which numpy lacks, hashes too); safetensors' own hashing is
per file, not per in-memory tensor, so it does not serve.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch


def add_tensor(h: hashlib._Hash, name: str, tensor: torch.Tensor, *, layout: bool = False) -> None:
    """Feed `name` (with dtype and shape when `layout`) and the tensor's bytes into `h`."""
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode() if layout else name.encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (shard and checkpoint manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def state_digest(
    state: Mapping[str, torch.Tensor], *, algorithm: str = "blake2b", layout: bool = False
) -> str:
    """Hex digest of a state dict by sorted names and exact bytes (blake2b-128, or e.g. sha256)."""
    h = hashlib.blake2b(digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    for name in sorted(state):
        add_tensor(h, name, state[name], layout=layout)
    return h.hexdigest()
