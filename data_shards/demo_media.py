"""The demo's media writers: mp4 clips and wav files that are the same bytes in every process and run
(`make demo` gives the same numbers on two fresh clones of one machine). The builder tests write their
real-format video and audio with them too."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """(H, W, 3) uint8 frames (H and W even) -> an mp4, byte-identical for the same frames in any process.

    libx264 through PyAV was not: the same frames gave different files in 55 of 240 demo clips across
    processes (mostly the implicit rgb24 -> yuv420p swscale conversion inside `encode`, the rest libx264's
    own threads), which moved the demo's video score between two fresh clones. So the conversion is done
    here in numpy, frames get explicit timestamps, and libavcodec's single-threaded MPEG-4 Part 2 encoder
    writes them (on the demo's clips its decoded error is that of libx264 at crf 18: ~0.9 grey levels).
    """
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.bit_rate = 4_000_000
        for i, frame in enumerate(frames):
            yuv = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(frame), format="yuv420p")
            yuv.pts = i
            container.mux(stream.encode(yuv))
        container.mux(stream.encode())


def _rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range Y'CbCr (ffmpeg's default for rgb24 -> yuv420p), chroma averaged over 2x2 blocks,
    as the (H * 3/2, W) plane layout PyAV's `VideoFrame.from_ndarray(..., format="yuv420p")` takes."""
    r, g, b = (frame[..., c].astype(np.float64) for c in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape
    planes = [y] + [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v)]
    flat = np.concatenate([np.clip(np.rint(p), 0, 255).astype(np.uint8).reshape(-1) for p in planes])
    return flat.reshape(h * 3 // 2, w)


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int = 16000) -> None:
    import soundfile

    soundfile.write(str(path), waveform, sample_rate, subtype="PCM_16")
