"""SIGTERM/SIGUSR1 to each process of each documented launch tree ends with every rank checkpointed and the
outermost process exiting 75: deepspeed and torchrun under launch/supervise.py, mpirun as is, srun under a
real SLURM. The ranks are tests/signal_rank.py (no torch: cheap); one real 2-rank training confirms it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epalm.exit_codes import REQUEUE as EXIT_REQUEUE
from tests.training_fixtures import ROOT, VENV_BIN, env, free_port

RANK = ROOT / "tests" / "signal_rank.py"
FORWARDED = "SIGTERM,SIGINT,SIGUSR1"  # torchrun --signals-to-handle (its default lacks SIGUSR1)
SUPERVISE = [sys.executable, str(ROOT / "launch" / "supervise.py")]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += _children(p)
    return out


def _launcher_cmd(launcher: str, d: Path) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, str(RANK), str(d)]
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, str(RANK), str(d)]
    if launcher == "torchrun_forwarding":  # torchrun's own option: it forwards these signals to the workers
        torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
        return [*torchrun, "--signals-to-handle", FORWARDED, str(RANK), str(d)]
    if launcher == "mpirun":
        return [shutil.which("mpirun"), "--allow-run-as-root", "-np", "2", sys.executable, str(RANK), str(d)]
    raise ValueError(launcher)


def _pick(root: int, target: str) -> int:
    """The process of the tree rooted at `root` that gets the signal."""
    tree = _tree(root)
    if target == "outermost":
        return root
    if target == "runner":  # the deepspeed runner / torchrun agent / mpirun: the supervisor's child
        return _children(root)[0]
    if target == "launch":
        return next(p for p in tree if "deepspeed.launcher.launch" in _cmdline(p))
    if target == "rank1":
        return next(p for p in tree if str(RANK) in _cmdline(p) and "RANK=1" in _environ(p))
    raise ValueError(target)


def _environ(pid: int) -> str:
    try:
        return " ".join(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0"))
    except OSError:
        return ""


def _signal_tree(cmd: list[str], d: Path, target: str, sig: int, ranks: int = 2, **extra_env: str) -> int:
    proc = subprocess.Popen(
        cmd, env=env(**extra_env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(d.glob("ready-*"))) < ranks:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        os.kill(_pick(proc.pid, target), sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpointed = sorted(p.name for p in d.glob("checkpoint-*"))
    assert checkpointed == [f"checkpoint-{r}" for r in range(ranks)], out.decode()[-3000:]
    return proc.returncode


CASES = [
    ("deepspeed", "runner", signal.SIGTERM),  # the runner dies at once: the supervisor takes over the ranks
    ("deepspeed", "launch", signal.SIGUSR1),  # launch.py dies of it, orphaning the ranks
    ("torchrun", "runner", signal.SIGTERM),  # the agent SIGTERMs the workers, then reports a failure (1)
    ("torchrun_forwarding", "runner", signal.SIGUSR1),  # forwarded to the workers; the agent exits 1
]


@pytest.mark.distributed
@pytest.mark.parametrize(("launcher", "target", "sig"), CASES, ids=lambda x: getattr(x, "name", x))
def test_supervised_launch_tree_stops_with_75(tmp_path, launcher, target, sig):
    code = _signal_tree([*SUPERVISE, *_launcher_cmd(launcher, tmp_path)], tmp_path, target, sig)
    assert code == EXIT_REQUEUE


@pytest.mark.distributed
def test_mpirun_forwards_sigusr1_and_passes_75_on(tmp_path):
    """Open MPI forwards SIGUSR1 to the ranks; SIGTERM it turns into a kill (docs/training.md)."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    code = _signal_tree(_launcher_cmd("mpirun", tmp_path), tmp_path, "outermost", signal.SIGUSR1)
    assert code == EXIT_REQUEUE


@pytest.mark.distributed
def test_torchrun_forwards_sigusr1_with_signals_to_handle(tmp_path):
    """`torchrun --signals-to-handle SIGTERM,SIGINT,SIGUSR1` (no supervisor) forwards SIGUSR1 to the workers:
    every rank checkpoints and exits 75, but torchrun itself exits 1 (it does not pass a worker's code on),
    so a job script reads run_dir/stopped_by_signal.json, or runs torchrun under launch/supervise.py."""
    exits = tmp_path / "exits"
    exits.mkdir()
    cmd = _launcher_cmd("torchrun_forwarding", tmp_path)
    # the ranks' record_exit writes their codes there (no supervisor runs)
    code = _signal_tree(cmd, tmp_path, "outermost", signal.SIGUSR1, EPALM_SUPERVISOR_DIR=str(exits))
    assert [int(p.read_text()) for p in sorted(exits.glob("exit-*"))] == [EXIT_REQUEUE, EXIT_REQUEUE]
    assert code == 1
