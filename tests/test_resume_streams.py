"""Exact resume on 2 ranks (torch.distributed, gloo) from the loader state rank 0 saves for everyone, as the
trainer does: shards read over http:// (a 500 twice on the way) with a garbage jpg skipped on one rank, then
resumed from `pipe:cat` or local paths, continue with the batches of an uninterrupted local run on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from epalm.data import schema
from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
from epalm.data.text import build_tokenizer
from testing.shard_fixtures import one_torch_thread, take, write_dataset
from tests.remote_fixtures import replace_member, serve
from tests.test_loader_remote import pipe_of, same

pytestmark = pytest.mark.timeout(300)
TOTAL = 12  # batches per rank: 8 an epoch, so the resumed run crosses an epoch end
BAD = "s00005"  # its jpg is garbage: skipped and counted on the rank that reads it


def make(path, tokenizer, rank: int, **kw):
    args = dict(batch_size=2, rank=rank, world_size=2, num_workers=0, seed=42, image_size=16)
    args |= dict(max_skip_fraction=0.2, retries=2)
    return build_train_loader([DatasetSpec(str(path), "qa", "image")], tokenizer, LoaderSettings(**args | kw))


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("streams") / "train", [16, 16])  # the training tests' layout
    replace_member(root / schema.shard_name("train", 0), f"{BAD}.jpg", b"not a JPEG at all")
    return root


def _rank(rank: int, tok_dir: str, root: str, url: str, k: int, num_workers: int, out: str) -> None:
    """One rank: k batches over HTTP, the state (rank 0 writes it), then a fresh loader resumes from it."""
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
    try:
        with one_torch_thread():
            tok = build_tokenizer(tok_dir)
            reference = take(make(root, tok, rank, num_workers=num_workers), TOTAL)
            first = make(url, tok, rank, num_workers=num_workers)
            assert same(take(first, k), reference[:k])
            state = first.state_dict()  # every rank calls it, as Trainer.save does
            if rank == 0:
                Path(out, "state.json").write_text(json.dumps(state))
            dist.barrier()
            saved = json.loads(Path(out, "state.json").read_text())  # rank 0's, as a checkpoint holds it
            skips = [first.skipped.total()] * 2
            dist.all_gather_object(skips, first.skipped.total())
            for path in (pipe_of(root), root):
                second = make(path, tok, rank, num_workers=num_workers, seed=123)  # the state's seed wins
                second.load_state_dict(saved)
                rest = take(second, TOTAL - k)
                assert same(rest, reference[k:]), (rank, path, [b["keys"] for b in rest])
                assert second.skipped == first.skipped, (rank, path)  # data/skipped is not counted twice
            if rank == 0:
                Path(out, "skips.json").write_text(json.dumps(skips))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_resumes_exactly_from_rank0_state(bad_shards, tiny_tokenizer, tmp_path):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    with serve(bad_shards.parent) as server:
        server.fail["train/train-000001.tar"] = 2  # retried, and reading goes on
        # a checkpoint after 6 batches (the trainer's step 3); 0 workers, as the training tests
        args = (str(tok_dir), str(bad_shards), f"{server.url}/train", 6, 0, str(tmp_path))
        mp.spawn(_rank, args=args, nprocs=2, join=True)
        assert server.requests["train/train-000001.tar"] >= 3
    # the case that matters: at the resume point one rank had skipped the bad sample and the other had not
    assert sorted(json.loads((tmp_path / "skips.json").read_text())) == [0, 1]


def test_state_without_a_ranks_skip_counts_is_refused(bad_shards, tiny_tokenizer):
    """Without torch.distributed a state holds its own rank's skips only: another rank cannot use it."""
    with one_torch_thread():
        first = make(bad_shards, tiny_tokenizer, 0)
        take(first, 4)
        assert first.skipped.total() == 1
        other = make(bad_shards, tiny_tokenizer, 1)
        with pytest.raises(ValueError, match="rank 1"):
            other.load_state_dict(json.loads(json.dumps(first.state_dict())))
