"""One media file a user gives (an image, a video, an audio clip) as a model-ready batch of one, through the
same code as shard building and evaluation, so the model sees what it saw in eval."""

from __future__ import annotations

from pathlib import Path

import torch

from epalm.config import Config


def load_media(
    cfg: Config, image: Path | None = None, video: Path | None = None, audio: Path | None = None
) -> torch.Tensor:
    """A batch of one: image (1, 3, S, S), video (1, T, 3, S, S) or audio fbank (1, 1024, 128).

    Images and frames are first stored as the shard builder stores them (shorter side resized, JPEG),
    then given the eval transform; video frames are the centres of `data.num_frames` equal segments (PyAV).
    """
    from epalm.data.collate import decode_image
    from epalm.data.media import audio_fbank, encode_image, extract_frames
    from epalm.data.transforms import AudioTransform, ImageTransform

    size = cfg.data.image_size
    if audio is not None:
        return AudioTransform(train=False)(torch.from_numpy(audio_fbank(audio).astype("float32")))[None]
    transform = ImageTransform(size, train=False, normalization=cfg.data.normalization)
    if image is not None:
        return transform(decode_image(encode_image(image, size)))[None]
    frames = extract_frames(video, cfg.data.num_frames, size)
    return transform(torch.stack([decode_image(f) for f in frames]))[None]
