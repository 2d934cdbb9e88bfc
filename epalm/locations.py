"""What a name in a config points at: a local path, a hub id, or a remote shard location."""

from __future__ import annotations

from pathlib import Path


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, ./ ../ or ~, several '/', or present on disk."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def is_remote(path: str) -> bool:
    """Shards behind a URL or a `pipe:` command: the loader opens (and retries) those itself."""
    return "://" in path or path.startswith("pipe:")
