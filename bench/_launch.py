"""Shared helpers of the training benchmarks: the OPT-125m-shaped model tree, per-process memory readings,
and a bounded `torchrun` launch of a bench module's worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from epalm.distributed import free_port
from testing.support import cpu_child_env

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


def model_tree(encoder: dict | None = None, prompt_tokens: int = 10) -> dict:
    """A random OPT-125m-shaped LM (hidden 768, 12 layers, vocab 50272), 6 states into layers 5..10."""
    enc = encoder or {"kind": "vit", "name": "vit_base_patch16_224", "num_states": 6}
    return {
        "model": {
            "lm": {"name": "125m", "pretrained": False},
            "encoder": {"pretrained": False, **enc},
            "adapter": {"start_layer": 5, "end_layer": 11, "prompt_tokens": prompt_tokens},
        }
    }


def bench_env(**extra: str) -> dict[str, str]:
    """The project's CPU environment for a child process: offline, cpu accelerator, one thread."""
    return cpu_child_env(**extra)


def torchrun_module(module: str, args: list[str], nproc: int = 2, timeout: int = 240) -> list[dict]:
    """`torchrun --nproc_per_node N -m module --out DIR args`; returns each rank's `DIR/rank{r}.json`."""
    torchrun = VENV_BIN / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            *launcher,
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
            module,
            "--out",
            out,
            *args,
        ]
        proc = subprocess.run(cmd, env=bench_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]


def proc_status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM); 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"), so a later VmHWM is the peak since now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_load() -> str:
    """The 1-minute load average against the core count: these CPU numbers move with it."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load unknown"
    return f"load average {load:.1f} on {os.cpu_count()} cores"


def fmt_mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def process_status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of process `pid` in KiB ({} once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def rank_pids(root_pid: int) -> dict[int, int]:
    """rank -> pid of the launch/train.py processes under the launcher."""
    import psutil

    ranks = {}
    try:
        for child in psutil.Process(root_pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
                if "launch/train.py" in cmd and "deepspeed.launcher" not in cmd:
                    rank = child.environ().get("RANK")
                    if rank is not None:
                        ranks[int(rank)] = child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    except psutil.NoSuchProcess:
        pass
    return ranks


def profile_by_category(fn, categories: dict[str, tuple[str, ...]]) -> tuple[dict[str, float], float]:
    """One profiled call of `fn`: self CPU seconds per category (operator-name prefixes, first match wins; 0 for
    a category no operator fell in), and the call's wall seconds."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - start
    out = dict.fromkeys(categories, 0.0)
    for e in prof.key_averages():
        cat = next((c for c, names in categories.items() if e.key.startswith(names)), None)
        if cat:
            out[cat] += e.self_cpu_time_total / 1e6
    return out, wall
