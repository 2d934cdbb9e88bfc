"""Our audio front end against transformers' own: `ASTFeatureExtractor` (the feature extractor published with
the AST checkpoints the audio configs use) computes the same normalised 1024 x 128 Kaldi fbank from the same
16 kHz waveform as shard building (`audio_fbank`, float16 in the shard) followed by the loader's
`AudioTransform`. We keep ours because the shard stores the un-normalised fbank in float16 and ours is
faster; this test is what ties the two together."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from epalm.data.media import audio_fbank, load_waveform, resample
from epalm.data.transforms import AudioTransform


def _wav(path, sample_rate: int, seconds: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 200 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    soundfile.write(path, (tone + 0.1).astype(np.float32), sample_rate)  # a DC offset the front end must drop
    return str(path)


@pytest.mark.parametrize(
    "sample_rate, seconds",
    [(16000, 10.24), (16000, 12.0), (44100, 3.0), (22050, 0.5)],  # exact fit, cropped, resampled + padded
)
def test_our_fbank_is_ast_feature_extractors(tmp_path, sample_rate, seconds):
    from transformers import ASTFeatureExtractor

    path = _wav(tmp_path / "clip.wav", sample_rate, seconds, seed=int(seconds))
    ours = AudioTransform(train=False)(torch.from_numpy(audio_fbank(path).astype(np.float32)))
    waveform = resample(*load_waveform(path))  # 16 kHz, first channel: the extractor takes a waveform
    theirs = ASTFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")["input_values"][0]
    assert ours.shape == theirs.shape == (1024, 128)
    # the only difference is the shard's float16 storage of the log-mel values (|x| < 16: steps of 2^-7)
    assert float((ours - theirs).abs().max()) < 2e-3
    raw = ASTFeatureExtractor(do_normalize=False)(waveform, sampling_rate=16000, return_tensors="np")
    frames = min(1024, 1 + (len(waveform) - 400) // 160)
    stored = audio_fbank(path)[:frames].astype(np.float32)
    assert np.abs(raw["input_values"][0][:frames] - stored).max() < 8e-3
    assert np.abs(stored).max() > 1.0  # real log-mel values were compared, not padding
