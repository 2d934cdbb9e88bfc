"""`python -m epalm.cli.describe CONFIG [key=value ...]`: build the model on the meta device (offline, no memory)
and print one line per component, frozen or trainable, with its parameter count; last line exactly
`trainable=<int> total=<int> ratio=<percent>%`. Nothing is built on a device, nothing downloaded.

  --gpus N [--zero S] [--micro-batch B]      the per-GPU memory plan (epalm/train/memory_plan.py), last line
                                              `frozen_bytes_per_gpu=<int> trainable_bytes_per_gpu=<int> activation_bytes_per_gpu=<int>`
  --gpus N --gpu-memory X                     `--ds_config auto`'s decision (epalm/train/engine_choice.py), last line
                                              `engine=<name> planned_bytes=<int> device_bytes=<int> margin=<float>`
  --gpus N --gpu h100|h200|a100 [--dataset-size S] [--mfu M] [--interconnect-gbps G]
                                              the decision, then the time plan (epalm/train/time_plan.py), last line
                                              `samples_per_s_per_gpu=<float> hours_per_epoch=<float>`
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from torch import nn

from epalm.cli.common import HelpFormatter, configure_logging, fail
from epalm.config import ConfigError
from epalm.model.epalm import EPALM, build_model
from epalm.preflight import load_run_config
from epalm.train.engine_choice import ENGINES, MARGIN, choose_engine, describe_choice, engine_config
from epalm.train.memory_plan import MemoryPlan, plan_memory
from epalm.train.time_plan import DEFAULT_MFU, DEFAULT_PCIE_GBPS, GPUS, plan_time


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def describe(model: EPALM, cfg) -> list[str]:
    m = cfg.model
    conn = model.connector
    first = conn.layers[0]
    rows = [
        ("lm", f"OPTForCausalLM {m.lm.name} ({m.lm.dtype})", "frozen", _count(model.lm)),
        (
            "encoder",
            f"{m.encoder.kind} {m.encoder.name}, last {m.encoder.num_states} [CLS]",
            "frozen",
            _count(model.encoder),
        ),
        (
            "connector",
            f"{len(conn.layers)} x Linear({first.in_features}->{first.out_features})"
            f"{' shared' if conn.shared else ''} -> layers {m.adapter.start_layer}..{m.adapter.end_layer - 1}",
            "trainable",
            _count(conn),
        ),
    ]
    if model.prompt is not None:
        kind = "MLP reparameterised" if model.prompt.mlp is not None else "raw"
        rows.append(
            ("prompt", f"{model.prompt.num_tokens} tokens, {kind}", "trainable", _count(model.prompt))
        )
    trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    total = _count(model)
    lines = [f"{name:<10} {what:<62} {state:<9} {n:>15,}" for name, what, state, n in rows]
    lines.append(f"visual_attention={m.adapter.visual_attention}")
    lines.append(f"trainable={trainable} total={total} ratio={100 * trainable / total:.4f}%")
    return lines


def plan_lines(plan: MemoryPlan, header: str) -> list[str]:
    gib = 2**30
    lines = [header]
    lines += [f"  {what:<52} {n / gib:>9.2f} GiB" for what, n in plan.rows]
    lines.append(f"  {'total of the three (per GPU)':<52} {plan.total_bytes_per_gpu / gib:>9.2f} GiB")
    if plan.gathered_bytes_per_gpu:
        lines.append(
            f"  {'planned, with the gathered working set':<52} {plan.planned_bytes_per_gpu / gib:>9.2f} GiB"
        )
    lines.append(plan.last_line())
    return lines


def memory_bytes(text: str) -> int:
    """'12', '12GB' (10^9 bytes, as GPUs are sold), '11.2GiB' (2^30) -> bytes; ValueError otherwise."""
    t = text.strip().lower().replace(" ", "")
    unit = 2**30 if t.endswith("gib") else 10**9
    number = t.removesuffix("gib").removesuffix("gb")
    value = float(number)
    if not value > 0:
        raise ValueError(text)
    return int(value * unit)


def dataset_samples(cfg) -> int:
    """Samples in the config's training shards (their manifests); ValueError when one cannot be read here."""
    from epalm.data.stream import load_manifest

    return sum(load_manifest(d.path)[1].num_samples for d in cfg.data.train)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epalm.cli.describe",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("config", help="run config YAML (launch/configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--gpus", type=int, help="plan for this many GPUs (memory, engine, time)")
    parser.add_argument(
        "--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage of the memory plan (none: 3)"
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        help="per-GPU micro-batch of the plan (none: the config's train.micro_batch_size)",
    )
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="of the plan")
    parser.add_argument("--text-tokens", type=int, default=32, help="text length per sample, for the plan")
    parser.add_argument(
        "--gpu-memory", help="memory per GPU, e.g. 24GB or 22.4GiB: print --ds_config auto's engine choice"
    )
    parser.add_argument("--margin", type=float, default=MARGIN, help="share of the GPU memory left free")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="print the time plan on these GPUs")
    parser.add_argument("--engine", choices=ENGINES, help="time plan for this engine (none: auto's choice)")
    parser.add_argument(
        "--dataset-size", type=int, help="training samples per epoch (none: the train shards' manifests)"
    )
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOP utilisation assumed")
    parser.add_argument(
        "--interconnect-gbps",
        type=float,
        help="per-GPU collective bandwidth in Gb/s (none: NVLink up to 8 GPUs, the network above)",
    )
    parser.add_argument("--pcie-gbps", type=float, default=DEFAULT_PCIE_GBPS, help="host-GPU, for offload")
    args = parser.parse_args(argv)
    for name in ("gpus", "micro_batch", "text_tokens", "dataset_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("mfu", "interconnect_gbps", "pcie_gbps"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.margin < 1:
        parser.error("--margin must be in [0, 1)")
    if args.gpus is None and (args.gpu or args.gpu_memory or args.zero is not None):
        parser.error("--gpu, --gpu-memory and --zero plan for a number of GPUs: give --gpus N")
    try:
        device = memory_bytes(args.gpu_memory) if args.gpu_memory else None
    except ValueError:
        parser.error(f"--gpu-memory: {args.gpu_memory!r} is not a size such as 24GB or 22.4GiB")
    configure_logging()
    try:
        cfg = load_run_config(args.config, args.overrides, paths=False)
    except ConfigError as e:
        return fail(str(e))
    if args.gpus is None:
        print("\n".join(describe(build_model(cfg.model, device="meta"), cfg)))
        return 0
    micro = args.micro_batch or cfg.train.micro_batch_size
    if device is None and args.gpu is None:
        zero = 3 if args.zero is None else args.zero
        plan = plan_memory(cfg, args.gpus, zero, micro, args.precision, args.text_tokens)
        header = (
            f"{args.config}: {args.gpus} GPU(s), ZeRO-{zero}, {args.precision}, micro-batch {micro}, "
            f"{args.text_tokens} text tokens; per GPU:"
        )
        print("\n".join(plan_lines(plan, header)))
        return 0
    gpu = GPUS[args.gpu] if args.gpu else None
    device = device or gpu.memory_bytes
    try:
        choice = choose_engine(
            cfg, args.gpus, device, args.precision, args.micro_batch, args.text_tokens, args.margin
        )
    except ConfigError as e:
        return fail("; ".join(e.problems))
    print(
        f"{args.config}: {args.gpus} GPU(s) x {device / 10**9:.2f} GB ({device / 2**30:.2f} GiB), {args.precision}, "
        f"micro-batch {micro}, {args.text_tokens} text tokens, {args.margin:.0%} left free -> "
        f"{choice.usable_bytes / 2**30:.2f} GiB usable; the engines, fastest first:"
    )
    print("\n".join(describe_choice(choice)))
    if gpu is None:
        return 0
    return _print_time_plan(args, cfg, gpu, choice)


def _print_time_plan(args, cfg, gpu, choice) -> int:
    try:
        size = args.dataset_size or dataset_samples(cfg)
    except (OSError, ValueError) as e:
        return fail(
            f"--dataset-size: the train shards cannot be counted here ({e}); give the number of samples"
        )
    if args.micro_batch:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, micro_batch_size=args.micro_batch)
        )
    name = args.engine or choice.name
    ds = choice.ds_config if name == choice.name else engine_config(name, choice.plan.frozen_params)
    try:
        plan = plan_time(
            cfg, args.gpus, gpu, name, ds, size, mfu=args.mfu, interconnect_gbps=args.interconnect_gbps,
            pcie_gbps=args.pcie_gbps, precision=args.precision, text_tokens=args.text_tokens,
        )  # fmt: skip
    except ConfigError as e:
        return fail("; ".join(e.problems))
    print(f"time plan on {args.gpus} x {gpu.name} (docs/training.md, 'Time planning'):")
    print("\n".join(f"  {what:<58} {value}" for what, value in plan.rows))
    print(plan.last_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
