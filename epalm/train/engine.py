"""The DeepSpeed engine: the model built partition-aware around the trainable adapter, the adapter
gather, and digests of the frozen weights (which must never change)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch.optim.lr_scheduler import LambdaLR

from epalm.config import Config
from epalm.digest import add_tensor
from epalm.model.epalm import EPALM, build_model
from epalm.train.ds_config import CONFIG_DTYPES, precision_of, zero_stage
from epalm.train.optimizer import build_optimizer, build_scheduler, choose_optimizer, param_groups

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """What `build_engine` returns: the DeepSpeed engine and what the trainer needs beside it."""

    ds_engine: deepspeed.DeepSpeedEngine
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
    dtype here, since DeepSpeed skips that cast for a zero-init model (see `deepspeed.initialize`'s
    `_configure_distributed_model`, which casts only when the model was not built under zero.Init), and partitioned
    by deepspeed.initialize.
    """
    precision = precision_of(ds_config)
    dtype = getattr(torch, CONFIG_DTYPES[precision])
    stage = zero_stage(ds_config)
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)
    cuda = torch.cuda.is_available()
    kind = choose_optimizer(cfg.train.optimizer, cuda)
    model_cfg = _with_dtype(cfg, CONFIG_DTYPES[precision])
    torch.manual_seed(cfg.train.seed)  # equal random weights on every rank (random LMs, adapter init)
    model = build_model(model_cfg.model, with_encoder=with_encoder)
    if cfg.train.init_adapter:
        from epalm.run.adapter import load_adapter

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
        add_tensor(h, name, p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
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
                add_tensor(h, name, p.data)
        else:
            add_tensor(h, name, p.data)
    return h.hexdigest()
