"""Every data_shards source converts a small fixture in its real on-disk format into correct shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from epalm.data import schema
from epalm.data.media import kaldi_fbank, segment_centres
from tests.fixtures_data import (
    avi,
    dump,
    image_size,
    jpeg,
    mean_level,
    meta,
    read_split,
    run_build,
    video,
    wav,
)


def test_coco_karpathy_train_expands_captions_val_keeps_references(tmp_path):
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        jpeg(tmp_path / "img" / "train2014" / f"{i}.jpg", size=(64, 48), seed=i)
        sentences = [{"raw": f" caption {i} a ", "tokens": []}, {"raw": f"caption {i} b"}]
        images.append(
            {
                "filepath": "train2014",
                "filename": f"{i}.jpg",
                "split": split,
                "cocoid": 100 + i,
                "imgid": i,
                "sentences": sentences,
            }
        )
    ann = dump(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    common = [
        "--source",
        "coco_karpathy",
        "--annotations",
        ann,
        "--media-root",
        tmp_path / "img",
        "--image-size",
        32,
    ]
    assert run_build(*common, "--split", "train", "--out", tmp_path / "train") == 0
    manifest, samples = read_split(tmp_path / "train")
    assert manifest["num_samples"] == 4 and manifest["skipped"] == {} and manifest["fingerprint"] is None
    metas = [meta(s) for s in samples]
    assert [m["captions"] for m in metas] == [
        ["caption 0 a"],
        ["caption 0 b"],
        ["caption 1 a"],
        ["caption 1 b"],
    ]
    assert {m["image_id"] for m in metas} == {100, 101}
    assert all(m["task"] == "caption" and m["modality"] == "image" and m["split"] == "train" for m in metas)
    assert all(image_size(s[schema.IMAGE]) == (43, 32) for s in samples)  # shorter side 32, aspect kept

    assert run_build(*common, "--split", "val", "--out", tmp_path / "val") == 0
    _, samples = read_split(tmp_path / "val")
    assert [meta(s)["captions"] for s in samples] == [["caption 2 a", "caption 2 b"]]
    assert meta(samples[0])["id"] == "102"


def _vqa_files(tmp_path, subtype="val2014"):
    questions = [{"image_id": i, "question": f"what is {i}?", "question_id": i * 10} for i in (1, 2)]
    answers = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    annotations = [
        {"question_id": i * 10, "image_id": i, "question_type": "what is", "answer_type": "yes/no"}
        | {
            "multiple_choice_answer": "yes",
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k} for k, a in enumerate(answers)
            ],
        }
        for i in (1, 2)
    ]
    for i in (1, 2):
        jpeg(tmp_path / "img" / f"COCO_{subtype}_{i:012d}.jpg", size=(40, 80))
    q = dump(tmp_path / "q.json", {"data_subtype": subtype, "questions": questions})
    a = dump(tmp_path / "a.json", {"data_subtype": subtype, "annotations": annotations})
    return q, a


def test_vqav2_official_pair_soft_scores(tmp_path):
    q, a = _vqa_files(tmp_path)
    args = [
        "--source",
        "vqav2",
        "--questions",
        q,
        "--annotations",
        a,
        "--media-root",
        tmp_path / "img",
        "--split",
        "val",
    ]
    assert run_build(*args, "--out", tmp_path / "out", "--image-size", 24) == 0
    _, samples = read_split(tmp_path / "out")
    m = meta(samples[0])
    assert (
        m["question"] == "what is 1?" and m["question_id"] == 10 and m["image_id"] == 1 and m["task"] == "qa"
    )
    assert m["answers"] == [
        {"answer": "yes", "score": 1.0},
        {"answer": "no", "score": 2 / 3},
        {"answer": "maybe", "score": 1 / 3},
    ]
    assert len(m["raw_answers"]) == 10 and m["answer_type"] == "yes/no" and m["question_type"] == "what is"
    assert image_size(samples[0][schema.IMAGE]) == (24, 48)


def test_vqav2_questions_only_test_split(tmp_path):
    q, _ = _vqa_files(tmp_path, subtype="test2015")
    args = ["--source", "vqav2", "--questions", q, "--media-root", tmp_path / "img", "--split", "test"]
    assert run_build(*args, "--out", tmp_path / "out") == 0
    _, samples = read_split(tmp_path / "out")
    assert [meta(s)["answers"] for s in samples] == [[], []]


def test_vqav2_test_dev_questions_name_test2015_images(tmp_path):
    """test-dev's questions file says data_subtype "test-dev2015"; its images are COCO_test2015_*.jpg."""
    q, _ = _vqa_files(tmp_path, subtype="test2015")
    data = json.loads(q.read_text())
    q.write_text(json.dumps(data | {"data_subtype": "test-dev2015"}))
    args = ["--source", "vqav2", "--questions", q, "--media-root", tmp_path / "img", "--split", "testdev"]
    assert run_build(*args, "--out", tmp_path / "out") == 0
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["skipped"] == {}
    assert [meta(s)["image_path"] for s in samples] == [f"COCO_test2015_{i:012d}.jpg" for i in (1, 2)]


def test_vqav2_vlt5_json_and_subtype_folders(tmp_path):
    jpeg(tmp_path / "img" / "COCO_train2014_000000000001.jpg")
    jpeg(tmp_path / "img" / "val2014" / "COCO_val2014_000000000002.jpg")  # found under <root>/<subtype>/
    entries = [
        {
            "img_id": "COCO_train2014_000000000001",
            "question_id": 1000,
            "sent": "What is it?",
            "label": {"net": 1, "nets": 0.3},
            "question_type": "what",
            "answer_type": "other",
        },
        {"img_id": "COCO_val2014_000000000002", "question_id": 2000, "sent": "Is it?", "label": {"yes": 1}},
    ]
    ann = dump(tmp_path / "karpathy_val.json", entries)
    assert (
        run_build(
            "--source",
            "vqav2_vlt5",
            "--annotations",
            ann,
            "--media-root",
            tmp_path / "img",
            "--split",
            "karpathy_val",
            "--out",
            tmp_path / "out",
        )
        == 0
    )
    _, samples = read_split(tmp_path / "out")
    m = meta(samples[0])
    assert m["answers"] == [{"answer": "net", "score": 1.0}, {"answer": "nets", "score": 0.3}]
    assert m["question"] == "What is it?" and m["question_type"] == "what" and m["answer_type"] == "other"
    assert meta(samples[1])["question_id"] == 2000


def test_gqa_official_questions(tmp_path):
    jpeg(tmp_path / "img" / "n123.jpg")
    ann = dump(
        tmp_path / "testdev_balanced_questions.json",
        {
            "201": {
                "imageId": "n123",
                "question": "Is the sky blue?",
                "answer": "yes",
                "fullAnswer": "Yes, it is.",
            }
        },
    )
    assert (
        run_build(
            "--source",
            "gqa",
            "--annotations",
            ann,
            "--media-root",
            tmp_path / "img",
            "--split",
            "testdev",
            "--out",
            tmp_path / "out",
        )
        == 0
    )
    _, samples = read_split(tmp_path / "out")
    m = meta(samples[0])
    assert (m["question_id"], m["image_id"], m["answers"], m["full_answer"]) == (
        "201",
        "n123",
        [{"answer": "yes", "score": 1.0}],
        "Yes, it is.",
    )


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_cc3m_img2dataset_tars_and_tsv(tmp_path):
    folder = tmp_path / "cc3m"
    folder.mkdir()
    img = jpeg(tmp_path / "x.jpg", size=(300, 200)).read_bytes()
    for t in range(2):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tf:
            for k in range(2):
                key = f"{t:05d}{k:04d}"
                _add(tf, f"{key}.jpg", img)
                _add(tf, f"{key}.txt", f"caption {t} {k}".encode())
                _add(
                    tf,
                    f"{key}.json",
                    f'{{"key": "{key}", "url": "http://x/{key}.jpg", "status": "success"}}'.encode(),
                )
    assert (
        run_build(
            "--source",
            "cc3m",
            "--annotations",
            folder,
            "--split",
            "train",
            "--out",
            tmp_path / "out",
            "--samples-per-shard",
            3,
        )
        == 0
    )
    manifest, samples = read_split(tmp_path / "out")
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 1]
    assert [meta(s)["captions"] for s in samples] == [
        ["caption 0 0"],
        ["caption 0 1"],
        ["caption 1 0"],
        ["caption 1 1"],
    ]
    assert meta(samples[0])["url"] == "http://x/000000000.jpg"
    assert image_size(samples[0][schema.IMAGE]) == (336, 224)

    jpeg(tmp_path / "media" / "a" / "1.jpg")
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("caption\tfilepath\na dog on grass\ta/1.jpg\n")
    assert (
        run_build(
            "--source",
            "cc3m",
            "--annotations",
            tsv,
            "--media-root",
            tmp_path / "media",
            "--split",
            "val",
            "--out",
            tmp_path / "tsv",
        )
        == 0
    )
    _, samples = read_split(tmp_path / "tsv")
    assert [meta(s)["captions"] for s in samples] == [["a dog on grass"]]


def test_msrvtt_caption_frames_at_segment_centres(tmp_path):
    video(tmp_path / "videos" / "video1.mp4", num_frames=12, size=(48, 32))
    ann = dump(
        tmp_path / "msrvtt_caption_train7k.json",
        [{"video": "video1.mp4", "caption": ["a grey fade", "it brightens"]}],
    )
    args = [
        "--source",
        "msrvtt_caption",
        "--annotations",
        ann,
        "--media-root",
        tmp_path / "videos",
        "--num-frames",
        4,
        "--image-size",
        16,
    ]
    assert run_build(*args, "--split", "train", "--out", tmp_path / "out") == 0
    _, samples = read_split(tmp_path / "out")
    assert [meta(s)["captions"] for s in samples] == [["a grey fade"], ["it brightens"]]
    frames = sorted(k for k in samples[0] if k.startswith("frame"))
    assert frames == [schema.frame_member(i) for i in range(4)]
    assert all(image_size(samples[0][k]) == (24, 16) for k in frames)
    assert segment_centres(12, 4) == [1, 4, 7, 10]
    levels = [mean_level(samples[0][k]) for k in frames]
    assert levels == pytest.approx([20, 80, 140, 200], abs=4)  # frame i is grey level 20 * i


def test_msrvtt_qa_label_and_msvd_qa_avi(tmp_path):
    video(tmp_path / "v" / "video7.mp4", num_frames=3)
    ann = dump(
        tmp_path / "qa.json",
        [{"video": "video7.mp4", "question_id": 5, "question": "what moves?", "label": {"car": 1.0}}],
    )
    assert (
        run_build(
            "--source",
            "msrvtt_qa",
            "--annotations",
            ann,
            "--media-root",
            tmp_path / "v",
            "--split",
            "test",
            "--out",
            tmp_path / "o1",
            "--num-frames",
            8,
        )
        == 0
    )
    _, samples = read_split(tmp_path / "o1")
    m = meta(samples[0])
    assert (m["question"], m["answers"], m["video_id"], m["modality"]) == (
        "what moves?",
        [{"answer": "car", "score": 1.0}],
        "video7",
        "video",
    )
    assert sum(k.startswith("frame") for k in samples[0]) == 8  # a 3-frame clip repeats frames

    avi(tmp_path / "v" / "-_hbPLsZvvo_5_15.avi")
    ann = dump(
        tmp_path / "msvd.json", [{"video": "-_hbPLsZvvo_5_15.avi", "sent": "who sings?", "answer": "man"}]
    )
    assert (
        run_build(
            "--source",
            "msvd_qa",
            "--annotations",
            ann,
            "--media-root",
            tmp_path / "v",
            "--split",
            "val",
            "--out",
            tmp_path / "o2",
            "--num-frames",
            2,
            "--image-size",
            8,
        )
        == 0
    )
    _, samples = read_split(tmp_path / "o2")
    assert (
        meta(samples[0])["answers"] == [{"answer": "man", "score": 1.0}]
        and meta(samples[0])["source"] == "msvd_qa"
    )
    assert [mean_level(samples[0][schema.frame_member(i)]) for i in range(2)] == pytest.approx(
        [40, 140], abs=4
    )


def _fbank(sample) -> np.ndarray:
    arr = np.load(io.BytesIO(sample[schema.AUDIO]), allow_pickle=False)
    assert arr.shape == (1024, 128) and arr.dtype == np.float16
    return arr.astype(np.float32)


def test_audiocaps_csv_resamples_and_groups_references(tmp_path):
    wav(tmp_path / "audio" / "abc.wav", seconds=2.0, sample_rate=44100, freq=1000.0)
    wav(tmp_path / "audio" / "def.wav", seconds=1.0, sample_rate=16000, freq=1000.0)
    csv = tmp_path / "val.csv"
    csv.write_text(
        "audiocap_id,youtube_id,start_time,caption\n1,abc,30,a beep\n2,abc,30,a tone\n3,def,0,a short beep\n"
    )
    assert (
        run_build(
            "--source",
            "audiocaps",
            "--annotations",
            csv,
            "--media-root",
            tmp_path / "audio",
            "--split",
            "val",
            "--out",
            tmp_path / "out",
        )
        == 0
    )
    _, samples = read_split(tmp_path / "out")
    assert [meta(s)["captions"] for s in samples] == [["a beep", "a tone"], ["a short beep"]]
    assert meta(samples[0])["audiocap_ids"] == ["1", "2"]
    long, short = _fbank(samples[0]), _fbank(samples[1])
    # 2 s at 16 kHz after resampling = 198 frames, the rest zero padding; 1 s = 98 frames
    assert np.all(long[198:] == 0) and np.all(long[197] != 0) and np.all(short[98:] == 0)
    # the same 1 kHz tone peaks in the same mel bin whatever the file's sample rate
    assert long[:198].mean(0).argmax() == short[:98].mean(0).argmax()


def test_audiocaps_json_train_one_sample_per_caption(tmp_path):
    wav(tmp_path / "audios" / "train" / "xyz.wav")
    ann = dump(
        tmp_path / "audiocaps_caption_train.json",
        [{"audio": "train/xyz.wav", "caption": ["rain falls", "water drips"]}],
    )
    assert (
        run_build(
            "--source",
            "audiocaps",
            "--annotations",
            ann,
            "--media-root",
            tmp_path / "audios",
            "--split",
            "train",
            "--out",
            tmp_path / "out",
        )
        == 0
    )
    _, samples = read_split(tmp_path / "out")
    assert [meta(s)["captions"] for s in samples] == [["rain falls"], ["water drips"]]
    assert meta(samples[0])["audio_id"] == "xyz"


def test_fbank_matches_kaldi_native_fbank():
    """Our fbank equals kaldi-native-fbank's with the original's options, at a bin count both accept."""
    knf = pytest.importorskip("kaldi_native_fbank")
    rng = np.random.default_rng(0)
    x = (0.3 * np.sin(np.arange(16000) * 0.07) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq, opts.frame_opts.window_type, opts.frame_opts.dither = 16000, "hanning", 0.0
    opts.mel_opts.num_bins, opts.use_energy, opts.htk_compat = 80, False, True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, x.tolist())
    fb.input_finished()
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    ours = kaldi_fbank(x, 16000, num_mel_bins=80)
    assert ours.shape == ref.shape == (98, 80)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    # at 128 bins one filter (bin 3) holds no FFT bin: torchaudio gives log(eps) there, kaldi-native-fbank refuses
    ours128 = kaldi_fbank(x, 16000)
    assert ours128.shape == (98, 128)
    np.testing.assert_allclose(ours128[:, 3], np.log(np.finfo(np.float32).eps), rtol=1e-6)


def test_check_fingerprint_lists_every_differing_field():
    fp = schema.fingerprint("vit:b16:float32", "abc", 6, "image:jpeg-resize-bicubic:clip", 224)
    schema.check_fingerprint(dict(fp), fp)
    with pytest.raises(ValueError) as e:
        schema.check_fingerprint(fp | {"layers": 4, "weights_hash": "def"}, fp)
    assert "layers" in str(e.value) and "weights_hash" in str(e.value) and "image_size" not in str(e.value)
    with pytest.raises(ValueError, match="no cached features"):
        schema.check_fingerprint(None, fp)


def test_feature_cache_stores_cls_states_and_fingerprint(tmp_path):
    pytest.importorskip("epalm.model.encoders")
    import torch

    from epalm.config import load_config
    from epalm.data.transforms import ImageTransform
    from epalm.model.encoders import build_encoder

    tiny = "{depth: 3, embed_dim: 16, num_heads: 2, img_size: 16, patch_size: 8}"
    config = tmp_path / "enc.yaml"
    config.write_text(
        f"model:\n  encoder: {{kind: vit, name: vit_base_patch16_224, pretrained: false, num_states: 3, config_overrides: {tiny}}}\n"
        "data: {image_size: 16, normalization: clip}\n"
    )
    for i in range(3):
        jpeg(tmp_path / "img" / f"n{i}.jpg", seed=i)
    ann = dump(
        tmp_path / "gqa.json",
        {str(i): {"imageId": f"n{i}", "question": "q?", "answer": "a"} for i in range(3)},
    )
    args = [
        "--source",
        "gqa",
        "--annotations",
        ann,
        "--media-root",
        tmp_path / "img",
        "--split",
        "val",
        "--image-size",
        20,
    ]
    assert (
        run_build(
            *args,
            "--out",
            tmp_path / "out",
            "--encoder",
            config,
            "--encoder-layers",
            2,
            "--samples-per-shard",
            2,
        )
        == 0
    )
    manifest, samples = read_split(tmp_path / "out")
    fp = manifest["fingerprint"]
    assert (
        fp["layers"] == 2
        and fp["image_size"] == 16
        and fp["preprocessing"] == "image:jpeg-resize-bicubic:clip"
    )

    # the training side rebuilds the same fingerprint from its config and encoder
    enc_cfg = load_config(config, ["model.encoder.num_states=2"]).model.encoder
    torch.manual_seed(0)
    encoder = build_encoder(enc_cfg)
    schema.check_fingerprint(
        fp, schema.encoder_fingerprint(enc_cfg, encoder.state_dict(), "image", 16, 8, "clip")
    )
    # features equal the encoder on the stored JPEG with the eval transform
    from data_shards.features import _pixels

    for s in samples:
        feats = np.load(io.BytesIO(s[schema.FEATURES]), allow_pickle=False)
        assert feats.shape == (2, 16) and feats.dtype == np.float16
        x = ImageTransform(size=16, train=False, normalization="clip")(_pixels(s[schema.IMAGE]))
        np.testing.assert_allclose(feats, encoder(x[None])[0].numpy(), atol=2e-3, rtol=2e-3)
