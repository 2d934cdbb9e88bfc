"""`python -m epalm.cli.describe CONFIG [key=value ...]`: build the model on the meta device (offline, no memory)
and print one line per component, frozen or trainable, with its parameter count; last line exactly
`trainable=<int> total=<int> ratio=<percent>%`. With `--gpus N --zero S [--micro-batch B]` it prints the
per-GPU memory plan (epalm/train/memory_plan.py) instead, ending with
`frozen_bytes_per_gpu=<int> trainable_bytes_per_gpu=<int> activation_bytes_per_gpu=<int>`.
"""

from __future__ import annotations

import argparse
import sys

from torch import nn

from epalm.cli.common import HelpFormatter, configure_logging, fail
from epalm.config import ConfigError
from epalm.model.epalm import EPALM, build_model
from epalm.preflight import load_run_config
from epalm.train.memory_plan import MemoryPlan, plan_memory


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
    lines.append(plan.last_line())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epalm.cli.describe",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("config", help="run config YAML (launch/configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--gpus", type=int, help="print the per-GPU memory plan for this many GPUs")
    parser.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3), help="ZeRO stage of the plan")
    parser.add_argument(
        "--micro-batch",
        type=int,
        help="per-GPU micro-batch of the plan (none: the config's train.micro_batch_size)",
    )
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="of the plan")
    parser.add_argument("--text-tokens", type=int, default=32, help="text length per sample, for the plan")
    args = parser.parse_args(argv)
    for name in ("gpus", "micro_batch", "text_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    configure_logging()
    try:
        cfg = load_run_config(args.config, args.overrides, paths=False)
    except ConfigError as e:
        return fail(str(e))
    if args.gpus is None:
        print("\n".join(describe(build_model(cfg.model, device="meta"), cfg)))
        return 0
    micro = args.micro_batch or cfg.train.micro_batch_size
    plan = plan_memory(cfg, args.gpus, args.zero, micro, args.precision, args.text_tokens)
    header = (
        f"{args.config}: {args.gpus} GPU(s), ZeRO-{args.zero}, {args.precision}, micro-batch {micro}, "
        f"{args.text_tokens} text tokens; per GPU:"
    )
    print("\n".join(plan_lines(plan, header)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
