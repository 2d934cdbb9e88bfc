"""The training loop's batches: a thread reads each step's micro-batches from the loader while the loop waits
with a timeout, so that every rank agrees once a second whether to go on, stop or fail, even while a read is
blocked (a stalled shard server). A stop signal (or the launcher's death) is thus acted on within seconds.
The same all-reduce checks that every rank got the same modality for each micro-batch: the loader promises
it, and ZeRO-3 hangs when ranks run different modules.

The loader counts a batch once the DataLoader hands it over. A step's batches are asked for together; when
the ranks stop before every rank has all of them, the position that gets saved is the step's start
(`state_dict`), the same on every rank, and the batches already read are read again after the resume. A
thread rather than a timer signal raising into the read: an exception thrown into the reader would abandon
the shard stream mid-sample and could be taken for a read error by its retries. The position is the
ResumableLoader's `POSITION` fields (what its iteration advances), copied at each step's start.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from epalm.data import schema
from epalm.data.loader import ResumableLoader

log = logging.getLogger(__name__)

POSITION = ("consumed", "extra", "skipped")  # what iterating a ResumableLoader advances


class StepFetcher:
    """`next_step(n, stop)`: the next step's n micro-batches on every rank, or None once the ranks agreed to stop."""

    def __init__(self, loader: ResumableLoader, device: torch.device, poll_s: float = 1.0):
        self.loader, self.device, self.poll_s = loader, device, poll_s
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._iter = None
        self._frozen: ResumableLoader | None = None  # the loader as at the start of the abandoned step

    def _serve(self) -> None:
        while True:
            n = self._requests.get()
            for _ in range(n):
                try:
                    self._results.put(("batch", self._next()))
                except BaseException as e:  # handed to the loop, which stops every rank
                    self._results.put(("error", e))
                    break

    def _next(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:  # end of an epoch; the loader continues from its position
            self._iter = iter(self.loader)
            return next(self._iter)

    def next_step(self, n: int, stop: Callable[[], bool]) -> list[dict] | None:
        """Wait for this rank's `n` batches in rounds of `poll_s`, then agree with every rank (one all-reduce
        per round): all ready -> the batches; a rank's `stop()` -> None, the loader back at this step's start
        for `state_dict`; a rank's loader failed -> its error there, RuntimeError elsewhere (all stop)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="epalm-batches", daemon=True)
            self._thread.start()
        start = {name: copy.deepcopy(getattr(self.loader, name)) for name in POSITION}
        self._requests.put(n)
        got, error = [], None
        while True:
            deadline = time.monotonic() + self.poll_s
            while len(got) < n and error is None and (left := deadline - time.monotonic()) > 0:
                try:
                    kind, item = self._results.get(timeout=left)
                except queue.Empty:
                    break
                if kind == "error":
                    error = item
                else:
                    got.append(item)
            codes = [schema.MODALITIES.index(b["modality"]) for b in got] + [0] * (n - len(got))
            flags = [int(stop()), int(len(got) < n), int(error is not None), *codes, *(-c for c in codes)]
            flags = torch.tensor(flags, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stopping, waiting, failed = (bool(f) for f in flags[:3].tolist())
            if failed:
                raise (
                    error if error is not None else RuntimeError("another rank's loader failed (see its log)")
                )
            if stopping:
                if waiting:
                    log.warning("stopping while a rank waits for data: the checkpoint is this step's start")
                self._frozen = copy.copy(self.loader)  # the reader thread may still advance the real one
                for name, value in start.items():
                    setattr(self._frozen, name, value)
                return None
            if not waiting:
                if flags[3 : 3 + n].tolist() != (-flags[3 + n :]).tolist():  # max != min: ranks differ
                    mine = [b["modality"] for b in got]
                    raise RuntimeError(f"ranks got different modalities for one step (this rank: {mine})")
                return got

    def state_dict(self) -> dict:
        """The loader's position after the last step handed out (collective, as the loader's)."""
        return (self._frozen or self.loader).state_dict()
