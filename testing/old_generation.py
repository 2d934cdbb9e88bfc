"""The beam search and greedy decoding as they were before decoding moved onto the device (epalm/evaluation/decoding.py,
named epalm/generation.py at commit c575083), kept only as the baseline of `bench.generation` and the
reference of tests/test_generation.py.

It copies the log-probs to the host every step and loops over the batch in Python. Not part of the library.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import DynamicCache

from epalm.model.epalm import EPALM


class _Decoder:
    """Holds the growing sequences and (optionally) the cache; returns next-token log-probs."""

    def __init__(self, model, input_ids, attention_mask, visual, prompt, use_cache):
        self.model, self.visual, self.prompt = model, visual, prompt
        self.ids, self.mask = input_ids, attention_mask
        self.cache = DynamicCache(config=model.lm.config) if use_cache else None
        self.started = False

    def logprobs(self) -> torch.Tensor:
        cached = self.cache is not None and self.started
        logits = self.model.lm_logits(
            self.ids[:, -1:] if cached else self.ids,
            self.mask,
            visual_tokens=self.visual,
            prompt_embeds=self.prompt,
            cache=self.cache,
            logits_to_keep=1,
        )
        self.started = True
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def append(self, tokens: torch.Tensor, order: torch.Tensor | None = None) -> None:
        if order is not None:  # beams were re-ranked: reorder every per-row state
            self.ids, self.mask = self.ids[order], self.mask[order]
            if self.cache is not None:
                self.cache.reorder_cache(order)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)


def _all_ranks_done(local_done: bool, device: torch.device) -> bool:
    flag = torch.tensor(0.0 if local_done else 1.0, device=device)
    dist.all_reduce(flag)
    return flag.item() == 0.0


@torch.no_grad()
def generate(
    model: EPALM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int,
    media: torch.Tensor | None = None,
    encoder_states: torch.Tensor | None = None,
    num_beams: int = 3,
    max_new_tokens: int = 30,
    use_cache: bool = True,
    length_penalty: float = 1.0,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """New tokens (B, L), EOS included, padded with pad_token_id. Inputs must be left-padded.

    `synced_gpus=True` keeps every rank stepping until all are done: required under ZeRO-3, where each
    forward gathers parameters collectively and a rank that stops early would hang the others.
    """
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generation needs left-padded inputs (tokenize with padding_side='left')")
    batch = input_ids.shape[0]
    visual = model.visual_tokens(media, encoder_states)
    prompt = model.prompt_embeds(batch)
    if num_beams > 1:
        expand = lambda t: None if t is None else t.repeat_interleave(num_beams, dim=0)  # noqa: E731
        input_ids, attention_mask, visual, prompt = map(expand, (input_ids, attention_mask, visual, prompt))
    decoder = _Decoder(model, input_ids, attention_mask, visual, prompt, use_cache)
    search = (
        _Greedy(batch, eos_token_id, pad_token_id)
        if num_beams == 1
        else _Beam(batch, num_beams, eos_token_id, pad_token_id, length_penalty, input_ids.device)
    )
    for step in range(max_new_tokens):
        done = search.done()
        if synced_gpus:
            if _all_ranks_done(done, input_ids.device):
                break
            if done:  # keep the collectives in step with ranks still generating
                decoder.logprobs()
                continue
        elif done:
            break
        tokens, order = search.step(decoder.logprobs(), step)
        decoder.append(tokens, order)
    if synced_gpus:  # ranks that hit max_new_tokens together still need one agreement round
        while not _all_ranks_done(True, input_ids.device):
            decoder.logprobs()
    return search.finish()


class _Greedy:
    def __init__(self, batch, eos, pad):
        self.eos, self.pad = eos, pad
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self.tokens: list[torch.Tensor] = []

    def done(self) -> bool:
        return bool(self.finished.all())

    def step(self, logprobs, step):
        nxt = logprobs.argmax(dim=-1).cpu()
        nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
        self.finished |= nxt == self.eos
        self.tokens.append(nxt)
        return nxt.to(logprobs.device), None

    def finish(self) -> torch.Tensor:
        if not self.tokens:
            return torch.empty(len(self.finished), 0, dtype=torch.long)
        return torch.stack(self.tokens, dim=1)


class _Beam:
    def __init__(self, batch, num_beams, eos, pad, length_penalty, device):
        self.batch, self.k, self.eos, self.pad, self.lp = batch, num_beams, eos, pad, length_penalty
        scores = torch.full((batch, num_beams), -1e9)
        scores[:, 0] = 0.0  # all beams start identical: expand from the first only
        self.scores = scores.view(-1)
        self.generated = torch.empty(batch * num_beams, 0, dtype=torch.long)
        self.hyps: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
        self.finished = [False] * batch
        self.device = device

    def done(self) -> bool:
        return all(self.finished)

    def _add(self, b: int, score: float, tokens: torch.Tensor) -> None:
        hyps = self.hyps[b]
        hyps.append((score / (len(tokens) ** self.lp), tokens))
        hyps.sort(key=lambda h: -h[0])
        del hyps[self.k :]

    def step(self, logprobs, step):
        vocab = logprobs.shape[-1]
        total = (logprobs.cpu() + self.scores[:, None]).view(self.batch, self.k * vocab)
        top_scores, top_index = total.topk(2 * self.k, dim=1)
        next_scores = torch.zeros(self.batch, self.k)
        next_tokens = torch.full((self.batch, self.k), self.pad, dtype=torch.long)
        next_source = torch.arange(self.k).repeat(self.batch, 1)
        for b in range(self.batch):
            if self.finished[b]:
                continue
            kept = 0
            for rank in range(2 * self.k):
                token = int(top_index[b, rank] % vocab)
                source = int(top_index[b, rank] // vocab)
                score = float(top_scores[b, rank])
                if token == self.eos:
                    if rank < self.k:  # an EOS outside the top k is not a candidate, as in HF
                        ended = torch.cat([self.generated[b * self.k + source], torch.tensor([token])])
                        self._add(b, score, ended)
                    continue
                next_scores[b, kept], next_tokens[b, kept], next_source[b, kept] = score, token, source
                kept += 1
                if kept == self.k:
                    break
            best_possible = float(top_scores[b].max()) / ((step + 1) ** self.lp)
            self.finished[b] = len(self.hyps[b]) == self.k and self.hyps[b][-1][0] >= best_possible
        order = (torch.arange(self.batch)[:, None] * self.k + next_source).view(-1)
        self.generated = torch.cat([self.generated[order], next_tokens.view(-1, 1)], dim=1)
        self.scores = next_scores.view(-1)
        return next_tokens.view(-1).to(self.device), order.to(self.device)

    def finish(self) -> torch.Tensor:
        for b in range(self.batch):
            if not self.finished[b]:
                for j in range(self.k):
                    self._add(b, float(self.scores[b * self.k + j]), self.generated[b * self.k + j])
        best = [self.hyps[b][0][1] for b in range(self.batch)]
        width = max((len(t) for t in best), default=0)
        out = torch.full((self.batch, width), self.pad, dtype=torch.long)
        for b, tokens in enumerate(best):
            out[b, : len(tokens)] = tokens
        return out
