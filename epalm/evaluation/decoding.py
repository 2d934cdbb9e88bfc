"""Greedy, sampled and beam-search decoding for eP-ALM, on the model's device, with a KV cache, left padding and
ZeRO-3 lockstep.

transformers' `generate` cannot drive eP-ALM's forward (the visual token is injected into the layers' states), so
the loop is written here; the sampling filters are transformers' own logits warpers, so `temperature`, `top_k` and
`top_p` mean what they mean in `generate`. Beam search follows transformers' vectorised beam search (5.x): a
finished hypothesis scores its summed log-probability over its length (EOS included) ** length_penalty; an EOS
counts only among the top `num_beams` candidates; a batch item stops once its best running beam cannot beat its
worst kept hypothesis (`early_stopping=False`). Every step stays on the device; one boolean per step ("all done?")
is read on the host, which the ZeRO-3 lockstep needs anyway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from transformers import DynamicCache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from epalm.model.epalm import EPALM

if TYPE_CHECKING:
    from epalm.config import EvalConfig

_NEG = -1.0e9  # "no hypothesis": the additive mask transformers' beam search uses


class _Decoder:
    """Holds the growing sequences and (optionally) the cache; returns next-token log-probs. With a cache, the
    prompt runs once per item and its cache is repeated for the `beams` (they start identical): transformers runs it
    once per beam, which with eP-ALM's longer prompt costs ~20% of a beam search (docs/benchmarks.md, decoding)."""

    def __init__(self, model, input_ids, attention_mask, visual, prompt, use_cache, beams: int = 1):
        self.model, self.visual, self.prompt = model, visual, prompt
        self.ids, self.mask = input_ids, attention_mask
        self.cache = DynamicCache(config=model.lm.config) if use_cache else None
        self.beams = beams if use_cache else 1
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
        out = torch.log_softmax(logits[:, -1].float(), dim=-1)
        if not self.started and self.beams > 1:
            self.cache.batch_repeat_interleave(self.beams)
            expand = lambda t: None if t is None else t.repeat_interleave(self.beams, dim=0)  # noqa: E731
            self.ids, self.mask, self.visual, self.prompt, out = map(
                expand, (self.ids, self.mask, self.visual, self.prompt, out)
            )
        self.started = True
        return out

    def append(self, tokens: torch.Tensor, order: torch.Tensor | None = None) -> None:
        if order is not None:  # beams were re-ranked: reorder every per-row state
            self.ids, self.mask = self.ids[order], self.mask[order]
            if self.cache is not None:
                self.cache.reorder_cache(order)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)


def _stop(local_done: torch.Tensor, synced_gpus: bool) -> bool:
    """The one host read per step: this rank is done, or (synced) every rank is."""
    if not (synced_gpus and dist.is_available() and dist.is_initialized()):
        return bool(local_done)
    flag = (~local_done).to(torch.float32).reshape(1)
    dist.all_reduce(flag)
    return flag.item() == 0.0


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the first sampling setting out of range."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@dataclass(frozen=True)
class Decoding:
    """How `generate` picks tokens. `do_sample=True` (with `num_beams=1`) draws each token from
    softmax(log-probs / temperature) restricted to the `top_k` most likely tokens (0: all) and to the smallest
    set holding `top_p` of the mass; otherwise greedy (`num_beams=1`) or beam search."""

    num_beams: int = 3
    max_new_tokens: int = 30
    use_cache: bool = True  # KV cache; False recomputes every step (the original's behaviour)
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log p) / length ** length_penalty
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    static_cache: bool = False  # preallocated keys/values appended in place (static_decoding.py): same tokens
    compile: bool = False  # static cache + a torch.compile'd step (CUDA graphs on a GPU); not under ZeRO-3

    @classmethod
    def from_config(cls, ev: EvalConfig, **changes) -> Decoding:
        """The decoding of a config's `eval` section, with `changes` (e.g. a CLI's --num-beams) applied."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**({k: v for k, v in dataclasses.asdict(ev).items() if k in names} | changes))


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
    decoding: Decoding = Decoding(),  # noqa: B008 (frozen, so one shared default is safe)
    synced_gpus: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New tokens (B, L) on the input's device, EOS included, padded with pad_token_id. Inputs must be left-padded.

    Sampling draws with `generator` (a `torch.Generator` on the model's device; None: torch's global RNG).
    `synced_gpus=True` keeps every rank stepping until all are done: required under ZeRO-3, where each forward
    gathers parameters collectively and a rank that stopped early would hang the others.
    """
    d = decoding
    num_beams, max_new_tokens, do_sample = d.num_beams, d.max_new_tokens, d.do_sample
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generation needs left-padded inputs (tokenize with padding_side='left')")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if (d.compile or d.static_cache) and not d.use_cache:
        raise ValueError("static_cache / compile decode from a KV cache: they need use_cache=True")
    if do_sample:
        check_sampling(d.temperature, d.top_k, d.top_p)
        if num_beams > 1:
            raise ValueError(
                "do_sample draws one sequence per prompt: set num_beams=1 (beam sampling is not offered)"
            )
    batch, device = input_ids.shape[0], input_ids.device
    visual = model.visual_tokens(media, encoder_states)
    prompt = model.prompt_embeds(batch)
    if num_beams > 1 and not d.use_cache:  # recomputing every step: one row per beam from the start
        expand = lambda t: None if t is None else t.repeat_interleave(num_beams, dim=0)  # noqa: E731
        input_ids, attention_mask, visual, prompt = map(expand, (input_ids, attention_mask, visual, prompt))
    decoder = _Decoder(model, input_ids, attention_mask, visual, prompt, d.use_cache, num_beams)
    if d.static_cache or d.compile:
        from epalm.evaluation.static_decoding import StaticDecoder

        decoder = StaticDecoder(
            model, input_ids, attention_mask, visual, prompt, max_new_tokens, d.compile, num_beams
        )
    if num_beams > 1:
        search = _Beam(batch, num_beams, max_new_tokens, eos_token_id, pad_token_id, d.length_penalty, device)
    else:
        pick = _sampler(d.temperature, d.top_k, d.top_p, generator) if do_sample else _argmax
        search = _Tokenwise(batch, max_new_tokens, eos_token_id, pad_token_id, device, pick)
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        tokens, order = search.step(decoder.logprobs(), last)
        if last:
            break
        decoder.append(tokens, order)
        # a done rank keeps stepping (finished rows and hypotheses are frozen) until every rank is done
        if _stop(search.done(), synced_gpus):
            break
    return search.finish()


def _argmax(logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs.argmax(dim=-1)


def _sampler(temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
    """Token picker for sampling: transformers' warpers in `generate`'s order (temperature, top-k, top-p)."""
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def pick(logprobs: torch.Tensor) -> torch.Tensor:
        for warp in warpers:  # log-probs differ from logits by a per-row constant: the same distribution
            logprobs = warp(None, logprobs)
        probs = torch.softmax(logprobs, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return pick


class _Tokenwise:
    """Greedy or sampled decoding: one token per row and step; rows past their EOS get pad."""

    def __init__(self, batch, max_new_tokens, eos, pad, device, pick):
        self.eos, self.pad, self.pick = eos, pad, pick
        self.tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)  # tokens up to and including EOS
        self.steps = 0

    def done(self) -> torch.Tensor:
        return self.finished.all()

    def step(self, logprobs: torch.Tensor, last: bool) -> tuple[torch.Tensor, None]:
        nxt = self.pick(logprobs).masked_fill(self.finished, self.pad)
        self.length += ~self.finished
        self.finished |= nxt == self.eos
        self.tokens[:, self.steps] = nxt
        self.steps += 1
        return nxt, None

    def finish(self) -> torch.Tensor:
        width = int(self.length.max()) if self.steps else 0
        return self.tokens[:, :width]


class _Beam:
    """Running beams and kept hypotheses as (batch, beams[, tokens]) tensors; best hypothesis first."""

    def __init__(self, batch, num_beams, max_new_tokens, eos, pad, length_penalty, device):
        k = num_beams
        self.batch, self.k, self.eos, self.lp, self.steps = batch, k, eos, length_penalty, 0
        self.running_scores = torch.full((batch, k), _NEG, device=device)
        self.running_scores[:, 0] = 0.0  # all beams start identical: expand from the first only
        self.running = torch.full((batch, k, max_new_tokens), pad, dtype=torch.long, device=device)
        self.kept = self.running.clone()  # finished hypotheses, padded after their EOS
        self.kept_scores = torch.full((batch, k), _NEG, device=device)
        self.kept_length = torch.zeros((batch, k), dtype=torch.long, device=device)
        self.kept_real = torch.zeros((batch, k), dtype=torch.bool, device=device)  # slot holds a hypothesis
        self.open = torch.ones(batch, dtype=torch.bool, device=device)  # may still improve
        self.in_top_k = torch.arange(2 * k, device=device) < k  # only these candidates may finish
        self.row_offset = torch.arange(batch, device=device)[:, None] * k

    def done(self) -> torch.Tensor:
        return ~self.open.any()

    def _take(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:
            index = index[..., None].expand(-1, -1, t.shape[-1])
        return t.gather(1, index)

    def step(self, logprobs: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t, k, vocab = self.steps, self.k, logprobs.shape[-1]
        total = (logprobs.view(self.batch, k, vocab) + self.running_scores[..., None]).view(self.batch, -1)
        # 2k candidates: with one EOS token at least k of them go on
        scores, index = total.topk(2 * k, dim=1)
        source, token = index // vocab, index % vocab
        ends = (token == self.eos) | last  # at max_new_tokens every candidate ends
        histories = self._take(self.running, source)
        histories[:, :, t] = token

        # the k best candidates that go on
        going_on = scores + ends * _NEG
        keep = going_on.topk(k, dim=1).indices
        self.running_scores = going_on.gather(1, keep)
        self.running = self._take(histories, keep)

        # candidates that end now (top k only, items that can still improve) join the kept hypotheses
        finished = ends & self.in_top_k & self.open[:, None]
        candidate_scores = scores / ((t + 1) ** self.lp) + ~finished * _NEG
        merged = torch.cat([self.kept_scores, candidate_scores], dim=1)
        best = merged.topk(k, dim=1).indices
        self.kept_scores = merged.gather(1, best)
        self.kept = self._take(torch.cat([self.kept, histories], dim=1), best)
        lengths = torch.cat([self.kept_length, torch.full_like(scores, t + 1, dtype=torch.long)], dim=1)
        self.kept_length = lengths.gather(1, best)
        self.kept_real = torch.cat([self.kept_real, finished], dim=1).gather(1, best)

        # early_stopping=False: stop when the best running beam, at today's length, is no better than the worst kept
        best_running = self.running_scores[:, 0] / ((t + 1) ** self.lp)
        worst_kept = torch.where(self.kept_real.all(dim=1), self.kept_scores.min(dim=1).values, _NEG)
        self.open &= best_running > worst_kept
        self.steps += 1
        order = (self.row_offset + source.gather(1, keep)).view(-1)  # cache row each running beam continues
        return self.running[:, :, t].reshape(-1), order

    def finish(self) -> torch.Tensor:
        width = int(self.kept_length[:, 0].max()) if self.steps else 0
        return self.kept[:, 0, :width]


def decode_generated(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Text of generated tokens: up to EOS, special tokens removed, stripped."""
    return [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
