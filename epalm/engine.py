"""The DeepSpeed engine: our config injected into the DeepSpeed JSON, the model built partition-aware,
the optimizer, the warmup + cosine schedule, the adapter gather and the frozen-weights checksum."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch.optim.lr_scheduler import LambdaLR

from epalm.config import Config, ConfigError, TrainConfig, gradient_accumulation_steps
from epalm.model.epalm import EPALM, build_model

log = logging.getLogger(__name__)

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
_CONFIG_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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


# --------------------------------------------------------------------------- optimizer and schedule


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


# --------------------------------------------------------------------------- the engine


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine
    model: EPALM
    scheduler: LambdaLR
    optimizer_kind: str
    dtype: torch.dtype
    stage: int
    _hf_ds_config: object = None  # keeps transformers' ZeRO-3 integration alive while the engine lives


def build_engine(cfg: Config, ds_config: dict, total_steps: int, with_encoder: bool = True) -> Engine:
    """Build eP-ALM partition-aware and wrap its trainable parameters only in a DeepSpeed engine.

    Under ZeRO-3 transformers loads a pretrained LM straight into partitions (HfDeepSpeedConfig alive);
    what is built outside zero.Init (encoder, connector, prompt; a random LM) is cast to the engine's
    dtype here, since DeepSpeed skips that cast for a zero-init model (cpu-stack §2.5), and partitioned
    by deepspeed.initialize.
    """
    precision = precision_of(ds_config)
    dtype = getattr(torch, _CONFIG_DTYPES[precision])
    stage = zero_stage(ds_config)
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    cuda = torch.cuda.is_available()
    kind = choose_optimizer(cfg.train.optimizer, cuda)
    model_cfg = _with_dtype(cfg, _CONFIG_DTYPES[precision])
    torch.manual_seed(cfg.train.seed)  # equal random weights on every rank (random LMs, adapter init)
    model = build_model(model_cfg.model, with_encoder=with_encoder)
    if cfg.train.init_adapter:
        from epalm.checkpoint import load_adapter

        init_state, _ = load_adapter(cfg.train.init_adapter)
        model.load_adapter_state_dict(init_state)
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    groups = param_groups(model, cfg.train)
    optimizer = build_optimizer(kind, groups, cfg.train)
    scheduler = functools.partial(build_scheduler, train=cfg.train, total_steps=total_steps)
    if kind == "apex" and stage > 0:
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    if cfg.train.init_adapter:
        _set_fp32_masters(model, init_state)
    _save_trainable_only(engine, model)
    n_train = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in model.trainable_named_parameters()
    )
    log.info("optimizer %s, ZeRO stage %d, %s, %d trainable parameters", kind, stage, precision, n_train)
    return Engine(engine, model, lr_scheduler, kind, dtype, stage, hf_ds)


def _with_dtype(cfg: Config, dtype: str) -> Config:
    """The DeepSpeed precision decides the frozen models' dtype (loading fp32 then casting would double memory)."""
    m = cfg.model
    if m.lm.dtype != dtype or m.encoder.dtype != dtype:
        log.info("model dtype follows the DeepSpeed config: %s", dtype)
    lm = dataclasses.replace(m.lm, dtype=dtype)
    encoder = dataclasses.replace(m.encoder, dtype=dtype)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, lm=lm, encoder=encoder))


def _set_fp32_masters(model: EPALM, state: dict[str, torch.Tensor]) -> None:
    """Give the fp32 master copies the exported values, not their low-precision rounding."""
    for name, p in model.trainable_named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, state[name].to(torch.float32))


def _save_trainable_only(engine: deepspeed.DeepSpeedEngine, model: EPALM) -> None:
    """Keep only trainable tensors in the engine's module checkpoint.

    exclude_frozen_parameters misses the LM head tied to the input embedding (it is absent from
    named_parameters), which under ZeRO 0-2 would write the whole vocab x hidden matrix each time.
    """
    keep = {name for name, _ in model.trainable_named_parameters()}
    original = engine.module_state_dict

    def trimmed(*args, **kwargs):
        state = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for key in [k for k in state if k not in keep]:
                del state[key]
        return state

    engine.module_state_dict = trimmed


# --------------------------------------------------------------------------- collective helpers


def gather_adapter_state(model: EPALM) -> dict[str, torch.Tensor]:
    """Full fp32 adapter weights (the optimizer's master copies where it keeps them). Call on every rank."""
    state = {}
    for name, p in model.trainable_named_parameters():
        full = safe_get_full_fp32_param(p)  # collective under ZeRO 1-3
        state[name] = (full if full is not None else p.detach()).to("cpu", torch.float32).clone()
    return state


def frozen_checksum(model: EPALM) -> str:
    """A digest of every rank's share of the frozen weights (its ZeRO-3 partition, or all of them).

    Collective. Depends on the world size under ZeRO-3; compare only runs of the same topology.
    """
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if id(p) in trainable:
            continue
        _update(h, name, p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return hashlib.blake2b("".join(digests).encode(), digest_size=16).hexdigest()


def full_frozen_digest(model: EPALM) -> str:
    """A digest of the full frozen weights as this rank sees them (ZeRO-3 partitions gathered one at a time).

    Collective under ZeRO-3. Equal on every rank, and equal to a freshly built model's, iff nothing drifted.
    """
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if id(p) in trainable:
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                _update(h, name, p.data)
        else:
            _update(h, name, p.data)
    return h.hexdigest()


def _update(h, name: str, t: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy())
