"""The demo writes learnable tasks in the real formats with disjoint splits, and shards for every split."""

from __future__ import annotations

import csv
import json

import pytest

from data_shards import demo
from epalm.data import schema
from tests.fixtures_data import meta, read_split


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--out", str(out), "--workers", "1"]) == 0
    return out


def _disjoint(ids_by_split: dict[str, set]) -> None:
    assert all(ids_by_split[s] for s in demo.SPLITS)
    for a in demo.SPLITS:
        for b in demo.SPLITS:
            if a < b:
                assert not ids_by_split[a] & ids_by_split[b], f"{a} and {b} share ids"


def test_raw_splits_are_disjoint(demo_dir):
    raw = demo_dir / "raw"
    karpathy = json.loads((raw / "digits" / "dataset_coco.json").read_text())["images"]
    _disjoint({s: {im["cocoid"] for im in karpathy if im["split"] == s} for s in demo.SPLITS})
    vqa = {
        s: json.loads((raw / "digits" / f"v2_OpenEnded_mscoco_{s}_questions.json").read_text())
        for s in demo.SPLITS
    }
    _disjoint({s: {q["image_id"] for q in vqa[s]["questions"]} for s in demo.SPLITS})
    assert sum(len(v["questions"]) for v in vqa.values()) == 1797  # every digit, once
    _disjoint(
        {
            s: {e["video"] for e in json.loads((raw / "shapes" / f"msrvtt_qa_{s}.json").read_text())}
            for s in demo.SPLITS
        }
    )
    _disjoint(
        {
            s: {
                r["youtube_id"] for r in csv.DictReader((raw / "tones" / f"{s}.csv").read_text().splitlines())
            }
            for s in demo.SPLITS
        }
    )


@pytest.mark.parametrize("task", ["digits_caption", "digits_vqa", "shapes_qa", "tones_caption"])
def test_shards_exist_with_disjoint_ids_and_learnable_labels(demo_dir, task):
    media_ids, labels = {}, set()
    for split in demo.SPLITS:
        manifest, samples = read_split(demo_dir / "shards" / task / split)
        assert manifest["split"] == split and manifest["skipped"] == {} and len(manifest["shards"]) >= 2
        metas = [meta(s) for s in samples]
        media_ids[split] = {m.get("image_id", m.get("video_id", m.get("audio_id"))) for m in metas}
        for m, s in zip(metas, samples):
            labels.update(a["answer"] for a in m.get("answers", []))
            labels.update(
                w
                for c in m.get("captions", [])
                for w in c.split()
                if task == "tones_caption" and w in demo.PITCHES
            )
            assert {schema.IMAGE, schema.AUDIO, schema.frame_member(7)} & set(s)
    _disjoint(media_ids)
    expected = {
        "digits_vqa": set(demo.NUMBERS),
        "shapes_qa": set(demo.DIRECTIONS),
        "tones_caption": set(demo.PITCHES),
    }
    assert labels == expected.get(task, set())
