"""Run a training launcher so that SIGTERM/SIGUSR1 to any process of its tree ends with a checkpoint and
exit 75 (see docs/training.md, "Signals per launcher"):

    python launch/supervise.py deepspeed --num_gpus 4 launch/train.py --config ... [--resume auto]
    python launch/supervise.py torchrun --nproc_per_node 4 launch/train.py --config ...

The ranks (launch/train.py) find it through $EPALM_SUPERVISOR_DIR. It covers the processes on its own host:
for several nodes use srun (launch/slurm/train.sbatch) or mpirun (launch/mpi/train.sh).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from epalm.train.supervisor import supervise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main())
