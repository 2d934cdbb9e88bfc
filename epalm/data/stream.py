"""Raw sample streams over tar shards: manifest, sample-granular ranges, buffer shuffle and safe reading.

Only members whose name ends in one of `schema.SAFE_EXTENSIONS` are ever read; any other member
(`.pyd`, `.pickle`, `.pth`, ...) is refused from its tar header alone, before its bytes are touched.
Samples that a stream does not need are skipped by seeking past them, without reading their data.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from epalm.data import schema

log = logging.getLogger(__name__)
UNSAFE_POLICIES = ("error", "skip")


class UnsafeMemberError(ValueError):
    """A shard holds a member the loader never decodes (possibly a pickle)."""


@dataclass(frozen=True)
class ShardList:
    """The shards of one manifest, in manifest order, with their sample counts."""

    root: str
    names: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def load_manifest(root: str | Path) -> tuple[dict, ShardList]:
    """Read `<root>/manifest.json` and check that its shard counts add up to `num_samples`."""
    path = Path(root) / schema.MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {schema.MANIFEST} in {root}")
    manifest = json.loads(path.read_text())
    shards = manifest.get("shards") or []
    names = tuple(s["name"] for s in shards)
    counts = tuple(int(s["num_samples"]) for s in shards)
    if sum(counts) != int(manifest["num_samples"]):
        raise ValueError(
            f"{path}: shard counts sum to {sum(counts)}, num_samples is {manifest['num_samples']}"
        )
    return manifest, ShardList(str(root), names, counts)


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


def _iter_shard(
    path: str, first: int, count: int, wanted: Callable[[str], bool], skip: Callable[[int], bool], unsafe: str
) -> Iterator[tuple[int, RawSample | None]]:
    """(index in range, sample or None when skipped) for samples first..first+count-1 of one tar."""
    key, members, index, refused = None, {}, -1, 0

    def done() -> tuple[int, RawSample | None]:
        i = index - first
        return i, (None if skip(i) else RawSample(key, members, path))

    with tarfile.open(path, "r:") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it has seen; a shard has thousands
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if k != key:
                if index >= first:
                    yield done()
                    if index - first + 1 == count:
                        return
                key, members, index = k, {}, index + 1
            if not is_safe(ext):
                if unsafe == "error":
                    raise UnsafeMemberError(
                        f"{path}: member {info.name!r} is not one of {schema.SAFE_EXTENSIONS}; refusing "
                        "the shard (it may be a pickle). Pass unsafe_members='skip' to drop such members."
                    )
                refused += 1
                if refused == 1:
                    log.warning("%s: skipping member %r (not a safe extension, never read)", path, info.name)
                continue
            # only the members this dataset decodes are read; the rest are seeked over
            if index >= first and wanted(ext) and not skip(index - first):
                members[ext] = tar.extractfile(info).read()
        if index >= first and index - first + 1 == count:
            yield done()
            return
    raise ValueError(f"{path}: has {index + 1} samples, manifest says at least {first + count}")


def iter_range(
    shards: ShardList,
    pieces: Sequence[tuple[int, int, int]],
    wanted: Callable[[str], bool],
    skip: Container[int] = (),
    unsafe: str = "error",
) -> Iterator[tuple[int, RawSample | None]]:
    """Samples of `pieces` read in sequence, numbered from 0; those in `skip` come back as None."""
    base = 0
    for shard, first, count in pieces:
        path = str(Path(shards.root) / shards.names[shard])
        for i, sample in _iter_shard(path, first, count, wanted, lambda i, b=base: b + i in skip, unsafe):
            yield base + i, sample
        base += count


def iter_ordered(
    shards: ShardList,
    pieces: Sequence[tuple[int, int, int]],
    order: Sequence[int],
    start: int,
    wanted: Callable[[str], bool],
    unsafe: str = "error",
) -> Iterator[RawSample]:
    """Samples `order[start:]` of a range: read sequentially, holding only those read ahead of use."""
    if unsafe not in UNSAFE_POLICIES:
        raise ValueError(f"unsafe_members must be one of {UNSAFE_POLICIES}, got {unsafe!r}")
    done = set(order[:start])
    reader = iter_range(shards, pieces, wanted, done, unsafe)
    ahead: dict[int, RawSample] = {}
    for idx in order[start:]:
        while idx not in ahead:
            i, sample = next(reader)
            if sample is not None:
                ahead[i] = sample
        yield ahead.pop(idx)
