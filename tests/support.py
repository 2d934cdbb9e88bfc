"""Test support shared by the tests and the benchmarks (never imported by the library)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "EPALM_FAULT",
)  # EPALM_FAULT: tests/fault_hook


def cpu_child_env(**extra: str) -> dict[str, str]:
    """The environment for launching ranks as child processes on a CPU host (tests, benchmarks, the demo).

    Offline hub, DeepSpeed's CPU accelerator, one thread per process (several ranks share few cores),
    this checkout and its venv first on the paths, and no rank variables leaked from a parent job.
    """
    root = ROOT
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".cache" / "torch_extensions"))
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore::FutureWarning",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(root),
        PATH=f"{root / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    env.update(extra)
    return env
