"""The parts of feature extraction (`data_shards.extract`) around the encoder: the ranks' group; the input
side, which reads whole media shards in DataLoader workers and applies the encoder's eval transform; the
output side, which writes each feature shard in the builder's layout with its done-record, and plans which
shards a re-run must redo."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_shards import writer
from data_shards.features import input_transform, sample_input
from epalm.data import schema
from epalm.data.media import npy_bytes
from epalm.data.stream import ShardList, iter_range
from epalm.distributed import (
    DistInfo,
    broadcast_from_rank0,
    get_dist_info,
    slurm_env_exports,
    without_cpu_shm_op,
)

# ----------------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Group:
    """This process's place in the job; collectives are no-ops in a world of one."""

    info: DistInfo

    def gather(self, obj: object) -> list:
        if self.info.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object) -> object:
        return broadcast_from_rank0(obj, self.info)


def join(timeout_minutes: int) -> Group:
    """A gloo group (only small objects travel: the encoder never needs NCCL) under any launcher."""
    import datetime

    import torch.distributed as dist

    os.environ.update(slurm_env_exports())
    info = get_dist_info()
    if info.world_size <= 1:
        return Group(DistInfo(0, 0, 1, info.source))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if info.source == "mpi":  # DeepSpeed's MPI discovery fills RANK / MASTER_ADDR from mpi4py
        import deepspeed

        with without_cpu_shm_op():
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return Group(DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size(), info.source))


# ----------------------------------------------------------------------------------- the input side


def first_sample(shards: ShardList) -> dict[str, bytes]:
    if not shards.names:
        return {}
    return next(iter_range(shards, [(0, 0, 1)], lambda ext: True))[1].members


class ShardInputs(torch.utils.data.IterableDataset):
    """An IterableDataset: each DataLoader worker reads whole shards and yields chunks of `batch_size`
    samples, the stored members plus the eval-transformed inputs of those the transform takes."""

    def __init__(self, shards: ShardList, todo: list[int], spec: dict, batch_size: int):
        super().__init__()
        self.shards, self.todo, self.spec, self.batch_size = shards, todo, spec, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        mine = self.todo[worker.id :: worker.num_workers] if worker else self.todo
        transform = input_transform(self.spec)
        for j in mine:
            chunk: list = []
            pieces = [(j, 0, self.shards.counts[j])]
            for _, sample in iter_range(self.shards, pieces, lambda ext: True):
                members = {k: v for k, v in sample.members.items() if k != schema.FEATURES}
                chunk.append((sample.key, members))
                if len(chunk) == self.batch_size:
                    yield self._item(j, chunk, transform, last=False)
                    chunk = []
            yield self._item(j, chunk, transform, last=True)

    def _item(self, shard: int, chunk: list, transform, last: bool) -> dict:
        keys, rows, failed = [], [], {}
        for key, members in chunk:
            try:
                rows.append(sample_input(members, self.spec, transform))
                keys.append(key)
            except Exception as e:  # a member the transform rejects: skip the sample, not the shard
                failed[key] = f"{type(e).__name__}: {e}"
        x = torch.stack(rows) if rows else None
        return {"shard": shard, "samples": chunk, "keys": keys, "x": x, "failed": failed, "last": last}


# ----------------------------------------------------------------------------------- the output side


def build_id(manifest: dict, shards: ShardList, j: int, fp: dict, batch_size: int, device: str) -> str:
    """A hash of what decides an output shard's bytes: its input shard, the encoder, batch and device kind."""
    payload = {
        "schema": schema.SCHEMA_VERSION,
        "input": {k: manifest.get(k) for k in ("source", "split", "args")},
        "shard": shards.names[j],
        "bytes": (Path(shards.root) / shards.names[j]).stat().st_size,
        "num_samples": shards.counts[j],
        "fingerprint": fp,
        "batch_size": batch_size,
        "device": device,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class InFlight:
    """An output shard being assembled from its chunks, which arrive in order."""

    samples: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # (key, input) not yet in a full batch
    feats: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)


def write_shard(out: Path, name: str, bid: str, fp: dict, state: InFlight) -> dict:
    """The builder's layout: the tar atomically, then its done-record; an empty shard is not written."""
    samples, skipped = [], []
    for key, members in state.samples:
        if key in state.feats:
            samples.append((key, {**members, schema.FEATURES: npy_bytes(state.feats[key])}))
        else:
            sid = json.loads(members[schema.JSON]).get("id") if schema.JSON in members else None
            skipped.append([sid, "encoder_error", state.failed.get(key, "no features")])
    return writer.commit_shard(
        out, name, samples, skipped, build_id=bid, fingerprint=fp, num_records=len(state.samples)
    )


def plan(out: Path, manifest: dict, shards: ShardList, ids: list[str], fp: dict) -> list[int]:
    """Rank 0, before any rank writes: drop the manifest and leftovers, return the shards to (re)do.
    Raises ValueError when --out holds shards of another encoder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / schema.MANIFEST).unlink(missing_ok=True)  # no manifest while shards change
    names = set(shards.names) | {schema.done_record_name(n) for n in shards.names}
    for path in out.iterdir():
        if path.suffix == ".tmp" or (path.name.endswith((".tar", ".tar.json")) and path.name not in names):
            path.unlink(missing_ok=True)
    todo = []
    for j, name in enumerate(shards.names):
        try:
            old = json.loads((out / schema.done_record_name(name)).read_text()).get("fingerprint")
        except (OSError, ValueError):
            old = None
        if old is not None and old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise ValueError(f"{out / name} was extracted with another encoder (differs in {diff})")
        if writer.load_done(out, name, ids[j]) is None:
            todo.append(j)
    return todo
