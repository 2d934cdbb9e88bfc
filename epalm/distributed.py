"""Who am I in the job: rank, local rank and world size from torchrun / deepspeed, Open MPI or SLURM variables.

Pure functions over an environment mapping, plus `init_distributed` (DeepSpeed's, which also does MPI discovery).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NoReturn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str  # "env" (torchrun, deepspeed launcher), "mpi", "slurm" or "single"


# Variable names per launcher: (rank, local rank, world size). The first complete set wins.
_SOURCES = (
    ("env", ("RANK", "LOCAL_RANK", "WORLD_SIZE")),
    ("mpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE")),
    ("slurm", ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")),
)


def get_dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """Rank, local rank and world size from the first launcher whose variables are all set."""
    env = os.environ if env is None else env
    for source, names in _SOURCES:
        if all(name in env for name in names):
            rank, local_rank, world_size = (int(env[name]) for name in names)
            return DistInfo(rank, local_rank, world_size, source)
    if "RANK" in env and "WORLD_SIZE" in env:  # LOCAL_RANK missing: a one-process-per-node launcher
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "env")
    return DistInfo(0, 0, 1, "single")


def slurm_env_exports(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE to export under `srun` (one task per GPU) when they are missing.

    MASTER_ADDR / MASTER_PORT stay the job script's business (the first host of the nodelist).
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "OMPI_COMM_WORLD_RANK" in env:
        return {}
    info = get_dist_info({k: env[k] for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS") if k in env})
    if info.source != "slurm":
        return {}
    return {"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(info.world_size)}


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the process group (gloo on CPU, nccl on CUDA) under any supported launcher; idempotent.

    DeepSpeed reads RANK/WORLD_SIZE, or discovers them through mpi4py under mpirun; SLURM's are exported
    first. A single process without any launcher gets a world of one on a free local port. `timeout_s` bounds
    every collective (torch's default is 30 minutes): a rank that stopped fails the job after that long
    instead of holding every other rank (gloo raises in the waiting collective; NCCL's watchdog aborts).
    """
    import datetime
    import importlib

    import deepspeed
    import torch.distributed as dist

    os.environ.update(slurm_env_exports())
    info = get_dist_info()
    if info.source == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not dist.is_initialized():
        # DeepSpeed's MPI discovery would otherwise pin 29500, so two mpirun jobs on one host collide
        kwargs = {"distributed_port": int(os.environ.get("MASTER_PORT", 29500))}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
            # the groups made later (DeepSpeed's data-parallel ones: `new_group` without a timeout) take torch's
            # module default, 30 min for gloo, 10 for NCCL; torch has no setter for it, so it is set here
            c10d = importlib.import_module("torch.distributed.distributed_c10d")
            c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = kwargs["timeout"]
        with without_cpu_shm_op():
            deepspeed.init_distributed(**kwargs)
    # MPI discovery sets RANK/LOCAL_RANK/WORLD_SIZE itself; read back what the group says.
    return DistInfo(dist.get_rank(), get_dist_info().local_rank, dist.get_world_size(), info.source)


@contextlib.contextmanager
def without_cpu_shm_op() -> Iterator[None]:
    """Join DeepSpeed's process group on CPU without its shared-memory all-reduce op.

    On the CPU accelerator `deepspeed.comm`'s TorchBackend JIT-builds `deepspeed_shm_comm` (~60 s of g++ on
    the first run of a checkout) and maps a 66 MiB `/dev/shm/deepspeed_allreduce_buffer_*` per rank that
    nothing ever unlinks: DeepSpeed never calls its `shared_close`, so every run leaves them behind, keyed
    by master port (7.5 GiB of RAM had piled up on one of our test machines; the same leak in
    https://github.com/sgl-project/sglang/pull/38638). The op serves only `inference_all_reduce`
    (tensor-parallel inference); training's collectives go through torch.distributed either way
    (deepspeed/comm/torch.py), so it is left out. Set EPALM_DS_SHM_OP=1 to keep DeepSpeed's default.
    Nothing changes on GPU accelerators.
    """
    import importlib

    from deepspeed.accelerator import get_accelerator

    # by module path: the attribute `deepspeed.comm.torch` is torch itself (deepspeed/comm imports it)
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    if get_accelerator().device_name() != "cpu" or os.environ.get("EPALM_DS_SHM_OP") == "1":
        yield
        return
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None  # TorchBackend.__init__ looks the builder up at call time
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def shutdown_distributed() -> None:
    """Leave the process group cleanly after a normal end: wait for every rank, then destroy the group.

    Exiting with a live gloo group lets its destructor run while peers are already gone, which can abort
    the process (SIGABRT) after all the work is done.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_rank0(obj: object, info: DistInfo | None = None) -> object:
    """Rank 0's `obj` on every rank (picklable; no-op without a process group). Under NCCL the object
    travels through this rank's GPU: the local rank's when `info` is given (before the engine exists),
    else the current device."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    device = None
    if dist.get_backend() == "nccl":
        if info is None:
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def exit_process(code: int) -> NoReturn:
    """End a launcher-started process with `code`, skipping the interpreter's teardown.

    Call it after `shutdown_distributed()`, when every file is written. The C++ destructors of the
    communication stack (gloo, Open MPI, DeepSpeed's shared-memory op) occasionally abort (SIGABRT, exit
    134) after all the work is done: about one two-rank CPU run in 20-40 on our CPU machines. A finished run must not report failure, so output is flushed and the process leaves at once.
    """
    import logging
    import sys

    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: finalize, or Open MPI calls the exit abnormal
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a rendezvous started next)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
