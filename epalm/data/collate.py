"""Raw samples -> one training or generation batch: safe decoding, transforms, text formats, labels."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from transformers import PreTrainedTokenizerBase

from epalm.data import schema
from epalm.data.settings import DatasetSpec, LoaderSettings
from epalm.data.stream import RawSample
from epalm.data.text import ANSWER_TOKEN, build_labels, format_caption, format_qa, tokenize
from epalm.data.transforms import AudioTransform, ImageTransform


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_npy(data: bytes) -> np.ndarray:
    """`.npy` bytes -> array; object arrays (which would need pickle) are refused by numpy."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_answer(answers: Sequence[dict], rng: random.Random) -> str:
    """One answer drawn with probability proportional to its score (uniform if all scores are 0)."""
    if not answers:
        raise ValueError("a QA training sample has no answers")
    scores = [max(float(a.get("score", 1.0)), 0.0) for a in answers]
    if sum(scores) <= 0:
        return rng.choice(answers)["answer"]
    return rng.choices(answers, weights=scores, k=1)[0]["answer"]


def pick_caption(captions: str | Sequence[str], rng: random.Random) -> str:
    if isinstance(captions, str):
        return captions
    if not captions:
        raise ValueError("a caption training sample has no caption")
    return captions[0] if len(captions) == 1 else rng.choice(list(captions))


def _frame_index(ext: str) -> int | None:
    if ext.startswith("frame") and ext.endswith(".jpg"):
        return int(ext[len("frame") : -len(".jpg")])
    return None


def decode_frames(members: dict[str, bytes]) -> torch.Tensor | None:
    """A video sample's frameNNN.jpg members in frame order, as (T, 3, H, W) uint8; None without frames."""
    frames = sorted((i, ext) for ext in members if (i := _frame_index(ext)) is not None)
    return torch.stack([decode_image(members[ext]) for _, ext in frames]) if frames else None


class SampleError(ValueError):
    """One sample cannot be used; `reason` is one of schema.LOAD_SKIP_REASONS. Names the shard and key."""

    def __init__(self, reason: str, sample: RawSample, detail: str) -> None:
        super().__init__(f"{sample.shard}: sample {sample.key!r}: {reason}: {detail}")
        self.reason, self.shard, self.key, self.detail = reason, sample.shard, sample.key, detail


@dataclass(frozen=True)
class BatchBuilder:
    """Turns the raw samples of one dataset into a batch dict; `train=False` gives generation prompts.

    Per-sample randomness (answer draw, caption pick, crop, flip, SpecAugment) comes from RNGs
    seeded by (seed, dataset index, epoch, key), so a batch is a pure function of its samples.
    """

    tokenizer: PreTrainedTokenizerBase
    spec: DatasetSpec
    name: str  # in logs and batch["dataset"]
    index: int  # the dataset's place in the mix (seeds its per-sample RNGs)
    train: bool
    settings: LoaderSettings

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def use_features(self) -> bool:
        return self.spec.use_features

    @cached_property
    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.settings.image_size, self.train, self.settings.normalization)

    @cached_property
    def audio_transform(self) -> AudioTransform:
        return AudioTransform(train=self.train)

    def wanted(self, ext: str) -> bool:
        """The members this dataset decodes; all others are seeked over, never read."""
        if ext == schema.JSON:
            return True
        if self.use_features:
            return ext == schema.FEATURES
        if self.modality == "image":
            return ext == schema.IMAGE
        if self.modality == "video":
            return _frame_index(ext) is not None
        return ext == schema.AUDIO

    def _media(self, sample: RawSample, rng: random.Random) -> torch.Tensor:
        m = sample.members
        need = (
            schema.FEATURES
            if self.use_features
            else {"image": schema.IMAGE, "audio": schema.AUDIO}.get(self.modality)
        )
        if need is not None and need not in m:
            raise SampleError("missing_member", sample, f"no {need!r} member")
        if self.use_features:
            return torch.from_numpy(decode_npy(m[schema.FEATURES]).astype(np.float32))
        if self.modality == "audio":
            fbank = torch.from_numpy(decode_npy(m[schema.AUDIO]).astype(np.float32))
            return self.audio_transform(fbank, rng)
        transform = self.image_transform
        if self.modality == "image":
            return transform(decode_image(m[schema.IMAGE]), rng)
        frames = decode_frames(m)
        if frames is None:
            raise SampleError("missing_member", sample, "a video sample without frameNNN.jpg members")
        return transform(frames, rng)

    def _text(self, meta: dict, rng: random.Random, sample: RawSample) -> str:
        eos = self.tokenizer.eos_token
        field = "question" if self.task == "qa" else "captions"
        needed = [field] if self.train or self.task == "qa" else []
        needed += ["answers"] if self.train and self.task == "qa" else []
        if any(k not in meta for k in needed):
            raise SampleError("bad_text", sample, f"lacks one of {needed} for task {self.task!r}")
        if self.task == "qa":
            answer = sample_answer(meta["answers"], rng) if self.train else None
            return format_qa(meta["question"], answer, eos, self.settings.double_question_mark)
        return format_caption(pick_caption(meta["captions"], rng) if self.train else None, eos)

    def prepare(self, s: RawSample, epoch: int, seed: int) -> tuple[str, torch.Tensor, dict]:
        """(text, media, meta) of one sample; SampleError (with a reason of schema.LOAD_SKIP_REASONS) if bad."""
        if s.problem is not None:
            raise SampleError("shard_read_error", s, s.problem)
        if schema.JSON not in s.members:
            raise SampleError("missing_member", s, "no json member")
        try:
            meta = json.loads(s.members[schema.JSON])
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except ValueError as e:
            raise SampleError("bad_json", s, str(e)) from e
        tag = f"{seed}/{self.index}/{epoch}/{s.key}"
        # separate streams, so switching to cached features keeps the same answers and captions
        try:
            text = self._text(meta, random.Random(tag + "/text"), s)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SampleError):
                raise
            raise SampleError("bad_text", s, f"{type(e).__name__}: {e}") from e
        try:
            media = self._media(s, random.Random(tag + "/media"))
        except SampleError:
            raise
        except (RuntimeError, ValueError, TypeError, OSError) as e:  # libjpeg, numpy's .npy checks
            raise SampleError("corrupt_media", s, f"{type(e).__name__}: {e}") from e
        return text, media, meta

    def __call__(self, samples: Sequence[RawSample], epoch: int, seed: int) -> dict:
        return self.assemble(samples, [self.prepare(s, epoch, seed) for s in samples])

    def assemble(
        self, samples: Sequence[RawSample], prepared: Sequence[tuple[str, torch.Tensor, dict]]
    ) -> dict:
        """One batch from `prepare`d samples."""
        texts = [t for t, _, _ in prepared]
        media = [m for _, m, _ in prepared]
        metas = [d for _, _, d in prepared]
        shapes = {tuple(x.shape) for x in media}
        if len(shapes) != 1:
            raise ValueError(
                f"dataset {self.name!r}: samples in one batch have different shapes {sorted(shapes)}"
            )
        ids, mask = tokenize(self.tokenizer, texts, padding_side="right" if self.train else "left")
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.train:
            answer_only = self.settings.answer_only
            sep = self.tokenizer.convert_tokens_to_ids(ANSWER_TOKEN) if answer_only else None
            batch["labels"] = build_labels(ids, mask, sep, answer_only and self.task == "qa")
        batch["encoder_states" if self.use_features else "media"] = torch.stack(media)
        batch.update(
            modality=self.modality,
            task=self.task,
            dataset=self.name,
            keys=[s.key for s in samples],
            meta=metas,
        )
        return batch
