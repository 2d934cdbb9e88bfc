"""GPU check of training at full size: eP-ALM pt-L (OPT-6.7B + ViT-L/16, launch/configs/image/vqa_v2_pt_L.yaml)
with random weights built on the GPU (ZeRO-0/2) or under `deepspeed.zero.Init` (ZeRO-3), never on the host.

One process, one engine after another through `epalm.train.engine.build_engine`, micro-batches 16 and 64, bf16:
the engines of `--ds_config auto` (no sharding, ZeRO-2, sharded ZeRO-3, ZeRO-3 with the frozen weights kept
gathered, and what auto picks on this GPU), ZeRO-3 with quantized frozen weights, and one fp16 step. Per
measurement: samples/s beside the time plan's prediction (epalm/train/time_plan.py), MFU against 989 TFLOP/s
dense bf16, peak memory beside the memory planner's figure (epalm/train/memory_plan.py). One summary line each; everything in OUT/gpu_train.json. A measurement that fails
(out of memory, an op that cannot build) is recorded with its error and the others still run.

`--dry-run`: the same code path on CPU with a tiny OPT/ViT (CI runs it through tests/gpu/run.sh --dry-run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "launch" / "configs" / "image" / "vqa_v2_pt_L.yaml"
BF16_PEAK = 989e12  # H100 / H200 SXM dense bf16 FLOP/s
TINY = {  # --dry-run: a 32-layer OPT of width 32 (pt-L's schedule: layers 19..30) and a 6-block ViT at 16x16
    "lm": dict(hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=320, word_embed_proj_dim=32),
    "encoder": dict(img_size=16, patch_size=8, embed_dim=24, depth=6, num_heads=2),
}  # fmt: skip
# (name, engine, precision, micro-batch, extra zero_optimization keys, timed steps). Engines are --ds_config auto's
# (epalm/train/engine_choice.py): "zero3" is its sharded ZeRO-3 (ds_configs/zero3_frozen.json), "auto" what it picks
# for this GPU (measured again only when it picks none of the rows already measured at that micro-batch).
ENGINES = ("zero0", "zero2", "zero3", "zero3_whole_frozen", "auto")
MEASUREMENTS = [
    (f"{e if e != 'auto' else 'zero-auto'}-mb{m}", e, "bf16", m, {}, None) for e in ENGINES for m in (16, 64)
]
MEASUREMENTS += [
    ("zero3-quantized-frozen-mb16", "zero3", "bf16", 16, {"zero_quantized_nontrainable_weights": True}, None),
    ("fp16-zero2-mb16-one-step", "zero2", "fp16", 16, {}, 1),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", help="run only these measurement names")
    p.add_argument(
        "--dry-run", "--dry-run-cpu", action="store_true", help="tiny model on CPU, same code path"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_cfg(dry_run: bool, micro: int, world: int, steps: int):
    import yaml

    from epalm.config import build_config

    tree = yaml.safe_load(CONFIG.read_text())
    model = tree["model"]
    model["lm"]["pretrained"] = False
    model["encoder"]["pretrained"] = False
    if dry_run:
        model["lm"]["config_overrides"] = TINY["lm"]
        model["encoder"]["config_overrides"] = TINY["encoder"]
        tree["data"]["image_size"] = TINY["encoder"]["img_size"]
    tree["train"].update(
        micro_batch_size=micro,
        global_batch_size=micro * world,
        max_steps=steps,
        optimizer="torch",  # no FusedAdam JIT build (nvcc) inside a timed check
    )
    return build_config(tree, source=str(CONFIG))


def flops_per_sample(model, text_tokens: int) -> tuple[float, int, int]:
    """The time plan's FLOP model on the built model (ZeRO-3 aware): FLOPs per sample, N_lm, N_encoder."""
    from epalm.train.time_plan import flop_params
    from epalm.train.time_plan import flops_per_sample as per_sample

    lm, enc = per_sample(model, text_tokens)
    return lm + enc, flop_params(model.lm, "embed_positions"), flop_params(model.encoder.model, "pos_embed")


def build_on_device(stage: int, ds_config: dict, device):
    """epalm.train.engine.build_model, but random weights made where they will live: under zero.Init for ZeRO-3
    (each rank initialises and keeps its partition), else straight on `device`."""
    import deepspeed

    import epalm.train.engine as engine_mod

    original = engine_mod.build_model

    def build(model_cfg, device_arg=None, with_encoder=True):
        if stage != 3:
            return original(model_cfg, device=device, with_encoder=with_encoder)
        # transformers' post_init would index already-partitioned (empty) tensors: skip it under zero.Init
        # and initialise the LM the way transformers' own ZeRO-3 `_from_config` does (gathered, per module)
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import initialize_weights_zero3

        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = original(model_cfg, with_encoder=with_encoder)
        initialize_weights_zero3(model.lm)
        model.lm.tie_weights()
        return model

    return original, build


def measure(args, name: str, engine: str, precision: str, micro: int, extra: dict, steps: int | None, info):
    import torch

    import epalm.train.engine as engine_mod
    from epalm.train.ds_config import build_ds_config
    from epalm.train.engine import build_engine
    from epalm.train.memory_plan import plan_memory

    cuda = torch.cuda.is_available()
    steps = steps or args.steps
    warmup = 0 if steps == 1 else args.warmup
    if args.dry_run:
        micro = max(1, micro // 8)
    cfg = build_cfg(args.dry_run, micro, info.world_size, warmup + steps)
    from tests.gpu.engines import ds_config_for, predicted_samples_per_s

    engine_name, base = ds_config_for(engine, extra, cfg, info.world_size, precision)
    stage = base["zero_optimization"]["stage"]
    ds_config = build_ds_config(base, cfg.train, info.world_size, precision, cuda)
    predicted = predicted_samples_per_s(cfg, info.world_size, engine_name, base, precision, args.text_tokens)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    original, build = build_on_device(stage, ds_config, device)
    engine_mod.build_model = build
    try:
        eng = build_engine(cfg, ds_config, total_steps=warmup + steps)
    finally:
        engine_mod.build_model = original
    build_s = time.perf_counter() - t0
    engine, model = eng.ds_engine, eng.model
    flops, n_lm, n_enc = flops_per_sample(model, args.text_tokens)
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(4, min(model.lm.config.vocab_size, 50000), (micro, args.text_tokens), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "media": torch.randn(micro, 3, size, size, generator=g),
    }
    batch = {k: v.to(engine.device) for k, v in batch.items()}
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

    for _ in range(warmup):
        step()
    timed = [step() for _ in range(steps)]
    step_s = statistics.median(t for t, _ in timed)
    samples_per_s = micro * info.world_size / step_s
    peak = torch.cuda.max_memory_allocated() if cuda else None
    plan = plan_memory(
        cfg, info.world_size, stage, micro, precision, args.text_tokens, zero_config=base["zero_optimization"]
    )
    engine = model = eng = None  # drop the engine before the next one is built
    gc.collect()
    return {
        "name": name, "engine": engine_name, "zero_stage": stage, "precision": precision, "zero_extra": extra,
        "micro_batch": micro, "world_size": info.world_size, "text_tokens": args.text_tokens, "n_lm": n_lm,
        "n_encoder": n_enc, "build_s": round(build_s, 2),
        "steps": steps,
        "step_s_median": step_s,
        "samples_per_s": samples_per_s,
        "flops_per_sample": flops,
        "mfu": flops * samples_per_s / info.world_size / BF16_PEAK,
        "peak_memory_bytes": peak,
        "planned_bytes_per_gpu": plan.planned_bytes_per_gpu,
        "predicted_samples_per_s": predicted,
        "planned_last_line": plan.last_line(),
        "losses": [loss for _, loss in timed],
    }  # fmt: skip


def summary(r: dict) -> str:
    if "error" in r:
        return f"RESULT {r['name']}: FAILED ({r['error'].splitlines()[-1][:200]})"
    mem = "n/a (CPU)" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f} GiB"
    return (
        f"RESULT {r['name']}: {r['engine']} (ZeRO-{r['zero_stage']}) {r['precision']} micro-batch {r['micro_batch']}: "
        f"{r['samples_per_s']:.1f} samples/s (predicted {r['predicted_samples_per_s']:.1f}), "
        f"step {r['step_s_median'] * 1e3:.0f} ms, MFU {r['mfu']:.1%} "
        f"of {BF16_PEAK / 1e12:.0f} TFLOP/s, peak memory {mem} (planned {r['planned_bytes_per_gpu'] / 2**30:.1f} "
        f"GiB), build {r['build_s']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("SKIP: no CUDA device (use --dry-run to exercise the code path on CPU)", flush=True)
        return 0
    from epalm.distributed import init_distributed
    from tests.gpu.engines import auto_pick

    info = init_distributed()
    results = []
    done: dict[tuple[str, int], dict] = {}  # (engine, micro-batch) -> its measurement
    for name, engine, precision, micro, extra, steps in MEASUREMENTS:
        if args.only and name not in args.only:
            continue
        if engine == "auto":
            picked = auto_pick(
                build_cfg(args.dry_run, max(1, micro // 8) if args.dry_run else micro, info.world_size, 1),
                info.world_size,
            )
            if (picked, micro) in done:  # auto's engine was measured at this micro-batch: that row stands
                r = {**done[(picked, micro)], "name": name, "auto_picked": picked}
                results.append(r)
                if info.rank == 0:
                    print(summary(r), flush=True)
                continue
        if precision == "fp16" and not cuda:
            results.append(
                {"name": name, "skipped": "fp16 needs CUDA (epalm.train.engine refuses it on CPU)"}
            )
            print(f"RESULT {name}: SKIPPED on CPU (fp16 needs CUDA)", flush=True)
            continue
        try:
            r = measure(args, name, engine, precision, micro, extra, steps, info)
            if not extra and precision == "bf16":
                done[(r["engine"], micro)] = r
        except Exception as e:  # OOM or an op that cannot build: record it, run the rest
            r = {
                "name": name,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
            }
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        results.append(r)
        if info.rank == 0:
            print(summary(r), flush=True)
    if info.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "dry_run": args.dry_run,
            "torch": torch.__version__,
            "measurements": results,
        }
        (out / "gpu_train.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / 'gpu_train.json'}", flush=True)
    return 0


if __name__ == "__main__":
    from epalm.distributed import exit_process, shutdown_distributed

    code = main()
    shutdown_distributed()
    exit_process(code)
