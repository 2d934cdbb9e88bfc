"""Bounded reads of remote sources: `ReadLimits` (connect and stall timeouts, the retry budget) and the
readers that enforce them: a child process's stdout read with `select` (curl, `pipe:` commands, webdataset's
own command openers), and any other file object (fsspec's) read on a helper thread. A read that gets no byte
for `read_timeout_s` raises `StallError` naming the bytes read so far; the source is then abandoned.

Hand-written: webdataset's `Pipe` has no read timeout and its close waits up to two hours for a stuck
process; fsspec's timeouts are per filesystem (s3fs, gcsfs, aiohttp each their own), not one setting.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TypeVar

T = TypeVar("T")
CHUNK = 1 << 20  # bytes asked of a remote source per read
OK_STATUS = (0, 141, -signal.SIGPIPE)  # 141: a shell's child ended by SIGPIPE (we stopped reading early)


@dataclass(frozen=True)
class ReadLimits:
    """How long a remote read may wait, and how long a failing one is retried (docs/loader.md)."""

    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0  # no byte for this long: the read has stalled and fails
    retry_budget_s: float = 120.0  # retry a failing read until this long after its first failure
    retries: int | None = None  # and at most this many times in a row (None: the budget alone decides)

    def __post_init__(self) -> None:
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0 and self.retry_budget_s >= 0):
            raise ValueError(f"read limits must be positive (the retry budget >= 0): {self}")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries must be >= 0 or None, got {self.retries}")

    def delay(self, failures: int, failing_since: float) -> float | None:
        """Seconds to wait before the next try after `failures` failures in a row, or None: give up."""
        wait = backoff(failures - 1)
        if self.retries is not None and failures > self.retries:
            return None
        if time.monotonic() - failing_since + wait > self.retry_budget_s:
            return None
        return wait

    def describe(self, failures: int) -> str:
        cap = f" of {self.retries}" if self.retries is not None else ""
        return f"retry {failures}{cap} (within data.retry_budget_s={self.retry_budget_s:g})"


DEFAULT_LIMITS = ReadLimits()


class StallError(OSError):
    """A remote source sent nothing for `read_timeout_s` seconds."""

    def __init__(self, seconds: float, nbytes: int) -> None:
        super().__init__(f"no data for {seconds:g} s after {nbytes} bytes (data.read_timeout_s)")
        self.seconds, self.nbytes = seconds, nbytes


def backoff(attempt: int) -> float:
    """0.5 s, 1 s, 2 s, ... at most 10 s: a restarted server is found again soon after it is back."""
    return min(0.5 * 2**attempt, 10.0)


def bounded(fn: Callable[[], T], timeout: float) -> T:
    """`fn()` on a helper thread, abandoned (StallError) when it has not returned after `timeout` seconds:
    for the single remote calls no stream carries (an fsspec `info`)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="remote-call")
    try:
        return pool.submit(fn).result(timeout)
    except concurrent.futures.TimeoutError:
        raise StallError(timeout, 0) from None
    finally:
        pool.shutdown(wait=False)


class ProcessSource(io.RawIOBase):
    """A child process's stdout, each read bounded by the stall timeout; a bad exit status fails at its end."""

    def __init__(self, proc: subprocess.Popen, what: str, timeout: float, own_group: bool) -> None:
        self.proc, self.what, self.timeout, self.own_group = proc, what, timeout, own_group
        self.fd, self.nbytes, self.eof = proc.stdout.fileno(), 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.eof:
            return 0
        if not select.select([self.fd], [], [], self.timeout)[0]:
            raise StallError(self.timeout, self.nbytes)
        data = os.read(self.fd, len(buffer))
        if not data:
            self.eof = True
            self._check_exit()
        buffer[: len(data)] = data
        self.nbytes += len(data)
        return len(data)

    def _check_exit(self) -> None:
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise StallError(self.timeout, self.nbytes) from None
        if status not in OK_STATUS:
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
            raise OSError(f"{self.what} exited with {status}" + (f": {err}" if err else ""))

    def abort(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if self.own_group else os.kill)(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self.abort()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        super().close()


class ThreadSource(io.RawIOBase):
    """A file object (fsspec's) read on a helper thread, so that a read that blocks is abandoned after the
    stall timeout; the opening is bounded the same way."""

    def __init__(self, opener: Callable[[], IO[bytes]], timeout: float) -> None:
        self.timeout, self.nbytes, self.eof, self.stuck = timeout, 0, False, False
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-read")
        self.file: IO[bytes] | None = None
        self.file = self._bounded(opener)

    def readable(self) -> bool:
        return True

    def _bounded(self, fn: Callable, *args):
        try:
            return self.pool.submit(fn, *args).result(self.timeout)
        except concurrent.futures.TimeoutError:
            self.stuck = True
            self.pool.shutdown(wait=False, cancel_futures=True)  # the blocked thread is left behind
            raise StallError(self.timeout, self.nbytes) from None

    def readinto(self, buffer) -> int:
        data = self._bounded(self.file.read, len(buffer))
        self.eof = not data
        buffer[: len(data)] = data
        self.nbytes += len(data)
        return len(data)

    def abort(self) -> None:
        if not self.stuck and self.file is not None:  # a stuck file is left to its blocked thread
            self.pool.submit(self.file.close)  # never waited for
        self.pool.shutdown(wait=False)

    def close(self) -> None:
        if not self.closed:
            self.abort()
        super().close()


class RemoteStream(io.BufferedReader):
    """A buffered remote source; `finish(ok)` reads to its end (status checked) or abandons it."""

    def finish(self, ok: bool) -> None:
        raw = self.raw
        try:
            if ok and isinstance(raw, ProcessSource):
                while not raw.eof:  # the tar's trailing padding; then the exit status counts
                    self.read(CHUNK)
        finally:
            self.close()
