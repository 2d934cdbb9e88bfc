"""One training per run directory: a second job gets exit 2 naming the holder on every rank at once, and a
lock left by a job killed with kill -9 never blocks the next one."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from epalm.distributed import free_port
from epalm.run.lock import LOCK_FILE, try_lock
from tests.training_fixtures import ROOT, env, write_setup

HOLD = "import sys, time; from epalm.run.lock import try_lock; l, why = try_lock(sys.argv[1]); print(why or 'held', flush=True); time.sleep(300)"


def _holder(run_dir, **extra):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        env=env(**extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_names_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    holder = _holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        lock, why = try_lock(tmp_path)
        assert lock is None
        assert f"host {socket.gethostname()}, pid {holder.pid}, SLURM job 4242" in why
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the stale file stays ...
    lock, why = try_lock(tmp_path)  # ... and blocks nothing
    assert lock is not None and not why
    lock.release()


@pytest.mark.distributed
@pytest.mark.slow
def test_second_training_exits_2_on_every_rank(tmp_path):
    """Both ranks of the second job exit 2 themselves, quickly, before building anything."""
    config = write_setup(tmp_path)
    holder = _holder(tmp_path / "run", SLURM_JOB_ID="4242")
    port = str(free_port())
    try:
        ranks = [
            subprocess.Popen(
                [sys.executable, "launch/train.py", "--config", str(config), "--precision", "fp32"],
                env=env(
                    RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
                ),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for r in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in ranks]
    finally:
        for p in [holder, *locals().get("ranks", [])]:
            p.kill()  # SIGKILL: before training a rank keeps SIGTERM for the training loop
            p.wait()
        holder.kill()
        holder.wait()
    assert [p.returncode for p in ranks] == [2, 2], [o[1][-2000:] for o in outs]
    assert f"pid {holder.pid}, SLURM job 4242" in outs[0][1]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()
