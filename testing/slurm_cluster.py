"""A private single-machine SLURM for tests (docs/cluster.md): munged + slurmctld + slurmd run out of a
temp dir on random free ports, and are stopped by PID; also the demo data the cluster tests train on.

The settings (why cred_expire=5, sched_interval=1) are explained where they are written below; see
https://slurm.schedmd.com/slurm.conf.html and https://slurm.schedmd.com/munge.html for the keys.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from epalm.distributed import free_port  # noqa: F401  (free_port: used by the tests)
from testing.support import cpu_child_env

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
DAEMONS = ("slurmctld", "slurmd", "munged")


def install_slurm() -> str | None:
    """Install slurm-wlm + munge with apt when missing (root only); return None, or why SLURM is unavailable."""
    if all(shutil.which(d) for d in (*DAEMONS, "sbatch")):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (
            "SLURM is not installed and cannot be (needs root and apt-get: apt-get install slurm-wlm munge)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "slurmctld",
        "slurmd",
        "slurm-client",
        "munge",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # a stale package index: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not all(shutil.which(d) for d in DAEMONS):
        return f"apt-get could not install SLURM: {r.stderr[-500:]}"
    return None


def slurm_conf(d: Path, host: str, ctld_port: int, slurmd_port: int, cpus: int, gpus: int) -> str:
    """The measured single-machine configuration; `gpus` fake GPUs (a countable GRES, no device files)."""
    gres_types = "GresTypes=gpu\n" if gpus else ""
    node_gres = f" Gres=gpu:{gpus}" if gpus else ""
    return f"""ClusterName=epalmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
{gres_types}NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus}{node_gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """One node, `cpus` CPUs and `gpus` fake GPUs; every client command needs `self.env` (SLURM_CONF)."""

    cpus: int = 4
    gpus: int = 2
    dir: Path = field(init=False)
    pids: dict[str, int] = field(default_factory=dict, init=False)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        d = self.dir = Path(tempfile.mkdtemp(prefix="epalm-slurm-"))
        d.chmod(0o711)  # munged wants o+x on every directory above its socket
        for sub in ("munge", "state", "spool", "log", "run"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o711)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        host = socket.gethostname().split(".")[0]
        conf = slurm_conf(d, host, free_port(), free_port(), self.cpus, self.gpus)
        (d / "slurm.conf").write_text(conf)
        if self.gpus:
            # fake GPUs: empty files stand in for /dev/nvidiaN (task/none binds nothing to them)
            (d / "dev").mkdir()
            for i in range(self.gpus):
                (d / "dev" / f"gpu{i}").touch()
            (d / "gres.conf").write_text(f"Name=gpu File={d}/dev/gpu[0-{self.gpus - 1}]\n")
        m = d / "munge"
        subprocess.run(
            ["munged", f"--key-file={key}", f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
             f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self.pids["munged"] = int((m / "munged.pid").read_text())
        for daemon in ("slurmctld", "slurmd"):
            with open(d / "log" / f"{daemon}.out", "wb") as out:
                proc = subprocess.Popen(
                    [daemon, "-D", "-f", str(d / "slurm.conf")],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=self.env, start_new_session=True,
                )  # fmt: skip
            self.pids[daemon] = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if r.stdout.strip() == "idle":
                return self
            time.sleep(0.1)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"SLURM did not come up in {timeout} s:\n{logs}")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw
        )

    def sbatch(
        self, script: Path | str, *args: str, options: tuple[str, ...] = (), env: dict | None = None
    ) -> int:
        """Submit `script` with sbatch `options` before it and script `args` after it; return the job id."""
        cmd = ["sbatch", "--parsable", *options, str(script), *args]
        r = self.run(cmd, check=False, env={**self.env, **(env or {})}, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for tok in r.stdout.split():
            key, sep, value = tok.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 300.0, states: tuple[str, ...] = ()) -> dict[str, str]:
        """Poll until the job is in one of `states` (default: any final state); return its fields."""
        final = states or ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in final:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {final} after {timeout} s: {self.job(job_id)}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.dir / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel and drain every job, then TERM the daemons we started (KILL the stragglers)."""
        if "slurmctld" in self.pids:
            self.run(["scancel", "--user", str(os.getuid())], check=False, timeout=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.1)
        for pid in self.pids.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids.values()):
            time.sleep(0.1)
        for pid in self.pids.values():
            _signal(pid, signal.SIGKILL)
        for pid in self.pids.values():
            _reap(pid)
        self.pids.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Processes whose command line still names this cluster's directory (there should be none)."""
        r = subprocess.run(["pgrep", "-af", str(self.dir)], capture_output=True, text=True)
        return [line for line in r.stdout.splitlines() if str(os.getpid()) != line.split()[0]]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # our Popen children (slurmctld, slurmd) become zombies otherwise


# --------------------------------------------------------------------------- demo data for training jobs


def train_env(**extra: str) -> dict[str, str]:
    """The environment a CPU training job needs (one thread per rank on this small machine)."""
    return cpu_child_env(**extra)


@functools.cache
def demo_data(root: Path) -> Path:
    """The demo's digits data, tokenizer and (1-epoch) encoder under `root`, built once per process."""
    py = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
    raw = root / "raw" / "digits"
    steps = [
        [py, "-m", "data_shards.demo", "--out", str(root), "--workers", "1"],
        [py, "launch/demo/tokenizer.py", "--raw", str(raw), "--out", str(root / "tokenizer")],
        [py, "launch/demo/pretrain_encoder.py", "--raw", str(raw), "--out", str(root / "encoder.safetensors"),
         "--epochs", "1"],
    ]  # fmt: skip
    for cmd in steps:
        r = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return root


DEMO_CONFIG = "launch/configs/demo/digits_vqa.yaml"


def demo_overrides(data: Path, run_dir: Path, max_steps: int, more: dict | None = None) -> list[str]:
    """key=value overrides pointing launch/configs/demo/digits_vqa.yaml at `data` (checkpoints at the end only)."""
    over = {
        "model.lm.tokenizer": data / "tokenizer",
        "model.encoder.checkpoint": data / "encoder.safetensors",
        "data.train": f"[{{path: {data / 'shards/digits_vqa/train'}}}]",
        "data.val": data / "shards/digits_vqa/val",
        "run_dir": run_dir,
        "train.max_steps": max_steps,
        "train.log_every": 1,
        "train.save_every": 10_000,
        **(more or {}),
    }
    return [f"{k}={v}" for k, v in over.items()]


# --------------------------------------------------------------------------- training jobs on the cluster

TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
# what the fake cluster has: 2 tasks on 2 (fake) GPUs, one CPU each
CPU_JOB_OPTIONS = ("--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1")


def submit_training(cluster: SlurmCluster, data: Path, out: Path, max_steps: int, name: str) -> int:
    """sbatch launch/slurm/train.sbatch for the demo config, run dir `out/name`, log `out/name.out`."""
    # every private cluster numbers its jobs from 1, so the script's job-id port would collide between
    # clusters running side by side: give each job a free port (the requeued run reuses it)
    env = train_env(
        CONFIG=DEMO_CONFIG, PRECISION="fp32", DS_CONFIG="ds_configs/zero3.json", MASTER_PORT=str(free_port())
    )
    options = (*CPU_JOB_OPTIONS, f"--output={out / name}.out", f"--job-name={name}")
    return cluster.sbatch(
        TRAIN_SBATCH, *demo_overrides(data, out / name, max_steps), options=options, env=env
    )


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


@dataclass
class Preemption:
    job_id: int
    info: dict[str, str]  # scontrol show job, at the end
    signal_step: int  # steps logged when the signal was sent
    checkpoint_step: int  # the step the signal's checkpoint holds
    signal_to_checkpoint_s: float  # scancel --signal=USR1 until checkpoints/latest names the new checkpoint
    signal_to_rerun_s: float  # ... until the requeued job runs again
    total_s: float  # submission to the end of the rerun


def run_preempted(
    cluster: SlurmCluster, data: Path, out: Path, max_steps: int, signal_after: int, name: str = "preempted"
) -> Preemption:
    """Submit a training job, send the warning signal after `signal_after` steps, follow it to the end."""
    start = time.time()
    job_id = submit_training(cluster, data, out, max_steps, name)
    run_dir, latest = out / name, out / name / "checkpoints" / "latest"
    while (step := steps_logged(run_dir)) < signal_after:
        if cluster.job(job_id).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise RuntimeError(f"job {job_id} ended before step {signal_after}: {_tail(out / f'{name}.out')}")
        if time.time() - start > 300:
            raise TimeoutError(
                f"job {job_id} did not reach step {signal_after}: {_tail(out / f'{name}.out')}"
            )
        time.sleep(0.02)
    sent = time.time()
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)])
    checkpointed = rerun = None
    while True:
        info = cluster.job(job_id)
        if checkpointed is None and latest.exists():
            checkpointed = latest.stat().st_mtime
        if rerun is None and info.get("Restarts") == "1" and info.get("JobState") == "RUNNING":
            rerun = time.time()
        if (
            info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
            and info.get("Restarts") == "1"
        ):
            break
        if time.time() - sent > 300:
            raise TimeoutError(f"job {job_id} after the signal: {info}\n{_tail(out / f'{name}.out')}")
        time.sleep(0.05)
    ckpt_step = _resumed_step(out / f"{name}.out")
    return Preemption(
        job_id=job_id,
        info=info,
        signal_step=step,
        checkpoint_step=ckpt_step,
        signal_to_checkpoint_s=(checkpointed or float("nan")) - sent,
        signal_to_rerun_s=(rerun or float("nan")) - sent,
        total_s=time.time() - start,
    )


def _resumed_step(log: Path) -> int:
    """The step the rerun resumed from ("resumed from .../step_00000011 at step 11"), or -1."""
    import re

    m = re.search(r"resumed from \S+ at step (\d+)", log.read_text(errors="replace"))
    return int(m.group(1)) if m else -1


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
