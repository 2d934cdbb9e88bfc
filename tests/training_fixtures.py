"""Whole training runs as child processes: a tiny setup on disk (tokenizer, image QA shards, run config) and
`launch`, which starts launch/train.py on 2 ranks under deepspeed, torchrun or mpirun (optionally with
tests/fault_hook on the path to inject a fault).

Separate from shard_fixtures.py, which only writes data (this module uses it) and is imported by many
in-process tests that start no launcher.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from epalm.distributed import free_port
from testing.shard_fixtures import write_dataset
from testing.support import cpu_child_env, fault_env, tiny_tree

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


def write_setup(tmp: Path, **train) -> Path:
    """Tokenizer + 2 shards of 16 image-QA samples + a config YAML; returns the config path."""
    from epalm.data.tokenizer_trainer import save_tokenizer

    tok = save_tokenizer(
        [f"what digit is {i}? seven one" for i in range(64)] * 4, tmp / "tok", vocab_size=300
    )
    write_dataset(tmp / "train", [16, 16], task="qa", modality="image")
    write_dataset(tmp / "val", [8], task="qa", modality="image", prefix="v")
    tree = tiny_tree()
    tree["model"]["lm"]["tokenizer"] = str(tok)
    # a larger init than OPT's 0.02 makes the random LM's logits respond to the adapter, so loss can fall
    tree["model"]["lm"]["config_overrides"]["init_std"] = 0.3
    tree["data"] = {
        "task": "qa",
        "modality": "image",
        "train": [{"path": str(tmp / "train")}],
        "val": str(tmp / "val"),
        "image_size": 16,
        "num_workers": 0,
    }
    tree["train"] = {
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "max_steps": 6,
        "lr": 5e-2,
        "prompt_lr": 5e-2,
        "warmup_steps": 2,
        "warmup_lr": 1e-3,
        "min_lr": 1e-3,
        "gradient_clipping": 1.0,
        "log_every": 1,
        "eval_every": 3,
        "save_every": 3,
        "keep_last": 2,
        **train,
    }
    tree["run_dir"] = str(tmp / "run")
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def env(**extra: str) -> dict:
    return cpu_child_env(**extra)


def launch(
    launcher: str, config: Path, *args: str, fault: str = "", timeout: int = 180
) -> subprocess.CompletedProcess:
    """Run launch/train.py with 2 ranks under `deepspeed`, `torchrun` or `mpirun`."""
    script = [str(ROOT / "launch" / "train.py"), "--config", str(config), *args]
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, *script]
    elif launcher == "torchrun":
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *script]
    elif launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        cmd = [
            mpirun,
            "--allow-run-as-root",
            "-np",
            "2",
            "-x",
            f"MASTER_PORT={port}",
            sys.executable,
            *script,
        ]
    else:
        raise ValueError(launcher)
    extra = fault_env(fault)  # tests/fault_hook/sitecustomize.py reads it in every rank
    return subprocess.run(cmd, env=env(**extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
