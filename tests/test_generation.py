"""Generation: cached and uncached decoding give identical tokens, greedy and beam, with left padding."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from epalm.generation import decode_generated, generate
from epalm.model.connector import Connector
from epalm.model.epalm import EPALM


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
    cached = generate(tiny_model, ids, mask, use_cache=True, **kwargs)
    uncached = generate(tiny_model, ids, mask, use_cache=False, **kwargs)
    assert cached.shape[0] == 4 and cached.shape[1] > 0
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_equals_one_by_one(tiny_model, num_beams):
    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    kwargs = dict(eos_token_id=2, pad_token_id=1, num_beams=num_beams, max_new_tokens=10)
    batched = generate(tiny_model, ids, mask, media=media, **kwargs)
    for i in range(4):
        start = int((mask[i] == 0).sum())
        single = generate(
            tiny_model, ids[i : i + 1, start:], mask[i : i + 1, start:], media=media[i : i + 1], **kwargs
        )
        assert torch.equal(single[0], batched[i, : single.shape[1]])
        assert (batched[i, single.shape[1] :] == 1).all()


def test_greedy_equals_transformers_generate_without_adapter():
    """No prompt, no injected token: our greedy decoding is stock OPT's."""
    from tests.conftest import TINY_LM

    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(**TINY_LM, init_std=0.3)).eval()
    model = EPALM(lm, None, Connector(8, 32, 1), None, start_layer=1, end_layer=2)
    ids, mask = _left_padded()
    ours = generate(model, ids, mask, eos_token_id=2, pad_token_id=1, num_beams=1, max_new_tokens=8)
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
    greedy = generate(tiny_model, ids, mask, num_beams=1, **kw)
    beam = generate(tiny_model, ids, mask, num_beams=4, **kw)
    assert score(beam) >= score(greedy) - 1e-5


def test_right_padding_is_refused(tiny_model):
    ids, mask = _left_padded()
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        generate(tiny_model, ids, mask, eos_token_id=2, pad_token_id=1)


def test_decode_stops_at_eos(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    seven = tiny_tokenizer("seven", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([seven + [eos, pad]])
    assert decode_generated(tiny_tokenizer, tokens) == ["seven"]
