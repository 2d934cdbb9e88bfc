"""Train eP-ALM with DeepSpeed. See docs/training.md.

    deepspeed --num_gpus 4 launch/train.py --ds_config ds_configs/zero3.json \
        --config launch/configs/image/vqa_v2.yaml [--resume auto|PATH] [--precision bf16] [key=value ...]

Also runs under `torchrun --nproc_per_node N`, `mpirun -np N python` and `srun python` (one task per GPU).
Exit codes: 0 done, 2 bad configuration or the run directory in use by another job (nothing trained),
75 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue and start again with --resume auto). To get 75
from the outermost process whichever process of the launch tree is signalled, start the launcher under
launch/supervise.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config YAML (launch/configs/...)")
    p.add_argument(
        "--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON: DeepSpeed knobs only"
    )
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (the newest verified checkpoint in run_dir, if any), a step number or a checkpoint path",
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="override the JSON's bf16/fp16")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:  # the deepspeed launcher passes it; the environment is authoritative
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from epalm import exit_codes
    from epalm.config import ConfigError
    from epalm.distributed import get_dist_info, init_distributed, shutdown_distributed
    from epalm.preflight import load_run_config
    from epalm.run.lock import acquire_run_lock
    from epalm.train.ds_config import load_ds_config
    from epalm.train.setup import build_train_setup
    from epalm.train.supervisor import register_rank
    from epalm.train.trainer import run

    register_rank()  # a stop signal from now on is kept for the training loop; see launch/supervise.py

    rank = get_dist_info().rank
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        cfg = load_run_config(args.config, args.overrides)  # every problem at once, files included
        ds_base = load_ds_config(args.ds_config)
        info = init_distributed()
        lock = acquire_run_lock(cfg.run_dir, info)  # held by rank 0 until this process ends
        setup = build_train_setup(cfg, ds_base, info, args.resume, args.precision)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return exit_codes.USAGE
    code = run(setup)  # a normal end or a signal stop (every rank stops at the same step)
    shutdown_distributed()
    lock.release()
    return code


if __name__ == "__main__":
    from epalm.distributed import exit_process
    from epalm.train.supervisor import record_exit

    code = main()
    record_exit(code)  # for launch/supervise.py, which launchers do not pass exit codes to
    exit_process(code)
