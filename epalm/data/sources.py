"""Where shards live: a local directory, an http(s):// base URL, an fsspec URL (s3://, gs://, hf://...) or a
`pipe:` command template; member URLs, opening streams, retries, the local cache.

HTTP is read by `curl` (our connect timeout, and `--speed-time` so that an orphaned curl ends too) and
`pipe:` commands by the shell, both through `epalm.data.remote_read`'s bounded process reader; webdataset's
`gopen` still opens the schemes it has commands for (gs://, hf://...), read through the same reader, and
fsspec the other protocols. A failing read is retried with backoff for `ReadLimits.retry_budget_s` seconds
(enough to ride through a server restart), at most `retries` times in a row when that is set. The cache
copies each remote shard through the same bounded streams (webdataset's `FileCache`, used before,
downloads without a read timeout).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import quote, urlparse

from epalm.data.remote_read import (
    CHUNK,
    DEFAULT_LIMITS,
    ProcessSource,
    ReadLimits,
    RemoteStream,
    ThreadSource,
)
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


def _spawn(cmd: list[str] | str, what: str, limits: ReadLimits) -> RemoteStream:
    shell = isinstance(cmd, str)  # a `pipe:` command line; curl is run directly, its stderr kept
    proc = subprocess.Popen(
        cmd,
        shell=shell,
        stdout=subprocess.PIPE,
        stderr=None if shell else subprocess.PIPE,
        start_new_session=True,
    )
    return RemoteStream(ProcessSource(proc, what, limits.read_timeout_s, own_group=True), CHUNK)


def curl_command(url: str, limits: ReadLimits) -> list[str]:
    """curl without retries of its own (ours decide), failing on HTTP errors, with both timeouts; unbuffered
    (-N), so the bytes a stall report counts are those that arrived."""
    ct, rt = f"{limits.connect_timeout_s:g}", f"{max(1, round(limits.read_timeout_s))}"
    return [
        "curl",
        "-f",
        "-s",
        "-S",
        "-L",
        "-N",
        "--connect-timeout",
        ct,
        "--speed-limit",
        "1",
        "--speed-time",
        rt,
        url,
    ]


def open_stream(url: str, limits: ReadLimits = DEFAULT_LIMITS) -> IO[bytes]:
    """A readable stream of `url`: a plain file when local, else a `RemoteStream` whose reads are bounded."""
    kind = shard_location(url)
    if kind == "local":
        return open(re.sub(r"^file://", "", url), "rb")  # noqa: SIM115 (the caller closes it)
    if kind == "http":
        return _spawn(curl_command(url, limits), "curl", limits)
    if kind == "pipe":
        return _spawn(url[len("pipe:") :], url, limits)
    scheme = urlparse(url).scheme
    if scheme in wds_gopen.gopen_schemes:  # gs://, hf://, ...: webdataset's own opener (a command)
        pipe = wds_gopen.gopen(url, "rb")
        if isinstance(pipe, wds_gopen.Pipe):
            wds_gopen.set_options(pipe, ignore_errors=True)  # its exit status is ours to check
            return RemoteStream(ProcessSource(pipe.proc, url, limits.read_timeout_s, own_group=False), CHUNK)
        return RemoteStream(ThreadSource(lambda: pipe, limits.read_timeout_s), CHUNK)

    def opener() -> IO[bytes]:
        import fsspec

        return fsspec.open(url, "rb").open()

    return RemoteStream(ThreadSource(opener, limits.read_timeout_s), CHUNK)


def close_stream(stream: IO[bytes], ok: bool) -> None:
    """Close; a reader's exit status counts only if we read to the end (`ok`), not when we stopped early."""
    if isinstance(stream, RemoteStream):
        stream.finish(ok)
    else:
        stream.close()


def read_bytes(url: str, limits: ReadLimits = DEFAULT_LIMITS) -> bytes:
    """The whole file at `url` (the manifest), with retries for remote kinds."""

    def attempt() -> bytes:
        stream = open_stream(url, limits)
        try:
            data = stream.read()
        except BaseException:
            close_stream(stream, ok=False)
            raise
        close_stream(stream, ok=True)
        return data

    if shard_location(url) == "local":
        return attempt()
    return with_retries(attempt, limits, url)


def permanent(error: OSError) -> bool:
    """An HTTP answer no retry changes (404, 403, ...; not 408 or 429): a wrong URL fails at once."""
    code = re.search(r"returned error: (4\d\d)", str(error))
    return code is not None and code.group(1) not in ("408", "429")


def with_retries(fn: Callable[[], bytes], limits: ReadLimits, what: str) -> bytes:
    """`fn()`, retried within `limits` (not after a permanent HTTP error)."""
    failures, since = 0, 0.0
    while True:
        try:
            return fn()
        except OSError as e:
            failures += 1
            since = since or time.monotonic()
            wait = None if permanent(e) else limits.delay(failures, since)
            if wait is None:
                raise OSError(f"{what}: {e} (after {failures} tries)") from e
            log.warning("%s: %s; %s", what, e, limits.describe(failures))
            time.sleep(wait)


class ShardCache:
    """Keeps a local copy of each remote shard under `cache_dir`, downloaded through the bounded streams."""

    def __init__(self, cache_dir: str, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        self.cache_dir, self.limits = cache_dir, limits

    def local_copy(self, url: str, size: int | None) -> str:
        """Path of the cached copy of `url`, downloaded if absent or of the wrong size."""
        digest = hashlib.sha1(url.encode()).hexdigest()[:12]
        path = os.path.join(self.cache_dir, f"{digest}-{Path(urlparse(url).path).name or 'shard'}")
        if size is not None and os.path.exists(path) and os.path.getsize(path) != size:
            log.warning("%s: cached copy has the wrong size, downloading again", path)
            os.remove(path)
        if not os.path.exists(path):
            tmp = f"{path}.tmp{os.getpid()}"
            stream, ok = open_stream(url, self.limits), False
            try:
                with open(tmp, "wb") as f:
                    while data := stream.read(CHUNK):
                        f.write(data)
                ok = True
            finally:
                close_stream(stream, ok)
                if not ok and os.path.exists(tmp):
                    os.remove(tmp)
            os.replace(tmp, path)
        if size is not None and os.path.getsize(path) != size:
            got = os.path.getsize(path)
            os.remove(path)
            raise OSError(f"{url}: downloaded {got} bytes, the manifest says {size}")
        return path


def display_name(base: str) -> str:
    """A short name for a shard set: the last path component (of a pipe: template, the one before {name})."""
    text = base.replace(PLACEHOLDER, "").rstrip("/ -") if shard_location(base) == "pipe" else base.rstrip("/")
    return re.split(r"[/\s]", text)[-1] or text
