"""Exact resume: a loader rebuilt from `state_dict()` continues with exactly the batches that came next."""

from __future__ import annotations

import json

import pytest
import torch

from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
from testing.shard_fixtures import take, write_dataset

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]


TOTAL = 14  # batches compared: 2 epochs of 6, plus 2 into the third


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    a = write_dataset(root / "a", [9, 14, 5, 11], prefix="a")
    b = write_dataset(root / "b", [20, 12], prefix="b", task="caption")
    return DatasetSpec(a, "qa", "image"), DatasetSpec(b, "caption", "image", weight=0.5)


def make(specs, tokenizer, num_workers, **kw):
    args = dict(batch_size=3, rank=1, world_size=2, num_workers=num_workers, seed=7, image_size=16)
    return build_train_loader(list(specs), tokenizer, LoaderSettings(shuffle_buffer=4, **args | kw))


def resumed(specs, tokenizer, num_workers, k: int) -> tuple[list[dict], dict]:
    first = make(specs, tokenizer, num_workers)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = make(specs, tokenizer, num_workers, seed=123)  # the state's seed wins
    second.load_state_dict(state)
    return take(second, TOTAL - k), state


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_single_dataset(data, tiny_tokenizer, num_workers):
    specs = data[:1]
    reference = take(make(specs, tiny_tokenizer, num_workers), TOTAL)
    assert len({k for b in reference[:6] for k in b["keys"]}) == 18
    for k in (1, 3, 6, 7):  # odd k: the next batch comes from worker 1; 6: an epoch boundary
        rest, state = resumed(specs, tiny_tokenizer, num_workers, k)
        assert (state["epoch"], state["batch_in_epoch"]) == divmod(k, 6)
        assert [b["keys"] for b in rest] == [b["keys"] for b in reference[k:]], f"k={k}"
        # augmentation and answer draws are replayed too, not only the sample order
        assert torch.equal(rest[0]["media"], reference[k]["media"])
        assert torch.equal(rest[0]["input_ids"], reference[k]["input_ids"])


def test_resume_mixture_with_workers(data, tiny_tokenizer):
    reference = take(make(data, tiny_tokenizer, 2), TOTAL)
    names = [b["dataset"] for b in reference]
    assert set(names) == {"a", "b"}
    for k in (5, 9):
        rest, _ = resumed(data, tiny_tokenizer, 2, k)
        assert [b["keys"] for b in rest] == [b["keys"] for b in reference[k:]], f"k={k}"


def test_worker_count_zero_and_one_share_a_stream(data, tiny_tokenizer):
    keys = [[b["keys"] for b in take(make(data[:1], tiny_tokenizer, n), 6)] for n in (0, 1)]
    assert keys[0] == keys[1]


def test_topology_change_refused_or_restarts_next_epoch(data, tiny_tokenizer):
    loader = make(data[:1], tiny_tokenizer, 0)
    take(loader, 4)
    state = loader.state_dict()
    other = make(data[:1], tiny_tokenizer, 2)
    with pytest.raises(ValueError, match="num_workers 1 -> 2"):
        other.load_state_dict(state)
    other.load_state_dict(state, allow_topology_change=True)
    assert (other.epoch, other.state_dict()["batch_in_epoch"]) == (1, 0)
    with pytest.raises(ValueError, match="datasets"):
        make(data, tiny_tokenizer, 0).load_state_dict(state)
