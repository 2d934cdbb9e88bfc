"""`python -m epalm.describe CONFIG [key=value ...]`: build the model on the meta device (offline, no memory)
and print one line per component, frozen or trainable, with its parameter count.

The last line is exactly `trainable=<int> total=<int> ratio=<percent>%`.
"""

from __future__ import annotations

import argparse

from torch import nn

from epalm.model.epalm import EPALM, build_model
from epalm.preflight import load_run_config


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Describe an eP-ALM config's model without loading weights.")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides, paths=False)
    model = build_model(cfg.model, device="meta")
    print("\n".join(describe(model, cfg)))


if __name__ == "__main__":
    main()
