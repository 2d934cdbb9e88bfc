"""`python -m epalm.cli.infer`: one JSON line per input over a JSONL and over a folder (bad media reported in its
line), answers equal to the API's one by one, a kill -9 mid-run then a rerun that skips what was written and ends
with the uninterrupted run's bytes, 2 ranks writing what 1 rank writes, and bad input as one `error:` line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testing.support import ROOT, cpu_child_env
from tests.test_eval_run import make_adapter

QUESTION = "what digit is this?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny adapter, and a folder of 5 PNGs (two in a subfolder), a corrupt PNG and a text file."""
    root = tmp_path_factory.mktemp("infer")
    media = root / "media"
    (media / "sub").mkdir(parents=True)
    for i in range(5):
        pixels = np.random.default_rng(i).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(media / ("sub" if i % 2 else "") / f"img{i}.png")
    (media / "broken.png").write_bytes(b"not a png")
    (media / "notes.txt").write_text("not media")
    return make_adapter(root), media


def infer(capsys, *argv: str) -> tuple[int, str]:
    from epalm.cli import infer as cli

    code = cli.main(["--no-progress", "--num-workers", "0", *argv])
    return code, capsys.readouterr().err


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_one_line_per_input_with_the_apis_answers(setup, tmp_path, capsys):
    from epalm.api import Predictor

    adapter, media = setup
    rows = [
        {"media": "media/img0.png", "question": QUESTION, "id": "q0"},
        {"media": "media/sub/img1.png"},  # no question: a caption; no id: its line number
        {"media": "media/broken.png", "question": QUESTION},
        {"media": "media/missing.png", "question": QUESTION},
        {"media": "media/img2.png", "question": "what?"},
        {"media": "media/img4.png", "question": "is it a handwritten seven or a three?"},
    ]
    jsonl = write_jsonl(media.parent / "inputs.jsonl", rows)
    out = tmp_path / "preds.jsonl"
    code, err = infer(
        capsys, "--adapter", str(adapter), "--inputs", str(jsonl), "--out", str(out), "--batch-size", "2"
    )
    assert code == 0, err
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ["q0", "2", "3", "4", "5", "6"]
    assert [line["media"] for line in lines] == [r["media"] for r in rows]
    assert "corrupt_image" in lines[2]["error"] and "no such file" in lines[3]["error"]
    assert set(lines[2]) == {"id", "media", "error"}
    p = Predictor.load(adapter, device="cpu")
    assert lines[1]["caption"] == p.caption(media / "sub/img1.png") and "question" not in lines[1]
    for line, row in zip(lines, rows):
        if "answer" in line:
            assert line["question"] == row["question"]
            assert line["answer"] == p.ask(media.parent / row["media"], row["question"])
    assert "wrote 6 lines (2 unreadable media)" in err

    # --media-root, decoding flags and DataLoader workers: the same answers as the API with those flags
    moved = write_jsonl(tmp_path / "elsewhere.jsonl", [{"media": "img0.png"}, {"media": "img2.png"}])
    out2 = tmp_path / "greedy.jsonl"
    argv = ["--adapter", str(adapter), "--inputs", str(moved), "--out", str(out2), "--media-root", str(media)]
    code, err = infer(capsys, *argv, "--num-beams", "1", "--max-new-tokens", "6", "--num-workers", "2")
    assert code == 0, err
    want = p.caption([media / "img0.png", media / "img2.png"], num_beams=1, max_new_tokens=6)
    assert [line["caption"] for line in read_lines(out2)] == want


def test_folder_every_media_file_once(setup, tmp_path, capsys):
    from epalm.api import Predictor

    adapter, media = setup
    out = tmp_path / "folder.jsonl"
    argv = ["--adapter", str(adapter), "--inputs", str(media), "--out", str(out), "--question", QUESTION]
    code, err = infer(capsys, *argv, "--batch-size", "4")
    assert code == 0, err
    lines = read_lines(out)
    ids = ["broken.png", "img0.png", "img2.png", "img4.png", "sub/img1.png", "sub/img3.png"]
    assert [line["id"] for line in lines] == ids  # sorted relative paths; notes.txt is not media
    assert "error" in lines[0] and all("answer" in line for line in lines[1:])
    p = Predictor.load(adapter, device="cpu")
    assert [line["answer"] for line in lines[1:]] == [p.ask(media / i, QUESTION) for i in ids[1:]]
    assert lines[1]["media"] == str(media / "img0.png")

    glob_out = tmp_path / "glob.jsonl"
    code, err = infer(
        capsys, "--adapter", str(adapter), "--inputs", f"{media}/**/img*.png", "--out", str(glob_out)
    )
    assert code == 0, err
    captions = read_lines(glob_out)
    assert [line["id"] for line in captions] == ids[1:]
    assert [line["caption"] for line in captions] == [p.caption(media / i) for i in ids[1:]]


def _cmd(adapter: Path, jsonl: Path, out: Path) -> list[str]:
    return [
        "-m", "epalm.cli.infer", "--adapter", str(adapter), "--inputs", str(jsonl), "--out", str(out),
        "--batch-size", "2", "--num-workers", "0", "--no-progress",
    ]  # fmt: skip


def test_kill_9_then_rerun_skips_what_was_written(setup, tmp_path):
    adapter, media = setup
    rows = [
        {"media": f"media/img{2 * (n % 3)}.png", **({"question": QUESTION} if n % 2 else {})}
        for n in range(400)
    ]
    jsonl = write_jsonl(media.parent / "many.jsonl", rows)
    out = tmp_path / "killed.jsonl"
    env = cpu_child_env()
    proc = subprocess.Popen(
        [sys.executable, *_cmd(adapter, jsonl, out)], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 6:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = out.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]  # a torn last line, if any, is redone
    done = complete.count(b"\n")
    assert 6 <= done < len(rows)

    rerun = subprocess.run(
        [sys.executable, *_cmd(adapter, jsonl, out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {done} of {len(rows)} inputs already in {out}, skipped" in rerun.stderr
    assert f"wrote {len(rows) - done} lines" in rerun.stderr  # only the rest was generated
    after = out.read_bytes()
    assert after.startswith(complete)  # the earlier lines, byte for byte
    ids = [line["id"] for line in read_lines(out)]
    assert ids == [str(n) for n in range(1, len(rows) + 1)]  # every input exactly once, in input order

    clean = tmp_path / "clean.jsonl"
    run = subprocess.run(
        [sys.executable, *_cmd(adapter, jsonl, clean)], cwd=ROOT, env=env, capture_output=True, timeout=300
    )
    assert run.returncode == 0
    assert after == clean.read_bytes()  # the interrupted run ends where an uninterrupted one does


def test_torn_last_line_is_cut_and_redone(setup, tmp_path, capsys):
    adapter, media = setup
    jsonl = write_jsonl(tmp_path / "three.jsonl", [{"media": str(media / f"img{i}.png")} for i in (0, 2, 4)])
    out = tmp_path / "torn.jsonl"
    argv = ["--adapter", str(adapter), "--inputs", str(jsonl), "--out", str(out)]
    assert infer(capsys, *argv)[0] == 0
    full = out.read_bytes()
    first = full[: full.index(b"\n") + 1]
    out.write_bytes(first + full[len(first) : len(first) + 10])  # line 2 half written
    code, err = infer(capsys, *argv)
    assert code == 0 and "resuming: 1 of 3" in err
    assert out.read_bytes() == full


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_write_what_one_rank_writes(setup, tmp_path):
    adapter, media = setup
    rows = [{"media": f"media/img{n % 5}.png", "question": "what?" * (1 + n % 3)} for n in range(9)]
    rows[4] = {"media": "media/broken.png"}
    jsonl = write_jsonl(media.parent / "nine.jsonl", rows)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = cpu_child_env()
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", *_cmd(adapter, jsonl, tmp_path / "two.jsonl")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *_cmd(adapter, jsonl, tmp_path / "one.jsonl")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=240,
    )
    assert one.returncode == 0
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert len(read_lines(tmp_path / "two.jsonl")) == 9
    assert two.stderr.count("wrote 9 lines") == 1  # rank 0 writes


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_inputs", "no such folder or file"),
        ("bad_jsonl", "line 2"),
        ("repeated_id", "appears twice"),
        ("empty_folder", "no image files"),
        ("missing_adapter", "no such adapter directory|not an adapter export directory"),
        ("bad_override", "eval.num_beamz"),
        ("bad_sampling", "temperature"),
        ("foreign_out", "not a line this command writes"),
    ],
)
def test_bad_input_is_one_error_line(setup, tmp_path, capsys, case, message):
    adapter, media = setup
    inputs, extra = str(write_jsonl(tmp_path / "ok.jsonl", [{"media": str(media / "img0.png")}])), []
    out = tmp_path / "out.jsonl"
    if case == "missing_inputs":
        inputs = str(tmp_path / "nowhere")
    elif case == "bad_jsonl":
        (tmp_path / "bad.jsonl").write_text('{"media": "a.png"}\n{"question": "no media"}\n')
        inputs = str(tmp_path / "bad.jsonl")
    elif case == "repeated_id":
        inputs = str(
            write_jsonl(
                tmp_path / "rep.jsonl", [{"media": "a.png", "id": "x"}, {"media": "b.png", "id": "x"}]
            )
        )
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        inputs = str(tmp_path / "empty")
    elif case == "missing_adapter":
        adapter = tmp_path / "no_adapter"
    elif case == "bad_override":
        extra = ["eval.num_beamz=2"]
    elif case == "bad_sampling":
        extra = ["--do-sample", "--temperature", "0"]
    elif case == "foreign_out":
        out.write_text("some other file\n")
    code, err = infer(capsys, "--adapter", str(adapter), "--inputs", inputs, "--out", str(out), *extra)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    if case != "foreign_out":
        assert not out.exists()  # refused before anything is written
