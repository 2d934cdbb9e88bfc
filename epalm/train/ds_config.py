"""The DeepSpeed JSON with our config injected: batch arithmetic, clipping, precision. Pure functions
(no deepspeed import), so every rule here is testable without building an engine."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from epalm.config import ConfigError, TrainConfig, gradient_accumulation_steps

# Keys our config owns; a DeepSpeed JSON that sets them would silently disagree with train.*.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size x world size)",
    "optimizer": "train.optimizer, train.lr, train.prompt_lr, train.weight_decay",
    "scheduler": "train.warmup_steps, warmup_lr, min_lr",
    "gradient_clipping": "train.gradient_clipping",
}
PRECISIONS = ("fp32", "bf16", "fp16")
CONFIG_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"DeepSpeed config not found: {path}"], str(path))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"invalid JSON: {e}"], str(path)) from e


def precision_of(ds_config: dict) -> str:
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"


def build_ds_config(
    base: dict, train: TrainConfig, world_size: int, precision: str | None = None, cuda: bool = False
) -> dict:
    """The one place batch sizes, clipping and precision enter the DeepSpeed config.

    Checks train_batch = micro x accumulation x world and refuses JSON keys that belong to our config.
    """
    problems = [
        f"{k}: set it in our config ({v}), not in the DeepSpeed JSON"
        for k, v in OWNED_KEYS.items()
        if k in base
    ]
    if precision is not None and precision not in PRECISIONS:
        problems.append(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    stage = base.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0..3, got {stage!r}")
    try:
        accum = gradient_accumulation_steps(train, world_size)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems, "DeepSpeed config")
    cfg = copy.deepcopy(base)
    if precision is not None:
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
        cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": precision == "fp16"}
    if precision_of(cfg) == "fp16" and not cuda:
        raise ConfigError(
            ["fp16 needs CUDA (DeepSpeed refuses it on CPU); use bf16 or fp32"], "DeepSpeed config"
        )
    cfg.update(
        train_batch_size=train.global_batch_size,
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=accum,
        gradient_clipping=float(train.gradient_clipping),
    )
    assert cfg["train_batch_size"] == train.micro_batch_size * accum * world_size
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
