"""`Decoding(static_cache=True)` and `Decoding(compile=True)` (epalm/evaluation/static_decoding.py): a static KV
cache, eager or with a torch.compile'd step, gives the default path's tokens, greedy, beam and sampled, with left
padding, a soft prompt and injected tokens; the buffers are reused across calls of one shape; bad combinations
fail with a clear message."""

from __future__ import annotations

import pytest
import torch

from epalm.evaluation.decoding import Decoding, generate


def _inputs(rows: int = 4):
    torch.manual_seed(3)
    ids = torch.randint(4, 320, (rows, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :5] = 0
    return ids.masked_fill(mask == 0, 1), mask, torch.randn(rows, 3, 16, 16)


def _generate(model, decoding: Decoding, **kw):
    ids, mask, media = _inputs()
    return generate(model, ids, mask, media=media, eos_token_id=2, pad_token_id=1, decoding=decoding, **kw)


@pytest.fixture
def sharp_model(tiny_model):
    """The tiny model with larger weights: its next-token distributions are not near-uniform, as a trained
    model's are not (a random OPT at init_std 0.02 has many near-ties that any reordering of a sum can flip)."""
    with torch.no_grad():
        for p in tiny_model.lm.parameters():
            p.mul_(8.0)
    return tiny_model


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_eager_and_compiled_give_the_default_tokens(sharp_model, num_beams):
    eager = _generate(sharp_model, Decoding(num_beams=num_beams, max_new_tokens=10))
    static = _generate(sharp_model, Decoding(num_beams=num_beams, max_new_tokens=10, static_cache=True))
    compiled = _generate(sharp_model, Decoding(num_beams=num_beams, max_new_tokens=10, compile=True))
    assert eager.shape[1] > 1
    assert torch.equal(static, eager) and torch.equal(compiled, eager)
    # same shape again: the buffers (and so the compiled step's guards) are reused, the tokens the same
    kept = sharp_model.lm._epalm_static_cache[1]
    again = _generate(sharp_model, Decoding(num_beams=num_beams, max_new_tokens=10, compile=True))
    assert sharp_model.lm._epalm_static_cache[1] is kept and torch.equal(again, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step did run compiled


def test_compiled_sampling_draws_what_eager_draws(sharp_model):
    d = dict(num_beams=1, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=8)
    eager = _generate(sharp_model, Decoding(**d), generator=torch.Generator().manual_seed(5))
    compiled = _generate(sharp_model, Decoding(**d, compile=True), generator=torch.Generator().manual_seed(5))
    assert torch.equal(compiled, eager)


def test_without_prompt_or_media_the_compiled_path_agrees(tiny_config):
    """No soft prompt and no injected token: slot 0 stays masked in every layer."""
    from epalm.config import build_config
    from epalm.model.epalm import build_model
    from testing.support import tiny_tree

    torch.manual_seed(0)
    model = build_model(build_config(tiny_tree(prompt_tokens=0)).model).eval()
    with torch.no_grad():
        for p in model.lm.parameters():
            p.mul_(8.0)
    ids, mask, _ = _inputs()
    kw = dict(eos_token_id=2, pad_token_id=1)
    eager = generate(model, ids, mask, decoding=Decoding(num_beams=1, max_new_tokens=6), **kw)
    compiled = generate(
        model, ids, mask, decoding=Decoding(num_beams=1, max_new_tokens=6, compile=True), **kw
    )
    assert torch.equal(compiled, eager)


def test_compile_needs_the_cache(tiny_model):
    with pytest.raises(ValueError, match="use_cache"):
        _generate(tiny_model, Decoding(use_cache=False, compile=True))
    with pytest.raises(ValueError, match="use_cache"):
        _generate(tiny_model, Decoding(use_cache=False, static_cache=True))
