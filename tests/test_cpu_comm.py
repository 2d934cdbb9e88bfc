"""Two CPU ranks join the process group through epalm.distributed without DeepSpeed's shared-memory op,
so a run leaves no /dev/shm/deepspeed_allreduce_buffer_* behind (see `without_cpu_shm_op`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from epalm.distributed import free_port
from testing.support import cpu_child_env

JOIN = """
import os

import deepspeed.comm.comm as ds_comm
import torch
import torch.distributed as dist

from epalm.distributed import init_distributed, shutdown_distributed

info = init_distributed()
assert ds_comm.cdb.shm_comm_op is None, "DeepSpeed's shm op was built"
total = torch.tensor([float(info.rank + 1)])
dist.all_reduce(total)
assert total.item() == 3.0, total
shutdown_distributed()
# one write(2) of a short line: atomic on a pipe, so the two ranks' lines never interleave (print() may split it)
os.write(1, f"joined {info.rank} {info.world_size}\\n".encode())
"""


@pytest.mark.distributed
def test_two_cpu_ranks_join_without_the_shm_op_and_leave_nothing_in_dev_shm(tmp_path):
    script = tmp_path / "join.py"
    script.write_text(JOIN)
    port = free_port()
    env = cpu_child_env()
    env.pop("EPALM_DS_SHM_OP", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("joined")) == [
        "joined 0 2",
        "joined 1 2",
    ]
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert leftovers == []
