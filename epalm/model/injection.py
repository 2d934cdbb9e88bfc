"""eP-ALM's injection (docs/model.md, "Injection"): run a stock OPT layer by layer, prepend the soft prompt to the
input embeddings, and inject one perceptual token at position 0 of LM layers [start, end).

The token is prepended before the first injected layer (the sequence grows by one) and replaces
position 0 before each later one; layer `end` onwards keep the last injected token's output. Masks are
built here as additive 4-D masks, which transformers' eager and sdpa attention both take as given.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, OPTForCausalLM


def layer_to_state(start_layer: int, end_layer: int, num_states: int) -> dict[int, int]:
    """Which encoder state (0 = earliest of the last K blocks) each injected LM layer receives."""
    step = (end_layer - start_layer) // num_states
    return {layer: (layer - start_layer) // step for layer in range(start_layer, end_layer)}


def schedule_problems(start_layer: int, end_layer: int, num_states: int, num_layers: int | None) -> list[str]:
    """Why a schedule is impossible, if it is (empty list when fine)."""
    problems = []
    if num_states < 1:
        problems.append(f"model.encoder.num_states: must be >= 1, got {num_states}")
    if not 0 <= start_layer < end_layer:
        problems.append(f"model.adapter: need 0 <= start_layer < end_layer, got {start_layer}..{end_layer}")
    elif num_states >= 1:
        span = end_layer - start_layer
        if num_states > span:
            problems.append(
                f"model.adapter: {num_states} encoder states cannot be spread over {span} injected layers "
                f"({start_layer}..{end_layer - 1})"
            )
        elif span % num_states:
            problems.append(
                f"model.adapter: {span} injected layers are not divisible by {num_states} encoder states"
            )
    if num_layers is not None and end_layer > num_layers:
        problems.append(f"model.adapter.end_layer: {end_layer} is past the LM's depth ({num_layers} layers)")
    return problems


def _additive_mask(key_valid: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, k) additive mask: causal over absolute positions, padded keys masked.

    The queries are the last `num_queries` positions of the key sequence (prefill or cached steps).
    """
    num_keys = key_valid.shape[1]
    device = key_valid.device
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    allowed = torch.arange(num_keys, device=device)[None, :] <= q_pos[:, None]
    allowed = allowed[None, None] & key_valid[:, None, None, :]
    return _to_additive(allowed, dtype)


def _to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # finfo.min rather than -inf: a fully masked row (a left pad with no prompt) gives a uniform
    # softmax instead of NaN, and its output is never used.
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def injected_forward(
    lm: OPTForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    visual_tokens: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    layer_states: dict[int, int] | None = None,
    visual_attention: str = "causal",
    cache: DynamicCache | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Logits for the text positions of `input_ids` (B, T, V), or the last `logits_to_keep` of them.

    attention_mask covers all text so far (cached + new), 1 for real tokens; padding may be on either
    side. With a non-empty `cache` only the new tokens are run: the prompt and the injected token are
    already in it. visual_tokens (B, K, d_model) are injected per `layer_states`; prompt_embeds
    (B, P, word_embed_proj_dim) get no positional embedding, as in the original.
    """
    decoder = lm.model.decoder
    batch, num_new = input_ids.shape
    text_valid = attention_mask.bool()
    num_cached_text = text_valid.shape[1] - num_new
    cached = cache is not None and cache.get_seq_length(0) > 0
    if cached:
        num_prompt = cache.get_seq_length(0) - num_cached_text
        has_visual = visual_tokens is not None and cache.get_seq_length(
            min(layer_states)
        ) > cache.get_seq_length(0)
    else:
        num_prompt = 0 if prompt_embeds is None else prompt_embeds.shape[1]
        has_visual = visual_tokens is not None

    # Text positions follow OPT: cumsum over the text mask (pads get -1), so left padding is harmless.
    mask_long = attention_mask.long()
    positions = (mask_long.cumsum(1) * mask_long - 1)[:, num_cached_text:]
    embeds = decoder.embed_tokens(input_ids)
    if num_prompt and not cached:
        embeds = torch.cat([prompt_embeds.to(embeds.dtype), embeds], dim=1)
    if decoder.project_in is not None:
        embeds = decoder.project_in(embeds)
    pos_embeds = decoder.embed_positions(attention_mask, 0, position_ids=positions).to(embeds.dtype)
    if num_prompt and not cached:
        pos_embeds = torch.cat(
            [pos_embeds.new_zeros(batch, num_prompt, pos_embeds.shape[-1]), pos_embeds], dim=1
        )
    hidden = embeds + pos_embeds

    dtype = hidden.dtype
    num_queries = hidden.shape[1]
    ones = text_valid.new_ones(batch, num_prompt)
    key_valid = torch.cat([ones, text_valid], dim=1)
    mask_text = _additive_mask(key_valid, num_queries, dtype)
    mask_visual = None
    if has_visual:
        key_valid_vis = torch.cat([text_valid.new_ones(batch, 1), key_valid], dim=1)
        mask_visual = _additive_mask(key_valid_vis, num_queries + (0 if cached else 1), dtype)
        if visual_attention == "original" and not cached:
            # the original pads its 4-D mask with an all-zero row: the visual token sees everything
            mask_visual[:, :, 0, :] = 0

    first_injected = min(layer_states) if layer_states else None
    for index, layer in enumerate(decoder.layers):
        if has_visual and not cached and index in layer_states:
            token = visual_tokens[:, layer_states[index]].unsqueeze(1).to(dtype)
            rest = hidden if index == first_injected else hidden[:, 1:]
            hidden = torch.cat([token, rest], dim=1)
        use_visual_mask = has_visual and index >= first_injected
        hidden = layer(
            hidden,
            attention_mask=mask_visual if use_visual_mask else mask_text,
            cache=cache,
            use_cache=cache is not None,
            position_ids=positions,
        )

    if not cached:  # drop the injected token and the prompt: logits are for text positions only
        hidden = hidden[:, (1 if has_visual else 0) + num_prompt :]
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    if decoder.final_layer_norm is not None:
        hidden = decoder.final_layer_norm(hidden)
    if decoder.project_out is not None:
        hidden = decoder.project_out(hidden)
    return lm.lm_head(hidden)
