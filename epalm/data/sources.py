"""Where shards live: a local directory, an http(s):// base URL, an fsspec URL (s3://, gs://, hf://...) or a
`pipe:` command template; member URLs, streams opened with webdataset's `gopen`, retries, the local cache.

Streams come from `webdataset.gopen` (its `Pipe` for `pipe:` commands and curl; fsspec is registered into
its scheme table for the object stores webdataset itself does not handle). HTTP goes through `pipe:curl`
without curl's own retries, so that `data.retries` alone decides how often a shard is tried. The cache is
webdataset's `FileCache`, with the size recorded in the manifest checked before a cached copy is used.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import quote, urlparse

from webdataset.cache import FileCache

from epalm.locations import shard_location

# the module: the package's `webdataset.gopen` attribute is the function of the same name
wds_gopen = importlib.import_module("webdataset.gopen")
log = logging.getLogger(__name__)
KINDS = ("local", "http", "pipe", "fsspec")
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")  # manifest names go into URLs and shells
PLACEHOLDER = "{name}"


class ShardReadError(OSError):
    """A shard could not be read to the end after every retry; names the URL and the sample index."""

    def __init__(self, url: str, index: int, cause: BaseException, tries: int) -> None:
        super().__init__(f"{url}: read failed at sample {index} after {tries} tries: {cause}")
        self.url, self.index, self.cause = url, index, cause


def check_name(name: str, where: str) -> str:
    """Shard names come from an untrusted manifest: no `..`, no shell or URL metacharacters."""
    if not NAME_RE.match(name) or ".." in name.split("/"):
        raise ValueError(f"{where}: shard name {name!r} is not a plain relative file name")
    return name


def member_url(base: str, name: str) -> str:
    """The URL (or path, or pipe: command) of file `name` of the shard set at `base`."""
    kind = shard_location(base)
    if kind == "local":
        return str(Path(re.sub(r"^file://", "", base)) / name)
    if kind == "pipe":
        if PLACEHOLDER not in base:
            raise ValueError(
                f"{base}: a pipe: shard path needs a {PLACEHOLDER} placeholder for the file name"
            )
        return base.replace(PLACEHOLDER, shlex.quote(name))
    if kind == "http":
        return base.rstrip("/") + "/" + quote(name)
    return base.rstrip("/") + "/" + name


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    import fsspec

    return fsspec.open(url, mode).open()


def _register_fsspec(scheme: str) -> None:
    """webdataset's gopen has no handler for s3:// and other fsspec protocols: hand those to fsspec."""
    if scheme not in wds_gopen.gopen_schemes:
        wds_gopen.gopen_schemes[scheme] = _gopen_fsspec


def gopen_url(url: str) -> str:
    """What `webdataset.gopen` is given for `url`: HTTP as a `pipe:curl` with no retries of its own."""
    kind = shard_location(url)
    if kind == "http":
        return "pipe:curl -f -s -S -L --connect-timeout 30 " + shlex.quote(url)
    if kind == "fsspec":
        _register_fsspec(urlparse(url).scheme)
    if kind == "local":
        return re.sub(r"^file://", "", url)
    return url


def open_stream(url: str) -> IO[bytes]:
    return wds_gopen.gopen(gopen_url(url), "rb")


def close_stream(stream: IO[bytes], ok: bool) -> None:
    """Close; a subprocess's exit status raises only if we read to the end (`ok`), not when we stopped early."""
    if not ok:
        wds_gopen.set_options(stream, ignore_errors=True)
    stream.close()


def read_bytes(url: str, retries: int = 0) -> bytes:
    """The whole file at `url` (the manifest), with retries for remote kinds."""

    def attempt() -> bytes:
        stream = open_stream(url)
        try:
            data = stream.read()
        except BaseException:
            close_stream(stream, ok=False)
            raise
        close_stream(stream, ok=True)
        return data

    if shard_location(url) == "local":
        return attempt()
    return with_retries(attempt, retries, url)


def backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, 30.0)


def with_retries(fn: Callable[[], bytes], retries: int, what: str) -> bytes:
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == retries:
                raise OSError(f"{what}: {e} (after {retries + 1} tries)") from e
            log.warning("%s: %s; retry %d of %d", what, e, attempt + 1, retries)
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")


class ShardCache:
    """Keeps a local copy of each remote shard under `cache_dir` (webdataset's FileCache downloads it)."""

    def __init__(self, cache_dir: str) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        self._names: dict[str, str] = {}
        self.cache = FileCache(cache_dir, url_to_name=self._names.__getitem__)
        self.cache_dir = cache_dir

    def local_copy(self, url: str, size: int | None) -> str:
        """Path of the cached copy of `url`, downloaded if absent or of the wrong size."""
        digest = hashlib.sha1(url.encode()).hexdigest()[:12]
        opened = gopen_url(url)
        self._names[opened] = f"{digest}-{Path(urlparse(url).path).name or 'shard'}"
        path = os.path.join(self.cache_dir, self._names[opened])
        if size is not None and os.path.exists(path) and os.path.getsize(path) != size:
            log.warning("%s: cached copy has the wrong size, downloading again", path)
            os.remove(path)
        got = self.cache.get_file(opened)
        if size is not None and os.path.getsize(got) != size:
            os.remove(got)
            raise OSError(f"{url}: downloaded {os.path.getsize(got)} bytes, the manifest says {size}")
        return got


def display_name(base: str) -> str:
    """A short name for a shard set: the last path component (of a pipe: template, the one before {name})."""
    text = base.replace(PLACEHOLDER, "").rstrip("/ -") if shard_location(base) == "pipe" else base.rstrip("/")
    return re.split(r"[/\s]", text)[-1] or text
