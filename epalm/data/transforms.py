"""Media transforms of eP-ALM (docs/data.md): image/video crop+flip or resize, normalisation, audio fbank.

Every random transform draws from a `random.Random` passed in by the caller, seeded per sample, so
augmentation is reproducible and survives a loader resume without storing any RNG state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # The original normalises with CLIP statistics even for the augreg ViT (docs/model.md).
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
AUDIO_MEAN = -4.2677393
AUDIO_STD = 4.5689974
AUDIO_FRAMES = 1024
AUDIO_BINS = 128
Normalization = str | tuple[Sequence[float], Sequence[float]]


def get_normalization(norm: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (3, 1, 1) tensors from a preset name or an explicit (mean, std) pair."""
    if isinstance(norm, str):
        if norm not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {norm!r}; presets: {sorted(NORMALIZATIONS)}")
        norm = NORMALIZATIONS[norm]
    mean, std = norm
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"normalization needs 3 means and 3 stds, got {norm!r}")
    return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)


def random_resized_crop_params(
    height: int,
    width: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with an aspect ratio in `ratio`.

    Same distribution as torchvision's RandomResizedCrop: ten tries, then a centre crop with the
    aspect ratio clamped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ImageTransform:
    """uint8 (..., 3, H, W) -> normalised float (..., 3, size, size); one crop/flip for all frames.

    Train: random resized crop (scale 0.5-1, bicubic) + horizontal flip with p=0.5.
    Eval: resize to (size, size), bicubic. The original's RandAugment is not applied.
    """

    size: int = 224
    train: bool = False
    normalization: Normalization = "clip"
    scale: tuple[float, float] = (0.5, 1.0)
    _stats: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_stats", get_normalization(self.normalization))  # validates early, once

    def __call__(self, pixels: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.shape[-3] != 3:
            raise ValueError(f"expected uint8 (..., 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        out_size = [self.size, self.size]
        if self.train:
            if rng is None:
                raise ValueError("a training transform needs a seeded rng")
            top, left, h, w = random_resized_crop_params(*pixels.shape[-2:], rng, self.scale)
            flip = rng.random() < 0.5
            pixels = F.resized_crop(
                pixels, top, left, h, w, out_size, InterpolationMode.BICUBIC, antialias=True
            )
            if flip:
                pixels = pixels.flip(-1)
        else:
            pixels = F.resize(pixels, out_size, InterpolationMode.BICUBIC, antialias=True)
        mean, std = self._stats
        return (pixels.float().div_(255.0) - mean) / std


def mask_band(
    x: torch.Tensor, dim: int, max_width: int, rng: random.Random, value: float = 0.0
) -> torch.Tensor:
    """Set a random band of up to `max_width` consecutive indices along `dim` to `value` (in place)."""
    size = x.shape[dim]
    width = rng.randint(0, min(max_width, size))
    start = rng.randint(0, size - width)
    x.narrow(dim, start, width).fill_(value)
    return x


@dataclass(frozen=True)
class AudioTransform:
    """Kaldi fbank (frames, 128) -> (1024, 128) float, SpecAugment when training, AST normalisation.

    Masked bins get the value a 0 takes after normalisation, as in the original (mask, then normalise).
    """

    train: bool = False
    freq_mask: int = 24
    time_mask: int = 96
    num_frames: int = AUDIO_FRAMES

    def __call__(self, fbank: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if fbank.ndim != 2 or fbank.shape[1] != AUDIO_BINS:
            raise ValueError(f"expected a (frames, {AUDIO_BINS}) fbank, got {tuple(fbank.shape)}")
        x = fbank[: self.num_frames]
        if x.shape[0] < self.num_frames:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.num_frames - x.shape[0]))
        out = (x.float() - AUDIO_MEAN) / (AUDIO_STD * 2)  # a new tensor: the caller's stays untouched
        if self.train:
            if rng is None:
                raise ValueError("a training transform needs a seeded rng")
            masked = (0.0 - AUDIO_MEAN) / (AUDIO_STD * 2)  # the original masks with 0 before normalising
            mask_band(out, 1, self.freq_mask, rng, masked)
            mask_band(out, 0, self.time_mask, rng, masked)
        return out
