"""The GPU check's engines: `--ds_config auto`'s JSONs (epalm/train/engine_choice.py) for a measurement, what auto
picks on this device, and the time plan's prediction (epalm/train/time_plan.py) printed beside each measurement."""

from __future__ import annotations


def ds_config_for(engine: str, extra: dict, cfg, world: int, precision: str) -> tuple[str, dict]:
    """(engine, DeepSpeed JSON): "auto" resolved as training resolves it, on this device's memory."""
    from epalm.model.epalm import build_model
    from epalm.train.engine_choice import choose_engine, device_memory_bytes, engine_config
    from epalm.train.memory_plan import count_params

    if engine == "auto":
        choice = choose_engine(cfg, world, device_memory_bytes(), precision)
        engine, base = choice.name, choice.ds_config
    elif engine == "zero3_whole_frozen":  # keep every frozen element gathered (one GPU: the plan's room)
        frozen, _ = count_params(build_model(cfg.model, device="meta"))
        base = engine_config(engine, frozen)
    else:
        base = engine_config(engine)
    base["zero_optimization"] = {**base.get("zero_optimization", {}), **extra}
    return engine, base


def predicted_samples_per_s(
    cfg, world: int, engine: str, ds_config: dict, precision: str, tokens: int
) -> float:
    """The time plan's samples/s per GPU (epalm/train/time_plan.py, MFU 0.40) for this device kind."""
    import torch

    from epalm.train.time_plan import GPUS, plan_time

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "H100 (dry run)"
    gpu = next((GPUS[k] for k in GPUS if k.upper() in name.upper()), GPUS["h100"])
    plan = plan_time(cfg, world, gpu, engine, ds_config, 1, precision=precision, text_tokens=tokens)
    return plan.samples_per_s_per_gpu


def auto_pick(cfg, world: int) -> str:
    """The engine `--ds_config auto` picks for `cfg` on this device."""
    from epalm.train.engine_choice import choose_engine, device_memory_bytes

    return choose_engine(cfg, world, device_memory_bytes()).name
