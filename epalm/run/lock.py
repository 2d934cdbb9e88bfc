"""One training per run directory: rank 0 holds an exclusive `fcntl.flock` on `run_dir/run.lock` for the
whole run; a second job gets a ConfigError naming the holder (host, pid, SLURM job) on every rank.

The kernel drops the lock when the holder dies (kill -9 included), so a stale lock file never blocks.
Limits (docs/training.md): NFS emulates flock with POSIX locks (fine across clients; a crashed node's lock
lasts until its lease expires); Lustre needs the `flock` mount option (`localflock` only guards one node).
The standard library's fcntl is all it takes; the `filelock` package adds nothing needed here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from epalm.config import ConfigError
from epalm.distributed import DistInfo, broadcast_from_rank0
from epalm.run.layout import LOCK as LOCK_FILE

DISABLE = "EPALM_RUN_LOCK"  # =0: train without the lock (filesystems without flock); nothing then guards


class RunLock:
    """The held lock (rank 0), or a placeholder on the other ranks; released at `release()` or process exit."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd
        if fd is not None:  # forked children (loader workers) must not keep the lock alive after rank 0
            os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing a copy does not unlock: the parent's descriptor still holds it
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _describe(info: dict) -> str:
    if not info:
        return "a process that has not written its name yet"
    job = info.get("slurm_job_id")
    slurm = f", SLURM job {job}" if job else ", not a SLURM job"
    return f"host {info.get('host')}, pid {info.get('pid')}{slurm}, since {info.get('since')}"


def try_lock(run_dir: str | Path) -> tuple[RunLock | None, str]:
    """(lock, "") or (None, why not). Never blocks."""
    path = Path(run_dir) / LOCK_FILE
    if os.environ.get(DISABLE, "1") == "0":
        return RunLock(path, None), ""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # no O_TRUNC: the holder's name must survive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return None, (
                f"{Path(run_dir)} is in use by another training ({_describe(holder)}; lock file {path}). "
                "Two jobs on one run directory corrupt each other's checkpoints: wait for it to end, cancel "
                "it, or use another run_dir"
            )
        return None, (
            f"{path}: this filesystem refuses flock ({os.strerror(e.errno)}; on Lustre mount with -o flock). "
            f"Set {DISABLE}=0 to train without the lock (nothing then stops a second job on this run_dir)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd), ""


def acquire_run_lock(run_dir: str | Path, info: DistInfo) -> RunLock:
    """Rank 0 takes the lock and tells every rank the outcome; raises the same ConfigError on every rank."""
    lock, why = RunLock(Path(run_dir) / LOCK_FILE, None), ""
    if info.rank == 0:
        try:
            lock, why = try_lock(run_dir)
        except OSError as e:  # e.g. no permission: still tell the other ranks
            why = f"{Path(run_dir) / LOCK_FILE}: {e}"
    why = broadcast_from_rank0(why, info)  # the other ranks wait here, before any other collective
    if why:
        raise ConfigError([why], "run lock")
    return lock
