"""`epalm.api.Predictor`: every input kind (path, PIL image, array; video file or frames; audio file or waveform)
gives the tensor and the answer its file gives, a list answered in batches equals the answers one by one, and bad
inputs raise clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_eval_run import make_adapter, tiny_encoder

QUESTIONS = ["what digit is this?", "what?", "is this a handwritten digit seven or a three?", "digit?"]


def _pixels(seed: int, shape=(24, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def image_predictor(tmp_path_factory):
    from epalm.api import Predictor

    root = tmp_path_factory.mktemp("api_image")
    return Predictor.load(make_adapter(root), device="cpu"), root


def test_image_inputs_give_their_files_tensor_and_answer(image_predictor):
    p, root = image_predictor
    pixels = _pixels(0)
    png = root / "picture.png"
    Image.fromarray(pixels).save(png)
    # a JPEG more than twice the model's size: its file is decoded at reduced DCT scale (PIL's draft)
    big = np.kron(_pixels(1, (20, 30, 3)), np.ones((4, 4, 1), dtype=np.uint8))
    jpg = root / "big.jpg"
    Image.fromarray(big).save(jpg, quality=95)

    from_png = p.media_tensor(png)
    assert from_png.shape == (3, 16, 16)
    for same in (str(png), pixels, Image.fromarray(pixels), Image.open(png)):
        assert torch.equal(p.media_tensor(same), from_png)
    assert torch.equal(p.media_tensor(Image.open(jpg)), p.media_tensor(jpg))  # as Image.open returns it
    decoded = Image.open(jpg).convert("RGB")  # decoded at full size: not the file's tensor, and said so
    assert not torch.equal(p.media_tensor(decoded), p.media_tensor(jpg))
    assert torch.equal(p.media_tensor(np.asarray(decoded)), p.media_tensor(decoded))

    answer = p.ask(png, QUESTIONS[0])
    assert isinstance(answer, str)
    assert p.ask(Image.fromarray(pixels), QUESTIONS[0]) == answer == p.ask(pixels, QUESTIONS[0])
    assert p.ask(Image.open(jpg), QUESTIONS[0]) == p.ask(jpg, QUESTIONS[0])


@pytest.mark.parametrize("options", [{}, {"num_beams": 1}, {"num_beams": 3, "max_new_tokens": 6}])
def test_batched_answers_equal_one_by_one(image_predictor, options):
    p, _ = image_predictor
    images = [_pixels(10 + i) for i in range(len(QUESTIONS))]
    single = [p.ask(img, q, **options) for img, q in zip(images, QUESTIONS)]
    # questions of 1..10 words: the batch is left padded; batch_size 3 cuts it into 3 + 1
    assert p.ask(images, QUESTIONS, batch_size=3, **options) == single
    assert p.caption(images, batch_size=3, **options) == [p.caption(img, **options) for img in images]
    shared = p.ask(images, "what digit is this?", **options)
    assert shared == [p.ask(img, "what digit is this?", **options) for img in images]
    assert p.ask(images[0], QUESTIONS, **options) == [p.ask(images[0], q, **options) for q in QUESTIONS]


def test_decoding_defaults_and_options(image_predictor):
    p, _ = image_predictor
    ev = p.cfg.eval
    d = p.decoding()
    assert (d.num_beams, d.max_new_tokens, d.do_sample) == (ev.num_beams, ev.max_new_tokens, ev.do_sample)
    assert p.decoding(do_sample=True).num_beams == 1  # sampling implies one beam, as the CLI's --do-sample
    img = _pixels(3)
    a = p.caption(img, do_sample=True, top_k=0, temperature=1.5, max_new_tokens=8, seed=1)
    assert a == p.caption(img, do_sample=True, top_k=0, temperature=1.5, max_new_tokens=8, seed=1)
    others = {
        p.caption(img, do_sample=True, top_k=0, temperature=1.5, max_new_tokens=8, seed=s) for s in (2, 3)
    }
    assert others != {a}


def test_bad_inputs_raise_clear_errors(image_predictor, tmp_path):
    from epalm.api import Predictor
    from epalm.data.media import SkipSample

    p, _ = image_predictor
    with pytest.raises(TypeError, match="unknown decoding option"):
        p.ask(_pixels(0), "what?", beams=2)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        p.media_tensor(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="temperature"):
        p.caption(_pixels(0), do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="num_beams=1"):
        p.caption(_pixels(0), do_sample=True, num_beams=3)
    with pytest.raises(ValueError, match="2 media but 3 questions"):
        p.ask([_pixels(0), _pixels(1)], ["a", "b", "c"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SkipSample, match="corrupt_image"):
        p.caption(bad)
    with pytest.raises(FileNotFoundError, match="no such adapter directory|not an adapter export directory"):
        Predictor.load(tmp_path / "missing")


def test_video_frames_give_the_files_tensor(tmp_path):
    import av

    from data_shards.demo import shape_clip
    from data_shards.demo_media import write_video
    from epalm.api import Predictor

    p = Predictor.load(
        make_adapter(tmp_path, tiny_encoder("video"), modality="video", num_frames=4), device="cpu"
    )
    assert p.modality == "video"
    clip = tmp_path / "clip.mp4"
    write_video(clip, shape_clip("left", np.random.default_rng(0)))
    with av.open(str(clip)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.ndim == 4 and len(frames) > 4
    tensor = p.media_tensor(clip)
    assert tensor.shape == (4, 3, 16, 16)
    assert torch.equal(p.media_tensor(frames), tensor)
    question = "which way does the shape move?"
    assert p.ask([frames, clip], question) == [p.ask(clip, question)] * 2
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        p.media_tensor(frames[0])


def test_audio_waveform_gives_the_files_tensor(tmp_path):
    import soundfile

    from data_shards.demo import tone
    from data_shards.demo_media import write_wav
    from epalm.api import Predictor

    p = Predictor.load(make_adapter(tmp_path, tiny_encoder("audio"), modality="audio"), device="cpu")
    wav = tmp_path / "tone.wav"
    write_wav(wav, tone("high", np.random.default_rng(0)))
    waveform, rate = soundfile.read(str(wav), dtype="float32")
    tensor = p.media_tensor(wav)
    assert tensor.shape == (1024, 128)
    assert torch.equal(p.media_tensor(waveform, sample_rate=rate), tensor)
    # another rate: resampled to 16 kHz as the builder resamples the same file
    wav44 = tmp_path / "tone44.wav"
    soundfile.write(str(wav44), np.resize(waveform, 44_100), 44_100)
    at44, _ = soundfile.read(str(wav44), dtype="float32")
    assert torch.equal(p.media_tensor(at44, sample_rate=44_100), p.media_tensor(wav44))
    assert p.caption([waveform, wav], sample_rate=rate) == [p.caption(wav)] * 2
    with pytest.raises(ValueError, match="sample_rate"):
        p.media_tensor(waveform)
