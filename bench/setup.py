"""`make setup` with uv against the same install with pip, from empty venvs, in one run.

uv: `make setup` in a fresh clone of this checkout, with an empty uv cache (UV_CACHE_DIR in the run's
temporary folder). pip: the recipe `make setup` had before uv, step for step (`pip install --upgrade pip`,
torch + torchvision pinned, `-r requirements.txt`, the project editable), with pip's own cache as it is.
Both read the indexes pip is configured with. Needs ~13 GB of free disk; takes ~5-10 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench._launch import ROOT, machine_load

COMMAND = "python -m bench.run setup"


def torch_pins() -> list[str]:
    """requirements.txt's torch and torchvision pins, which the recipe installs first."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line for line in lines if line.startswith(("torch==", "torchvision=="))]


def _timed(cmds: list[list[str]], cwd: Path, env: dict[str, str]) -> float:
    start = time.time()
    for cmd in cmds:
        subprocess.run(
            cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return time.time() - start


def main() -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-setup-"))
    try:
        clone = tmp / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
        load_before = machine_load()
        pip = str(tmp / "pip-venv" / "bin" / "pip")
        pip_s = _timed(
            [
                ["python3", "-m", "venv", str(tmp / "pip-venv")],
                [pip, "install", "-q", "--upgrade", "pip"],
                [pip, "install", "-q", *torch_pins()],
                [pip, "install", "-q", "-r", "requirements.txt"],
                [pip, "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
            ],
            clone,
            env,
        )
        shutil.rmtree(tmp / "pip-venv")
        uv_s = _timed([["make", "-s", "setup"]], clone, {**env, "UV_CACHE_DIR": str(tmp / "uv-cache")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join(
        [
            "## Setup: `make setup` with uv against pip",
            "",
            f"Command: `{COMMAND}` (`bench/setup.py`): empty venvs; pip with its cache as it is, uv with an empty",
            f"cache; both from the indexes pip is configured with. {load_before} at the start.",
            "",
            "| installer | venv + pip upgrade + torch/torchvision + requirements.txt + project (s) | vs pip |",
            "|---|---|---|",
            f"| pip (the recipe before uv) | {pip_s:.0f} | 1.00x |",
            f"| uv (`make setup`) | {uv_s:.0f} | {uv_s / pip_s:.2f}x |",
        ]
    )
