"""The adapter's optimizer (Apex / DeepSpeed FusedAdam / torch fused AdamW) and its warmup + cosine schedule."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from epalm.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from epalm.model.epalm import EPALM


def choose_optimizer(requested: str, cuda: bool) -> str:
    """auto: Apex FusedAdam (apex + CUDA), else DeepSpeed FusedAdam (CUDA), else torch AdamW(fused)."""
    if requested == "apex" and not (cuda and _apex_available()):
        raise ConfigError(["train.optimizer=apex: NVIDIA apex with CUDA is not available here"])
    if requested != "auto":
        return requested
    if cuda:
        return "apex" if _apex_available() else "deepspeed"
    return "torch"


def _apex_available() -> bool:
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:  # ImportError, or the unrelated PyPI "apex" without .optimizers
        return False
    return True


def param_groups(model: EPALM, train: TrainConfig) -> list[dict]:
    """Connector at train.lr, soft prompt at train.prompt_lr, both with train.weight_decay."""
    named = model.trainable_named_parameters()
    groups = [
        {"name": "connector", "lr": train.lr, "params": [p for n, p in named if n.startswith("connector.")]},
        {"name": "prompt", "lr": train.prompt_lr, "params": [p for n, p in named if n.startswith("prompt.")]},
    ]
    groups = [dict(g, weight_decay=train.weight_decay) for g in groups if g["params"]]
    assert sum(len(g["params"]) for g in groups) == len(named), "trainable set outside connector/prompt"
    return groups


def build_optimizer(kind: str, groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    common = dict(lr=train.lr, weight_decay=train.weight_decay)
    if kind == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **common)
    if kind == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **common)
    return torch.optim.AdamW(groups, fused=True, **common)


def lr_factor(
    step: int, *, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """lr(step) / lr: linear from warmup_lr to lr over warmup_steps, then cosine down to min_lr at total_steps."""
    if lr <= 0:
        return 0.0
    if step < warmup_steps:
        value = warmup_lr + (lr - warmup_lr) * step / warmup_steps
    else:
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        value = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return value / lr


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> LambdaLR:
    """One factor for all groups, so the prompt follows the connector's shape scaled by prompt_lr / lr.

    A partial (not a lambda) so LambdaLR's state_dict stays small and loads into a fresh scheduler.
    """
    factor = functools.partial(
        lr_factor,
        lr=train.lr,
        warmup_lr=train.warmup_lr,
        min_lr=train.min_lr,
        warmup_steps=train.warmup_steps,
        total_steps=total_steps,
    )
    return LambdaLR(optimizer, factor)
