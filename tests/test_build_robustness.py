"""The shard builder survives bad input (skipped and counted by reason), is deterministic, and a killed
build resumes to the same bytes as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epalm.data import schema
from tests.fixtures_data import dump, hashes, jpeg, meta, read_split, run_build, video, wav

ROOT = Path(__file__).resolve().parent.parent


def _karpathy(tmp_path: Path, names: list[str]) -> Path:
    images = [
        {"filepath": "", "filename": n, "split": "val", "cocoid": i, "sentences": [{"raw": f"caption {i}"}]}
        for i, n in enumerate(names)
    ]
    return dump(tmp_path / "dataset_coco.json", {"images": images})


def test_bad_images_are_skipped_by_reason(tmp_path):
    root = tmp_path / "media"
    for i in range(4):
        jpeg(root / f"ok{i}.jpg", seed=i)
    good = jpeg(root / "truncated.jpg", size=(200, 150)).read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "garbage.jpg").write_bytes(b"this is not an image")
    jpeg(tmp_path / "secret.jpg")  # exists, but outside --media-root
    names = [f"ok{i}.jpg" for i in range(4)] + [
        "truncated.jpg",
        "garbage.jpg",
        "missing.jpg",
        "../secret.jpg",
    ]
    ann = _karpathy(tmp_path, names + [str(tmp_path / "secret.jpg")])
    data = json.loads(ann.read_text())
    data["images"].append({"filepath": "", "split": "val", "cocoid": 99, "sentences": []})  # no filename
    ann.write_text(json.dumps(data))
    args = ["--source", "coco_karpathy", "--annotations", ann, "--media-root", root, "--split", "val"]
    assert (
        run_build(*args, "--out", tmp_path / "out", "--max-skip-fraction", 1.0, "--samples-per-shard", 3) == 0
    )
    manifest, samples = read_split(tmp_path / "out")
    assert manifest["skipped"] == {
        "corrupt_image": 2,
        "missing_media": 1,
        "path_escapes_root": 2,
        "malformed_record": 1,
    }
    assert manifest["num_samples"] == 4 and manifest["num_records"] == 10
    assert sorted(meta(s)["image_id"] for s in samples) == [0, 1, 2, 3]
    # the done-records name each skipped sample
    done = json.loads((tmp_path / "out" / schema.done_record_name("val-000001.tar")).read_text())
    assert [r[:2] for r in done["skipped_samples"]] == [["4", "corrupt_image"], ["5", "corrupt_image"]]


def test_bad_video_and_audio_are_skipped_by_reason(tmp_path):
    video(tmp_path / "v" / "ok.mp4")
    full = video(tmp_path / "v" / "cut.mp4", num_frames=30).read_bytes()
    (tmp_path / "v" / "cut.mp4").write_bytes(full[: len(full) // 2])
    (tmp_path / "v" / "junk.mp4").write_bytes(os.urandom(2000))
    entries = [
        {"video": n, "question": "q?", "answer": "a"} for n in ("ok.mp4", "cut.mp4", "junk.mp4", "nope.mp4")
    ]
    entries.append({"video": "ok.mp4"})  # no question
    ann = dump(tmp_path / "qa.json", entries)
    args = ["--source", "msrvtt_qa", "--annotations", ann, "--media-root", tmp_path / "v", "--split", "test"]
    assert run_build(*args, "--out", tmp_path / "vo", "--max-skip-fraction", 1) == 0
    manifest, _ = read_split(tmp_path / "vo")
    assert manifest["num_samples"] == 1
    assert manifest["skipped"] == {"unreadable_video": 2, "missing_media": 1, "malformed_record": 1}

    wav(tmp_path / "a" / "ok.wav")
    (tmp_path / "a" / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    wav(tmp_path / "a" / "tiny.wav", seconds=0.01)  # shorter than one 25 ms frame
    csv = tmp_path / "test.csv"
    rows = ["audiocap_id,youtube_id,start_time,caption"] + [
        f"{i},{y},0,a sound" for i, y in enumerate(["ok", "bad", "tiny", "gone"])
    ]
    csv.write_text("\n".join(rows) + "\n")
    args = ["--source", "audiocaps", "--annotations", csv, "--media-root", tmp_path / "a", "--split", "test"]
    assert run_build(*args, "--out", tmp_path / "ao", "--max-skip-fraction", 1) == 0
    manifest, _ = read_split(tmp_path / "ao")
    assert manifest["num_samples"] == 1 and manifest["skipped"] == {"unreadable_audio": 2, "missing_media": 1}


def test_exit_codes_skip_threshold_and_unreadable_annotations(tmp_path, capsys):
    root = tmp_path / "media"
    for i in range(9):
        jpeg(root / f"{i}.jpg", size=(16, 16))
    ann = _karpathy(tmp_path, [f"{i}.jpg" for i in range(9)] + ["missing.jpg"])
    args = [
        "--source",
        "coco_karpathy",
        "--annotations",
        ann,
        "--media-root",
        root,
        "--split",
        "val",
        "--out",
        tmp_path / "out",
    ]
    assert run_build(*args) == 3  # 10% skipped > the default 5%
    assert "--max-skip-fraction" in capsys.readouterr().err
    assert not (tmp_path / "out" / schema.MANIFEST).exists()
    assert run_build(*args, "--max-skip-fraction", 0.1) == 0  # resumes: the shards are already done
    assert (tmp_path / "out" / schema.MANIFEST).exists()

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    assert (
        run_build(
            "--source", "coco_karpathy", "--annotations", broken, "--split", "val", "--out", tmp_path / "x"
        )
        == 2  # bad input: annotations that cannot be parsed
    )
    assert str(broken) in capsys.readouterr().err
    assert (
        run_build(
            "--source",
            "gqa",
            "--annotations",
            tmp_path / "absent.json",
            "--split",
            "val",
            "--out",
            tmp_path / "x",
        )
        == 2  # bad input: a missing annotation file
    )
    assert "absent.json" in capsys.readouterr().err


def _dataset(tmp_path: Path, n: int) -> list[str]:
    root = tmp_path / "media"
    for i in range(n):
        jpeg(root / f"{i}.jpg", size=(320, 240), seed=i)
    ann = _karpathy(tmp_path, [f"{i}.jpg" for i in range(n)])
    return [
        "--source",
        "coco_karpathy",
        "--annotations",
        str(ann),
        "--media-root",
        str(root),
        "--split",
        "val",
    ]


def test_two_builds_give_identical_bytes_whatever_the_worker_count(tmp_path):
    args = _dataset(tmp_path, 12) + ["--samples-per-shard", "5", "--image-size", "64"]
    assert run_build(*args, "--out", tmp_path / "a", workers=1) == 0
    assert run_build(*args, "--out", tmp_path / "b", workers=2) == 0
    a = hashes(tmp_path / "a")
    assert len(a) == 4 and a == hashes(tmp_path / "b")  # 3 shards + manifest


def test_changed_options_rebuild_stale_shards(tmp_path):
    args = _dataset(tmp_path, 6)
    assert run_build(*args, "--out", tmp_path / "o", "--samples-per-shard", "2", "--image-size", "32") == 0
    assert run_build(*args, "--out", tmp_path / "o", "--samples-per-shard", "4", "--image-size", "48") == 0
    assert run_build(*args, "--out", tmp_path / "ref", "--samples-per-shard", "4", "--image-size", "48") == 0
    assert hashes(tmp_path / "o") == hashes(tmp_path / "ref")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        p.name for p in (tmp_path / "ref").iterdir()
    )


@pytest.mark.timeout(120)
def test_killed_build_resumes_to_identical_bytes(tmp_path):
    n = 60
    args = _dataset(tmp_path, n) + ["--samples-per-shard", "1", "--image-size", "200", "--no-progress"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_build(*args, "--out", ref, workers=2) == 0
    cmd = [sys.executable, "-m", "data_shards.build", *args, "--out", str(out), "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / schema.done_record_name(schema.shard_name("val", 0))
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = list(out.glob("*.tar.json"))
    assert 0 < len(finished) < n, "the build was not interrupted part way"
    assert not (out / schema.MANIFEST).exists()
    for done in finished:  # every done-record has its complete shard; partial work is only *.tmp
        assert (out / json.loads(done.read_text())["name"]).stat().st_size == json.loads(done.read_text())[
            "bytes"
        ]
    time.sleep(0.5)  # let orphaned pool workers notice their parent is gone
    assert run_build(*args, "--out", out, workers=2) == 0
    assert hashes(out) == hashes(ref) and len(hashes(ref)) == n + 1
    assert not list(out.glob("*.tmp"))
