"""Sampling (`do_sample`): reproducible under a seed, top_k=1 is greedy, the same draws as transformers'
`generate` under the same global seed, and the first token's empirical distribution is the model's softmax."""

import pytest
import torch
from scipy.stats import chi2

from testing.support import generate_loose
from tests.test_generation import _left_padded, _stock_opt

KW = dict(eos_token_id=2, pad_token_id=1, num_beams=1)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fixed_seed_gives_fixed_tokens(tiny_model):
    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    kw = dict(KW, media=media, max_new_tokens=10, do_sample=True, top_k=0)
    first = generate_loose(tiny_model, ids, mask, generator=_seeded(7), **kw)
    again = generate_loose(tiny_model, ids, mask, generator=_seeded(7), **kw)
    other = generate_loose(tiny_model, ids, mask, generator=_seeded(8), **kw)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # 40 draws from ~320 tokens: equal by chance ~never


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_1_is_greedy(tiny_model, temperature):
    ids, mask = _left_padded()
    media = torch.randn(4, 3, 16, 16)
    kw = dict(KW, media=media, max_new_tokens=10)
    greedy = generate_loose(tiny_model, ids, mask, **kw)
    sampled = generate_loose(
        tiny_model, ids, mask, do_sample=True, top_k=1, temperature=temperature, generator=_seeded(0), **kw
    )
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 50, 1.0), (0.7, 20, 0.8)])
def test_same_draws_as_transformers_generate(temperature, top_k, top_p):
    """Stock OPT, no adapter: with the same global seed, our sampling draws what `generate(do_sample=True)` draws."""
    lm, model = _stock_opt(0, init_std=0.3)
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(11)
    ours = generate_loose(model, ids, mask, **KW, **kw)
    torch.manual_seed(11)
    hf = lm.generate(input_ids=ids, attention_mask=mask, eos_token_id=2, pad_token_id=1, num_beams=1, **kw)
    hf = hf[:, ids.shape[1] :]
    assert torch.equal(ours[:, : hf.shape[1]], hf)


def _filtered_softmax(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution, computed here independently of transformers' warpers: softmax at the
    temperature, cut to the top_k tokens, renormalised, then cut to the fewest tokens holding top_p of that."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    if top_k:
        probs[order[top_k:]] = 0
        probs /= probs.sum()
    mass = 0.0
    for rank, token in enumerate(order):
        if mass >= top_p:
            probs[order[rank:]] = 0
            break
        mass += float(probs[token])
    return probs / probs.sum()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor, draws: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; bins expecting < 5 draws are pooled into one."""
    expected = probs * draws
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # the pooled rest is too small to test on its own: fold it into the last big bin
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[-1] += counts[~big].sum()
        exp[-1] += expected[~big].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, len(exp) - 1


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 40, 0.9)])
def test_first_token_follows_the_models_softmax(tiny_model, temperature, top_k, top_p):
    """20,000 first tokens drawn in one batch (one prompt repeated), against the model's own softmax.

    Threshold: the chi-square quantile at p = 1e-4, so a correct sampler fails with probability 1e-4 for any
    seed (the seed is fixed, so the test is deterministic). Power: the same draws against the distribution at
    1.5x the temperature score over twice the threshold, checked below.
    """
    draws = 20_000
    with torch.no_grad():
        tiny_model.lm.get_output_embeddings().weight.mul_(4)  # a peaked, non-uniform first-token distribution
    ids, mask = _left_padded()
    ids, mask, media = ids[:1, -2:], mask[:1, -2:], torch.randn(1, 3, 16, 16)  # short: 20,000 rows stay fast
    with torch.no_grad():
        logits = tiny_model.lm_logits(
            ids,
            mask,
            visual_tokens=tiny_model.visual_tokens(media),
            prompt_embeds=tiny_model.prompt_embeds(1),
        )[0, -1]
    probs = _filtered_softmax(logits, temperature, top_k, top_p)
    tokens = generate_loose(
        tiny_model,
        ids.expand(draws, -1),
        mask.expand(draws, -1),
        media=media.expand(draws, -1, -1, -1),
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=_seeded(0),
        **KW,
    )[:, 0]
    counts = torch.bincount(tokens, minlength=len(probs))
    assert not counts[probs == 0].any()  # nothing outside the top-k / top-p set
    stat, df = _chi_square(counts, probs, draws)
    threshold = chi2.isf(1e-4, df)
    assert stat < threshold, f"chi-square {stat:.1f} >= {threshold:.1f} (df {df})"
    wrong = _filtered_softmax(logits, temperature * 1.5, top_k, top_p)
    assert _chi_square(counts, wrong, draws)[0] > 2 * threshold


def test_config_refuses_sampling_with_beams_and_bad_settings():
    from epalm.config import build_config
    from testing.support import tiny_tree

    ok = build_config(tiny_tree() | {"eval": {"do_sample": True, "num_beams": 1, "top_k": 0, "seed": None}})
    assert ok.eval.do_sample and ok.eval.top_k == 0 and ok.eval.seed is None
    with pytest.raises(ValueError, match="eval.do_sample.*num_beams=1"):
        build_config(tiny_tree() | {"eval": {"do_sample": True}})
    with pytest.raises(ValueError, match="temperature > 0"):
        build_config(tiny_tree() | {"eval": {"temperature": 0.0}})
