"""`--source jsonl` (a user's own data): good lines become samples of any modality, bad lines are skipped and
counted by reason, and the file's kind is that of most of its lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from epalm import exit_codes
from epalm.data import schema
from tests.fixtures_data import image_size, jpeg, meta, read_split, run_build, video, wav


def write_lines(path: Path, lines: list[object]) -> Path:
    """One line per item: dicts as JSON, strings verbatim (for the malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def build(ann: Path, root: Path, split: str, out: Path, *extra: object) -> int:
    args = ["--source", "jsonl", "--annotations", ann, "--media-root", root, "--split", split, "--out", out]
    return run_build(*args, *extra)


def test_image_captions_good_and_bad_lines(tmp_path, capsys):
    root = tmp_path / "media"
    jpeg(root / "imgs" / "a.jpg", size=(64, 48))
    jpeg(root / "imgs" / "c.jpg", size=(64, 48))
    from PIL import Image

    Image.new("RGB", (30, 60), (200, 10, 10)).save(root / "imgs" / "b.png")
    ann = write_lines(
        tmp_path / "captions.jsonl",
        [
            {"media": "imgs/q.jpg", "question": "what?", "answers": ["x"]},  # line 1: QA in a caption file
            {"media": "imgs/a.jpg", "caption": "a red square"},
            "{not json",
            {"media": "imgs/a.jpg", "caption": ["a square", " red "]},  # same image: grouped with line 2
            "",  # blank lines are ignored, not counted
            [1, 2],  # JSON but not an object
            {"caption": "no media"},
            {"media": "notes/readme.txt", "caption": "what kind of file?"},
            {"media": "imgs/a.jpg", "caption": ""},
            {"media": "imgs/c.jpg", "caption": "both", "question": "which?"},
            {"media": "imgs/b.png", "caption": "a tall red box", "id": 7},
            {"media": "imgs/c.jpg", "caption": "id taken", "id": 7},
            {"media": "audio/x.wav", "caption": "a beep"},  # another modality
            {"media": "imgs/gone.jpg", "caption": "missing file"},
            {"media": "imgs/c.jpg", "caption": "an image given by modality", "modality": "image"},
        ],
    )
    # 13 records, 10 of them skipped: more than the default 5%, so no manifest
    assert build(ann, root, "val", tmp_path / "strict") == 3
    assert not (tmp_path / "strict" / schema.MANIFEST).exists()
    err = capsys.readouterr().err
    assert f"{ann}:1: skipped (mixed_kind)" in err and f"{ann}:3: skipped (malformed_record): not JSON" in err
    assert "4 more skipped line(s)" in err  # 9 lines skipped while reading, the first 5 with line numbers

    assert build(ann, root, "val", tmp_path / "val", "--max-skip-fraction", 1.0, "--image-size", 24) == 0
    manifest, samples = read_split(tmp_path / "val")
    assert manifest["skipped"] == {
        "malformed_record": 6,  # not JSON, not an object, no media, empty caption, caption + question, id 7
        "unknown_media_type": 1,
        "mixed_kind": 2,
        "missing_media": 1,
    }
    assert manifest["source"] == "jsonl" and manifest["num_records"] == 3 + 10
    metas = [meta(s) for s in samples]
    assert [(m["captions"], m["image_id"], m["image_path"]) for m in metas] == [
        (["a red square", "a square", "red"], "imgs/a", "imgs/a.jpg"),
        (["a tall red box"], 7, "imgs/b.png"),
        (["an image given by modality"], "imgs/c", "imgs/c.jpg"),
    ]
    assert all((m["task"], m["modality"], m["split"]) == ("caption", "image", "val") for m in metas)
    assert [image_size(s[schema.IMAGE]) for s in samples] == [(32, 24), (24, 48), (32, 24)]  # PNG -> JPEG

    assert build(ann, root, "train", tmp_path / "train", "--max-skip-fraction", 1.0) == 0
    _, samples = read_split(tmp_path / "train")  # a training split: one sample per caption
    assert [(meta(s)["id"], meta(s)["captions"]) for s in samples] == [
        ("imgs/a_0", ["a red square"]),
        ("imgs/a_1", ["a square"]),
        ("imgs/a_2", ["red"]),
        ("7", ["a tall red box"]),
        ("imgs/c", ["an image given by modality"]),
    ]


def test_image_qa_answers_and_ids(tmp_path):
    root = tmp_path / "media"
    for name in ("p", "q"):
        jpeg(root / f"{name}.jpg")
    ann = write_lines(
        tmp_path / "qa.jsonl",
        [
            {"media": "p.jpg", "question": "what colour?", "answers": ["red", "dark red", "red"]},
            {
                "media": "q.jpg",
                "question": "how many?",
                "answers": [{"answer": "2", "score": 0.6}, {"answer": "two"}],
                "id": "q-2",
            },
            {"media": "q.jpg", "question": "is it?", "answers": []},  # no ground truth (a test split)
            {"media": "p.jpg", "question": "repeated id", "answers": ["x"], "id": "q-2"},
            {"media": "p.jpg", "question": "no answers key"},
            {"media": "p.jpg", "question": "bad score", "answers": [{"answer": "x", "score": 3}]},
            {"media": "p.jpg", "question": " ", "answers": ["blank question"]},
            {"media": "p.jpg", "question": "mixed answer types", "answers": ["x", {"answer": "y"}]},
        ],
    )
    assert build(ann, root, "test", tmp_path / "out", "--max-skip-fraction", 1.0) == 0
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["skipped"] == {"malformed_record": 5}
    metas = [meta(s) for s in samples]
    assert [(m["id"], m["question_id"], m["question"], m["answers"]) for m in metas] == [
        ("1", 1, "what colour?", [{"answer": "red", "score": 1.0}, {"answer": "dark red", "score": 1.0}]),
        ("q-2", "q-2", "how many?", [{"answer": "two", "score": 1.0}, {"answer": "2", "score": 0.6}]),
        ("3", 3, "is it?", []),
    ]
    assert [m["image_id"] for m in metas] == ["p", "q", "q"]
    assert all((m["task"], m["modality"]) == ("qa", "image") for m in metas)


def test_video_qa_frames_and_explicit_modality(tmp_path):
    root = tmp_path / "media"
    video(root / "clips" / "v1.mp4", num_frames=12)
    video(root / "clips" / "v2.mp4", num_frames=12).rename(root / "clips" / "v2.video")  # odd extension
    ann = write_lines(
        tmp_path / "video.jsonl",
        [
            {"media": "clips/v1.mp4", "question": "what happens?", "answers": ["it brightens"]},
            {"media": "clips/v2.video", "question": "and here?", "answers": ["same"], "modality": "video"},
            {"media": "clips/v2.video", "question": "no modality", "answers": ["?"]},
            {"media": "clips/v1.mp4", "question": "bad modality", "answers": ["?"], "modality": "text"},
            {"media": "clips/v1.mp4", "question": "list modality", "answers": ["?"], "modality": ["video"]},
        ],
    )
    assert (
        build(
            ann,
            root,
            "val",
            tmp_path / "out",
            "--num-frames",
            4,
            "--image-size",
            16,
            "--max-skip-fraction",
            1,
        )
        == 0
    )
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["skipped"] == {"unknown_media_type": 3}
    assert [(meta(s)["video_id"], meta(s)["modality"]) for s in samples] == [
        ("clips/v1", "video"),
        ("clips/v2", "video"),
    ]
    for s in samples:
        assert sorted(k for k in s if k.startswith("frame")) == [schema.frame_member(i) for i in range(4)]
        assert image_size(s[schema.frame_member(0)]) == (24, 16)


def test_audio_captions_wav_and_flac(tmp_path):
    root = tmp_path / "media"
    wav(root / "a.wav", seconds=1.0, sample_rate=16000)
    t = np.arange(16000) / 16000
    soundfile.write(root / "b.flac", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    ann = write_lines(
        tmp_path / "audio.jsonl",
        [
            {"media": "a.wav", "caption": ["a tone", "a beep"]},
            {"media": "b.flac", "caption": "a low hum", "id": "clip-b"},
            {"media": "a.wav", "question": "a QA line in a caption file", "answers": ["x"]},
        ],
    )
    assert build(ann, root, "test", tmp_path / "out", "--max-skip-fraction", 1) == 0
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["skipped"] == {"mixed_kind": 1}
    assert [(meta(s)["audio_id"], meta(s)["captions"]) for s in samples] == [
        ("a", ["a tone", "a beep"]),
        ("clip-b", ["a low hum"]),
    ]
    for s in samples:
        fbank = np.load(io.BytesIO(s[schema.AUDIO]), allow_pickle=False)
        assert fbank.shape == (1024, 128) and np.all(fbank[98:] == 0) and fbank[:98].any(axis=1).all()  # 1 s


def test_missing_annotations_file_is_an_error(tmp_path, capsys):
    assert build(tmp_path / "absent.jsonl", tmp_path, "val", tmp_path / "out") == exit_codes.USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read annotations") and "absent.jsonl" in err


@pytest.mark.parametrize("line", ["[]", '"text"', "3", "null"])
def test_a_file_of_only_bad_lines_builds_nothing(tmp_path, line):
    ann = write_lines(tmp_path / "bad.jsonl", [line, line])
    assert build(ann, tmp_path, "val", tmp_path / "out") == 3
    assert not (tmp_path / "out" / schema.MANIFEST).exists()
