"""Bad shards: a missing or truncated shard is found before training; a sample that does not decode,
or the rest of a shard that fails mid-read, is skipped, counted and refilled, with equal batches and exact resume."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from epalm.config import build_config
from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
from epalm.data.stream import UnsafeMemberError, load_manifest
from testing.shard_fixtures import take, write_dataset
from tests.remote_fixtures import replace_member, truncate_half

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]


def record_sizes(root):
    """What data_shards writes: each shard's byte size and sha256 in the manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    for s in manifest["shards"]:
        data = (root / s["name"]).read_bytes()
        s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make(root, tokenizer, **kw):
    args = dict(batch_size=4, rank=0, world_size=2, num_workers=0, seed=3, image_size=16, shuffle_buffer=4)
    return build_train_loader([DatasetSpec(root, "qa", "image")], tokenizer, LoaderSettings(**args | kw))


def test_missing_or_truncated_shard_is_found_before_training(tmp_path, tiny_tokenizer):
    root = record_sizes(write_dataset(tmp_path / "d", [8, 8, 8]))
    truncate_half(root / "train-000001.tar")
    (root / "train-000002.tar").unlink()
    with pytest.raises(ValueError) as err:
        make(root, tiny_tokenizer)
    message = str(err.value)
    assert "train-000001.tar" in message and "truncated" in message
    assert "train-000002.tar: missing" in message


def test_replaced_shard_fails_the_checksum_when_asked(tmp_path, tiny_tokenizer):
    root = record_sizes(write_dataset(tmp_path / "d", [8, 8]))
    data = bytearray((root / "train-000000.tar").read_bytes())
    data[600] ^= 0xFF  # same size, other bytes
    (root / "train-000000.tar").write_bytes(bytes(data))
    make(root, tiny_tokenizer)  # sizes match: reading every byte is optional
    with pytest.raises(ValueError, match="train-000000.tar: sha256 differs"):
        make(root, tiny_tokenizer, verify_checksums=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_garbage_jpg_is_skipped_counted_refilled_and_resumes_exactly(
    tmp_path, tiny_tokenizer, num_workers, caplog
):
    root = write_dataset(tmp_path / "d", [10, 6, 8])
    replace_member(root / "train-000001.tar", "s00012.jpg", b"this is not a JPEG")
    # with 2 workers a share is 4 samples, and the refill (from the share's start) can meet the bad one again
    opts = dict(max_skip_fraction=0.5, num_workers=num_workers)
    per_rank = [make(root, tiny_tokenizer, rank=r, **opts) for r in (0, 1)]
    with caplog.at_level(logging.WARNING, logger="epalm.data.resumable"):
        runs = [take(loader, 9) for loader in per_rank]  # 3 epochs of 3 batches
    assert all(len(b["keys"]) == 4 for run in runs for b in run)  # every rank, every batch full
    skipped = sum(loader.skipped["corrupt_media"] for loader in per_rank)
    assert skipped >= 1 and sum(loader.skipped.total() for loader in per_rank) == skipped
    assert all("s00012" not in b["keys"] for run in runs for b in run)
    if num_workers == 0:  # worker processes log into their own handlers
        assert any(
            "train-000001.tar" in r.getMessage() and "s00012" in r.getMessage() for r in caplog.records
        )
    # resume at every position: the same skips happen in the same places
    rank = 0 if per_rank[0].skipped else 1
    reference = runs[rank]
    for k in range(1, 9) if num_workers == 0 else (2, 5):
        first = make(root, tiny_tokenizer, rank=rank, **opts)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        second = make(root, tiny_tokenizer, rank=rank, **opts)
        second.load_state_dict(state)
        rest = take(second, 9 - k)
        assert [b["keys"] for b in rest] == [b["keys"] for b in reference[k:]], k
        assert torch.equal(rest[0]["media"], reference[k]["media"])
        assert second.skipped == per_rank[rank].skipped
    assert (
        per_rank[rank].skip_metrics()["data/skipped/corrupt_media"] == per_rank[rank].skipped["corrupt_media"]
    )


def test_shard_failing_mid_read_is_skipped_with_its_remaining_samples(tmp_path, tiny_tokenizer):
    root = write_dataset(tmp_path / "d", [16, 16, 16])  # no sizes in the manifest: found only when read
    truncate_half(root / "train-000001.tar")
    loader = make(root, tiny_tokenizer, world_size=1, max_skip_fraction=0.4)
    batches = take(loader, 12)  # one epoch
    assert all(len(b["keys"]) == 4 for b in batches)
    lost = loader.skipped["shard_read_error"]
    assert 0 < lost < 16  # the samples after the cut; the whole ones before it are used
    with pytest.raises(ValueError, match=r"max_skip_fraction=0.1.*train-000001.tar"):
        take(make(root, tiny_tokenizer, world_size=1, max_skip_fraction=0.1), 12)


def test_invalid_json_manifest_names_the_file(tmp_path):
    root = write_dataset(tmp_path / "d", [2])
    (root / "manifest.json").write_text('{"num_samples": 2, "shards": [')
    with pytest.raises(ValueError, match=r"d/manifest.json: invalid JSON"):
        load_manifest(root)


def test_unsafe_members_is_a_config_key_and_the_message_names_it(tmp_path, tiny_tokenizer):
    assert build_config({"data": {"unsafe_members": "skip"}}).data.unsafe_members == "skip"
    root = write_dataset(tmp_path / "d", [4], extra={1: {"pyd": b"not even a pickle"}})
    with pytest.raises(UnsafeMemberError, match="data.unsafe_members=skip"):
        take(make(root, tiny_tokenizer, world_size=1, batch_size=2), 2)
