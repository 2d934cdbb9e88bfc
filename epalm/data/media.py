"""Media decoding shared by the shard builder and `epalm.cli.generate`: resized JPEGs, evenly sampled video
frames (PyAV), 16 kHz Kaldi log-mel fbanks (numpy; kaldi-native-fbank refuses 128 bins at 16 kHz and
torchaudio has no build for our torch).

Every function is deterministic (same file -> same bytes) and raises `SkipSample(reason)` on bad input.
"""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np
from PIL import Image

from epalm.data import schema

JPEG_QUALITY = 90


class SkipSample(Exception):
    """A sample that cannot be built; `reason` is one of schema.SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _resize_short(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    new = (size, max(1, round(h * size / w))) if w <= h else (max(1, round(w * size / h)), size)
    # reducing_gap: box-reduce by an integer factor first, then bicubic; visually the same, much faster
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_image(src: str | Path | bytes, image_size: int) -> bytes:
    """Decode any PIL-readable image, resize its shorter side to `image_size` (aspect kept), re-encode as JPEG."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale in the DCT domain, never below image_size
            img.draft("RGB", (image_size, image_size))
            return _jpeg(_resize_short(img.convert("RGB"), image_size))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from e


def segment_centres(num_total: int, num_frames: int) -> list[int]:
    """The centre frame of each of `num_frames` equal segments (repeats when the clip is shorter)."""
    return [min(num_total - 1, int((i + 0.5) * num_total / num_frames)) for i in range(num_frames)]


def _decode_frames(path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode sequentially, keeping the wanted frame indices; returns them and the frames decoded."""
    import av

    found: dict[int, Image.Image] = {}
    count = 0
    # one reformatter reuses its swscale context: ~4x faster than frame.to_image() on small clips
    rgb = av.video.reformatter.VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]  # no frame threading: workers already use every core
        for frame in container.decode(stream):
            if count in wanted:
                found[count] = rgb.reformat(frame, format="rgb24").to_image()
                if len(found) == len(wanted):
                    return found, count + 1
            count += 1
    return found, count


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size)


def extract_frames(path: Path, num_frames: int, image_size: int) -> list[bytes]:
    """`num_frames` JPEG frames at segment centres (the original sampled at random, even at test time)."""
    try:
        total = _count_frames(path)
        indices = segment_centres(total, num_frames) if total > 0 else [0]
        found, decoded = _decode_frames(path, set(indices))
        if len(found) < len(set(indices)):
            # the header over-counted (truncated or variable stream): resample on what really decodes
            if decoded == 0:
                raise ValueError("no decodable frames")
            indices = segment_centres(decoded, num_frames)
            found, _ = _decode_frames(path, set(indices))
        return [_jpeg(_resize_short(found[i].convert("RGB"), image_size)) for i in indices]
    except Exception as e:  # PyAV raises FFmpegError subclasses, IndexError for no video stream, ...
        raise SkipSample("unreadable_video", f"{type(e).__name__}: {e}") from e


def _mel_banks(num_bins: int, num_fft_bins: int, sample_rate: int, low_freq: float = 20.0) -> np.ndarray:
    """Kaldi's triangular mel filters (HTK mel scale), (num_bins, num_fft_bins); the Nyquist bin is unused."""

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    lo, hi = mel(low_freq), mel(sample_rate / 2)
    delta = (hi - lo) / (num_bins + 1)
    left = lo + np.arange(num_bins)[:, None] * delta
    centre, right = left + delta, left + 2 * delta
    m = mel(np.arange(num_fft_bins) * sample_rate / (2 * num_fft_bins))[None, :]
    up, down = (m - left) / (centre - left), (right - m) / (right - centre)
    return np.maximum(0.0, np.minimum(up, down))


def kaldi_fbank(
    waveform: np.ndarray, sample_rate: int, num_mel_bins: int = schema.AUDIO_NUM_MEL_BINS
) -> np.ndarray:
    """Log-mel fbank with Kaldi's defaults as torchaudio's `kaldi.fbank(htk_compat=True, window_type='hanning',
    dither=0, use_energy=False)` computes them: 25 ms frames, 10 ms shift, snip_edges, DC removal,
    pre-emphasis 0.97, symmetric Hann window, power spectrum, log floored at float32 eps.

    Implemented here because kaldi-native-fbank refuses 128 bins at 16 kHz (one filter falls between
    FFT bins; torchaudio leaves it empty, i.e. log(eps)); tests check it against kaldi-native-fbank and,
    through the loader's normalisation, against transformers' ASTFeatureExtractor (tests/test_audio_features.py).
    """
    x = np.asarray(waveform, dtype=np.float64)
    win, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
    if len(x) < win:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    n = 1 + (len(x) - win) // shift
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::shift][:n].copy()
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] *= 1 - 0.97
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    nfft = 1 << (win - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=nfft)) ** 2
    energies = power[:, : nfft // 2] @ _mel_banks(num_mel_bins, nfft // 2, sample_rate).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


def load_waveform(path: Path) -> tuple[np.ndarray, int]:
    """(first channel as float32, its sample rate): the channel torchaudio-based code used."""
    import soundfile

    data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    return data[:, 0], sr


def resample(x: np.ndarray, sr: int, sample_rate: int = schema.AUDIO_SAMPLE_RATE) -> np.ndarray:
    """`x` at `sample_rate`, through scipy's polyphase filter (unchanged when the rates agree)."""
    from scipy.signal import resample_poly

    if sr == sample_rate:
        return x
    g = gcd(sr, sample_rate)
    return resample_poly(x, sample_rate // g, sr // g).astype(np.float32)


def waveform_fbank(
    x: np.ndarray, sample_rate: int, target_length: int = schema.AUDIO_TARGET_LENGTH
) -> np.ndarray:
    """(target_length, 128) float16 log-mel of a 1-D waveform: resampled to 16 kHz, the whole clip's mean
    removed (as the original), cropped to what `target_length` frames use, zero-padded after the last frame."""
    x = resample(np.asarray(x, dtype=np.float32), sample_rate)
    x = x - x.mean()  # the mean of the whole clip, as the original; then only what the crop keeps
    x = x[
        : int(0.025 * schema.AUDIO_SAMPLE_RATE) + int(0.010 * schema.AUDIO_SAMPLE_RATE) * (target_length - 1)
    ]
    fb = kaldi_fbank(x, schema.AUDIO_SAMPLE_RATE)
    if len(fb) == 0:
        raise ValueError(f"shorter than one 25 ms frame ({len(x)} samples)")
    out = np.zeros((target_length, fb.shape[1]), dtype=np.float16)
    out[: min(target_length, len(fb))] = fb[:target_length]
    return out


def audio_fbank(path: Path, target_length: int = schema.AUDIO_TARGET_LENGTH) -> np.ndarray:
    """`waveform_fbank` of an audio file; SkipSample when it cannot be read or is too short."""
    try:
        return waveform_fbank(*load_waveform(path), target_length)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad files
        raise SkipSample("unreadable_audio", f"{type(e).__name__}: {e}") from e


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
