"""The library's command lines answer where the README says they live: `python -m epalm.cli.<name>` and the
console scripts pyproject.toml declares (installed by `make setup`)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_cli_prints_its_help(script, tmp_path):
    module = SCRIPTS[script].split(":")[0]
    assert module.startswith("epalm.cli."), f"{script} -> {module}: command lines live in epalm/cli/"
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
    installed = Path(sys.executable).parent / script
    if installed.exists():  # the console script runs the same main
        r2 = subprocess.run(
            [str(installed), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert r2.returncode == 0 and "usage:" in r2.stdout, r2.stderr[-2000:]
