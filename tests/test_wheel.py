"""The distribution as a user gets it: a wheel built from this working tree, installed into a fresh virtual
environment, and every console script's `--help` run from outside the repository. The wheel holds the
library, the shard tools and the evaluation CLIs (as `epalm_eval`: no top-level `eval`), and none of the
tests, benchmarks or launch scripts.

Nothing is downloaded: the wheel is built without isolation and installed without dependencies; a `.pth`
file lets the fresh environment import the heavy dependencies (torch, ...) from this checkout's .venv,
whose own `.pth` files (the editable install) are not read from there.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
INSTALLED = {"epalm": "epalm", "data_shards": "data_shards", "eval": "epalm_eval"}  # folder -> import name


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _working_tree(dest: Path) -> Path:
    """This checkout's files as a fresh clone would have them (tracked, or new and not ignored): building
    from a copy keeps setuptools' build/ and *.egg-info out of the checkout other processes are using."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file():  # a tracked file deleted in the working tree is not there to copy
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the fresh environment's bin/) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _working_tree(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, src])
    (wheel,) = tmp.glob("epalm-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "heavy_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # this .venv's
    return wheel, venv / "bin"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(PYTHONWARNINGS="ignore::FutureWarning")
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_holds_the_packages_and_no_top_level_eval(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(z.read(f"{info}/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        record = z.read(f"{info}/RECORD").decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"epalm", "data_shards", "epalm_eval", info}, (
        tops
    )  # no eval, tests, testing, bench, launch
    assert {line.split(",")[0].split("/")[0] for line in record.splitlines()} == tops
    for folder, name in INSTALLED.items():  # every module of the three packages, eval/ renamed
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"{name}/{rel}" in names, (
                f"{folder}/{rel} is not in the wheel (pyproject's packages list?)"
            )
    assert "epalm/cli/train.py" in names  # what launch/train.py runs, shipped inside the library
    assert metadata["License-Expression"] == "Apache-2.0"
    assert f"{info}/licenses/LICENSE" in names
    requires = {Requirement(r).name for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert {"torch", "deepspeed", "transformers", "webdataset", "pycocoevalcap"} <= requires
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_console_script_answers_help_from_outside_the_repository(installed, tmp_path):
    _, bin_dir = installed

    def help_of(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bin_dir / script), "--help"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    with ThreadPoolExecutor(max(1, min(4, len(os.sched_getaffinity(0))))) as pool:
        outcomes = dict(zip(SCRIPTS, pool.map(help_of, SCRIPTS)))
    for script, r in outcomes.items():
        assert r.returncode == 0, f"{script} --help: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert r.stdout.startswith(f"usage: {script}") or r.stdout.startswith("usage: python -m"), r.stdout[
            :300
        ]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_installed_code_is_the_wheel_s_and_eval_is_not_claimed(installed, tmp_path):
    _, bin_dir = installed
    probe = (
        "import importlib.util, epalm, data_shards, epalm_eval.run, epalm_eval.vqa\n"
        "print(epalm.__file__, data_shards.__file__, epalm_eval.__file__)\n"
        "print(importlib.util.find_spec('eval'))\n"
    )
    r = _run([bin_dir / "python", "-c", probe], cwd=tmp_path, env=_env())
    files, eval_spec = r.stdout.splitlines()
    assert all(str(ROOT) not in f and str(bin_dir.parent) in f for f in files.split()), files
    assert eval_spec == "None"  # `import eval` finds nothing: the name is left to whoever owns it
