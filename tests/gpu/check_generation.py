"""GPU check of decoding against its limit: OPT-6.7B + ViT-L shapes (launch/configs/image/vqa_v2_pt_L.yaml with
random weights, nothing downloaded), bf16, one GPU, batch 64, greedy and beam 3. NOT YET RUN ON A GPU.

Paths (`bench.decoding.decode_calls`): the default DynamicCache `generate`, `Decoding(static_cache=True)`,
`Decoding(compile=True)` (static cache + torch.compile "reduce-overhead": CUDA graphs) and stock transformers
`generate` on the same LM without injection. Each decoding step reads every LM weight once, so new tokens/s is at
most batch x (device bandwidth / weight bytes); the bandwidth is measured in the same call (a device-to-device
copy) and each line gives the measured rate against that roofline (the prediction). Tokens of the static and
compiled paths are compared with the default's. One `RESULT` line per path and decoding; $OUT/gpu_generation.json.

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up; best is kept")
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


def copy_bandwidth(device: str, nbytes: int, cuda: bool) -> float:
    """Bytes/s moved (read + write) by a device-to-device copy of `nbytes`, best of 5."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.decoding import decode_calls
    from bench.generation import build_bench_model, inputs, time_paths

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("SKIP: no CUDA device (use --dry-run to exercise the code path on CPU)", flush=True)
        return 0
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    t0 = time.perf_counter()
    tree, num_states, state_dim = model_tree(args.dry_run)
    model = build_bench_model(tree, device, dtype)
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.lm.parameters())
    bandwidth = copy_bandwidth(device, 2**31 if cuda else 2**26, cuda)
    roofline = args.batch * bandwidth / weight_bytes  # new tokens/s: one read of the weights per step
    x = inputs(model, args.batch, num_states, state_dim, device)
    tokens = args.batch * args.new_tokens
    results, ok = [], True
    for beams in (1, args.beams):
        calls = decode_calls(model, x, beams, args.new_tokens)
        first, out = {}, {}
        for name, call in calls.items():  # warm-up; the compiled path compiles (and records its graphs) here
            start = time.perf_counter()
            out[name] = call()
            first[name] = time.perf_counter() - start
        same = {n: bool(torch.equal(out[n], out["default"])) for n in ("static", "compiled")}
        ok &= all(same.values())
        seconds = time_paths(calls, args.repeats, cuda)
        label = "greedy" if beams == 1 else f"beam{beams}"
        for name, s in seconds.items():
            rate = tokens / s
            r = {"decoding": label, "path": name, "seconds": s, "new_tokens_per_s": rate,
                 "roofline_tokens_per_s": roofline, "of_roofline": rate / roofline, "first_call_s": first[name],
                 "same_tokens_as_default": same.get(name)}  # fmt: skip
            results.append(r)
            print(
                f"RESULT generation-{label}-{name}: batch {args.batch}, {rate:.0f} new tokens/s = "
                f"{rate / roofline:.1%} of the roofline {roofline:.0f} (predicted: weights {weight_bytes / 1e9:.1f} GB "
                f"at {bandwidth / 1e12:.2f} TB/s measured); {seconds['hf'] / s:.2f}x stock generate; first call "
                f"{first[name]:.0f} s" + ("" if same.get(name) is None else f"; same tokens: {same[name]}"),
                flush=True,
            )
    doc = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "shape": "tiny (dry run)" if args.dry_run else "OPT-6.7B + ViT-L/16 (vqa_v2_pt_L.yaml), bf16",
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "build_s": build_s,
        "results": results,
        "same_tokens": ok,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_generation.json").write_text(json.dumps(doc, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
