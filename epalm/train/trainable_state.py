"""The adapter's training state in a form that loads on any world size and ZeRO stage: each trainable
parameter's full fp32 master, Adam's moments, the optimizer's step, the lr scheduler and the engine's
counters (`gather_trainable_state` / `restore_trainable_state`; the checkpoint keeps it beside DeepSpeed's
per-rank files, epalm.run.checkpoint).

DeepSpeed's `safe_get_full_*` / `safe_set_full_*` (ZeRO 1-3, the bf16 optimizer) reach a parameter's
fragments of the flat fp32 state on every rank; without ZeRO the masters are the parameters themselves or
the fp16/bf16 wrapper's fp32 copies, read here directly. DeepSpeed's universal checkpoints do the same
offline (ds_to_universal.py) and need the module files our trainable-only checkpoints leave out.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from epalm.train.engine import Engine

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, under every optimizer we build (torch, DeepSpeed, Apex)


def _base_optimizer(ds: deepspeed.DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch/fused optimizer itself: ZeRO and the fp16/bf16 optimizers wrap it."""
    return getattr(ds.optimizer, "optimizer", ds.optimizer)


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Held by ZeRO (or the bf16 optimizer) as fp32 fragments; a rank may hold none of it (mapping None)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _masters(ds: deepspeed.DeepSpeedEngine) -> dict[int, tuple[torch.Tensor, int]]:
    """id(module parameter) -> (the fp32 tensor the optimizer updates for it, offset in it) where the
    fp16/bf16 optimizers without ZeRO keep fp32 copies: one per parameter (unfused) or one flat per group."""
    opt, out = ds.optimizer, {}
    for i, lps in enumerate(getattr(opt, "fp16_groups", None) or []):
        if hasattr(opt, "fp32_groups"):
            out.update({id(lp): (hp, 0) for lp, hp in zip(lps, opt.fp32_groups[i])})
        elif hasattr(opt, "fp32_groups_flat"):
            offset = 0
            for lp in lps:
                out[id(lp)] = (opt.fp32_groups_flat[i], offset)
                offset += lp.numel()
    return out


def _view(t: torch.Tensor, offset: int, p: torch.nn.Parameter) -> torch.Tensor:
    return t.detach().view(-1).narrow(0, offset, p.numel()).view(p.shape)


def gather_trainable_state(engine: Engine) -> dict | None:
    """Every trainable parameter's full fp32 master and Adam moments, the optimizer's step, the scheduler and
    the engine's counters, on every rank. Collective under ZeRO 1-3: call on every rank. Small (the adapter
    is a few M parameters). None for an optimizer whose state is laid out otherwise."""
    ds, base = engine.ds_engine, _base_optimizer(engine.ds_engine)
    masters, named = _masters(ds), engine.model.trainable_named_parameters()
    stepped = any(base.state.values())  # Adam makes its state at the first step
    if stepped and any(
        not _partitioned(p) and masters.get(id(p), (p,))[0] not in base.state for _, p in named
    ):
        return None
    if stepped:
        _link_fragments(ds)
    state: dict = {"params": {}, **{key: {} for key in MOMENTS}}
    for name, p in named:
        hp, offset = masters.get(id(p), (p, 0))
        full = safe_get_full_fp32_param(p) if _partitioned(p) else _view(hp, offset, p)
        state["params"][name] = full.detach().to("cpu", torch.float32).clone()
        for key in MOMENTS:
            if not stepped:
                value = torch.zeros_like(state["params"][name])
            elif _partitioned(p):
                value = safe_get_full_optimizer_state(p, key)
            else:
                value = _view(base.state[hp][key], offset, p)
            state[key][name] = value.detach().to("cpu", torch.float32).clone()
    counters = {k: getattr(ds, k) for k in ("global_steps", "global_samples", "skipped_steps")}
    return {
        "format": 1,
        **state,
        "optimizer_step": _optimizer_step(base),
        "scheduler": engine.scheduler.state_dict(),
        "engine": counters,
        "world_size": dist.get_world_size(),
        "zero_stage": engine.stage,
    }


def restore_trainable_state(engine: Engine, state: dict) -> None:
    """Load `gather_trainable_state`'s result into a freshly built engine of any world size and ZeRO stage:
    masters, the module's own (low-precision or partitioned) copies, moments, steps, scheduler, the param
    groups' lr, the engine's counters. Collective under ZeRO 1-3. Every value is copied, none recomputed:
    on the same world size the next step equals the uninterrupted run's bit for bit."""
    ds, base = engine.ds_engine, _base_optimizer(engine.ds_engine)
    stepped = state["optimizer_step"] > 0
    if stepped:
        _materialize_optimizer_state(ds, base)
    masters = _masters(ds)
    for name, p in engine.model.trainable_named_parameters():
        value = state["params"][name]
        if hasattr(p, "ds_id"):  # ZeRO-3: rank 0's full value is partitioned again on leaving the context
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.device, p.dtype))
        else:
            p.data.copy_(value.to(p.device, p.dtype))
        hp, offset = masters.get(id(p), (p, 0))
        if _partitioned(p):
            safe_set_full_fp32_param(p, value.to(ds.device))
        elif hp is not p:
            _view(hp, offset, p).copy_(value)
        for key in MOMENTS if stepped else ():
            if _partitioned(p):
                safe_set_full_optimizer_state(p, state[key][name].to(ds.device), key)
            else:
                _view(base.state[hp][key], offset, p).copy_(state[key][name])
    _set_optimizer_step(base, state["optimizer_step"])
    engine.scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(ds.optimizer.param_groups, engine.scheduler.get_last_lr()):
        group["lr"] = lr  # what the scheduler set at the saved step
    for key, value in state["engine"].items():
        setattr(ds, key, value)
    ds.micro_steps = ds.global_steps * ds.gradient_accumulation_steps()  # the next micro-step opens a step


def _optimizer_step(base: torch.optim.Optimizer) -> int:
    for group in base.param_groups:
        if "step" in group:  # DeepSpeed's and Apex's FusedAdam count per group
            return int(group["step"])
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _set_optimizer_step(base: torch.optim.Optimizer, step: int) -> None:
    for group in base.param_groups:
        if "step" in group:
            group["step"] = step
    for state in base.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


def _materialize_optimizer_state(ds: deepspeed.DeepSpeedEngine, base: torch.optim.Optimizer) -> None:
    """Adam makes its state at the first step: take one with zero gradients at lr 0 (the parameters do not
    move: AdamW scales them by 1 - lr * wd = 1 and adds lr * 0), so every entry exists with the optimizer's
    own types. ZeRO-3 hands its optimizer one flat fp32 partition at a time (`_optimizer_step`)."""
    lrs = [group["lr"] for group in base.param_groups]
    for group in base.param_groups:
        group["lr"] = 0.0
    zero3 = getattr(ds.optimizer, "fp32_partitioned_groups_flat", None)
    flats = zero3 if zero3 is not None else [p for group in base.param_groups for p in group["params"]]
    for p in flats:
        p.grad = torch.zeros_like(p)
    if zero3 is not None:
        for sub_group in range(len(zero3)):
            ds.optimizer._optimizer_step(sub_group)
    else:
        base.step()
    for p in flats:
        p.grad = None
    for group, lr in zip(base.param_groups, lrs):
        group["lr"] = lr
    _link_fragments(ds)


def _link_fragments(ds: deepspeed.DeepSpeedEngine) -> None:
    """ZeRO 1-2 and the bf16 optimizer map each parameter to its fragment of the flat Adam state once, after
    the first group's first step (DeepSpeed 0.19: before a second group, the prompt's, has any state, so its
    fragments stay empty). Map again, now that every group has its state."""
    opt = ds.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
