"""Exact-resume machinery: who reads what (per rank, worker, epoch), the mixing schedule, the DataLoader wrapper.

Every worker's batches are a pure function of (seed, epoch, rank, world size, worker, workers), so
the loader state is a count of batches handed out; see docs/loader.md. A state from another partition
(world size, workers, batch size) continues through `epalm.data.reshard`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from epalm.data import schema
from epalm.data.collate import BatchBuilder, SampleError
from epalm.data.reshard import Carry, Partition, plan, share, shuffled, worker_batch_counts
from epalm.data.stream import ShardList, iter_ordered, pieces_of, shard_order

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: skip counts of every rank (1 held the saving rank's only)
_BLOCK = 4096  # schedule steps drawn per RNG block
INFO = "_loader"  # batch key the workers use to report positions and skips; removed before the batch is handed out


class TooManySkipsError(ValueError):
    """More samples of a worker's share were skipped than `max_skip_fraction` allows."""


__all__ = ["DatasetPlan", "ResumableLoader", "eval_batches_per_rank", "worker_batch_counts"]


def eval_batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> list[int]:
    """Eval batches of each rank (they differ by at most one; ZeRO-3 generation must pad to the max)."""
    sizes = [num_samples * (r + 1) // world_size - num_samples * r // world_size for r in range(world_size)]
    return [-(-n // batch_size) for n in sizes]


@dataclass(frozen=True)
class DatasetPlan:
    """Where each (rank, worker, epoch) of one dataset reads, all a pure function of its arguments."""

    shards: ShardList
    builder: BatchBuilder
    rank: int
    world_size: int
    batch_size: int
    num_workers: int  # logical workers, >= 1
    shuffle_buffer: int
    unsafe: str
    max_skip_fraction: float = 0.0

    @property
    def num_batches(self) -> int:
        return self.shards.num_samples // (self.world_size * self.batch_size)

    def _refill(self, pieces, perm: list[int], pos: int, absent=()) -> Iterator:
        """The worker's samples from position `pos` of `perm`, then `perm` again: skipped samples are replaced
        by the next ones, and past the end of the share by its first ones (equal batches on every rank)."""
        p = pos % len(perm)
        while True:
            yield from iter_ordered(
                self.shards, pieces, perm, p, self.builder.wanted, self.unsafe, "skip", absent
            )
            p = 0

    def _order(self, seed: int, epoch: int) -> list[int]:
        return shard_order(
            len(self.shards.names), random.Random(f"shards/{seed}/{self.builder.index}/{epoch}")
        )

    def iter_train(
        self,
        worker: int,
        consumed: int,
        seed: int,
        extra: tuple[int, int] = (0, 0),
        carry: Carry | None = None,
        shift: int = 0,
    ) -> Iterator[dict]:
        """Batches of one worker from its `consumed`-th batch on, through epochs forever.

        `extra` = (epoch, samples skipped so far in it): each skip moved the worker one sample further on.
        `carry`: first the rest of an epoch another partition interrupted (`reshard.Carry`); then, as
        after a finished one (`shift`), positions move to where an ordinary run's are.
        """
        if carry is not None:
            if carry.active(worker, consumed):
                yield from self._carry(worker, consumed - carry.base[worker], seed, extra, carry)
                consumed = carry.base[worker] + carry.batches[worker]
            shift = carry.delta[worker]
        counts, b = worker_batch_counts(self.num_batches, self.num_workers), self.batch_size
        epoch, first = divmod(consumed + shift, counts[worker])
        skipped = extra[1] if extra[0] == epoch else 0
        start, n = share(self.num_batches, self.num_workers, b, self.rank, worker)
        while True:
            pieces = pieces_of(self.shards.counts, self._order(seed, epoch), start, start + n)
            perm = shuffled(
                n, self.shuffle_buffer, "buffer", seed, self.builder.index, epoch, self.rank, worker
            )
            samples = self._refill(pieces, perm, first * b + skipped)
            yield from self._batches(samples, range(first, counts[worker]), worker, epoch, seed, skipped, n)
            epoch, first, skipped = epoch + 1, 0, 0

    def _carry(
        self, worker: int, taken: int, seed: int, extra: tuple[int, int], carry: Carry
    ) -> Iterator[dict]:
        """The worker's batches of `carry` from its `taken`-th on: its positions, read in one sweep over the
        range they span (the others in it are not returned), in their own shuffle-buffer order."""
        mine, epoch = carry.positions(self.rank, worker), carry.epoch
        lo, hi = int(mine[0]), int(mine[-1]) + 1
        present = np.zeros(hi - lo, dtype=bool)
        present[mine - lo] = True
        perm = [int(mine[j]) - lo for j in carry.order(self.rank, worker)]
        pieces = pieces_of(self.shards.counts, self._order(seed, epoch), lo, hi)
        skipped = extra[1] if extra[0] == epoch else 0
        samples = self._refill(pieces, perm, taken * self.batch_size + skipped, _Absent(present))
        steps = range(taken, carry.batches[worker])
        yield from self._batches(samples, steps, worker, epoch, seed, skipped, len(mine))

    def _batches(self, samples, steps: range, worker: int, epoch: int, seed: int, skipped: int, n: int):
        """One batch per step from `samples`, skipping (and counting) bad ones; `n`: the share's size."""
        b = self.batch_size
        for _ in steps:
            raws, items, reasons = [], [], Counter()
            while len(items) < b:
                raw = next(samples)
                try:
                    items.append(self.builder.prepare(raw, epoch, seed))
                    raws.append(raw)
                except SampleError as e:
                    skipped += 1
                    reasons[e.reason] += 1
                    log.warning("skipping a sample: %s", e)
                    self._check_skips(skipped, n, epoch, e)
            batch = self.builder.assemble(raws, items)
            batch[INFO] = {
                "dataset": self.builder.index,
                "worker": worker,
                "epoch": epoch,
                "skipped_in_epoch": skipped,
                "reasons": dict(reasons),
            }
            yield batch

    def _check_skips(self, skipped: int, n: int, epoch: int, last: SampleError) -> None:
        if skipped > self.max_skip_fraction * n:
            raise TooManySkipsError(
                f"dataset {self.builder.name!r}: {skipped} of the {n} samples of this worker's share of "
                f"epoch {epoch} on rank {self.rank} skipped, more than data.max_skip_fraction="
                f"{self.max_skip_fraction}; the last: {last}"
            )

    def iter_eval(self, worker: int) -> Iterator[tuple[int, list]]:
        """Worker `worker`'s share of this rank's contiguous slice, in manifest order; last batch partial."""
        total, r, w, b = self.shards.num_samples, self.rank, self.world_size, self.batch_size
        lo, hi = total * r // w, total * (r + 1) // w
        num_batches = -(-(hi - lo) // b)
        short = num_batches * b - (hi - lo)
        sizes = [c * b for c in worker_batch_counts(num_batches, self.num_workers)]
        if num_batches:
            sizes[(num_batches - 1) % self.num_workers] -= short  # the owner of the last batch
        start, n = lo + sum(sizes[:worker]), sizes[worker]
        order = shard_order(len(self.shards.names), None)
        pieces = pieces_of(self.shards.counts, order, start, start + n)
        samples = iter_ordered(self.shards, pieces, range(n), 0, self.builder.wanted, self.unsafe)
        for i in range(0, n, b):
            yield 0, [next(samples) for _ in range(min(b, n - i))]


class _Absent:
    """The indices of a range a carry does not read: a mask, not a set (a rest may hold millions)."""

    def __init__(self, present: np.ndarray) -> None:
        self.present = present

    def __contains__(self, i: object) -> bool:
        return not self.present[i]


class _Schedule:
    """Dataset index of each global step, from an RNG seeded only by (seed, block): equal on all ranks."""

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        self.cum = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def block(self, index: int) -> np.ndarray:
        if len(self.cum) == 1:
            return np.zeros(_BLOCK, dtype=np.int64)
        if self._cache is None or self._cache[0] != index:
            u = np.random.default_rng([0x6D6978, self.seed, index]).random(_BLOCK)
            choice = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1)
            self._cache = (index, choice)
        return self._cache[1]

    def at(self, step: int) -> int:
        return int(self.block(step // _BLOCK)[step % _BLOCK])

    def worker_counts(self, steps: int, per_epoch: int, num_workers: int) -> np.ndarray:
        """(worker, dataset) -> batches that logical worker took from that dataset in steps [0, steps)."""
        counts = np.zeros(num_workers * len(self.cum), dtype=np.int64)
        for blk in range(-(-steps // _BLOCK)):
            g = np.arange(blk * _BLOCK, min(steps, (blk + 1) * _BLOCK))
            worker = (g % per_epoch) % num_workers
            counts += np.bincount(worker * len(self.cum) + self.block(blk)[: len(g)], minlength=len(counts))
        return counts.reshape(num_workers, len(self.cum))


class _EpochView(IterableDataset):
    """The batches of one epoch from step `start` on; physical worker p plays logical (p + start) % K."""

    def __init__(
        self,
        plans,
        schedule,
        seed,
        epoch,
        start,
        per_epoch,
        num_workers,
        counts,
        train,
        extra,
        moved=(None, None),
    ) -> None:
        self.plans, self.schedule, self.seed = plans, schedule, seed
        self.epoch, self.start, self.per_epoch = epoch, start, per_epoch
        self.num_workers, self.counts, self.train, self.extra = num_workers, counts, train, extra
        self.carries, self.shift = moved  # an active carry per dataset, or the shift after one

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.start) % self.num_workers
        if not self.train:
            plan = self.plans[0]
            for epoch, raw in plan.iter_eval(physical):
                yield plan.builder(raw, epoch, self.seed)
            return
        position, streams = [int(c) for c in self.counts[worker]], {}
        for step in range(self.start + physical, self.per_epoch, self.num_workers):
            d = self.schedule.at(self.epoch * self.per_epoch + step)
            if d not in streams:
                extra = tuple(self.extra[worker][d])
                carry = self.carries[d] if self.carries else None
                shift = int(self.shift[worker][d]) if self.shift else 0
                streams[d] = self.plans[d].iter_train(worker, position[d], self.seed, extra, carry, shift)
            yield next(streams[d])


def _identity(batch: dict) -> dict:
    return batch


class ResumableLoader:
    """Iterating gives the rest of the current epoch; `state_dict()` counts batches handed out."""

    def __init__(
        self,
        plans: list[DatasetPlan],
        weights: list[float],
        *,
        train: bool,
        seed: int,
        num_workers: int,
        batches_per_epoch: int,
        dataloader_kwargs: dict,
    ) -> None:
        self.plans, self.weights, self.train, self.seed = plans, weights, train, seed
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.dataloader_kwargs = dataloader_kwargs
        self.consumed = 0
        self.skipped: Counter = Counter()  # reason -> samples skipped on this rank, over the whole run
        self._reset_extra()
        # continuing a state of another partition (reshard.plan): its record, its carries, or the shift after
        self.carry: dict | None = None
        self.carries: list[Carry] | None = None
        self.shift: list | None = None

    def _reset_extra(self) -> None:
        # (logical worker, dataset) -> [dataset epoch, samples skipped in it so far]
        self.extra = [[[0, 0] for _ in self.plans] for _ in range(self._logical_workers)]

    def skip_metrics(self, device: torch.device | str | None = None) -> dict[str, float]:
        """Samples skipped so far, summed over ranks (a collective when distributed: call on every rank)."""
        counts = torch.tensor(
            [self.skipped.get(r, 0) for r in schema.LOAD_SKIP_REASONS], dtype=torch.float64, device=device
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        out = {"data/skipped": float(counts.sum())}
        out.update(
            {f"data/skipped/{r}": float(c) for r, c in zip(schema.LOAD_SKIP_REASONS, counts.tolist()) if c}
        )
        return out

    @property
    def _logical_workers(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.consumed // self.batches_per_epoch if self.train else 0

    def _worker_counts(self) -> np.ndarray:
        return _Schedule(self.weights, self.seed).worker_counts(
            self.consumed, self.batches_per_epoch, self._logical_workers
        )

    def _partition(self) -> Partition:
        p, k = self.plans[0], self._logical_workers
        return Partition(p.world_size, k, p.batch_size, self.batches_per_epoch, self.seed, p.shuffle_buffer)

    def _counts_on(self, part: Partition, consumed: int) -> np.ndarray:
        return _Schedule(self.weights, part.seed).worker_counts(
            consumed, part.batches_per_epoch, part.num_workers
        )

    def _plan(self, state: dict) -> tuple[int, list[Carry]]:
        sizes = [p.shards.num_samples for p in self.plans]
        return plan(state, self._partition(), sizes, self.plans[0].shuffle_buffer, self._counts_on)

    def _moved(self) -> tuple[list[Carry] | None, list | None]:
        """(carries while one is active, else None; the shift of positions after them, else None)."""
        if not self.carries:
            return None, self.shift
        pos = self._worker_counts()
        if any(c.active(w, pos[w][c.dataset]) for c in self.carries for w in range(self._logical_workers)):
            return self.carries, None
        shift = [[c.delta[w] for c in self.carries] for w in range(self._logical_workers)]
        return None, shift if any(map(any, shift)) else None

    def __iter__(self) -> Iterator[dict]:
        epoch, start = divmod(self.consumed, self.batches_per_epoch) if self.train else (0, 0)
        view = _EpochView(
            self.plans,
            _Schedule(self.weights, self.seed),
            self.seed,
            epoch,
            start,
            self.batches_per_epoch,
            self._logical_workers,
            self._worker_counts(),
            self.train,
            [[list(e) for e in w] for w in self.extra],
            self._moved(),
        )
        loader = DataLoader(
            view,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            **self.dataloader_kwargs,
        )
        for batch in loader:
            if self.train:
                self.consumed += 1
                info = batch.pop(INFO)
                self.extra[info["worker"]][info["dataset"]] = [info["epoch"], info["skipped_in_epoch"]]
                self.skipped.update(info["reasons"])
            yield batch

    def _topology(self) -> dict:
        p = self.plans[0]
        return {
            "world_size": p.world_size,
            "num_workers": self._logical_workers,
            "batch_size": p.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def _datasets(self) -> list[dict]:
        return [
            {"name": p.builder.name, "num_samples": p.shards.num_samples, "weight": w}
            for p, w in zip(self.plans, self.weights)
        ]

    def _every_rank(self, mine: object) -> list:
        """`mine` of every rank, by rank: gathered under torch.distributed, else only this rank's (others None)."""
        world, rank = self.plans[0].world_size, self.plans[0].rank
        gathered = [(rank, mine)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (rank, mine))
        out = [None] * world
        for r, value in gathered:
            out[r] = value
        return out

    def state_dict(self) -> dict:
        """Small and equal on every rank, so rank 0 may save it for all.

        Skips depend on which bad samples a rank's share holds, so they differ between ranks: under
        torch.distributed this gathers every rank's (a collective: call it on every rank).
        """
        epoch, batch = divmod(self.consumed, self.batches_per_epoch)
        skips = self._every_rank((self.extra, dict(sorted(self.skipped.items()))))
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "consumed_batches": self.consumed,
            "epoch": epoch,
            "batch_in_epoch": batch,
            **self._topology(),
            "datasets": self._datasets(),
            "worker_batches": self._worker_counts().tolist(),
            # per rank (None: not gathered), per worker, per dataset: [its epoch, samples skipped in it]
            "worker_skipped": [s and s[0] for s in skips],
            "skipped": [s and s[1] for s in skips],  # per rank: its skips by reason, whole run
            "shuffle_buffer": self.plans[0].shuffle_buffer,
            **self._moved_state(),
        }

    def _moved_state(self) -> dict:
        """While a carry lasts, the state it continues (so a resume recomputes it); after, the shift."""
        carries, shift = self._moved()
        if carries:
            return {"carry": self.carry}
        return {"shift": shift} if shift else {}

    def _skips_of(self, state: dict) -> tuple[list, list, Counter]:
        """(worker_skipped, skipped) by rank in `state`, and the skips of all ranks; version 1 held one rank's."""
        if state["version"] == STATE_VERSION:
            extra, skipped = state["worker_skipped"], state["skipped"]
            return extra, skipped, sum(map(Counter, filter(None, skipped)), Counter())
        world = self.plans[0].world_size
        extra, skipped = state.get("worker_skipped"), state.get("skipped", {})  # absent: saved before skips
        if world > 1 and skipped:
            log.warning(
                "loader state version 1 holds one rank's skips %s; every rank resumes with them", skipped
            )
        extra = extra or [[[0, 0] for _ in self.plans] for _ in range(self._logical_workers)]
        return [extra] * world, [skipped] * world, Counter(skipped)

    def load_state_dict(
        self, state: dict, allow_topology_change: bool = False, *, reshard: bool = False
    ) -> None:
        """Continue exactly where `state` was taken; see docs/loader.md for a changed topology.

        With `reshard`, a state of another partition (world size, workers, batch size, epoch length) goes on
        with the samples of the interrupted epoch it had not consumed, each once, spread over this one.
        """
        if not self.train:
            raise ValueError("an eval loader has no position to restore")
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._datasets()
        theirs = [{k: d[k] for k in ("num_samples", "weight")} for d in state["datasets"]]
        if theirs != [{k: d[k] for k in ("num_samples", "weight")} for d in mine]:
            raise ValueError(f"loader state is for datasets {state['datasets']}, this loader reads {mine}")
        changed = {k: (state[k], v) for k, v in self._topology().items() if state[k] != v}
        self.seed = int(state["seed"])
        extra, skipped, total = self._skips_of(state)
        self._reset_extra()
        if not changed:
            self.consumed = int(state["consumed_batches"])
            if self._worker_counts().tolist() != state["worker_batches"]:
                raise ValueError("loader state's per-worker positions do not match its step count")
            rank = self.plans[0].rank
            if extra[rank] is None:  # another rank's skips would move this rank's refill positions
                raise ValueError(
                    f"loader state holds no skip counts for rank {rank}: it was taken on another rank "
                    "without torch.distributed (under it, state_dict() gathers every rank's)"
                )
            self.extra = [[list(map(int, e)) for e in w] for w in extra[rank]]
            self.skipped = Counter(skipped[rank])
            self.carry, self.shift = state.get("carry"), state.get("shift")
            self.carries = self._plan(self.carry["from"])[1] if self.carry else None
            return
        # a new partition: rank 0 keeps the run's skips so far, in total (data/skipped sums over ranks)
        self.skipped = total if self.plans[0].rank == 0 else Counter()
        detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        if reshard:
            self.consumed, self.carries = self._plan(state)
            self.carry, self.shift = {"from": state, "consumed": self.consumed}, None
            left = [c.per_rank for c in self.carries]
            log.warning(
                "loader partition changed (%s): the interrupted epoch goes on, %s batches left", detail, left
            )
            return
        if not allow_topology_change:
            raise ValueError(
                f"loader state was saved with a different topology ({detail}); an exact resume needs "
                "the same one. Pass reshard=True to go on with the rest of the epoch on this partition "
                "(the trainer does), or allow_topology_change=True to restart at the next epoch."
            )
        self.consumed = (int(state["epoch"]) + 1) * self.batches_per_epoch
        log.warning("loader topology changed (%s): restarting at epoch %d", detail, self.epoch)
