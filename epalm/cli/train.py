"""The trainer's command line: one rank of a DeepSpeed run, started by any launcher. `launch/train.py` (what
the launchers and docs name) and the `epalm-train` console script both run `entry`; see docs/training.md.

    deepspeed --num_gpus 4 launch/train.py --ds_config auto \\
        --config launch/configs/image/vqa_v2.yaml [--resume auto|PATH] [--precision bf16] [key=value ...]
    torchrun --nproc_per_node 4 --no-python epalm-train --config ... [key=value ...]

A fresh start (no --resume) into a run_dir that holds a run is refused (exit 2) unless --move-aside; a resume
whose config changes what a step computes or reads is refused unless --allow-inexact-resume (lr and schedule
changes take effect at the resumed step). Exit codes (epalm/exit_codes.py): 0 done, 1 failed (e.g.
train.max_nonfinite_steps NaN/inf steps in a row), 2 bad configuration, a used run directory or one in use by
another job (nothing trained), 75 stopped by SIGTERM/SIGUSR1, or by its launcher's death, after a checkpoint
(requeue and start again with --resume auto). To get 75 from the outermost process whichever process of the
launch tree is signalled, start the launcher under launch/supervise.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from epalm.cli.common import HelpFormatter, configure_logging, fail


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML (launch/configs/...)")
    p.add_argument(
        "--ds_config",
        default="auto",
        help="DeepSpeed JSON (DeepSpeed knobs only), or 'auto': the fastest engine whose memory plan fits "
        "the devices (epalm/train/engine_choice.py; `python -m epalm.cli.describe CONFIG --gpus N "
        "--gpu-memory X` shows the choice)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (the newest verified checkpoint in run_dir, if any), a step number or a checkpoint "
        "path; none starts afresh",
    )
    p.add_argument(
        "--move-aside",
        action="store_true",
        help="a fresh start into a run_dir holding a run moves that run to <run_dir>.moved-<time>/ beside it "
        "(nothing deleted) instead of stopping with exit 2",
    )
    p.add_argument(
        "--allow-inexact-resume",
        action="store_true",
        help="apply config changes that break the exact resume (batch sizes, seed, optimizer, data, model) "
        "instead of refusing them; the loader restarts its data where its position no longer fits",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="override the DeepSpeed JSON's bf16/fp16 (none: as the JSON says)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) one run; the exit code. Bad input ends in one `error:` line (rank 0) and 2."""
    args = parse_args(argv)
    if args.move_aside and args.resume is not None:
        return fail("--move-aside starts a new run; it cannot be combined with --resume")
    if args.local_rank is not None:  # the deepspeed launcher passes it; the environment is authoritative
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from epalm import exit_codes
    from epalm.config import ConfigError, batch_check, load_config
    from epalm.distributed import get_dist_info, init_distributed, shutdown_distributed
    from epalm.preflight import run_checks
    from epalm.run.lock import acquire_run_lock
    from epalm.train.ds_config import load_ds_config
    from epalm.train.engine_choice import resolve_auto
    from epalm.train.nonfinite import NonFiniteError
    from epalm.train.setup import build_train_setup
    from epalm.train.supervisor import register_rank
    from epalm.train.trainer import run

    env = get_dist_info()
    # a stop signal from now on is kept for the training loop, and so is the launcher's death; see
    # launch/supervise.py
    register_rank(launched=env.source != "single")
    configure_logging(env.rank)
    try:  # every problem at once, files and the batch arithmetic on this launch's world size included
        cfg = load_config(
            args.config, args.overrides, checks=[*run_checks(True), batch_check(env.world_size)]
        )
        ds_base = None if args.ds_config == "auto" else load_ds_config(args.ds_config)
        info = init_distributed(cfg.train.collective_timeout_s)
        if ds_base is None:  # the fastest engine whose memory plan fits these devices (same on every rank)
            ds_base = resolve_auto(cfg, info.world_size, args.precision)
        lock = acquire_run_lock(cfg.run_dir, info)  # held by rank 0 until this process ends
        setup = build_train_setup(
            cfg, ds_base, info, args.resume, args.precision, args.move_aside, args.allow_inexact_resume
        )
    except ConfigError as e:
        return fail(str(e)) if env.rank == 0 else exit_codes.USAGE  # every rank sees it; one says it
    try:
        code = run(setup)  # a normal end or a signal stop (every rank stops at the same step)
    except NonFiniteError as e:  # raised on every rank at the same step: they still leave together
        if info.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = exit_codes.FAILED
    shutdown_distributed()
    lock.release()
    return code


def entry(argv: list[str] | None = None) -> NoReturn:
    """`main`, then the exit every launched rank needs: the code recorded for launch/supervise.py (launchers
    do not pass exit codes on) and the process left without the teardown that can abort."""
    from epalm.distributed import exit_process
    from epalm.train.supervisor import record_exit

    code = main(argv)
    record_exit(code)
    exit_process(code)


if __name__ == "__main__":
    entry()
