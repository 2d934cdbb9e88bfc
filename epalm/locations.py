"""What a name in a config points at: a local path, a hub id, or a remote shard location."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, ./ ../ or ~, several '/', or present on disk."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def shard_location(path: str) -> str:
    """Where a shard directory lives: "local" (a path or file:// URL), "http" (http/https), "pipe" (a `pipe:`
    command template) or "fsspec" (any other URL scheme: s3://, gs://, hf://...)."""
    if path.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(path).scheme
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        return "local"
    return "fsspec"


def is_remote(path: str) -> bool:
    """Shards the loader opens (and retries) itself rather than reading from a local directory."""
    return shard_location(path) != "local"
