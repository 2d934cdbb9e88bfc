"""Generation with versus without the KV cache, on a random OPT-125m-shaped LM with eP-ALM's injection.

The uncached path re-runs the whole sequence for every new token, as the original code did.
"""

from __future__ import annotations

import time

import torch

from epalm.config import build_config
from epalm.generation import generate
from epalm.model.epalm import build_model

BATCH, PROMPT_LEN, NEW_TOKENS, BEAMS = 8, 12, 30, 3


def _model():
    tree = {
        "model": {
            "lm": {"name": "125m", "pretrained": False},
            "encoder": {"name": "vit_base_patch16_224", "pretrained": False, "num_states": 6},
            "adapter": {"start_layer": 5, "end_layer": 11, "prompt_tokens": 10},
        }
    }
    torch.manual_seed(0)
    return build_model(build_config(tree).model, with_encoder=False).eval()


def _time(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> str:
    model = _model()
    ids = torch.randint(4, 50000, (BATCH, PROMPT_LEN))
    mask = torch.ones_like(ids)
    states = torch.randn(BATCH, 6, 768)
    # eos never emitted by chance in practice: every run decodes all NEW_TOKENS steps
    kw = dict(
        encoder_states=states, eos_token_id=-1, pad_token_id=1, num_beams=BEAMS, max_new_tokens=NEW_TOKENS
    )
    cached = _time(lambda: generate(model, ids, mask, use_cache=True, **kw))
    uncached = _time(lambda: generate(model, ids, mask, use_cache=False, **kw))
    hf_kw = dict(
        max_new_tokens=NEW_TOKENS, num_beams=BEAMS, do_sample=False, min_new_tokens=NEW_TOKENS, pad_token_id=1
    )
    hf_cached = _time(lambda: model.lm.generate(input_ids=ids, attention_mask=mask, use_cache=True, **hf_kw))
    hf_uncached = _time(
        lambda: model.lm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **hf_kw)
    )
    threads = torch.get_num_threads()
    return f"""## Generation: KV cache

Command: `python -m bench.run generation` ({threads} CPU threads, fp32). Random OPT-125m-shaped LM (hidden 768,
12 layers) with injection into layers 5..10 and a 10-token soft prompt, batch {BATCH}, {PROMPT_LEN}-token inputs,
{NEW_TOKENS} new tokens, {BEAMS} beams; best of 2 runs after a warm-up.

| path | seconds | speed-up from the cache |
|---|---|---|
| eP-ALM `generate`, KV cache | {cached:.2f} | **{uncached / cached:.1f}x** |
| eP-ALM `generate`, recompute every step (the original's way) | {uncached:.2f} | |
| stock HF `OPTForCausalLM.generate`, no injection, cache | {hf_cached:.2f} | {hf_uncached / hf_cached:.1f}x (the ceiling) |
| stock HF, no cache | {hf_uncached:.2f} | |

Target: at least 5x with the cache.
"""


if __name__ == "__main__":
    print(main())
