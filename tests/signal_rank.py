"""A stand-in rank for the launcher signal tests: it reacts to SIGTERM/SIGUSR1 as launch/train.py does
(the supervisor hooks of epalm.train.supervisor; a signal on one rank stops all, through a file here instead of the
trainer's all-reduce), "checkpoints" and exits 75, without loading torch, so each launcher is cheap to test.

    python tests/signal_rank.py DIR     (DIR shared by the ranks; `ready-<rank>` appears once it listens)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epalm.distributed import get_dist_info  # noqa: E402
from epalm.exit_codes import REQUEUE as EXIT_REQUEUE
from epalm.train.supervisor import record_exit, register_rank, stop_requested_early  # noqa: E402


def main() -> int:
    d = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    rank = get_dist_info().rank
    register_rank()
    (d / f"ready-{rank}").write_text("")
    deadline = time.monotonic() + 60  # a rank nobody stops ends as a normal run would
    while time.monotonic() < deadline:
        if stop_requested_early():
            (d / "stop").touch()  # the trainer's all-reduce: every rank learns of it
        if (d / "stop").exists():
            time.sleep(0.3)  # the checkpoint
            (d / f"checkpoint-{rank}").write_text("")
            return EXIT_REQUEUE
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    code = main()
    record_exit(code)
    sys.exit(code)
