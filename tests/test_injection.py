"""The injection over stock OPT: equivalence with injection off, the layer schedule, masks, visual attention."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from epalm.model.injection import injected_forward, layer_to_state, schedule_problems


def _batch(vocab=320, left_pad=True):
    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (3, 9))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:
        mask[1, -3:] = 0
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("left_pad", [True, False])
def test_logits_equal_stock_opt_when_switched_off(attn, left_pad):
    from testing.support import TINY_LM

    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(**TINY_LM, attn_implementation=attn)).eval()
    ids, mask = _batch(left_pad=left_pad)
    ours = injected_forward(lm, ids, mask, layer_states={})
    stock = lm(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()  # padded positions' outputs are never used (and differ only by masking convention)
    torch.testing.assert_close(ours[valid], stock[valid], rtol=1e-5, atol=1e-5)


def test_logits_equal_stock_for_350m_style_projection_and_post_norm():
    from testing.support import TINY_LM

    torch.manual_seed(0)
    cfg = OPTConfig(**{**TINY_LM, "word_embed_proj_dim": 16, "do_layer_norm_before": False})
    lm = OPTForCausalLM(cfg).eval()
    ids, mask = _batch()
    ours = injected_forward(lm, ids, mask, layer_states={})
    stock = lm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], stock[mask.bool()], rtol=1e-5, atol=1e-5)


def test_schedule_32_layers_matches_reference_table():
    # docs/model.md, "Injection": layers 19,20 <- block 7 of 12 (state 0) ... 29,30 <- block 12 (state 5); 31 none
    mapping = layer_to_state(19, 31, 6)
    expected = {19: 0, 20: 0, 21: 1, 22: 1, 23: 2, 24: 2, 25: 3, 26: 3, 27: 4, 28: 4, 29: 5, 30: 5}
    assert mapping == expected
    assert 31 not in mapping


def test_schedule_24_layers_opt_350m_defaults():
    # the original class defaults for OPT-350m (24 layers): 11 -> 23, layer 23 not injected
    mapping = layer_to_state(11, 23, 6)
    assert mapping == {layer: (layer - 11) // 2 for layer in range(11, 23)}
    assert set(mapping.values()) == set(range(6)) and 23 not in mapping


def test_impossible_schedules_are_reported():
    assert schedule_problems(19, 31, 6, 32) == []
    assert any("cannot be spread" in p for p in schedule_problems(19, 22, 6, 32))
    assert any("past the LM's depth" in p for p in schedule_problems(19, 33, 6, 32))
    assert any("not divisible" in p for p in schedule_problems(19, 31, 5, 32))
    assert any("start_layer < end_layer" in p for p in schedule_problems(10, 10, 1, 32))


def test_injection_changes_only_what_it_should(tiny_model):
    m = tiny_model
    ids, mask = _batch()
    vis_a = torch.randn(3, 2, 32)
    vis_b = vis_a.clone()
    vis_b[:, 1] += 1.0  # change only the second state (layers 3, 4)
    la = m.lm_logits(ids, mask, visual_tokens=vis_a, prompt_embeds=None)
    lb = m.lm_logits(ids, mask, visual_tokens=vis_b, prompt_embeds=None)
    plain = m.lm_logits(ids, mask, visual_tokens=None, prompt_embeds=None)
    assert la.shape == plain.shape == (3, 9, 320)  # logits only for text positions
    assert not torch.allclose(la, lb)
    assert not torch.allclose(la, plain)


def test_visual_attention_original_leaks_future_causal_does_not(tiny_config):
    """With 'causal' the logits at position t do not depend on tokens after t; 'original' lets the
    visual token see the whole sequence (the original's all-zero mask row), so they do."""
    from epalm.config import build_config
    from epalm.model.epalm import build_model
    from testing.support import tiny_tree

    ids, mask = _batch(left_pad=False)
    mask = torch.ones_like(mask)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 300 + 4
    for mode, leaks in (("causal", False), ("original", True)):
        torch.manual_seed(0)
        m = build_model(build_config(tiny_tree(visual_attention=mode)).model)
        vis = torch.randn(3, 2, 32)
        a = m.lm_logits(ids, mask, visual_tokens=vis, prompt_embeds=m.prompt_embeds(3))
        b = m.lm_logits(changed, mask, visual_tokens=vis, prompt_embeds=m.prompt_embeds(3))
        same_prefix = torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
        assert same_prefix != leaks, mode


def test_prompt_has_no_positional_embedding(tiny_model):
    """Prompt vectors enter the first layer as given: adding OPT's positional rows would shift them."""
    m = tiny_model
    captured = {}
    layer0 = m.lm.model.decoder.layers[0]
    handle = layer0.register_forward_pre_hook(lambda mod, args: captured.setdefault("h", args[0]))
    ids, mask = _batch()
    prompt = m.prompt_embeds(3)
    m.lm_logits(ids, mask, visual_tokens=None, prompt_embeds=prompt)
    handle.remove()
    torch.testing.assert_close(captured["h"][:, :3], prompt)
