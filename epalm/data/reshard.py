"""Resume on another partition (world size, workers, batch size): which samples of each dataset's
interrupted epoch a saved loader state had consumed, recomputed from the state alone (no data is read),
and how the rest is spread over the new ranks and workers, each sample once (a `Carry`); later epochs
are then any run's on the new partition. docs/loader.md, "Resume on another partition".

Positions are indices into one dataset epoch's virtual sequence (its shards concatenated in that epoch's
order). The same pure functions say who reads what in `epalm.data.resumable`, so the two cannot disagree.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from epalm.data.stream import buffer_shuffle_order

log = logging.getLogger(__name__)
# (partition, batches consumed) -> (worker, dataset) batches each logical worker took: the mixing schedule's
WorkerCounts = Callable[["Partition", int], np.ndarray]


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches of worker w: DataLoader hands out batch i from worker i % num_workers."""
    return [(num_batches - w + num_workers - 1) // num_workers for w in range(num_workers)]


def share(num_batches: int, num_workers: int, batch_size: int, rank: int, worker: int) -> tuple[int, int]:
    """(first position, number of samples) of one worker's contiguous share of an epoch."""
    counts = worker_batch_counts(num_batches, num_workers)
    return (rank * num_batches + sum(counts[:worker])) * batch_size, counts[worker] * batch_size


def shuffled(n: int, buffer_size: int, *key: object) -> list[int]:
    """The shuffle-buffer order of n items under the RNG named by `key` (epoch, rank, worker, ...)."""
    return buffer_shuffle_order(n, buffer_size, random.Random("/".join(map(str, key))))


@dataclass(frozen=True)
class Partition:
    """What decides who reads what, as a loader state records it."""

    world_size: int
    num_workers: int  # logical, >= 1
    batch_size: int
    batches_per_epoch: int
    seed: int
    shuffle_buffer: int

    @classmethod
    def of(cls, state: dict, shuffle_buffer: int) -> Partition:
        keys = ("world_size", "num_workers", "batch_size", "batches_per_epoch", "seed")
        values = [int(state[k]) for k in keys]
        return cls(*values, int(state.get("shuffle_buffer", shuffle_buffer)))

    def num_batches(self, num_samples: int) -> int:
        return num_samples // (self.world_size * self.batch_size)


@dataclass(frozen=True)
class Carry:
    """The rest of one dataset's interrupted `epoch` on a new partition. Per logical worker: the dataset
    position where the carry starts (`base`), its batches on every rank (`batches`) and the shift of the
    positions after it (`delta`: position + delta is the position of an ordinary run of the partition)."""

    dataset: int
    epoch: int
    rest: np.ndarray  # the positions handed out, sorted: rank r's run of per_rank * batch_size, by worker
    part: Partition
    base: tuple[int, ...]
    batches: tuple[int, ...]
    delta: tuple[int, ...]

    @property
    def per_rank(self) -> int:
        return sum(self.batches)

    def positions(self, rank: int, worker: int) -> np.ndarray:
        lo = (rank * self.per_rank + sum(self.batches[:worker])) * self.part.batch_size
        return self.rest[lo : lo + self.batches[worker] * self.part.batch_size]

    def order(self, rank: int, worker: int) -> list[int]:
        n = self.batches[worker] * self.part.batch_size
        p = self.part
        return shuffled(n, p.shuffle_buffer, "carry", p.seed, self.dataset, self.epoch, rank, worker)

    def active(self, worker: int, position: int) -> bool:
        return position < self.base[worker] + self.batches[worker]


def _skips(state: dict, num_datasets: int) -> list:
    """[rank][worker][dataset] -> [epoch, samples skipped in it]; every rank's must be in the state."""
    part_k = int(state["num_workers"])
    if state.get("version") == 1:  # one rank's counts, held for all (see ResumableLoader._skips_of)
        table = state.get("worker_skipped") or [[[0, 0]] * num_datasets for _ in range(part_k)]
        return [table] * int(state["world_size"])
    by_rank = state["worker_skipped"]
    missing = [r for r, table in enumerate(by_rank) if table is None]
    if missing:
        raise ValueError(
            f"loader state holds no skip counts for ranks {missing}: taken without torch.distributed, it "
            "cannot say which samples those ranks consumed"
        )
    return by_rank


def _skipped(table: list, rank: int, worker: int, dataset: int, epoch: int) -> int:
    e, s = table[rank][worker][dataset]
    return int(s) if int(e) == epoch else 0


def consumed(state: dict, sizes: Sequence[int], shuffle_buffer: int, counts: WorkerCounts) -> list:
    """Per dataset: (its interrupted epoch, a boolean mask over that epoch's positions: consumed).

    A worker that had moved on to the next epoch consumed all of its share; what it took of the next one
    is not counted (with one dataset every worker is in the same epoch). Skipped (bad) samples count as
    consumed.
    """
    part = Partition.of(state, shuffle_buffer)
    k, b = part.num_workers, part.batch_size
    pos = np.asarray(state["worker_batches"], dtype=np.int64).reshape(k, len(sizes))
    skips = _skips(state, len(sizes))
    carries = None
    if state.get("carry"):  # this state continued an earlier one: its carry decides while it lasts
        carries = plan(state["carry"]["from"], part, sizes, shuffle_buffer, counts)[1]
    shift = np.asarray(state.get("shift") or np.zeros((k, len(sizes))), dtype=np.int64)
    out = []
    for d, n_samples in enumerate(sizes):
        c = carries[d] if carries else None
        if c is not None and any(c.active(w, pos[w, d]) for w in range(k)):
            mask = np.ones(n_samples, dtype=bool)
            mask[c.rest] = False
            for r in range(part.world_size):
                for w in range(k):
                    mine = c.positions(r, w)
                    taken = min(int(pos[w, d]) - c.base[w], c.batches[w])
                    n = taken * b + _skipped(skips, r, w, d, c.epoch)
                    mask[mine[np.asarray(c.order(r, w)[: min(n, len(mine))], dtype=np.int64)]] = True
            out.append((c.epoch, mask))
            continue
        q = pos[:, d] + (np.asarray(c.delta) if c is not None else shift[:, d])
        nb = part.num_batches(n_samples)
        per_worker = worker_batch_counts(nb, k)
        live = [w for w in range(k) if per_worker[w]]
        epoch = min(int(q[w]) // per_worker[w] for w in live)
        mask = np.zeros(n_samples, dtype=bool)
        for r in range(part.world_size):
            for w in live:
                start, n = share(nb, k, b, r, w)
                e, first = divmod(int(q[w]), per_worker[w])
                taken = n if e > epoch else min(n, first * b + _skipped(skips, r, w, d, epoch))
                order = shuffled(n, part.shuffle_buffer, "buffer", part.seed, d, epoch, r, w)
                mask[start + np.asarray(order[:taken], dtype=np.int64)] = True
        out.append((epoch, mask))
    return out


def plan(
    state: dict, new: Partition, sizes: Sequence[int], shuffle_buffer: int, counts: WorkerCounts
) -> tuple[int, list[Carry]]:
    """(batches consumed on the new partition, one Carry per dataset) to continue `state` on `new`.

    One dataset (an epoch of the mix = one pass over it): the loader resumes inside the interrupted epoch,
    with exactly as many steps left as the rest makes on the new partition, then runs later epochs as any
    run of it. A mix: the same share of the mix's epoch is consumed, and each dataset first hands out the
    rest of its own interrupted epoch. A rest that does not fill a batch on every rank is dropped (logged),
    as an epoch's remainder always is.
    """
    old = Partition.of(state, shuffle_buffer)
    progress = consumed(state, sizes, shuffle_buffer, counts)
    rests = [np.flatnonzero(~mask) for _, mask in progress]
    k, per = new.num_workers, new.batches_per_epoch
    per_rank = [len(rest) // (new.world_size * new.batch_size) for rest in rests]
    if len(sizes) == 1 and per == new.num_batches(sizes[0]):
        epoch = progress[0][0]
        done = epoch * per + per - per_rank[0]
        batches = [[sum(1 for s in range(per - per_rank[0], per) if s % k == w)] for w in range(k)]
    else:
        mix_epoch, step = divmod(int(state["consumed_batches"]), old.batches_per_epoch)
        done = mix_epoch * per + min(per - 1, step * per // old.batches_per_epoch)
        batches = [[worker_batch_counts(n, k)[w] for n in per_rank] for w in range(k)]
    base = np.asarray(counts(new, done), dtype=np.int64).reshape(k, len(sizes))
    carries = []
    for d, n_samples in enumerate(sizes):
        per_worker = worker_batch_counts(new.num_batches(n_samples), k)
        (epoch, _), t = progress[d], [batches[w][d] for w in range(k)]
        delta = tuple((epoch + 1) * per_worker[w] - int(base[w, d]) - t[w] for w in range(k))
        used = per_rank[d] * new.world_size * new.batch_size
        if used < len(rests[d]):
            log.warning(
                "dataset %d, epoch %d: %d samples left over after %d full batches per rank are not used",
                d, epoch, len(rests[d]) - used, per_rank[d],
            )  # fmt: skip
        base_d = tuple(int(x) for x in base[:, d])
        carries.append(Carry(d, epoch, rests[d][:used], new, base_d, tuple(t), delta))
    return done, carries
