"""GPU check of decoding: beam 3, batch 64, OPT-6.7B + ViT-L shapes (launch/configs/image/vqa_v2_pt_L.yaml with
random weights, nothing downloaded), bf16, one GPU. NOT YET RUN ON A GPU.

Times eP-ALM's beam search on the device against stock transformers `generate` on the same LM without injection
(and the previous host-side beam search) with `bench.generation.time_paths`; prints one summary line and writes
$OUT/gpu_generation.json (else runs/gpu_check/). Target: new tokens/s >= 80% of `generate`'s.

    python tests/gpu/check_generation.py              # on a CUDA machine; prints SKIP and exits 0 without CUDA
    python tests/gpu/check_generation.py --dry-run    # tiny shapes on CPU: the same code path
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "launch" / "configs" / "image" / "vqa_v2_pt_L.yaml"
TARGET = 0.8  # new beam search tokens/s over stock generate's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up; best is kept")
    p.add_argument("--no-old", action="store_true", help="skip the previous host-side beam search")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: exercise the code path")
    return p.parse_args(argv)


def model_tree(dry_run: bool) -> tuple[dict, int, int]:
    """(model config mapping, encoder states per sample, their width) from the pt-L config."""
    import yaml

    model = yaml.safe_load(CONFIG.read_text())["model"]
    model["lm"]["pretrained"] = False
    model["encoder"]["pretrained"] = False
    if dry_run:
        from testing.support import TINY_LM

        model["lm"]["config_overrides"] = dict(TINY_LM)
        model["adapter"].update(start_layer=1, end_layer=5, prompt_tokens=3)
        model["encoder"]["num_states"] = 2
    from epalm.config import build_config
    from epalm.model.epalm import _encoder_dim_without_building

    cfg = build_config({"model": model}).model
    return model, cfg.encoder.num_states, _encoder_dim_without_building(cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.generation import build_bench_model, inputs, paths, time_paths

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("SKIP: no CUDA device (use --dry-run to exercise the code path on CPU)", flush=True)
        return 0
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    t0 = time.perf_counter()
    tree, num_states, state_dim = model_tree(args.dry_run)
    model = build_bench_model(tree, device, dtype)
    build_s = time.perf_counter() - t0
    x = inputs(model, args.batch, num_states, state_dim, device)
    calls = paths(model, x, beams=args.beams, new_tokens=args.new_tokens)
    calls.pop("recompute")
    if args.no_old:
        calls.pop("old")
    for call in calls.values():  # warm-up: kernels, allocator
        call()
    seconds = time_paths(calls, args.repeats, cuda)
    tokens = args.batch * args.new_tokens
    rate = {name: tokens / s for name, s in seconds.items()}
    ratio = rate["new"] / rate["hf"]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "shape": "tiny (dry run)" if args.dry_run else "OPT-6.7B + ViT-L/16 (vqa_v2_pt_L.yaml), bf16",
        "batch": args.batch,
        "beams": args.beams,
        "new_tokens": args.new_tokens,
        "seconds": seconds,
        "new_tokens_per_s": rate,
        "new_over_hf": ratio,
        "target": TARGET,
        "passed": ratio >= TARGET,
        "build_s": build_s,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_generation.json").write_text(json.dumps(result, indent=2))
    others = ", ".join(f"{n} {r:.0f}" for n, r in rate.items() if n != "new")
    verdict = "OK" if result["passed"] else "BELOW TARGET"
    print(
        f"{verdict}: generation beam {args.beams} batch {args.batch}: {rate['new']:.0f} new tokens/s "
        f"({others}); {ratio:.2f}x of HF generate (target {TARGET}) -> {out / 'gpu_generation.json'}",
        flush=True,
    )
    return 0 if result["passed"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
