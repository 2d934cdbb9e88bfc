"""Decoding from a static KV cache (`Decoding(static_cache=True)`), optionally with the one-token step
`torch.compile`d (`Decoding(compile=True)`; mode "reduce-overhead" on CUDA replays it as a CUDA graph), for
`epalm.evaluation.decoding.generate`. Buffers are transformers' `StaticCache`.

The prompt (soft prompt, text, injected token) runs eagerly through `injected_forward` with a DynamicCache; its
keys and values are then copied into preallocated buffers in which every layer keeps slot 0 for the injected token
(masked in the layers that have none), so every layer appends at the same slot: no per-step concatenation of the
growing cache. Beam search reorders into a second set of buffers (no allocation) and the two sets alternate. The
one-token step is written here rather than reusing `injected_forward`'s cached branch because a static cache
needs masks over the buffers' full length, which that function (built for a growing DynamicCache) does not take;
tests/test_compiled_decoding.py checks both give the same tokens, greedy, beam and sampled, so they cannot drift.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache

_COMPILED: dict[bool, object] = {}  # one compiled step per device kind; its guards re-specialise per shape


def _step(lm, cache: StaticCache, token, positions, key_valid, first_injected: int, has_visual: bool):
    """Log-probs (rows, V) of the next token after `token` (rows, 1) at text `positions` (rows, 1), its keys and
    values written into `cache` at the buffers' next slot; `key_valid` (rows, L) marks the filled slots."""
    decoder = lm.model.decoder
    hidden = decoder.embed_tokens(token)
    if decoder.project_in is not None:
        hidden = decoder.project_in(hidden)
    hidden = hidden + decoder.embed_positions(key_valid, 0, position_ids=positions).to(hidden.dtype)
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    low = torch.finfo(hidden.dtype).min  # as injection._to_additive: no NaN on a fully masked row
    mask_text = torch.where(key_valid, zero, low)[:, None, None, :]
    mask_visual = torch.cat([zero.expand(len(token), 1, 1, 1), mask_text[..., 1:]], dim=-1)
    for index, layer in enumerate(decoder.layers):
        visual = has_visual and index >= first_injected
        mask = mask_visual if visual else mask_text
        hidden = layer(hidden, attention_mask=mask, cache=cache, use_cache=True, position_ids=positions)
    if decoder.final_layer_norm is not None:
        hidden = decoder.final_layer_norm(hidden)
    if decoder.project_out is not None:
        hidden = decoder.project_out(hidden)
    return torch.log_softmax(lm.lm_head(hidden)[:, -1].float(), dim=-1)


def _compiled(cuda: bool):
    if cuda not in _COMPILED:
        _COMPILED[cuda] = torch.compile(_step, mode="reduce-overhead" if cuda else None, dynamic=False)
    return _COMPILED[cuda]


def _static_caches(lm, rows: int, length: int, like: torch.Tensor) -> list[StaticCache]:
    """Two sets of buffers for `rows` x `length` (beam search reorders from one into the other), kept on the model
    and reused by calls of the same shape, so a compiled step's guards hold and a CUDA graph keeps its addresses."""
    cfg = lm.config
    key = (rows, length, like.dtype, like.device)
    kept = getattr(lm, "_epalm_static_cache", None)
    if kept is None or kept[0] != key:
        caches = []
        for _ in range(2):
            cache = StaticCache(config=cfg, max_cache_len=length)
            heads = cfg.num_attention_heads
            cache.early_initialization(rows, heads, cfg.hidden_size // heads, like.dtype, like.device)
            caches.append(cache)
        lm._epalm_static_cache = kept = (key, caches)
    return kept[1]


class StaticDecoder:
    """The `_Decoder` of decoding.py over static buffers: `logprobs()` for the next token, `append(tokens, order)`."""

    def __init__(
        self, model, input_ids, attention_mask, visual, prompt, max_new_tokens: int, compile: bool, beams: int = 1
    ):  # fmt: skip
        if compile and any(hasattr(p, "ds_id") for p in model.lm.parameters()):
            raise ValueError("compile=True needs whole weights: not under ZeRO-3 partitioning")
        self.lm = model.lm
        dynamic = DynamicCache(config=self.lm.config)
        logits = model.lm_logits(
            input_ids,
            attention_mask,
            visual_tokens=visual,
            prompt_embeds=prompt,
            cache=dynamic,
            logits_to_keep=1,
        )  # once per item: the beams start identical, so the buffers take each row `beams` times
        self.first = torch.log_softmax(logits[:, -1].float(), dim=-1).repeat_interleave(beams, dim=0)
        attention_mask = attention_mask.repeat_interleave(beams, dim=0)
        rows = len(attention_mask)
        lengths = [layer.keys.shape[2] for layer in dynamic.layers]
        n_text = lengths[0]  # prompt + text: a layer before the first injected one
        self.has_visual = max(lengths) > n_text
        self.first_injected = next((i for i, n in enumerate(lengths) if n > n_text), len(lengths))
        self.slot = 1 + n_text  # every layer's next free slot (slot 0: the injected token, or nothing)
        length = self.slot + max_new_tokens
        self.caches = _static_caches(self.lm, rows, length, dynamic.layers[0].keys)
        for layer, source, n in zip(self.caches[0].layers, dynamic.layers, lengths):
            start = self.slot - n  # 0 with an injected token, 1 without
            layer.keys[:, :, start : self.slot].copy_(source.keys.repeat_interleave(beams, dim=0))
            layer.values[:, :, start : self.slot].copy_(source.values.repeat_interleave(beams, dim=0))
            layer.cumulative_length.fill_(self.slot)
        text_valid = attention_mask.bool()
        self.key_valid = torch.zeros(rows, length, dtype=torch.bool, device=attention_mask.device)
        prompt_valid = text_valid.new_ones(rows, n_text - text_valid.shape[1])
        self.key_valid[:, 1 : self.slot] = torch.cat([prompt_valid, text_valid], dim=1)
        self.text_count = attention_mask.long().sum(1, keepdim=True)
        self.token = None
        self.step = _compiled(attention_mask.is_cuda) if compile else _step

    def logprobs(self) -> torch.Tensor:
        if self.token is None:
            return self.first
        self.key_valid[:, self.slot] = True  # the new token's own slot
        out = self.step(
            self.lm, self.caches[0], self.token, self.text_count - 1, self.key_valid, self.first_injected,
            self.has_visual,
        )  # fmt: skip
        self.slot += 1
        return out.clone()  # a CUDA graph's output is overwritten by its next replay

    def append(self, tokens: torch.Tensor, order: torch.Tensor | None = None) -> None:
        if order is not None:  # beams re-ranked: gather every row's state into the other buffers, then swap
            now, other = self.caches
            for src, dst in zip(now.layers, other.layers):
                torch.index_select(src.keys, 0, order, out=dst.keys)
                torch.index_select(src.values, 0, order, out=dst.values)
                dst.cumulative_length.copy_(src.cumulative_length)
            self.caches = [other, now]
            self.key_valid = self.key_valid[order]
            self.text_count = self.text_count[order]
        self.token = tokens[:, None]
        self.text_count = self.text_count + 1
