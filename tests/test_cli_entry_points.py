"""The command lines answer where the README says they live: `python -m <module>` and the console scripts
pyproject.toml declares (installed by `make setup`), run from outside the repository. tests/test_wheel.py
runs the same scripts from a built wheel in a fresh environment."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# Where a console script's function may live. The library's command lines are in epalm/cli/; the shard tools
# (data_shards/) and the evaluation CLIs (eval/, installed as `epalm_eval`) are tools beside the library, as the
# layout puts them, so their scripts point there rather than through a wrapper in epalm/cli/ (the library never
# imports them: tests/test_architecture.py).
HOMES = ("epalm.cli.", "data_shards.", "epalm_eval.")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_cli_prints_its_help(script, tmp_path):
    module = SCRIPTS[script].split(":")[0]
    assert module.startswith(HOMES), f"{script} -> {module}: command lines live in {HOMES}"
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
        assert r2.stdout.split("\n\n")[1:] == r.stdout.split("\n\n")[1:]  # the same options and text
