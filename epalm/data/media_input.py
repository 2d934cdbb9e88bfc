"""Media a user gives (a file path, a PIL image, an array of pixels or frames, a waveform) as model-ready tensors,
through the shard builder's encoders (epalm.data.media) and the eval transforms, so the model sees what it saw in
eval, and an in-memory input gives the tensor its file gives."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageFile

if TYPE_CHECKING:
    from epalm.config import Config

Media = Any  # str | Path | PIL.Image.Image | np.ndarray (see `media_tensor`)


def _png(img: Image.Image) -> bytes:
    """Lossless bytes for `encode_image`, which takes a file or bytes; the pixels pass through unchanged."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _image_bytes(media: Media) -> bytes | Path:
    """What `encode_image` reads for one image input."""
    if isinstance(media, str | os.PathLike):
        return Path(media)
    if isinstance(media, Image.Image):
        fp = getattr(media, "fp", None)
        if isinstance(media, ImageFile.ImageFile) and media.tile and fp is not None:
            # not decoded yet (as Image.open returns it): read its file's bytes, so a JPEG is decoded at
            # reduced DCT scale exactly as the builder decodes the same file (`encode_image`'s draft)
            pos = fp.tell()
            fp.seek(0)
            data = fp.read()
            fp.seek(pos)  # leave the image loadable as it was
            return data
        return _png(media)
    if isinstance(media, np.ndarray):
        return _png(Image.fromarray(_pixels(media, "an image", 3)))
    raise TypeError(
        f"an image is a path, a PIL image or an (H, W, 3) uint8 array, not {type(media).__name__}"
    )


def _pixels(array: np.ndarray, what: str, ndim: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        shape = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
        raise ValueError(f"{what} array must be {shape} uint8 RGB, got {array.dtype} {array.shape}")
    return array


def _video_frames(cfg: Config, media: Media) -> list[bytes]:
    """`data.num_frames` JPEG frames, from a file (PyAV) or a (T, H, W, 3) array, at the same segment centres."""
    from epalm.data.media import encode_image, extract_frames, segment_centres

    size = cfg.data.image_size
    if isinstance(media, str | os.PathLike):
        return extract_frames(Path(media), cfg.data.num_frames, size)
    if not isinstance(media, np.ndarray):
        raise TypeError(f"a video is a path or a (T, H, W, 3) uint8 array, not {type(media).__name__}")
    frames = _pixels(media, "a video", 4)
    if len(frames) == 0:
        raise ValueError("a video array needs at least one frame")
    indices = segment_centres(len(frames), cfg.data.num_frames)
    return [encode_image(_png(Image.fromarray(frames[i])), size) for i in indices]


def _audio_fbank(media: Media, sample_rate: int | None) -> np.ndarray:
    """The builder's fbank of a file, or of a 1-D waveform at `sample_rate` (resampled to 16 kHz as a file is)."""
    from epalm.data.media import audio_fbank

    if isinstance(media, str | os.PathLike):
        return audio_fbank(Path(media))
    if not isinstance(media, np.ndarray):
        raise TypeError(f"an audio clip is a path or a 1-D waveform array, not {type(media).__name__}")
    if media.ndim != 1 or not np.issubdtype(media.dtype, np.floating):
        # floats in [-1, 1], as soundfile reads a file; integer PCM has no agreed scale here
        raise ValueError(f"a waveform must be a 1-D float array, got {media.dtype} {media.shape}")
    if sample_rate is None or sample_rate <= 0:
        raise ValueError("a waveform needs its sample_rate (Hz)")
    from epalm.data.media import waveform_fbank

    return waveform_fbank(media, int(sample_rate))


def media_tensor(cfg: Config, modality: str, media: Media, sample_rate: int | None = None) -> torch.Tensor:
    """One sample: image (3, S, S), video (T, 3, S, S) or audio fbank (1024, 128).

    `media` is a path for every modality, or in memory: an image as a PIL image or (H, W, 3) uint8 array, a
    video as (T, H, W, 3) uint8 frames, audio as a 1-D waveform with `sample_rate`. Images and frames are
    stored as the shard builder stores them (shorter side resized, JPEG), then given the eval transform;
    video frames are the centres of `data.num_frames` equal segments. A PIL image that is already decoded is
    taken at full resolution, where its JPEG file would be DCT-downscaled first: pass the file (or the image
    as `Image.open` returns it) to get the file's tensor. Unreadable files raise `epalm.data.media.SkipSample`,
    malformed arrays ValueError.
    """
    from epalm.data.collate import decode_image
    from epalm.data.media import encode_image
    from epalm.data.transforms import AudioTransform, ImageTransform

    if modality == "audio":
        return AudioTransform(train=False)(
            torch.from_numpy(_audio_fbank(media, sample_rate).astype("float32"))
        )
    transform = ImageTransform(cfg.data.image_size, train=False, normalization=cfg.data.normalization)
    if modality == "image":
        return transform(decode_image(encode_image(_image_bytes(media), cfg.data.image_size)))
    if modality == "video":
        return transform(torch.stack([decode_image(f) for f in _video_frames(cfg, media)]))
    raise ValueError(f"unknown modality {modality!r}")


def load_media(
    cfg: Config,
    image: Media | None = None,
    video: Media | None = None,
    audio: Media | None = None,
    sample_rate: int | None = None,
) -> torch.Tensor:
    """A batch of one: image (1, 3, S, S), video (1, T, 3, S, S) or audio fbank (1, 1024, 128); see `media_tensor`."""
    given = {"image": image, "video": video, "audio": audio}
    chosen = [(m, x) for m, x in given.items() if x is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of image, video, audio")
    modality, media = chosen[0]
    return media_tensor(cfg, modality, media, sample_rate)[None]
