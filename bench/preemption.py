"""Preemption on a real (private, single-machine) SLURM: time from the warning signal to a saved checkpoint,
and until the requeued job runs again. The scenario of tests/test_slurm.py, timed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from testing.slurm_cluster import SlurmCluster, demo_data, install_slurm, run_preempted

COMMAND = "python -m bench.run preemption"
MAX_STEPS = 24
SIGNAL_AFTER = 8
REPEATS = 2


def main() -> str:
    head = f"## Preemption\n\nCommand: `{COMMAND}` (the scenario of `tests/test_slurm.py`).\n\n"
    reason = install_slurm()
    if reason:
        return head + f"Not measured: {reason}.\n"
    tmp = Path(tempfile.mkdtemp(prefix="epalm-bench-preempt-"))
    tmp.chmod(0o755)
    cluster = SlurmCluster(cpus=4, gpus=2).start()
    try:
        data = demo_data(tmp / "demo")
        runs = [
            run_preempted(cluster, data, tmp, MAX_STEPS, SIGNAL_AFTER, name=f"run{i}") for i in range(REPEATS)
        ]
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = "\n".join(
        f"| {i + 1} | {p.signal_step} | {p.checkpoint_step} | {p.signal_to_checkpoint_s:.2f} | "
        f"{p.signal_to_rerun_s:.1f} | {p.total_s:.1f} | {p.info.get('JobState')} |"
        for i, p in enumerate(runs)
    )
    return head + (
        f"`launch/slurm/train.sbatch`, demo config (`launch/configs/demo/digits_vqa.yaml`), 2 srun tasks on CPU, "
        f"ZeRO-3 fp32, {MAX_STEPS} steps; `scancel --signal=USR1 --batch` after {SIGNAL_AFTER} logged steps. "
        "The batch script forwards SIGUSR1 to the tasks, they finish the step, checkpoint and exit 75, the script "
        "runs `scontrol requeue`, and the rerun resumes with `--resume auto` (cluster: `cred_expire=5`, "
        "`sched_interval=1`; the rerun wait is SLURM's, mostly `cred_expire`).\n\n"
        "| run | steps when signalled | checkpoint step | signal -> checkpoint saved (s) | "
        "signal -> rerun running (s) | submit -> done (s) | final state |\n"
        "|---|---|---|---|---|---|---|\n" + rows + "\n\n"
        "Signal -> checkpoint is the end of the current step plus writing the adapter-only checkpoint "
        "(the frozen LM and encoder are never written); for a real model add one step time.\n"
    )


if __name__ == "__main__":
    print(main())
