"""`--ds_config auto`: the fastest DeepSpeed engine whose memory plan (epalm/train/memory_plan.py) fits the device
with a margin, from the candidates below in speed order, and the one line that says why. Pure apart from
`device_memory_bytes`/`agreed_device_bytes` (no deepspeed import), so every decision is testable without a GPU.

DeepSpeed's `estimate_zero3_model_states_mem_needs_all_live` was considered for the plan: it counts every
parameter as trainable, which for a frozen base overstates the states ~8x (memory_plan.py's docstring).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

from epalm.config import Config, ConfigError, gradient_accumulation_steps
from epalm.train.memory_plan import BYTES, MemoryPlan, plan_memory

log = logging.getLogger(__name__)

MARGIN = 0.15  # left free of the device: CUDA context, allocator fragmentation, communication buckets
# Modules ZeRO-3 gathers as one unit (DeepSpeed's `zero_optimization.leaf_module`, by class): one all-gather per
# decoder layer or encoder block instead of one per submodule, and no hooks inside them (bench/zero.py).
LEAF_CLASSES = [
    "transformers.models.opt.modeling_opt.OPTDecoderLayer",
    "timm.models.vision_transformer.Block",
    "transformers.models.timesformer.modeling_timesformer.TimesformerLayer",
    "transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer.ASTLayer",
]
_COMMON = {"bf16": {"enabled": True}, "communication_data_type": "fp32", "steps_per_print": 1_000_000_000}
_COMMON["wall_clock_breakdown"] = False
# ds_configs/zero0.json, zero2.json and zero3_frozen.json hold the same knobs (tests/test_engine_choice.py)
_ZERO2 = {
    "stage": 2,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "allgather_partitions": True,
    "allgather_bucket_size": 50_000_000,
    "reduce_scatter": True,
    "reduce_bucket_size": 50_000_000,
}
_ZERO3 = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 50_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    # 0, not DeepSpeed's 1e5: a persistent parameter is released at every optimizer step and gathered again
    # alone (stage3.py `_post_step`), ~10 tiny all-gathers per layer per step for the frozen biases and norms
    "stage3_param_persistence_threshold": 0,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": False,
    "leaf_module": {"classes": LEAF_CLASSES},
}
ENGINES = ("zero0", "zero2", "zero3_whole_frozen", "zero3", "zero3_offload")  # fastest first
WHAT = {
    "zero0": "no sharding (plain data parallel)",
    "zero2": "frozen weights whole on every device, adapter gradients and optimizer state sharded",
    "zero3_whole_frozen": "ZeRO-3 keeping frozen layers gathered from forward to backward within the room left",
    "zero3": "ZeRO-3, frozen weights sharded, each layer gathered as one unit",
    "zero3_offload": "ZeRO-3 with the frozen shards in host memory",
}


def engine_config(name: str, live_elements: int | None = None, prefetch: bool = True) -> dict:
    """The DeepSpeed JSON (knobs only) of engine `name`; `live_elements` sets zero3_whole_frozen's budget.

    `prefetch=False` (CPU runs) gathers each layer when it is called: on a CPU the prefetching gloo thread takes
    cores from the compute instead of hiding under it (bench/zero.py, "no prefetch": ~15% faster steps)."""
    cfg = copy.deepcopy(_COMMON)
    if name == "zero0":
        cfg["zero_optimization"] = {"stage": 0}
    elif name == "zero2":
        cfg["zero_optimization"] = copy.deepcopy(_ZERO2)
    elif name in ("zero3", "zero3_whole_frozen", "zero3_offload"):
        cfg["zero_optimization"] = copy.deepcopy(_ZERO3)
        if not prefetch:
            cfg["zero_optimization"]["stage3_prefetch_bucket_size"] = 0
        if name == "zero3_offload":
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
        if name == "zero3_whole_frozen":
            if not live_elements:
                raise ValueError("zero3_whole_frozen needs its live budget (elements)")
            cfg["zero_optimization"]["stage3_max_live_parameters"] = int(live_elements)
            cfg["zero_optimization"]["stage3_max_reuse_distance"] = int(live_elements)
    else:
        raise ValueError(f"unknown engine {name!r}; one of {ENGINES}")
    return cfg


@dataclass(frozen=True)
class Candidate:
    name: str
    ds_config: dict
    plan: MemoryPlan | None  # None: not considered (see `note`)
    fits: bool
    note: str


@dataclass(frozen=True)
class EngineChoice:
    name: str
    ds_config: dict
    plan: MemoryPlan
    device_bytes: int
    margin: float
    candidates: tuple[Candidate, ...]

    @property
    def usable_bytes(self) -> int:
        return int(self.device_bytes * (1 - self.margin))

    def reason(self) -> str:
        """Why this engine: the faster ones that did not fit (or were skipped), in one clause."""
        faster = [c for c in self.candidates if ENGINES.index(c.name) < ENGINES.index(self.name)]
        why = "; ".join(f"{c.name} {c.note}" for c in faster)
        return f"{WHAT[self.name]}" + (f" (faster ones: {why})" if why else " (the fastest)")

    def last_line(self) -> str:
        return (
            f"engine={self.name} planned_bytes={self.plan.planned_bytes_per_gpu} device_bytes={self.device_bytes} "
            f"margin={self.margin:g}"
        )


def choose_engine(
    cfg: Config, world_size: int, device_bytes: int, precision: str = "bf16", micro_batch: int | None = None,
    text_tokens: int = 32, margin: float = MARGIN, prefetch: bool = True,
) -> EngineChoice:  # fmt: skip
    """The first of ENGINES whose plan fits `device_bytes x (1 - margin)`; ConfigError when none does.

    zero0 is skipped under gradient accumulation in bf16/fp16 (its optimizer wrapper accumulates gradients in the
    low precision); zero3_whole_frozen is offered when the room left beside sharded ZeRO-3's plan holds more
    gathered layers than zero3's own live budget, and takes all of that room (whole layers).
    """
    from epalm.model.epalm import build_model

    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}")
    usable = int(device_bytes * (1 - margin))
    model = build_model(cfg.model, device="meta", with_encoder=not cfg.data.use_features)
    micro = micro_batch or cfg.train.micro_batch_size
    accum = gradient_accumulation_steps(cfg.train, world_size) if micro_batch is None else 1

    def plan(name: str, live: int | None = None) -> tuple[dict, MemoryPlan]:
        ds = engine_config(name, live, prefetch)
        stage = ds["zero_optimization"]["stage"]
        zc = ds["zero_optimization"]
        return ds, plan_memory(
            cfg, world_size, stage, micro, precision, text_tokens, zero_config=zc, model=model
        )

    gib = 2**30
    candidates: list[Candidate] = []
    for name in ENGINES:
        if name == "zero0" and accum > 1 and precision != "fp32":
            note = f"skipped: {accum} accumulation steps would add up {precision} gradients"
            candidates.append(Candidate(name, engine_config(name), None, False, note))
            continue
        if name == "zero3_whole_frozen":
            ds, sharded = plan("zero3")
            bpe = BYTES[precision]
            layer = sum(q.numel() for q in model.lm.model.decoder.layers[0].parameters())
            room = (usable - sharded.planned_bytes_per_gpu + sharded.gathered_bytes_per_gpu) // bpe
            live = min(room // layer * layer, sharded.frozen_params)
            own = ds["zero_optimization"]["stage3_max_live_parameters"]
            if live <= own:
                note = f"no room beyond zero3's own {own:,} live elements"
                candidates.append(Candidate(name, engine_config("zero3"), None, False, note))
                continue
            ds, p = plan(name, live)
            note = f"keeps {live / sharded.frozen_params:.0%} of the frozen elements gathered"
        else:
            ds, p = plan(name)
            note = ""
        fits = p.planned_bytes_per_gpu <= usable
        verdict = "fits" if fits else "does not fit"
        note = f"{p.planned_bytes_per_gpu / gib:.2f} GiB {verdict}" + (f", {note}" if note else "")
        candidates.append(Candidate(name, ds, p, fits, note))
        if fits:
            return EngineChoice(name, ds, p, device_bytes, margin, tuple(candidates))
    smallest = min(c.plan.planned_bytes_per_gpu for c in candidates if c.plan is not None)
    raise ConfigError(
        [
            f"--ds_config auto: no engine fits {device_bytes / gib:.2f} GiB per device with a {margin:.0%} margin "
            f"(smallest plan {smallest / gib:.2f} GiB, {ENGINES[-1]}): lower train.micro_batch_size or use more "
            "devices"
        ]
    )


def device_memory_bytes(local_world_size: int | None = None) -> int:
    """This rank's device memory: the CUDA device's total (`torch.cuda.mem_get_info`), else host RAM shared by
    the ranks of this node (the CPU rule; LOCAL_WORLD_SIZE, set by torchrun and the deepspeed launcher)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    import psutil

    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return int(psutil.virtual_memory().total // max(1, local))


def agreed_device_bytes(local_bytes: int) -> int:
    """The smallest device of all ranks (collective when a process group is up), so every rank picks alike."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local_bytes
    t = torch.tensor([float(local_bytes)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def describe_choice(choice: EngineChoice) -> list[str]:
    """One line per candidate, then the decision's last line."""
    lines = []
    for c in choice.candidates:
        mark = "<- chosen" if c.name == choice.name else ""
        lines.append(f"  {c.name:<20} {c.note:<80} {mark}".rstrip())
    lines.append(choice.last_line())
    return lines


def resolve_auto(cfg: Config, world_size: int, precision: str | None = None) -> dict:
    """`--ds_config auto` in training: choose on the smallest device of all ranks, log the one-line decision."""
    import torch

    device = agreed_device_bytes(device_memory_bytes())
    choice = choose_engine(cfg, world_size, device, precision or "bf16", prefetch=torch.cuda.is_available())
    log.info("--ds_config auto: %s: %s", choice.last_line(), choice.reason())
    return choice.ds_config
