"""A rank that stops making progress is reported, not waited on in silence: each rank's watchdog thread writes
a heartbeat (run_dir/heartbeat/rank-NNNNN.json: step, phase, times) every few seconds and, after
`train.watchdog_s` without a completed step, logs "no step for N s on rank R", what the rank is doing, and
which ranks show no sign of life (their heartbeat stopped too: a SIGSTOPped or hung process, a lost node).
The collective the others then wait in fails after `train.collective_timeout_s` (the process group's
timeout, epalm.distributed.init_distributed), which ends the job.

Heartbeats are files on the run directory (shared by the ranks, as the checkpoints need) rather than keys in
the process group's TCP store: rank 0's process serves that store, and a watchdog must not block on the
rank it is meant to report.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from epalm.config import TrainConfig
from epalm.run.layout import HEARTBEATS

log = logging.getLogger(__name__)


class Watchdog:
    """Set `phase` as the loop moves on and call `stepped(step)` after every step; `close()` at the end."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, train: TrainConfig):
        self.dir, self.rank, self.world = Path(run_dir) / HEARTBEATS, rank, world_size
        self.limit, self.collective_timeout = train.watchdog_s, train.collective_timeout_s
        self.interval = max(0.5, min(self.limit / 4, 30.0))
        self.step, self.phase, self.last_step = 0, "starting", time.time()
        self._done = threading.Event()
        self._reported = 0.0
        self._thread = threading.Thread(target=self._run, name="epalm-watchdog", daemon=True)
        if self.limit > 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._thread.start()

    def stepped(self, step: int) -> None:
        self.step, self.last_step = step, time.time()

    def close(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self._beat()
                self._check()
            except OSError as e:  # a full or unreachable run directory must not end the run from here
                log.warning("watchdog: %s", e)
            self._done.wait(self.interval)

    def _beat(self) -> None:
        beat = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step,
            "phase": self.phase,
            "last_step_at": self.last_step,
            "beat_at": time.time(),
        }
        path = self.dir / f"rank-{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, path)

    def silent_ranks(self, now: float) -> list[str]:
        """The other ranks whose heartbeat is older than three intervals, described for a log line."""
        silent = []
        for rank in range(self.world):
            if rank == self.rank:
                continue
            try:
                beat = json.loads((self.dir / f"rank-{rank:05d}.json").read_text())
            except (OSError, ValueError):
                beat = None
            if beat is None:
                silent.append(f"rank {rank} (no heartbeat yet)")
            elif now - beat["beat_at"] > 3 * self.interval:
                silent.append(
                    f"rank {rank} (pid {beat['pid']} on {beat['host']}, silent for {now - beat['beat_at']:.0f} s, "
                    f"last at step {beat['step']}, {beat['phase']})"
                )
        return silent

    def _check(self) -> None:
        now = time.time()
        idle = now - self.last_step
        if idle < self.limit:
            self._reported = 0.0
            return
        if self._reported and idle - self._reported < self.limit:
            return  # once per `limit` seconds of the same stall
        self._reported = idle
        silent = self.silent_ranks(now)
        who = f"; no sign of life from {', '.join(silent)}: stopped or hung" if silent else ""
        log.warning(
            "no step for %.0f s on rank %d (after step %d, %s)%s; a collective waiting longer than "
            "train.collective_timeout_s=%g s fails the job",
            idle,
            self.rank,
            self.step,
            self.phase,
            who,
            self.collective_timeout,
        )
