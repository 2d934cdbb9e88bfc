"""Train eP-ALM with DeepSpeed: the script every launcher starts, one process per rank. See docs/training.md.

    deepspeed --num_gpus 4 launch/train.py --ds_config auto \\
        --config launch/configs/image/vqa_v2.yaml [--resume auto|PATH] [--precision bf16] [key=value ...]

Also runs under `torchrun --nproc_per_node N`, `mpirun -np N python` and `srun python` (one task per GPU).
Exit codes: 0 done, 1 failed (e.g. NaN/inf steps in a row), 2 bad configuration, a run directory that holds
a run (pass --resume auto, or --move-aside) or one in use by another job (nothing trained), 75 stopped by
SIGTERM/SIGUSR1 or its launcher's death, after a checkpoint (requeue and start again with --resume auto).
To get 75 from the outermost process whichever process of the launch tree is signalled, start the launcher
under launch/supervise.py. The trainer itself is epalm/cli/train.py (also installed as `epalm-train`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from epalm.cli.train import entry  # noqa: E402

if __name__ == "__main__":
    entry()  # main, record_exit for launch/supervise.py, exit_process
