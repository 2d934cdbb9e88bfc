"""Run a training launcher so that SIGTERM/SIGUSR1 to any process of its tree ends with a checkpoint and
exit 75 (see docs/training.md, "Signals per launcher"):

    python launch/supervise.py deepspeed --num_gpus 4 launch/train.py --config ... [--resume auto]
    python launch/supervise.py torchrun --nproc_per_node 4 launch/train.py --config ...

The ranks (launch/train.py) find it through $EPALM_SUPERVISOR_DIR. It covers the processes on its own host:
for several nodes use srun (launch/slurm/train.sbatch) or mpirun (launch/mpi/train.sh). Exit code: the
launcher's, 75 when the ranks stopped on a signal, 2 when no launcher command is given or it is not found.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from epalm.cli.common import configure_logging, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv:
        return fail(
            "no launcher command given, e.g. python launch/supervise.py torchrun ... launch/train.py ..."
        )
    if shutil.which(argv[0]) is None:
        return fail(f"{argv[0]}: launcher command not found (not on PATH, or not an executable file)")
    from epalm.train.supervisor import supervise

    configure_logging()
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main())
