"""Media transforms, answer sampling and dataset mixing: shapes, values, determinism, proportions."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from epalm.data.collate import pick_caption, sample_answer
from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
from epalm.data.text import IGNORE_INDEX
from epalm.data.transforms import (
    AUDIO_MEAN,
    AUDIO_STD,
    NORMALIZATIONS,
    AudioTransform,
    ImageTransform,
    random_resized_crop_params,
)
from testing.shard_fixtures import write_dataset

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def pattern(frames: int = 0, h: int = 20, w: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(frames)
    shape = (frames, 3, h, w) if frames else (3, h, w)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("preset", sorted(NORMALIZATIONS))
def test_normalisation_values(preset):
    gray = torch.full((3, 20, 28), 100, dtype=torch.uint8)  # constant: resizing keeps it exactly
    out = ImageTransform(16, train=False, normalization=preset)(gray)
    mean, std = NORMALIZATIONS[preset]
    expected = [(100 / 255 - m) / s for m, s in zip(mean, std)]
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_custom_normalisation_and_bad_names():
    out = ImageTransform(8, normalization=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))(
        torch.full((3, 8, 8), 255, dtype=torch.uint8)
    )
    assert torch.allclose(out, torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="unknown normalization"):
        ImageTransform(8, normalization="cifar")


def test_eval_is_deterministic_bicubic_resize():
    image = pattern()
    t = ImageTransform(16, train=False, normalization="half")
    out = t(image)
    assert torch.equal(out, t(image))
    resized = F.resize(image, [16, 16], InterpolationMode.BICUBIC, antialias=True).float() / 255
    assert torch.allclose(out, (resized - 0.5) / 0.5, atol=1e-6)


def test_train_is_seeded_and_flips_sometimes():
    image, t = pattern(), ImageTransform(16, train=True)
    assert torch.equal(t(image, random.Random(3)), t(image, random.Random(3)))
    outs = [t(image, random.Random(s)) for s in range(20)]
    assert len({o.sum().item() for o in outs}) > 10
    with pytest.raises(ValueError, match="rng"):
        t(image)


def test_crop_params_cover_half_to_all_of_the_area():
    for seed in range(300):
        top, left, h, w = random_resized_crop_params(40, 60, random.Random(seed))
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w
        assert 0.5 * 2400 * 0.9 <= h * w <= 2400 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.2


def test_video_frames_share_one_crop_and_flip():
    frames = pattern(frames=4)
    t = ImageTransform(16, train=True)
    joint = t(frames, random.Random(11))
    assert joint.shape == (4, 3, 16, 16)
    for i in range(4):
        assert torch.allclose(joint[i], t(frames[i], random.Random(11)), atol=1e-5)


def test_audio_normalisation_and_specaugment():
    fbank = torch.full((1024, 128), -4.0)
    value = (-4.0 - AUDIO_MEAN) / (AUDIO_STD * 2)
    assert torch.allclose(AudioTransform(train=False)(fbank), torch.full((1024, 128), value))
    masked_value = (0.0 - AUDIO_MEAN) / (AUDIO_STD * 2)
    for seed in range(30):
        out = AudioTransform(train=True)(fbank, random.Random(seed))
        masked = out == masked_value
        bins = masked.all(dim=0).nonzero().flatten()  # frequency mask: whole columns
        rows = masked.all(dim=1).nonzero().flatten()  # time mask: whole rows
        assert len(bins) <= 24 and len(rows) <= 96
        assert masked.sum() == len(bins) * 1024 + len(rows) * 128 - len(bins) * len(rows)
        for band in (bins, rows):
            if len(band):
                assert band[-1] - band[0] + 1 == len(band), "a mask is one contiguous band"
    short = AudioTransform()(torch.zeros(1000, 128))
    assert short.shape == (1024, 128)


def test_answer_drawn_in_proportion_to_score():
    answers = [{"answer": "yes", "score": 0.9}, {"answer": "no", "score": 0.3}, {"answer": "x", "score": 0.0}]
    counts = Counter(sample_answer(answers, random.Random(f"s{i}")) for i in range(6000))
    assert counts["x"] == 0
    assert abs(counts["yes"] / 6000 - 0.75) < 0.025
    zeros = [{"answer": "a", "score": 0.0}, {"answer": "b", "score": 0.0}]
    assert {sample_answer(zeros, random.Random(i)) for i in range(50)} == {"a", "b"}
    assert pick_caption(["only"], random.Random(0)) == "only"
    assert pick_caption(["a", "b", "c"], random.Random(5)) == pick_caption(["a", "b", "c"], random.Random(5))


def test_batch_shapes_and_labels_per_modality(tmp_path, tiny_tokenizer):
    for modality, media_shape in [
        ("image", (2, 3, 16, 16)),
        ("video", (2, 3, 3, 16, 16)),
        ("audio", (2, 1024, 128)),
    ]:
        root = write_dataset(tmp_path / modality, [4], modality=modality)
        spec = DatasetSpec(root, "qa", modality)
        batch = next(
            iter(
                build_train_loader(
                    [spec], tiny_tokenizer, LoaderSettings(batch_size=2, rank=0, world_size=1, image_size=16)
                )
            )
        )
        assert batch["media"].shape == media_shape and batch["modality"] == modality
        pad = batch["attention_mask"] == 0
        assert batch["labels"][pad].eq(IGNORE_INDEX).all() and batch["attention_mask"][:, 0].eq(1).all()
        assert len(batch["meta"]) == 2 and batch["meta"][0]["id"] == batch["keys"][0]
    answer_only = build_train_loader(
        [spec],
        tiny_tokenizer,
        LoaderSettings(batch_size=2, rank=0, world_size=1, image_size=16, answer_only=True),
    )
    batch = next(iter(answer_only))
    text = tiny_tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert text.strip() in {"seven</s>", "one</s>"}


def test_mixing_weights_and_same_dataset_on_every_rank(tmp_path, tiny_tokenizer):
    specs = [
        DatasetSpec(write_dataset(tmp_path / "a", [20, 20], prefix="a"), "qa", "image", weight=0.7),
        DatasetSpec(
            write_dataset(tmp_path / "b", [40], prefix="b", modality="audio"), "qa", "audio", weight=0.3
        ),
    ]
    runs = []
    for rank in (0, 1):
        loader = build_train_loader(
            specs,
            tiny_tokenizer,
            LoaderSettings(batch_size=2, rank=rank, world_size=2, image_size=16, batches_per_epoch=50),
        )
        runs.append([b for _ in range(4) for b in loader])
    names = [[b["dataset"] for b in run] for run in runs]
    assert names[0] == names[1], "ranks must draw the same dataset at every step"
    assert [b["modality"] for b in runs[0]] == [{"a": "image", "b": "audio"}[n] for n in names[0]]
    assert abs(names[0].count("a") / 200 - 0.7) < 0.1
    for b0, b1 in zip(*runs):
        assert not set(b0["keys"]) & set(b1["keys"])
