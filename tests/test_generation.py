"""Generation: cached and uncached decoding give identical tokens, greedy and beam, with left padding."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from epalm.evaluation.decoding import decode_generated
from epalm.model.connector import Connector
from epalm.model.epalm import EPALM
from testing.support import generate_loose


def _left_padded(vocab=320):
    torch.manual_seed(3)
    ids = torch.randint(4, vocab, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :5] = 0
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_generation_agree(tiny_model, num_beams):
    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    kwargs = dict(media=media, eos_token_id=2, pad_token_id=1, num_beams=num_beams, max_new_tokens=12)
    cached = generate_loose(tiny_model, ids, mask, use_cache=True, **kwargs)
    uncached = generate_loose(tiny_model, ids, mask, use_cache=False, **kwargs)
    assert cached.shape[0] == 4 and cached.shape[1] > 0
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_equals_one_by_one(tiny_model, num_beams):
    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    kwargs = dict(eos_token_id=2, pad_token_id=1, num_beams=num_beams, max_new_tokens=10)
    batched = generate_loose(tiny_model, ids, mask, media=media, **kwargs)
    for i in range(4):
        start = int((mask[i] == 0).sum())
        single = generate_loose(
            tiny_model, ids[i : i + 1, start:], mask[i : i + 1, start:], media=media[i : i + 1], **kwargs
        )
        assert torch.equal(single[0], batched[i, : single.shape[1]])
        assert (batched[i, single.shape[1] :] == 1).all()


def test_greedy_equals_transformers_generate_without_adapter():
    """No prompt, no injected token: our greedy decoding is stock OPT's."""
    from testing.support import TINY_LM

    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(**TINY_LM, init_std=0.3)).eval()
    model = EPALM(lm, None, Connector(8, 32, 1), None, start_layer=1, end_layer=2)
    ids, mask = _left_padded()
    ours = generate_loose(model, ids, mask, eos_token_id=2, pad_token_id=1, num_beams=1, max_new_tokens=8)
    hf = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        num_beams=1,
        eos_token_id=2,
        pad_token_id=1,
    )[:, ids.shape[1] :]
    assert torch.equal(ours[:, : hf.shape[1]], hf)


def test_beam_search_finds_higher_likelihood_than_greedy(tiny_model):
    """Beam search's best hypothesis scores at least as well as greedy's, by the model's own log-probs."""
    ids, mask = _left_padded()
    ids, mask = ids[:1], mask[:1]
    media = torch.randn(1, 3, 16, 16)

    def score(tokens):
        full = torch.cat([ids, tokens], dim=1)
        full_mask = torch.ones_like(full)
        logits = tiny_model.lm_logits(
            full,
            full_mask,
            visual_tokens=tiny_model.visual_tokens(media),
            prompt_embeds=tiny_model.prompt_embeds(1),
        )
        logp = torch.log_softmax(logits[:, ids.shape[1] - 1 : -1].float(), -1)
        return logp.gather(-1, tokens[..., None]).sum().item() / tokens.shape[1]

    kw = dict(media=media, eos_token_id=2, pad_token_id=1, max_new_tokens=6)
    greedy = generate_loose(tiny_model, ids, mask, num_beams=1, **kw)
    beam = generate_loose(tiny_model, ids, mask, num_beams=4, **kw)
    assert score(beam) >= score(greedy) - 1e-5


def test_right_padding_is_refused(tiny_model):
    ids, mask = _left_padded()
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        generate_loose(tiny_model, ids, mask, eos_token_id=2, pad_token_id=1)


def test_decode_stops_at_eos(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    seven = tiny_tokenizer("seven", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([seven + [eos, pad]])
    assert decode_generated(tiny_tokenizer, tokens) == ["seven"]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_same_tokens_as_the_previous_host_side_implementation(tiny_model, num_beams, use_cache):
    """The cases above give the tokens the host-side search (kept in testing/old_generation.py) gave."""
    from testing.old_generation import generate as old_generate

    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    kwargs = dict(media=media, eos_token_id=2, pad_token_id=1, num_beams=num_beams, max_new_tokens=12)
    new = generate_loose(tiny_model, ids, mask, use_cache=use_cache, **kwargs)
    assert torch.equal(new, old_generate(tiny_model, ids, mask, use_cache=use_cache, **kwargs))


def _stock_opt(seed: int, init_std: float) -> tuple[OPTForCausalLM, EPALM]:
    from testing.support import TINY_LM

    torch.manual_seed(seed)
    lm = OPTForCausalLM(OPTConfig(**TINY_LM, init_std=init_std)).eval()
    return lm, EPALM(lm, None, Connector(8, 32, 1), None, start_layer=1, end_layer=2)


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_beam_search_equals_transformers_generate_without_adapter(length_penalty):
    """No prompt, no injected token: our beam search is stock OPT's `generate(num_beams=3)`, EOS and
    length penalty included. EOS is a token the model likes, so hypotheses finish early and the stopping
    rule is exercised (checked: some rows end before max_new_tokens)."""
    ended_early = 0
    for seed in (18, 28, 36):
        lm, model = _stock_opt(seed, init_std=0.3 if seed % 2 == 0 else 1.0)
        ids, mask = _left_padded()
        greedy = generate_loose(
            model, ids, mask, eos_token_id=-1, pad_token_id=1, num_beams=1, max_new_tokens=4
        )
        eos = int(greedy[seed % 4, 1])
        kw = dict(eos_token_id=eos, pad_token_id=1, max_new_tokens=12, length_penalty=length_penalty)
        ours = generate_loose(model, ids, mask, num_beams=3, **kw)
        hf = lm.generate(input_ids=ids, attention_mask=mask, num_beams=3, do_sample=False, **kw)
        assert torch.equal(ours, hf[:, ids.shape[1] :])
        ended_early += int((ours == 1).any(dim=1).sum())
    assert ended_early > 0


def test_one_host_read_per_step(tiny_model, monkeypatch):
    """Inside the step loop nothing is copied to the host: no .cpu()/.tolist()/.numpy(), and at most one
    scalar read ("all done?") per step, plus the left-padding check and the output width."""
    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    reads = {"cpu": 0, "tolist": 0, "numpy": 0, "scalar": 0}

    def counting(name, original, key):
        def wrapper(self, *a, **k):
            reads[key] += 1
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("cpu", "tolist", "numpy"):
        counting(name, getattr(torch.Tensor, name), name)
    for name in ("__bool__", "__int__", "__float__", "item"):
        counting(name, getattr(torch.Tensor, name), "scalar")
    steps = 10
    for num_beams in (1, 3):
        for k in reads:
            reads[k] = 0
        out = generate_loose(tiny_model, ids, mask, media=media, eos_token_id=-1, pad_token_id=1,
                       num_beams=num_beams, max_new_tokens=steps)  # fmt: skip
        assert out.shape[1] == steps  # eos -1 never comes: every step ran
        assert reads["cpu"] == reads["tolist"] == reads["numpy"] == 0
        assert reads["scalar"] <= (steps - 1) + 2
