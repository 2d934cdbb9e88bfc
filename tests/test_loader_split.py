"""The loader splits data over ranks and workers: disjoint, equal batch counts, whole epoch; eval sees all once."""

from __future__ import annotations

import pytest

from epalm.data.loader import (
    DatasetSpec,
    LoaderSettings,
    build_eval_loader,
    build_train_loader,
    eval_batches_per_rank,
)
from epalm.data.text import ANSWER_TOKEN
from testing.shard_fixtures import all_keys, write_dataset

COUNTS = [9, 14, 5, 11]  # 39 samples in uneven shards
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("qa"), COUNTS)


def epoch_keys(loader) -> list[list[str]]:
    return [batch["keys"] for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_disjoint_equal_and_whole_epoch(qa_dir, tiny_tokenizer, num_workers):
    spec = DatasetSpec(qa_dir, "qa", "image")
    per_rank = []
    for rank in (0, 1):
        loader = build_train_loader(
            [spec],
            tiny_tokenizer,
            LoaderSettings(batch_size=3, rank=rank, world_size=2, num_workers=num_workers, image_size=16),
        )
        batches = epoch_keys(loader)
        assert len(batches) == len(loader) == 39 // (2 * 3)
        assert all(len(b) == 3 for b in batches)
        per_rank.append([k for b in batches for k in b])
    a, b = (set(keys) for keys in per_rank)
    assert len(a) == len(per_rank[0]) and len(b) == len(per_rank[1]), "a sample repeated within a rank"
    assert not a & b
    # documented: the remainder 39 - 2 * 6 * 3 = 3 is dropped
    assert len(a | b) == 36 and (a | b) <= all_keys("s", 39)


def test_epochs_reshuffle_and_stay_disjoint(qa_dir, tiny_tokenizer):
    spec = DatasetSpec(qa_dir, "qa", "image")
    loaders = [
        build_train_loader(
            [spec],
            tiny_tokenizer,
            LoaderSettings(batch_size=3, rank=r, world_size=2, num_workers=2, image_size=16),
        )
        for r in (0, 1)
    ]
    first = [epoch_keys(ld) for ld in loaders]
    second = [epoch_keys(ld) for ld in loaders]
    assert first[0] != second[0]
    for epoch in (first, second):
        r0, r1 = ({k for b in batches for k in b} for batches in epoch)
        assert len(r0) == len(r1) == 18 and not r0 & r1
    assert [ld.epoch for ld in loaders] == [2, 2]


def test_fewer_shards_than_ranks_times_workers(tmp_path, tiny_tokenizer):
    root = write_dataset(
        tmp_path / "one", [25], task="caption"
    )  # 1 shard for 2 ranks x 2 workers: split by sample
    spec = DatasetSpec(root, "caption", "image")
    keys = []
    for rank in (0, 1):
        loader = build_train_loader(
            [spec],
            tiny_tokenizer,
            LoaderSettings(batch_size=2, rank=rank, world_size=2, num_workers=2, image_size=16),
        )
        batches = epoch_keys(loader)
        assert len(batches) == 6
        keys.append({k for b in batches for k in b})
    assert len(keys[0]) == len(keys[1]) == 12 and not keys[0] & keys[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_every_sample_once_left_padded(qa_dir, tiny_tokenizer, num_workers):
    spec = DatasetSpec(qa_dir, "qa", "image")
    sep = tiny_tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)
    seen = []
    for rank in (0, 1):
        loader = build_eval_loader(
            spec,
            tiny_tokenizer,
            LoaderSettings(batch_size=4, rank=rank, world_size=2, num_workers=num_workers, image_size=16),
        )
        batches = list(loader)
        assert len(batches) == len(loader) == eval_batches_per_rank(39, 2, 4)[rank]
        for batch in batches:
            assert "labels" not in batch
            assert batch["input_ids"][:, -1].eq(sep).all(), "left padding: every prompt ends with </a>"
            assert batch["attention_mask"][:, -1].eq(1).all()
            seen.extend(batch["keys"])
    assert sorted(seen) == sorted(all_keys("s", 39))


def test_eval_caption_prompt_is_bos_only(qa_dir, tiny_tokenizer):
    loader = build_eval_loader(
        DatasetSpec(qa_dir, "caption", "image"),
        tiny_tokenizer,
        LoaderSettings(batch_size=5, rank=0, world_size=1, image_size=16),
    )
    batch = next(iter(loader))
    assert batch["input_ids"].tolist() == [[tiny_tokenizer.bos_token_id]] * 5


def test_eval_more_workers_than_batches(qa_dir, tiny_tokenizer):
    loader = build_eval_loader(
        DatasetSpec(qa_dir, "qa", "image"),
        tiny_tokenizer,
        LoaderSettings(batch_size=32, rank=1, world_size=2, num_workers=2),
    )
    assert [len(b["keys"]) for b in loader] == [20]


def test_clear_errors_up_front(qa_dir, tiny_tokenizer):
    spec = DatasetSpec(qa_dir, "qa", "image")
    with pytest.raises(ValueError, match="no full batch"):
        build_train_loader([spec], tiny_tokenizer, LoaderSettings(batch_size=32, rank=0, world_size=2))
    with pytest.raises(ValueError, match="workers"):
        mix = [spec, DatasetSpec(qa_dir, "qa", "image", weight=0.5)]
        build_train_loader(
            mix, tiny_tokenizer, LoaderSettings(batch_size=8, rank=0, world_size=2, num_workers=4)
        )
    with pytest.raises(ValueError, match="rank"):
        build_train_loader([spec], tiny_tokenizer, LoaderSettings(batch_size=2, rank=2, world_size=2))
    with pytest.raises(ValueError, match="modality"):
        DatasetSpec(qa_dir, "qa", "smell")
