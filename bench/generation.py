"""Beam search on the device vs the previous host-side beam search vs stock transformers `generate`, and the KV
cache vs recompute, on a random OPT-125m-shaped LM with eP-ALM's injection, in one process.

The previous implementation (log-probs copied to the host each step, a Python loop per batch item) lives only in
testing/old_generation.py. Stock `generate` runs on the same LM without injection or prompt: the ceiling.
tests/gpu/check_generation.py times the same paths (`time_paths`) at OPT-6.7B shape on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from epalm.config import build_config
from epalm.model.epalm import EPALM, build_model
from testing import old_generation
from testing.support import generate_loose

PROMPT_LEN, NEW_TOKENS, BEAMS, BATCHES = 12, 30, 3, (8, 32)


def build_bench_model(tree_model: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> EPALM:
    """A random-weight eP-ALM without encoder (inputs are cached encoder states), in eval mode on `device`."""
    torch.manual_seed(0)
    cfg = build_config({"model": tree_model}).model
    with torch.device(device):
        model = build_model(cfg, device=device, with_encoder=False)
    return model.to(dtype).eval()


def inputs(model: EPALM, batch: int, num_states: int, state_dim: int, device: str) -> dict:
    g = torch.Generator().manual_seed(batch)
    vocab = min(model.lm.config.vocab_size, 50000)
    ids = torch.randint(4, vocab, (batch, PROMPT_LEN), generator=g)
    states = torch.randn(batch, num_states, state_dim, generator=g).to(next(model.parameters()).dtype)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "states": states.to(device),
    }


def paths(model: EPALM, x: dict, beams: int = BEAMS, new_tokens: int = NEW_TOKENS) -> dict[str, Callable]:
    """name -> a call decoding `new_tokens` for every prompt (EOS -1 never comes, so no path stops early)."""
    ids, mask = x["input_ids"], x["attention_mask"]
    kw = dict(
        encoder_states=x["states"],
        eos_token_id=-1,
        pad_token_id=1,
        num_beams=beams,
        max_new_tokens=new_tokens,
    )
    hf = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, do_sample=False, pad_token_id=1
    )
    return {
        "new": lambda: generate_loose(model, ids, mask, **kw),
        "old": lambda: old_generation.generate(model, ids, mask, **kw),
        "hf": lambda: model.lm.generate(input_ids=ids, attention_mask=mask, use_cache=True, **hf),
        "recompute": lambda: generate_loose(model, ids, mask, use_cache=False, **kw),
    }


def time_paths(calls: dict[str, Callable], repeats: int, cuda: bool = False) -> dict[str, float]:
    """Best wall time of each call over `repeats` rounds, the calls interleaved so load drift hits all alike."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> str:
    tree = {
        "lm": {"name": "125m", "pretrained": False},
        "encoder": {"name": "vit_base_patch16_224", "pretrained": False, "num_states": 6},
        "adapter": {"start_layer": 5, "end_layer": 11, "prompt_tokens": 10},
    }
    model = build_bench_model(tree)
    rows, speedup = [], None
    for batch in BATCHES:
        x = inputs(model, batch, 6, 768, "cpu")
        calls = paths(model, x)
        if batch != BATCHES[0]:
            calls.pop("recompute")  # ~6x the cached time; measured once, at the first batch size
        else:
            calls["new"]()  # warm-up
        t = time_paths(calls, repeats=2)
        if "recompute" in t:
            speedup = t["recompute"] / t["new"]
        tokens = batch * NEW_TOKENS
        names = {
            "new": "eP-ALM `generate`, beam search on the device (new), KV cache",
            "old": "eP-ALM `generate`, host-side beam search (previous), KV cache",
            "hf": "stock HF `OPTForCausalLM.generate`, no injection, KV cache",
            "recompute": "eP-ALM `generate` (new), recompute every step (the original's way)",
        }
        for name, seconds in t.items():
            rows.append(
                f"| {batch} | {names[name]} | {seconds:.2f} | {tokens / seconds:.0f} | {t['old'] / seconds:.2f}x |"
            )
    threads = torch.get_num_threads()
    table = "\n".join(rows)
    return f"""## Generation: beam search on the device, KV cache

Command: `python -m bench.run generation` ({threads} CPU threads, fp32). Random OPT-125m-shaped LM (hidden 768,
12 layers) with injection into layers 5..10 and a 10-token soft prompt, {PROMPT_LEN}-token inputs, {NEW_TOKENS} new
tokens (EOS never emitted, so every path decodes all of them), {BEAMS} beams; best of 2 interleaved runs after a
warm-up, all in one process. "Previous" is the host-side beam search kept in testing/old_generation.py.

| batch | path | seconds | new tokens/s | vs previous |
|---|---|---|---|---|
{table}

Targets: the new beam search no slower than the previous one (same run); the cache at least 5x faster than
recompute (here {speedup:.1f}x). On a GPU, `tests/gpu/check_generation.py` compares the same paths at OPT-6.7B shape.
"""


if __name__ == "__main__":
    print(main())
