"""launch/slurm/*.sbatch against a real SLURM (a private single-machine cluster with 2 fake GPUs): the demo
training completes with 2 tasks; a warning signal mid-run checkpoints, requeues and resumes to the same
adapter bit for bit; the pretrain -> finetune chain honours its dependency; eval.sbatch scores the result."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from testing.slurm_cluster import (
    CPU_JOB_OPTIONS,
    DEMO_CONFIG,
    ROOT,
    SlurmCluster,
    demo_data,
    demo_overrides,
    free_port,
    install_slurm,
    run_preempted,
    submit_training,
    train_env,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 24


@pytest.fixture(scope="module")
def cluster():
    reason = install_slurm()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(cpus=4, gpus=2).start()
    try:
        yield c
    finally:
        directory = c.dir
        c.stop()
        c.dir = directory
        assert not c.leftovers(), c.leftovers()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def straight(cluster, data, out) -> Path:
    """The uninterrupted reference run: train.sbatch, 2 tasks, STEPS steps."""
    job = submit_training(cluster, data, out, STEPS, "straight")
    info = cluster.wait(job, timeout=300)
    log = (out / "straight.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    return out / "straight"


def adapter_tensors(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].view(-1).view(dtype=_int_view(a[k])).equal(b[k].view(-1).view(dtype=_int_view(b[k]))), k


def _int_view(t):
    import torch

    return {4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]


def test_train_sbatch_runs_two_tasks_to_completion(straight, out):
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["step"] == STEPS and not summary["stopped_by_signal"]
    assert len(summary["adapter_digests"]) == 2 and len(set(summary["adapter_digests"])) == 1  # 2 ranks
    log = (out / "straight.out").read_text(errors="replace")
    assert "2 tasks on 1 node(s)" in log and "restart 0" in log
    assert "training exited with 0" in log


def test_warning_signal_checkpoints_requeues_and_resumes_bit_identically(cluster, data, out, straight):
    p = run_preempted(cluster, data, out, STEPS, signal_after=8, name="preempted")
    log = (out / "preempted.out").read_text(errors="replace")
    final = (p.info["JobState"], p.info["ExitCode"], p.info["Restarts"])
    assert final == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "got SIGUSR1: forwarding SIGUSR1" in log and "requeueing job" in log and "restart 1" in log
    assert p.signal_step <= p.checkpoint_step < STEPS, (p, log[-3000:])  # stopped part way, resumed there
    run = out / "preempted"
    assert json.loads((run / "summary.json").read_text())["step"] == STEPS
    assert not (run / "stopped_by_signal.json").exists()  # the resumed run clears it
    assert_same_tensors(adapter_tensors(run), adapter_tensors(straight))
    print(
        f"\npreemption: signal at step {p.signal_step}, checkpoint at step {p.checkpoint_step} "
        f"{p.signal_to_checkpoint_s:.2f} s after the signal; rerun running after {p.signal_to_rerun_s:.1f} s; "
        f"job total {p.total_s:.1f} s"
    )
    assert 0 < p.signal_to_checkpoint_s < 60


def test_pretrain_then_finetune_chain_then_eval_sbatch(cluster, data, out):
    pre, fine = out / "chain_pre", out / "chain_fine"
    env = train_env(
        PRETRAIN_CONFIG=DEMO_CONFIG,
        FINETUNE_CONFIG=DEMO_CONFIG,
        PRETRAIN_RUN_DIR=str(pre),
        FINETUNE_RUN_DIR=str(fine),
        PRETRAIN_OVERRIDES="train.max_steps=4",
        FINETUNE_OVERRIDES="train.max_steps=3 train.lr=1e-3",
        PRECISION="fp32",
        MASTER_PORT=str(free_port()),  # both jobs (one after the other); see submit_training
        SLURM_CONF=cluster.env["SLURM_CONF"],
    )
    shared = [
        o
        for o in demo_overrides(data, Path("unused"), 4)
        if not o.startswith(("run_dir=", "train.max_steps="))
    ]
    cmd = [
        "bash",
        "launch/slurm/pretrain_then_finetune.sh",
        *CPU_JOB_OPTIONS,
        f"--output={out}/%x-%j.out",
        "--",
        *shared,
    ]
    r = cluster.run(cmd, env=env, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    ids = [int(line.split()[2].rstrip(":")) for line in r.stdout.splitlines() if " job " in line]
    assert len(ids) == 2, r.stdout
    assert "Dependency=afterok:" in " ".join(f"{k}={v}" for k, v in cluster.job(ids[1]).items())
    first, second = (cluster.wait(j, timeout=300) for j in ids)
    for info in (first, second):
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
    assert _time(second["StartTime"]) >= _time(first["EndTime"])  # afterok held the finetuning back
    resolved = yaml.safe_load((fine / "config.yaml").read_text())
    assert Path(resolved["train"]["init_adapter"]) == pre / "adapter"
    assert json.loads((fine / "summary.json").read_text())["step"] == 3

    eval_out = out / "eval"
    env = train_env(ADAPTER=str(fine / "adapter"), SHARDS=str(data / "shards/digits_vqa/test"), TASK="vqav2")
    job = cluster.sbatch(
        ROOT / "launch/slurm/eval.sbatch",
        "--num-beams",
        "1",
        "--out",
        str(eval_out),
        options=("--cpus-per-task=1", f"--output={out}/eval-%j.out"),
        env=env,
    )
    info = cluster.wait(job, timeout=300)
    log = (out / f"eval-{job}.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    scores = json.loads((eval_out / "scores.json").read_text())
    assert scores, log[-2000:]


def _time(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def test_cluster_fixture_leaves_nothing_behind():
    """start + stop of a second private cluster: ~1 s each, no daemon or job process left over."""
    if install_slurm():
        pytest.skip("SLURM not installed")
    c = SlurmCluster(cpus=2, gpus=0).start()
    directory = c.dir
    try:
        r = c.run(["srun", "-n2", "bash", "-c", "echo $SLURM_PROCID/$SLURM_NTASKS"])
        assert sorted(r.stdout.split()) == ["0/2", "1/2"]
    finally:
        pids = dict(c.pids)
        c.stop()
    c.dir = directory
    assert not c.leftovers()
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not directory.exists()
