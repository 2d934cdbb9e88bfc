"""Signals across a launch tree: `supervise(cmd)` runs a launcher (deepspeed, torchrun, mpirun) so that a
SIGTERM/SIGUSR1 to any process of the tree reaches the ranks as SIGUSR1 and the outermost process exits 75.

Why: the deepspeed runner dies of SIGTERM at once (143) and leaves the ranks training; its per-node
`deepspeed.launcher.launch` SIGTERMs the ranks but then exits 1; torchrun exits 1 on a rank's 75; neither
handles SIGUSR1. No launcher option changes this (DeepSpeed forwards SIGTERM only in its multi-node pdsh
mode), so the supervisor talks to the ranks directly: each rank (launch/train.py) registers its pid and,
at the end, its exit code in `$EPALM_SUPERVISOR_DIR`. The supervisor is a child subreaper (Linux), so
ranks orphaned by a launcher that died are re-parented to it and can still be waited for. Without the
supervisor, each rank still notices its launcher's death itself (`watch_launcher`) and stops as for SIGUSR1.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from epalm.exit_codes import REQUEUE as EXIT_REQUEUE
from epalm.exit_codes import STOP_SIGNALS

log = logging.getLogger(__name__)

SUPERVISOR_DIR = "EPALM_SUPERVISOR_DIR"
_early_stop = False


# --------------------------------------------------------------------------- the rank side (launch/train.py)


def register_rank(launched: bool = True) -> None:
    """Catch SIGTERM/SIGUSR1 from now on (until the trainer takes over), tell the supervisor, if any, and (a
    rank a launcher started) stop as for a signal when that launcher dies: see `watch_launcher`."""
    for s in STOP_SIGNALS:
        signal.signal(s, _remember_stop)
    d = os.environ.get(SUPERVISOR_DIR)
    if d:
        with contextlib.suppress(OSError):  # another host's ranks see a directory that is not theirs
            Path(d, f"rank-{os.getpid()}").write_text(socket.gethostname())
    if launched:
        watch_launcher()


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def watch_launcher(poll_s: float = 1.0) -> threading.Thread | None:
    """A daemon thread that sends this rank SIGUSR1 (checkpoint, exit 75) once its launcher is gone.

    The launcher is the parent, and under the `deepspeed` runner also the runner above the per-node
    `deepspeed.launcher.launch`: the runner dies of a SIGTERM at once (a container manager's stop, `kill`)
    while launch.py and the ranks train on. A dead process's children are re-parented, so the watch compares
    parent ids (Linux /proc; a polling thread rather than prctl(PR_SET_PDEATHSIG), which sees only the
    parent *thread*, and only one level up).
    """
    parent = os.getppid()
    chain = [(os.getpid(), parent)]
    if "deepspeed.launcher.launch" in _cmdline(parent) and (runner := _parent_of(parent)) is not None:
        chain.append((parent, runner))
    if parent <= 1:
        return None  # started by init (a daemon): no launcher to watch

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            gone = [
                p for child, p in chain if (os.getppid() if child == os.getpid() else _parent_of(child)) != p
            ]
            if gone:
                log.warning(
                    "the launcher (pid %d) is gone: checkpointing and exiting as for SIGUSR1", gone[0]
                )
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    thread = threading.Thread(target=watch, name="epalm-launcher-watch", daemon=True)
    thread.start()
    return thread


def _remember_stop(signum, frame) -> None:
    global _early_stop
    _early_stop = True


def stop_requested_early() -> bool:
    """Whether a stop signal arrived before the training loop installed its own handler."""
    return _early_stop


def record_exit(code: int) -> None:
    d = os.environ.get(SUPERVISOR_DIR)
    if d:
        with contextlib.suppress(OSError):
            tmp = Path(d, f".exit-{os.getpid()}")
            tmp.write_text(str(code))
            tmp.rename(Path(d, f"exit-{os.getpid()}"))


# --------------------------------------------------------------------------- the supervisor


def _become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class _Tree:
    def __init__(self, d: Path):
        self.d = d
        self.signalled: set[int] = set()

    def ranks(self) -> list[int]:
        host = socket.gethostname()
        return [int(p.name[5:]) for p in self.d.glob("rank-*") if p.read_text() == host]

    def exit_codes(self) -> dict[int, int]:
        return {int(p.name[5:]): int(p.read_text()) for p in self.d.glob("exit-*")}

    def live(self) -> list[int]:
        done = self.exit_codes()
        return [pid for pid in self.ranks() if pid not in done and _alive(pid)]

    def stop(self, why: str) -> None:
        """SIGUSR1 to every live rank not yet asked: each finishes its step, checkpoints and exits 75."""
        for pid in self.live():
            if pid not in self.signalled:
                self.signalled.add(pid)
                log.warning("supervisor: %s: SIGUSR1 to rank pid %d", why, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)


def supervise(cmd: list[str], poll_s: float = 0.2) -> int:
    """Run `cmd` to its end (and its ranks to theirs); the exit code, 75 when the ranks stopped on a signal."""
    subreaper = _become_subreaper()
    with tempfile.TemporaryDirectory(prefix="epalm-supervise-") as d:
        tree, pending = _Tree(Path(d)), []

        def on_signal(signum, frame):
            pending.append(signal.Signals(signum).name)

        for s in STOP_SIGNALS:
            signal.signal(s, on_signal)
        child = subprocess.Popen(cmd, env={**os.environ, SUPERVISOR_DIR: d})
        child_code = None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)  # the launcher, and ranks it orphaned (subreaper)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == child.pid:
                child_code = os.waitstatus_to_exitcode(status)
                child.returncode = child_code  # reaped here; Popen must not wait for it again
            if pid:
                continue
            if pending:
                tree.stop(f"got {pending[0]}")  # again each round: ranks that register later get it too
            live = tree.live()
            if child_code is not None:
                if not live:
                    break
                if not tree.signalled and not subreaper:
                    log.warning("supervisor: cannot be a subreaper; polling the orphaned ranks")
                tree.stop(f"the launcher ended ({child_code}) while {len(live)} rank(s) run")
            time.sleep(poll_s)
        codes = tree.exit_codes()
        ranks = tree.ranks()
    same = {codes.get(pid) for pid in ranks}
    if child_code == EXIT_REQUEUE or same == {EXIT_REQUEUE}:
        return EXIT_REQUEUE
    if len(same) == 1 and None not in same:
        return same.pop()  # every rank ended alike (e.g. 2): say so, whatever the launcher made of it
    return child_code if child_code >= 0 else 128 - child_code
