"""GPU check: train OPT-6.7B + ViT-L/16 shapes (random weights, no download) in bf16 under ZeRO-3 for a few steps
through `epalm.engine.build_engine`; report samples/s, MFU and peak memory. NOT YET RUN ON A GPU.

Started by tests/gpu/run.sh under the deepspeed launcher; `--dry-run-cpu` runs the same path on CPU with a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "launch" / "configs" / "image" / "vqa_v2_pt_L.yaml"
DS_CONFIG = ROOT / "ds_configs" / "zero3.json"
BF16_PEAK = 989e12  # H100 / H200 SXM dense bf16 FLOP/s
TINY = {  # --dry-run-cpu: a 6-layer OPT and a 4-block ViT at 16x16, 2 states into layers 1..4
    "lm": dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, ffn_dim=64, vocab_size=320,
               max_position_embeddings=128, word_embed_proj_dim=32),
    "encoder": dict(img_size=16, patch_size=8, embed_dim=24, depth=4, num_heads=2),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=16, help="micro-batch per GPU (the paper used 2)")
    p.add_argument("--text-tokens", type=int, default=30)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny model on CPU: exercise the code path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_cfg(args: argparse.Namespace, world: int):
    import yaml

    from epalm.config import build_config

    tree = yaml.safe_load(CONFIG.read_text())
    model = tree["model"]
    model["lm"]["pretrained"] = False
    model["encoder"]["pretrained"] = False
    if args.dry_run_cpu:
        model["lm"]["config_overrides"] = TINY["lm"]
        model["encoder"]["config_overrides"] = TINY["encoder"]
        model["encoder"]["num_states"] = 2
        model["adapter"].update(start_layer=1, end_layer=5, prompt_tokens=3)
    tree["train"].update(
        micro_batch_size=args.micro,
        global_batch_size=args.micro * world,
        max_steps=args.warmup + args.steps,
        optimizer="torch",  # no FusedAdam JIT build (needs nvcc) inside a timed check
    )
    return build_config(tree, source=str(CONFIG))


def flops_per_sample(model, text_tokens: int) -> tuple[float, int, int]:
    """4 N_lm x LM tokens (frozen LM fwd + bwd) + ViT forward; N from the built model (ZeRO-3 aware)."""
    from bench.features import lm_train_flops, vit_forward_flops

    def count(module, skip: str) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters() if skip not in n)

    n_lm = count(model.lm, "embed_positions")  # the tied head is listed once, as the FLOP model wants
    vit = model.encoder.model
    n_enc = count(vit, "pos_embed")
    patches = vit.patch_embed.num_patches
    prompt = model.prompt.num_tokens if model.prompt is not None else 0
    lm = lm_train_flops(n_lm, text_tokens + prompt)
    enc = vit_forward_flops(n_enc, len(vit.blocks), vit.embed_dim, patches)
    return lm + enc, n_lm, n_enc


def peak_memory(cuda: bool) -> int:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated()
    from bench._launch import proc_status_kib

    return proc_status_kib("VmHWM") * 1024


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run_cpu:
        print("SKIP: no CUDA device (use --dry-run-cpu to exercise the code path on CPU)", flush=True)
        return 0
    from bench._launch import reset_peak_rss
    from epalm.distributed import init_distributed
    from epalm.ds_config import build_ds_config, load_ds_config
    from epalm.engine import build_engine

    t0 = time.perf_counter()
    info = init_distributed()
    cfg = build_cfg(args, info.world_size)
    ds_config = build_ds_config(load_ds_config(DS_CONFIG), cfg.train, info.world_size, "bf16", cuda)
    eng = build_engine(cfg, ds_config, total_steps=args.warmup + args.steps)
    build_s = time.perf_counter() - t0
    engine, model = eng.ds_engine, eng.model
    device = engine.device
    flops, n_lm, n_enc = flops_per_sample(model, args.text_tokens)
    size = cfg.data.image_size if not args.dry_run_cpu else TINY["encoder"]["img_size"]
    vocab = model.lm.config.vocab_size
    g = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(4, min(vocab, 50000), (args.micro, args.text_tokens), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "media": torch.randn(args.micro, 3, size, size, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    engine.train()

    def step() -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.loss.detach().float().item()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    timed = [step() for _ in range(args.steps)]
    step_s = statistics.median(t for t, _ in timed)
    samples_per_s = args.micro * info.world_size / step_s
    result = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dry_run_cpu": args.dry_run_cpu,
        "world_size": info.world_size,
        "zero_stage": eng.stage,
        "dtype": str(eng.dtype),
        "optimizer": eng.optimizer_kind,
        "micro_batch": args.micro,
        "text_tokens": args.text_tokens,
        "n_lm": n_lm,
        "n_encoder": n_enc,
        "build_s": round(build_s, 1),
        "steps": args.steps,
        "step_s_median": step_s,
        "samples_per_s": samples_per_s,
        "flops_per_sample": flops,
        "mfu": flops * samples_per_s / info.world_size / BF16_PEAK,
        "peak_memory_bytes_in_steps": peak_memory(cuda),
        "losses": [loss for _, loss in timed],
        "torch": torch.__version__,
    }
    if info.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_train.json").write_text(json.dumps(result, indent=1))
        print(
            f"RESULT {result['device']}: ZeRO-{eng.stage} bf16, micro-batch {args.micro}, "
            f"{samples_per_s:.1f} samples/s, step {step_s * 1e3:.0f} ms, MFU {result['mfu']:.1%} "
            f"(of {BF16_PEAK / 1e12:.0f} TFLOP/s), peak memory {result['peak_memory_bytes_in_steps'] / 2**30:.2f} GiB, "
            f"build {build_s:.0f} s -> {out / 'gpu_train.json'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    from epalm.distributed import exit_process, shutdown_distributed

    code = main()
    shutdown_distributed()
    exit_process(code)
