"""`python -m epalm.cli.generate` on one PNG, mp4 or wav prints one answer or caption, and for an image or a
video it is the answer `eval.run` gives for the same file built into shards."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_eval_run import make_adapter, tiny_encoder

QUESTION = "what digit is this?"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from epalm.cli import generate

    code = generate.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def build_shards(source_args: list[str], out: Path) -> None:
    from data_shards import build

    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            build.main(
                [
                    *source_args,
                    "--split",
                    "val",
                    "--out",
                    str(out / "shards"),
                    "--no-progress",
                    "--workers",
                    "1",
                    "--image-size",
                    "16",
                    "--num-frames",
                    "4",
                ]
            )
            == 0
        )


def eval_answer(capsys, adapter: Path, source_args: list[str], task: str, out: Path) -> str:
    """Build a one-sample shard with data_shards.build and return eval.run's answer for it."""
    from eval import run

    build_shards(source_args, out)
    assert (
        run.main(
            [
                "--adapter",
                str(adapter),
                "--shards",
                str(out / "shards"),
                "--task",
                task,
                "--out",
                str(out / "eval"),
                "--no-progress",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    (result,) = json.loads((out / "eval" / f"{task}_val_results.json").read_text())
    return result["answer"]


def assert_same_media_as_eval(adapter: Path, shards: Path, task: str = "qa", **media: Path) -> None:
    """The CLI's tensor equals what the eval loader feeds the encoder for the same file."""
    from epalm.data.loader import DatasetSpec, LoaderSettings, build_eval_loader
    from epalm.data.media_input import load_media
    from epalm.data.text import build_tokenizer
    from epalm.run.adapter import load_adapter

    _, cfg = load_adapter(adapter)
    spec = DatasetSpec(shards, task, cfg.data.modality)
    tokenizer = build_tokenizer(cfg.model.lm.tokenizer)
    kwargs = dict(batch_size=1, rank=0, world_size=1, image_size=cfg.data.image_size)
    (batch,) = list(build_eval_loader(spec, tokenizer, LoaderSettings(**kwargs)))
    assert torch.equal(load_media(cfg, **media), batch["media"])


def test_image_answer_and_caption(tmp_path, capsys):
    adapter = make_adapter(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    png = tmp_path / "picture.png"
    Image.fromarray(pixels).save(png)
    code, out, err = cli(capsys, "--adapter", str(adapter), "--image", str(png), "--question", QUESTION)
    assert code == 0, err
    assert len(out.splitlines()) == 1
    # the same PNG as a GQA image (PIL reads it by content whatever its name)
    (tmp_path / "media").mkdir()
    (tmp_path / "media/img1.jpg").symlink_to(png)
    questions = tmp_path / "gqa.json"
    questions.write_text(json.dumps({"q1": {"imageId": "img1", "question": QUESTION, "answer": "seven"}}))
    source = ["--source", "gqa", "--annotations", str(questions), "--media-root", str(tmp_path / "media")]
    assert out.strip() == eval_answer(capsys, adapter, source, "gqa", tmp_path)
    assert_same_media_as_eval(adapter, tmp_path / "shards", image=png)

    code, out, err = cli(capsys, "--adapter", str(adapter), "--image", str(png), "--num-beams", "1")
    assert code == 0 and len(out.splitlines()) == 1, err


def test_video_answer_matches_eval(tmp_path, capsys):
    from data_shards.demo import shape_clip
    from data_shards.demo_media import write_video

    adapter = make_adapter(tmp_path, tiny_encoder("video"), modality="video", num_frames=4)
    (tmp_path / "videos").mkdir()
    clip = tmp_path / "videos/clip.mp4"
    write_video(clip, shape_clip("left", np.random.default_rng(0)))
    question = "which way does the shape move?"
    code, out, err = cli(capsys, "--adapter", str(adapter), "--video", str(clip), "--question", question)
    assert code == 0 and len(out.splitlines()) == 1, err
    annotations = tmp_path / "qa.json"
    annotations.write_text(
        json.dumps([{"video": "clip.mp4", "question_id": 1, "question": question, "answer": "left"}])
    )
    source = [
        "--source",
        "msrvtt_qa",
        "--annotations",
        str(annotations),
        "--media-root",
        str(tmp_path / "videos"),
    ]
    assert out.strip() == eval_answer(capsys, adapter, source, "video_qa", tmp_path)
    assert_same_media_as_eval(adapter, tmp_path / "shards", video=clip)


def test_audio_caption(tmp_path, capsys):
    from data_shards.demo import tone
    from data_shards.demo_media import write_wav

    adapter = make_adapter(tmp_path, tiny_encoder("audio"), modality="audio")
    (tmp_path / "audios").mkdir()
    wav = tmp_path / "audios/tone.wav"
    write_wav(wav, tone("high", np.random.default_rng(0)))
    code, out, err = cli(capsys, "--adapter", str(adapter), "--audio", str(wav))
    assert code == 0 and len(out.splitlines()) == 1, err
    csv = tmp_path / "val.csv"
    csv.write_text("audiocap_id,youtube_id,start_time,caption\n1,tone,0,a high pitched tone\n")
    build_shards(
        ["--source", "audiocaps", "--annotations", str(csv), "--media-root", str(tmp_path / "audios")],
        tmp_path,
    )
    assert_same_media_as_eval(adapter, tmp_path / "shards", "caption", audio=wav)


@pytest.mark.parametrize("flag", ["--video", "--audio"])
def test_wrong_modality_or_missing_file_is_an_error(tmp_path, capsys, flag):
    adapter = make_adapter(tmp_path)
    media = tmp_path / "x.bin"
    code, _, err = cli(capsys, "--adapter", str(adapter), flag, str(media))
    assert code == 2 and "no such file" in err
    media.write_bytes(b"not media")
    code, _, err = cli(capsys, "--adapter", str(adapter), flag, str(media))
    assert code == 2 and "takes image" in err


@pytest.mark.parametrize("case", ["missing_adapter", "corrupt_weights", "bad_override"])
def test_bad_adapter_or_override_is_one_error_line(tmp_path, capsys, case):
    adapter = make_adapter(tmp_path)
    png = tmp_path / "picture.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(png)
    extra = []
    if case == "missing_adapter":
        adapter = tmp_path / "nowhere"
    elif case == "corrupt_weights":
        (adapter / "adapter.safetensors").write_bytes(b"not safetensors")
    else:
        extra = ["eval.num_beamz=2"]
    code, out, err = cli(capsys, "--adapter", str(adapter), "--image", str(png), *extra)
    assert code == 2 and out == ""
    assert err.startswith("error: --adapter ") and len(err.strip().splitlines()) == 1, err
    expected = {
        "missing_adapter": "no such adapter directory|not an adapter export directory",
        "corrupt_weights": "unreadable adapter export",
        "bad_override": "eval.num_beamz: unknown key",
    }[case]
    assert re.search(expected, err), err
