"""Shard writing: records cut into fixed-size shards, built in parallel worker processes, each written
atomically (`.tmp` + os.replace, then a done-record), so a re-run skips finished shards; plus the manifest.

Tars are written with webdataset's TarWriter. `--out` is a local directory: the atomic rename and the
done-records need a filesystem (an fsspec URL for --out is not supported; copy the finished directory up).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from data_shards.media import extract
from data_shards.sources.base import Record
from epalm import atomic
from epalm.data import schema
from epalm.data.media import SkipSample, npy_bytes
from epalm.digest import file_sha256

KEY_WIDTH = 9  # sample keys are the zero-padded record index: sortable, dot-free, stable


@dataclass(frozen=True)
class ShardOptions:
    """Everything a worker needs to build a shard; all of it (bar `out`) decides the shard's bytes."""

    out: str
    split: str
    media_root: str | None
    image_size: int
    num_frames: int
    samples_per_shard: int
    encoder: dict | None = None  # data_shards.features spec, None = no feature cache


@dataclass(frozen=True)
class ShardTask:
    index: int
    start: int  # index of its first record in the whole record list
    records: tuple[Record, ...]
    options: ShardOptions


def plan(records: list[Record], options: ShardOptions) -> list[ShardTask]:
    """Cut the record list into consecutive shard-sized chunks: shard i always holds the same records."""
    n = options.samples_per_shard
    return [
        ShardTask(i, start, tuple(records[start : start + n]), options)
        for i, start in enumerate(range(0, len(records), n))
    ]


def build_id(task: ShardTask) -> str:
    """A hash of the shard's inputs: a done-record with another id is stale and gets rebuilt."""
    o = task.options
    payload = {
        "schema": schema.SCHEMA_VERSION,
        "split": o.split,
        "media_root": os.path.abspath(o.media_root) if o.media_root else None,
        "image_size": o.image_size,
        "num_frames": o.num_frames,
        "encoder": o.encoder and o.encoder["fingerprint"],
        "start": task.start,
        "records": [asdict(r) for r in task.records],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar with fixed metadata (mtime 0, uid/gid 0 with empty names, 0644, USTAR) and sorted members, written
    by webdataset's TarWriter: same samples -> same bytes. (Its ShardWriter is not used: it numbers shards as
    it fills them, one writer at a time, while a build here writes planned shards in parallel workers.)"""
    with open(path, "wb") as f:
        with wds.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
            for key, members in samples:
                writer.write({"__key__": key, **members})
        f.flush()
        os.fsync(f.fileno())


def load_done(out: Path, name: str, bid: str) -> dict | None:
    """The shard's done-record if it is finished and current, else None."""
    try:
        done = json.loads((out / schema.done_record_name(name)).read_text())
    except (OSError, ValueError):
        return None
    if done.get("build_id") != bid or (done["num_samples"] and "sha256" not in done):
        return None  # stale, or from before the manifest recorded checksums
    if done["num_samples"] and not ((out / name).is_file() and (out / name).stat().st_size == done["bytes"]):
        return None
    return done


def build_shard(task: ShardTask) -> dict:
    """Extract every record's media, write the tar atomically, then the done-record; returns the done-record."""
    o, out = task.options, Path(task.options.out)
    name = schema.shard_name(o.split, task.index)
    samples, skipped, ids = [], [], {}
    for offset, record in enumerate(task.records):
        key = f"{task.start + offset:0{KEY_WIDTH}d}"
        ids[key] = record.meta.get("id")
        try:
            members = extract(record, o.media_root, o.image_size, o.num_frames)
        except SkipSample as e:
            skipped.append([record.meta.get("id"), e.reason, e.detail])
            continue
        members[schema.JSON] = json.dumps(record.meta, sort_keys=True, ensure_ascii=False).encode()
        samples.append((key, members))
    if o.encoder is not None and samples:
        from data_shards.features import encode_samples

        feats, failed = encode_samples(samples, o.encoder)
        for key, members in samples:
            if key in feats:
                members[schema.FEATURES] = npy_bytes(feats[key])
        skipped += [[ids[key], "encoder_error", detail] for key, detail in failed.items()]
        samples = [s for s in samples if s[0] in feats]
    return commit_shard(out, name, samples, skipped, build_id=build_id(task), num_records=len(task.records))


def commit_shard(out: Path, name: str, samples: list, skipped: list[list], **identity) -> dict:
    """Write shard `name` (tmp + rename; an empty shard is not written at all), then its done record: `identity`
    (build id, record count...), sample count, bytes, sha256 and the skips by reason. Returns the record."""
    if samples:
        tmp = out / f"{name}.{os.getpid()}.tmp"
        write_tar(tmp, samples)
        os.replace(tmp, out / name)
    else:
        (out / name).unlink(missing_ok=True)
    done = {
        "name": name,
        **identity,
        "num_samples": len(samples),
        "bytes": (out / name).stat().st_size if samples else 0,
        "sha256": file_sha256(out / name) if samples else None,
        "skipped": dict(sorted(Counter(r for _, r, _ in skipped).items())),
        "skipped_samples": skipped,
    }
    atomic.write_json_atomic(out / schema.done_record_name(name), done)
    return done


def run_tasks(tasks: list[ShardTask], workers: int) -> Iterator[dict]:
    """Build shards, in completion order; each worker builds whole shards."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(build_shard, tasks)
        return
    # fork is cheap, but unsafe once torch has started its thread pools (the feature cache): spawn then
    method = "spawn" if tasks[0].options.encoder is not None else "fork"
    with mp.get_context(method).Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(build_shard, tasks)


def remove_stale(out: Path, split: str, num_shards: int) -> None:
    """Drop shards and temp files of this split that the current plan does not produce."""
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.tar(\.json)?$")
    for path in out.iterdir():
        m = pattern.match(path.name)
        if (m and int(m.group(1)) >= num_shards) or (
            path.name.startswith(f"{split}-") and path.suffix == ".tmp"
        ):
            path.unlink(missing_ok=True)


def build(tasks: list[ShardTask], workers: int, progress: bool = True) -> tuple[list[dict], dict]:
    """Build every unfinished shard; returns all done-records (in shard order) and run statistics."""
    from tqdm import tqdm

    out = Path(tasks[0].options.out) if tasks else None
    done: dict[int, dict] = {}
    todo = []
    for task in tasks:
        record = load_done(out, schema.shard_name(task.options.split, task.index), build_id(task))
        if record is None:
            todo.append(task)
        else:
            done[task.index] = record
    t0 = time.perf_counter()
    total = sum(len(t.records) for t in todo)
    bar = tqdm(total=total, unit="rec", disable=not progress, desc="shards", dynamic_ncols=True)
    built_samples = 0
    for record in run_tasks(todo, workers):
        done[int(record["name"].rsplit("-", 1)[1].split(".")[0])] = record
        built_samples += record["num_samples"]
        bar.update(record["num_records"])
    bar.close()
    stats = {
        "resumed_shards": len(tasks) - len(todo),
        "built_samples": built_samples,
        "seconds": time.perf_counter() - t0,
    }
    return [done[i] for i in sorted(done)], stats


def make_manifest(
    done: list[dict], parse_skipped: Counter, source: str, split: str, args: dict, fingerprint: dict | None
) -> dict:
    skipped = Counter(parse_skipped)
    for d in done:
        skipped.update(d["skipped"])
    # bytes and sha256 let the loader find a missing, truncated or replaced shard before training
    shards = [
        {"name": d["name"], "num_samples": d["num_samples"], "bytes": d["bytes"], "sha256": d["sha256"]}
        for d in done
        if d["num_samples"]
    ]
    num_samples = sum(s["num_samples"] for s in shards)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "source": source,
        "split": split,
        "num_samples": num_samples,
        "num_records": num_samples + sum(skipped.values()),
        "shards": shards,
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "args": args,
        "fingerprint": fingerprint,
    }
