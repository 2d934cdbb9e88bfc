"""Raw sample streams over tar shards: manifest, shard checks, sample-granular ranges, buffer shuffle, safe reading.

Tars are read with webdataset's `tar_file_iterator` from streams that `epalm.data.sources` opens (local,
http(s), fsspec, `pipe:`). Only members whose name ends in one of `schema.SAFE_EXTENSIONS` are ever read;
any other member (`.pyd`, `.pickle`, `.pth`, ...) is refused from its tar header alone, before its bytes
are touched. Samples a stream does not need are not selected: a local file seeks past them on resume, a
stream reads and drops their bytes (logged). webdataset's decoders are never used. Where shards live is
`epalm.data.sources`'.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import tarfile
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass

from webdataset.tariterators import tar_file_iterator

from epalm.data import schema, sources
from epalm.data.remote_read import DEFAULT_LIMITS, ReadLimits, StallError, bounded
from epalm.data.sources import ShardCache, ShardReadError
from epalm.digest import file_sha256
from epalm.locations import shard_location

log = logging.getLogger(__name__)
UNSAFE_POLICIES = ("error", "skip")
READ_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)


class UnsafeMemberError(ValueError):
    """A shard holds a member the loader never decodes (possibly a pickle)."""

    def __str__(self) -> str:  # webdataset appends its stream to args[0]; keep our message
        return self.message

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ShardList:
    """The shards of one manifest, in manifest order, with their sample counts (and sizes, where recorded)."""

    root: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int | None, ...] = ()
    sha256: tuple[str | None, ...] = ()
    limits: ReadLimits = DEFAULT_LIMITS  # timeouts and retries of remote reads
    cache_dir: str | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def url(self, shard: int) -> str:
        return sources.member_url(self.root, self.names[shard])

    def size(self, shard: int) -> int | None:
        return self.sizes[shard] if self.sizes else None


def load_manifest(root: str | os.PathLike, limits: ReadLimits = DEFAULT_LIMITS) -> tuple[dict, ShardList]:
    """Read `<root>/manifest.json` (any kind of path) and check that its shard counts add up to `num_samples`."""
    root = str(root)
    url = sources.member_url(root, schema.MANIFEST)
    if shard_location(root) == "local" and not os.path.isfile(url):
        raise FileNotFoundError(f"no {schema.MANIFEST} in {root}")
    try:
        text = sources.read_bytes(url, limits)
    except OSError as e:
        raise FileNotFoundError(f"{url}: cannot read the manifest: {e}") from e
    try:
        manifest = json.loads(text)
        shards = manifest.get("shards") or []
        names = tuple(sources.check_name(s["name"], url) for s in shards)
        counts = tuple(int(s["num_samples"]) for s in shards)
        sizes = tuple(s.get("bytes") for s in shards)
        sha = tuple(s.get("sha256") for s in shards)
        total = int(manifest["num_samples"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: invalid JSON: {e}") from e
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{url}: not a shard manifest ({type(e).__name__}: {e})") from e
    if sum(counts) != total:
        raise ValueError(f"{url}: shard counts sum to {sum(counts)}, num_samples is {total}")
    return manifest, ShardList(root, names, counts, sizes, sha, limits)


def check_shards(shards: ShardList, verify_checksums: bool = False) -> None:
    """Every listed shard exists with the manifest's size (and checksum); one error lists every problem.

    Local and fsspec shards are checked; http(s) and pipe: shards are checked while they are read.
    """
    kind = shard_location(shards.root)
    if kind not in ("local", "fsspec"):
        return
    problems = []
    fs = None
    for i in range(len(shards.names)):
        url, want = shards.url(i), shards.size(i)
        try:
            if kind == "local":
                size = os.path.getsize(url)
            else:
                if fs is None:
                    import fsspec

                    fs = fsspec.core.url_to_fs(url)[0]
                size = int(bounded(functools.partial(fs.info, url), shards.limits.read_timeout_s)["size"])
        except StallError as e:
            problems.append(f"{url}: no answer ({e})")
            continue
        except (FileNotFoundError, OSError) as e:
            problems.append(f"{url}: missing ({type(e).__name__})")
            continue
        if want is not None and size != want:
            problems.append(f"{url}: {size} bytes, the manifest says {want} (truncated or replaced?)")
        elif verify_checksums and kind == "local" and shards.sha256 and shards.sha256[i]:  # noqa: SIM102
            if file_sha256(url) != shards.sha256[i]:  # reads every byte: optional
                problems.append(f"{url}: sha256 differs from the manifest's")
    if problems:
        raise ValueError(f"{len(problems)} bad shard(s) in {shards.root}:\n  " + "\n  ".join(problems))


def split_name(name: str) -> tuple[str, str]:
    """`dir/key.frame000.jpg` -> (`dir/key`, `frame000.jpg`): the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return (head + "/" + stem if head else stem), ext


def is_safe(ext: str) -> bool:
    return ("." + ext).endswith(schema.SAFE_EXTENSIONS)


def shard_order(num_shards: int, rng: random.Random | None) -> list[int]:
    """Manifest order, or a seeded permutation of it."""
    order = list(range(num_shards))
    if rng is not None:
        rng.shuffle(order)
    return order


def pieces_of(
    counts: Sequence[int], order: Sequence[int], start: int, stop: int
) -> list[tuple[int, int, int]]:
    """Samples [start, stop) of the shards concatenated in `order`, as (shard, first sample, count)."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - lo))
        offset += counts[shard]
    if sum(p[2] for p in pieces) != stop - start:
        raise ValueError(f"range [{start}, {stop}) exceeds the {offset} samples of the shards")
    return pieces


def buffer_shuffle_order(n: int, buffer_size: int, rng: random.Random) -> list[int]:
    """The order in which a streaming shuffle buffer of `buffer_size` would emit items 0..n-1.

    Computed on indices, so a worker knows its whole order up front (resume = skip a prefix) while
    still reading shards sequentially: item k is never needed before item k - buffer_size is out.
    """
    if buffer_size <= 1:
        return list(range(n))
    out, buf = [], []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer_size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]
    shard: str
    problem: str | None = None  # set when the shard failed before this sample could be read


class _EndOfRange(Exception):
    pass


class _Selector:
    """webdataset's `select_files`: numbers samples by key, refuses unsafe members, selects what is wanted."""

    def __init__(self, url, first, count, start, wanted, skip, unsafe) -> None:
        self.url, self.first, self.stop, self.start = url, first, first + count, start
        self.wanted, self.skip, self.unsafe = wanted, skip, unsafe
        self.key, self.index, self.refused, self.keys = None, -1, 0, {}
        self.started_at: float | None = None

    def refuse(self, name: str) -> None:
        if self.unsafe == "error":
            raise UnsafeMemberError(
                f"{self.url}: member {name!r} is not one of {schema.SAFE_EXTENSIONS}; refusing the shard "
                "(it may be a pickle). Set data.unsafe_members=skip to drop such members."
            )
        self.refused += 1
        if self.refused == 1:
            log.warning("%s: skipping member %r (not a safe extension, never read)", self.url, name)

    def new_key(self, key: str) -> None:
        self.key, self.index = key, self.index + 1
        if self.index >= self.stop:
            raise _EndOfRange
        if self.index >= self.start:
            self.keys[self.index] = key

    def __call__(self, name: str) -> bool:
        key, ext = split_name(name)
        if key != self.key:
            self.new_key(key)
        if not is_safe(ext):
            self.refuse(name)
            return False
        return self.index >= self.start and self.wanted(ext) and not self.skip(self.index - self.first)


def _handler(exn: Exception) -> bool:
    if isinstance(exn, _EndOfRange):
        return False  # stop reading: the rest of the shard belongs to another range
    raise exn


class _Counting:
    """Counts the bytes a stream hands out (the cost of skipping to a resume point without seeking)."""

    def __init__(self, stream) -> None:
        self.stream, self.bytes = stream, 0

    def read(self, *args) -> bytes:
        data = self.stream.read(*args)
        self.bytes += len(data)
        return data


def _seek_to(f, url: str, start: int, sel: _Selector) -> None:
    """Local file: walk the tar headers, seeking over data, to the first member of sample `start`."""
    with tarfile.open(fileobj=f, mode="r:") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it has seen; a shard has thousands
            if not info.isfile():
                continue
            key, ext = split_name(info.name)
            if key != sel.key and sel.index + 1 == start:
                f.seek(info.offset)
                sel.key = None  # the member at `info.offset` opens sample `start` again
                return
            if key != sel.key:
                sel.new_key(key)
            if not is_safe(ext):
                sel.refuse(info.name)
    raise ValueError(f"{url}: has {sel.index + 1} samples, fewer than {start + 1}")


def _read_once(url, local, cache, size, first, count, start, wanted, skip, unsafe, limits):
    """(index in shard, sample) for samples start..first+count-1 of one tar, read once from its start."""
    path = cache.local_copy(url, size) if cache is not None and not local else url
    stream = sources.open_stream(path, limits)
    sel, ok = _Selector(url, first, count, start, wanted, skip, unsafe), False
    pending: dict[int, RawSample] = {}
    emit = start

    def flush(upto: int) -> Iterator[tuple[int, RawSample]]:
        nonlocal emit
        while emit < upto:
            sample = pending.pop(emit, None) or RawSample(sel.keys.get(emit, "?"), {}, url)
            sel.keys.pop(emit, None)
            if not skip(emit - first):
                yield emit, sample
            emit += 1

    try:
        source = stream
        if start > 0 and (local or cache is not None):
            _seek_to(stream, url, start, sel)
        elif start > 0:
            source = _Counting(stream)
        for item in tar_file_iterator(source, skip_meta=None, handler=_handler, select_files=sel):
            if isinstance(source, _Counting) and sel.started_at is None:
                sel.started_at = time.perf_counter()
                log.info("%s: read and dropped %d bytes to reach sample %d", url, source.bytes, start)
            index = sel.index
            yield from flush(index)
            pending.setdefault(index, RawSample(sel.key, {}, url)).members[split_name(item["fname"])[1]] = (
                item["data"]
            )
        stop = sel.stop if sel.index >= sel.stop else sel.index + 1
        yield from flush(stop)
        if emit < sel.stop:
            raise ValueError(f"has {sel.index + 1} samples, the manifest says at least {sel.stop}")
        ok = sel.index < sel.stop  # read to the end of the tar: the reader's exit status counts
    finally:
        sources.close_stream(stream, ok)


def iter_shard(
    shards: ShardList, shard: int, first: int, count: int, wanted, skip, unsafe, cache: ShardCache | None
) -> Iterator[tuple[int, RawSample]]:
    """(index in range, sample) for samples first..first+count-1 of one shard, with retries for remote ones.

    A failed read (a stall included) is retried from the first sample not yet handed out, within
    `shards.limits`; failures count from the last one after which a sample arrived. ShardReadError at the end.
    """
    url, limits = shards.url(shard), shards.limits
    local = shard_location(shards.root) == "local"
    done, failures, since, failed_at = first, 0, 0.0, -1
    while True:
        try:
            for index, sample in _read_once(
                url, local, cache, shards.size(shard), first, count, done, wanted, skip, unsafe, limits
            ):
                yield index - first, sample
                done = index + 1
            return
        except UnsafeMemberError:
            raise
        except READ_ERRORS as e:
            if done >= first + count:
                return  # every sample arrived whole; only the reader's exit status or the tail failed
            if done != failed_at:  # progress since the last failure: a new run of failures
                failures, since, failed_at = 0, time.monotonic(), done
            failures += 1
            wait = None if local else limits.delay(failures, since)
            if wait is None:
                raise ShardReadError(url, done, e, failures) from e
            log.warning("%s: %s at sample %d; %s", url, e, done, limits.describe(failures))
            time.sleep(wait)


def iter_range(
    shards: ShardList,
    pieces: Sequence[tuple[int, int, int]],
    wanted: Callable[[str], bool],
    skip: Container[int] = (),
    unsafe: str = "error",
    on_error: str = "raise",
) -> Iterator[tuple[int, RawSample]]:
    """Samples of `pieces` read in sequence, numbered from 0; those in `skip` are not read (nor returned).

    With on_error="skip", a shard that fails mid-read gives its remaining samples as RawSamples with
    `problem` set, so the caller can count them and the numbering stays the same.
    """
    base = 0
    cache = ShardCache(shards.cache_dir, shards.limits) if shards.cache_dir else None
    for shard, first, count in pieces:
        got = -1
        try:
            for i, sample in iter_shard(
                shards, shard, first, count, wanted, lambda i, b=base: b + i in skip, unsafe, cache
            ):
                got = i
                yield base + i, sample
        except ShardReadError as e:
            if on_error != "skip":
                raise
            log.error("%s; skipping its %d remaining samples of this range", e, count - got - 1)
            name = shards.names[shard]
            for i in range(got + 1, count):
                if base + i not in skip:
                    yield base + i, RawSample(f"{name}#{first + i}", {}, e.url, f"shard_read_error: {e}")
        base += count


class _Either:
    """Membership in any of several containers (a set, a mask wrapper)."""

    def __init__(self, *parts: Container[int]) -> None:
        self.parts = parts

    def __contains__(self, i: object) -> bool:
        return any(i in part for part in self.parts)


def iter_ordered(
    shards: ShardList,
    pieces: Sequence[tuple[int, int, int]],
    order: Sequence[int],
    start: int,
    wanted: Callable[[str], bool],
    unsafe: str = "error",
    on_error: str = "raise",
    absent: Container[int] = (),
) -> Iterator[RawSample]:
    """Samples `order[start:]` of a range: read sequentially, holding only those read ahead of use.

    `absent`: indices of the range that `order` does not hold (never read, nor returned)."""
    if unsafe not in UNSAFE_POLICIES:
        raise ValueError(f"unsafe_members must be one of {UNSAFE_POLICIES}, got {unsafe!r}")
    done = _Either(set(order[:start]), absent)
    reader = iter_range(shards, pieces, wanted, done, unsafe, on_error)
    ahead: dict[int, RawSample] = {}
    for idx in order[start:]:
        while idx not in ahead:
            i, sample = next(reader)
            ahead[i] = sample
        yield ahead.pop(idx)
