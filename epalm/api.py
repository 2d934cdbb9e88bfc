"""The Python API: load an adapter once, then ask about or caption images, videos and audio clips, one input or a
list, with the CLI's decoding options. `epalm.cli.generate` and `epalm.cli.infer` go through it, so there is one
path from media to answer.

    from epalm.api import Predictor
    p = Predictor.load("runs/vqa/adapter")
    p.ask("cat.jpg", "what is the cat doing?")              # -> "sleeping"
    p.ask([img1, img2], "what is this?", num_beams=1)       # -> ["a dog", "a cat"]  (PIL images, arrays, paths)
    p.caption(waveform, sample_rate=44_100, do_sample=True, seed=1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from epalm.config import ENCODER_MODALITY, Config
from epalm.data.media_input import Media, media_tensor
from epalm.data.text import format_caption, format_qa, tokenize
from epalm.evaluation.decoding import Decoding, check_sampling, decode_generated, generate

# the decoding keywords `ask` and `caption` take (the CLIs' flags); unset ones come from the config's `eval`
DECODING_OPTIONS = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")


@dataclasses.dataclass
class Predictor:
    """A loaded adapter (frozen LM + encoder, trained connector and prompt) in eval mode on `device`."""

    model: torch.nn.Module
    tokenizer: Any
    cfg: Config
    device: torch.device

    @classmethod
    def load(
        cls, adapter: str | Path, *, device: str | torch.device | None = None, overrides: Sequence[str] = ()
    ) -> Predictor:
        """Load an adapter export; `overrides` are `key=value` config changes, `device` defaults to CUDA if any.

        `adapter` is what `epalm.run.adapter.load_adapter` reads (an export directory, or a Hub id it resolves):
        every entry point goes through it, so adapters are found one way. Raises FileNotFoundError (no adapter,
        weights or tokenizer), ValueError (a bad override, or an adapter trained on cached encoder features,
        which has no encoder to read media with)."""
        from epalm.evaluation.predict import load_eval_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer, cfg = load_eval_model(adapter, overrides, device)
        if model.encoder is None:
            raise ValueError("this adapter was trained on cached features; set data.use_features=false")
        return cls(model, tokenizer, cfg, device)

    @property
    def modality(self) -> str:
        """The media this adapter's encoder reads: "image", "video" or "audio"."""
        return ENCODER_MODALITY[self.cfg.model.encoder.kind]

    def decoding(
        self,
        *,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Decoding:
        """The config's `eval` decoding with the given options changed (sampling implies one beam unless set);
        ValueError for an out-of-range option."""
        ev = self.cfg.eval
        do_sample = ev.do_sample if do_sample is None else do_sample
        given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        changes = {k: v for k, v in given.items() if v is not None}
        beams = (1 if do_sample else ev.num_beams) if num_beams is None else num_beams
        d = Decoding.from_config(ev, num_beams=beams, do_sample=do_sample, **changes)
        # `generate` checks these too; checked here as well so a batch run fails before reading any media
        if d.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {d.num_beams}")
        if d.do_sample:
            check_sampling(d.temperature, d.top_k, d.top_p)
            if d.num_beams > 1:
                raise ValueError("do_sample draws one sequence per prompt: set num_beams=1")
        return d

    def generator(self, decoding: Decoding, seed: int | None = None) -> torch.Generator | None:
        """The sampling RNG of one call: seeded with `seed` (default `eval.seed`); None when not sampling."""
        seed = self.cfg.eval.seed if seed is None else seed
        if not decoding.do_sample or seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def media_tensor(self, media: Media, sample_rate: int | None = None) -> torch.Tensor:
        """One input as the model reads it (`epalm.data.media_input.media_tensor`), without a batch dimension."""
        return media_tensor(self.cfg, self.modality, media, sample_rate)

    def prompt(self, question: str | None) -> str:
        """`question</a>` to answer it, the empty prompt (BOS only) to caption."""
        eos = self.tokenizer.eos_token
        if question is None:
            return format_caption(None, eos)
        return format_qa(question, None, eos, self.cfg.model.double_question_mark)

    @torch.no_grad()
    def generate(
        self,
        media: torch.Tensor,
        questions: Sequence[str | None],
        decoding: Decoding,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Texts for a batch of media tensors (B, ...) and one question per row (None: caption it).

        Prompts are left padded, so each row's greedy or beam answer is the one it gets alone."""
        ids, mask = tokenize(self.tokenizer, [self.prompt(q) for q in questions], padding_side="left")
        tokens = generate(
            self.model,
            ids.to(self.device),
            mask.to(self.device),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            media=media.to(self.device),
            decoding=decoding,
            generator=generator,
        )
        return decode_generated(self.tokenizer, tokens)

    def ask(
        self,
        media: Media | Sequence[Media],
        question: str | Sequence[str],
        *,
        sample_rate: int | None = None,
        batch_size: int | None = None,
        **options: Any,
    ) -> str | list[str]:
        """Answer `question` about `media`; a list of either gives a list of answers (a single one is shared).

        `media`: a path, PIL image or (H, W, 3) uint8 array (image adapters); a path or (T, H, W, 3) frames
        (video); a path or a 1-D float waveform with `sample_rate` (audio). `options`: `DECODING_OPTIONS`.
        Lists are generated `batch_size` at a time (default `eval.batch_size`); with greedy or beam search
        each answer equals the one-by-one answer. Raises `epalm.data.media.SkipSample` for an unreadable
        file, ValueError for a malformed array or an out-of-range decoding option."""
        if isinstance(question, str) and isinstance(media, list | tuple):
            question = [question] * len(media)
        if not isinstance(question, str) and not isinstance(media, list | tuple):
            media = [media] * len(question)
        return self._run(media, question, sample_rate, batch_size, options)

    def caption(
        self,
        media: Media | Sequence[Media],
        *,
        sample_rate: int | None = None,
        batch_size: int | None = None,
        **options: Any,
    ) -> str | list[str]:
        """Caption `media` (one input, or a list: a list of captions); inputs and options as in `ask`."""
        questions = [None] * len(media) if isinstance(media, list | tuple) else None
        return self._run(media, questions, sample_rate, batch_size, options)

    def _run(self, media, questions, sample_rate, batch_size, options: dict) -> str | list[str]:
        unknown = set(options) - set(DECODING_OPTIONS)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {sorted(unknown)}; expected {DECODING_OPTIONS}")
        seed = options.pop("seed", None)
        decoding = self.decoding(**options)
        generator = self.generator(decoding, seed)
        if not isinstance(media, list | tuple):
            tensor = self.media_tensor(media, sample_rate)[None]
            return self.generate(tensor, [questions], decoding, generator)[0]
        if len(media) != len(questions):
            raise ValueError(f"{len(media)} media but {len(questions)} questions")
        size = batch_size or self.cfg.eval.batch_size
        texts: list[str] = []
        for start in range(0, len(media), size):
            tensors = [self.media_tensor(m, sample_rate) for m in media[start : start + size]]
            texts += self.generate(torch.stack(tensors), questions[start : start + size], decoding, generator)
        return texts
