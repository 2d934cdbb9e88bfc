"""One rank of bench zero (started by torchrun from bench/zero.py, which writes the report): an engine per
DeepSpeed variant through the product's path, stepped in turn, with the collectives of each phase counted on
DeepSpeed's backend, the frozen bytes this rank holds, and the all-gather bandwidth between the rounds."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from bench._launch import model_tree
from bench.zero import LARGER, MICRO, OTHERS, PHASES, STEPS, TOKENS, WARMUP


def frozen_resident_bytes(model) -> int:
    """Bytes of frozen parameters held by this rank between steps: a ZeRO-3 parameter's own shard (its whole
    tensor if persistent), else the whole tensor."""
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    total = 0
    for p in model.parameters():  # tied weights are listed once
        if id(p) in trainable:
            continue
        if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        else:
            total += getattr(p, "ds_numel", p.numel()) * p.element_size()
    return total


class CollectiveCounter:
    """Calls and output bytes of the collectives on DeepSpeed's backend object (ZeRO's all go through it), by
    phase: `phase` is set by the caller; None counts nothing."""

    def __init__(self):
        import deepspeed.comm.comm as ds_comm

        self.phase: str | None = None
        self.reset()
        backend = ds_comm.cdb
        for name in ("all_gather_into_tensor", "all_gather", *OTHERS):
            setattr(backend, name, self._wrap(name, getattr(backend, name)))

    def reset(self) -> None:
        self.gathers = {p: [0, 0] for p in PHASES}  # phase -> [calls, bytes]
        self.others = dict.fromkeys(OTHERS, 0)

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.phase is not None:
                if name.startswith("all_gather"):
                    out = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
                    tensors = out if isinstance(out, list) else [out]
                    self.gathers[self.phase][0] += 1
                    self.gathers[self.phase][1] += sum(t.numel() * t.element_size() for t in tensors)
                else:
                    self.others[name] += 1
            return original(*args, **kwargs)

        return counted


def allgather_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Output bytes per second of one all_gather_into_tensor of `nbytes` (bf16), best of `repeats`."""
    import deepspeed.comm as dist
    import torch

    world = dist.get_world_size()
    shard = torch.ones(nbytes // 2 // world, dtype=torch.bfloat16)
    out = torch.empty(shard.numel() * world, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_gather_into_tensor(out, shard)
        best = min(best, time.perf_counter() - start)
    return out.numel() * 2 / best


def worker(args: argparse.Namespace) -> None:
    """One rank: an engine per variant through the product's path (same seed, same batch), then `args.steps`
    rounds of one step of each in turn after `args.warmup` such rounds."""
    import torch

    from epalm.config import build_config
    from epalm.distributed import init_distributed
    from epalm.train.ds_config import build_ds_config
    from epalm.train.engine import build_engine

    info = init_distributed()
    counter = CollectiveCounter()
    tree = model_tree()
    tree["train"] = {
        "global_batch_size": args.micro * info.world_size,
        "micro_batch_size": args.micro,
        "max_steps": args.warmup + args.steps,
        "optimizer": "torch",
        "warmup_steps": 1,
    }
    cfg = build_config(tree)
    g = torch.Generator().manual_seed(1 + info.rank)

    def make_batch(micro: int) -> dict:
        ids = torch.randint(4, 50000, (micro, args.tokens), generator=g)
        states = torch.randn(micro, 6, 768, generator=g)
        return dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(), encoder_states=states
        )

    batch, larger = make_batch(args.micro), make_batch(args.larger)
    engines, results = {}, {}
    for name, base in json.loads(args.variants).items():
        ds_config = build_ds_config(base, cfg.train, info.world_size, "bf16")
        eng = build_engine(cfg, ds_config, total_steps=args.warmup + args.steps, with_encoder=False)
        eng.ds_engine.train()
        engines[name] = eng.ds_engine
        lm_elements = sum(getattr(p, "ds_numel", p.numel()) for p in eng.model.lm.parameters())
        results[name] = {
            "times": [],
            "larger_times": [],
            "losses": [],
            "gathers": {p: [0, 0] for p in PHASES},
        }
        results[name] |= {"others": dict.fromkeys(OTHERS, 0), "lm_bytes": lm_elements * 2}
        results[name]["frozen_bytes"] = frozen_resident_bytes(eng.model)

    def step(name: str, timed: bool) -> None:
        engine, r = engines[name], results[name]
        counter.reset()
        start = time.perf_counter()
        counter.phase = "forward" if timed else None
        out = engine(**batch)
        counter.phase = "backward" if timed else None
        engine.backward(out.loss)
        counter.phase = "step" if timed else None
        engine.step()
        counter.phase = None
        seconds = time.perf_counter() - start
        r["losses"].append(out.loss.item())
        if timed:
            r["times"].append(seconds)
            for p in PHASES:
                r["gathers"][p] = [a + b for a, b in zip(r["gathers"][p], counter.gathers[p])]
            for k in OTHERS:
                r["others"][k] += counter.others[k]

    for _ in range(args.warmup):
        for name in engines:
            step(name, timed=False)
    gc.collect()
    bandwidth = []
    for _ in range(args.steps):
        for name in engines:
            step(name, timed=True)
        bandwidth.append(allgather_bandwidth(results[name]["lm_bytes"] // 4))
    # the same engines fed the larger micro-batch (DeepSpeed's micro-batch setting only labels its throughput)
    for round_ in range(1 + args.larger_steps):  # the first round warms up the new shapes
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.backward(engine(**larger).loss)
            engine.step()
            if round_:
                results[name]["larger_times"].append(time.perf_counter() - start)
    out = {"rank": info.rank, "threads": torch.get_num_threads(), "allgather_bytes_per_s": max(bandwidth)}
    for name, r in results.items():
        n = len(r["times"])
        out[name] = {
            "step_s": statistics.median(r["times"]),
            "larger_step_s": statistics.median(r["larger_times"]) if r["larger_times"] else None,
            "losses": r["losses"],
            "frozen_bytes": r["frozen_bytes"],
            "lm_bytes": r["lm_bytes"],
            "gathers": {p: [c / n, b / n] for p, (c, b) in r["gathers"].items()},
            "others": {k: v / n for k, v in r["others"].items()},
        }
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(out))


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one rank of bench.zero (started by torchrun)")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", required=True, help="{name: DeepSpeed JSON (knobs only)}, inline")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--micro", type=int, default=MICRO)
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--larger", type=int, default=LARGER, help="micro-batch of the extra rounds")
    p.add_argument("--larger-steps", type=int, default=0, help="timed rounds at --larger (0: none)")
    return p.parse_args(argv)


if __name__ == "__main__":
    worker(_parse())
