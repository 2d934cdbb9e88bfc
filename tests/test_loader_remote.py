"""Shards anywhere: http(s) from a real server on 127.0.0.1, `pipe:` commands and S3 (moto) give the batches of
local disk, resume exactly, retry faults, fail naming the URL, keep a local cache, and never run a pickle."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from epalm.data import sources
from epalm.data.loader import DatasetSpec, LoaderSettings, build_eval_loader, build_train_loader
from epalm.data.sources import ShardReadError
from epalm.data.stream import UnsafeMemberError, load_manifest
from testing.shard_fixtures import take, write_dataset
from tests.remote_fixtures import s3_server, serve

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("remote") / "train", [9, 14, 7], prefix="a")


def make(path, tokenizer, **kw):
    args = dict(batch_size=3, rank=1, world_size=2, num_workers=0, seed=7, image_size=16, shuffle_buffer=4)
    return build_train_loader([DatasetSpec(path, "qa", "image")], tokenizer, LoaderSettings(**args | kw))


def same(a: list[dict], b: list[dict]) -> bool:
    return all(
        x["keys"] == y["keys"]
        and torch.equal(x["media"], y["media"])
        and torch.equal(x["input_ids"], y["input_ids"])
        for x, y in zip(a, b, strict=True)
    )


def pipe_of(root) -> str:
    return f"pipe:cat {root}/{sources.PLACEHOLDER}"


TOTAL = 8  # batches: 5 per epoch on each rank, so this crosses an epoch end


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_remote_batches_and_resume_equal_local(shards, tiny_tokenizer, kind, caplog):
    reference = take(make(shards, tiny_tokenizer), TOTAL)
    with serve(shards.parent) as server:
        path = f"{server.url}/train" if kind == "http" else pipe_of(shards)
        assert same(take(make(path, tiny_tokenizer), TOTAL), reference)
        first = make(path, tiny_tokenizer)
        take(first, 3)
        state = json.loads(json.dumps(first.state_dict()))
        second = make(path, tiny_tokenizer, seed=123)
        second.load_state_dict(state)
        with caplog.at_level(logging.INFO, logger="epalm.data.stream"):
            rest = take(second, TOTAL - 3)
        assert same(rest, reference[3:])
    # a stream cannot seek: the skip to the resume point is read, dropped and logged
    assert any("read and dropped" in r.getMessage() for r in caplog.records)


def test_http_500_twice_then_served_goes_on(shards, tiny_tokenizer):
    reference = take(make(shards, tiny_tokenizer), 5)
    with serve(shards.parent) as server:
        server.fail["train/train-000001.tar"] = 2
        got = take(make(f"{server.url}/train", tiny_tokenizer, retries=2), 5)
        assert server.requests["train/train-000001.tar"] >= 3
    assert same(got, reference)


def test_truncated_stream_fails_naming_url_and_sample(shards, tiny_tokenizer):
    size = (shards / "train-000000.tar").stat().st_size
    with serve(shards.parent) as server:
        server.truncate["train/train-000000.tar"] = size // 2
        url = f"{server.url}/train/train-000000.tar"
        # evaluation: every sample counts, so a shard that stays broken is an error naming it
        spec = DatasetSpec(f"{server.url}/train", "qa", "image")
        loader = build_eval_loader(
            spec, tiny_tokenizer, LoaderSettings(batch_size=4, rank=0, world_size=1, image_size=16, retries=1)
        )
        with pytest.raises(ShardReadError, match=r"read failed at sample \d+ after 2 tries") as err:
            list(loader)
        assert url in str(err.value)
        assert server.requests["train/train-000000.tar"] == 2
        # training: the rest of the shard is skipped and counted, and past max_skip_fraction the run stops
        loader = make(f"{server.url}/train", tiny_tokenizer, rank=0, world_size=1, retries=0)
        with pytest.raises(ValueError, match="max_skip_fraction") as err:
            take(loader, 10)
        assert url in str(err.value) and "shard_read_error" in str(err.value)


def test_missing_manifest_names_the_url(tmp_path, tiny_tokenizer):
    with serve(tmp_path) as server, pytest.raises(FileNotFoundError, match=rf"{server.url}/nothing/manifest"):
        make(f"{server.url}/nothing", tiny_tokenizer, retries=0)
    with pytest.raises(FileNotFoundError, match="manifest"):
        make(pipe_of(tmp_path / "nothing"), tiny_tokenizer, retries=0)


class Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_member_over_http_is_refused_never_run(tmp_path, tiny_tokenizer, monkeypatch):
    target = tmp_path / "pwned"
    payload = pickle.dumps(Payload(str(target)))
    root = write_dataset(tmp_path / "evil", [6], extra={3: {"pyd": payload}})
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("something unpickled shard data"))
    with serve(tmp_path) as server:
        loader = make(f"{server.url}/evil", tiny_tokenizer, rank=0, world_size=1, batch_size=2)
        with pytest.raises(UnsafeMemberError, match=r"s00003\.pyd.*data\.unsafe_members=skip"):
            take(loader, 3)
        loader = make(
            f"{server.url}/evil", tiny_tokenizer, rank=0, world_size=1, batch_size=2, unsafe_members="skip"
        )
        assert len({k for b in take(loader, 3) for k in b["keys"]}) == 6
    assert not target.exists() and root.is_dir()


def test_cache_dir_keeps_local_copies_for_later_epochs(shards, tiny_tokenizer, tmp_path):
    one = dict(rank=0, world_size=1)  # 10 batches an epoch, reading every shard
    reference = take(make(shards, tiny_tokenizer, **one), 20)
    with serve(shards.parent) as server:
        loader = make(f"{server.url}/train", tiny_tokenizer, cache_dir=str(tmp_path / "cache"), **one)
        got = take(loader, 10)  # epoch 0
        fetched = sum(v for k, v in server.requests.items() if k.endswith(".tar"))
        assert fetched == 3
        got += take(loader, 10)  # epoch 1: from the cache
        assert sum(v for k, v in server.requests.items() if k.endswith(".tar")) == fetched
    assert same(got, reference)
    cached = sorted(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    assert cached == sorted(p.stat().st_size for p in shards.glob("*.tar"))


def test_shard_names_from_a_manifest_cannot_escape_or_inject(tmp_path):
    root = write_dataset(tmp_path / "x", [2])
    manifest = json.loads((root / "manifest.json").read_text())
    for bad in ("../x/train-000000.tar", "a;touch pwned.tar", "$(id).tar"):
        manifest["shards"][0]["name"] = bad
        (root / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="not a plain relative file name"):
            load_manifest(pipe_of(root))


@pytest.mark.s3
def test_s3_through_fsspec_equals_local(shards, tiny_tokenizer, monkeypatch):
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        pytest.skip(
            f"moto[server] and s3fs are needed for the S3 test (pip install -r requirements.txt): {e}"
        )
    reference = take(make(shards, tiny_tokenizer), TOTAL)
    with s3_server() as endpoint:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(k, v)
        import boto3
        import fsspec

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="shards")
        for p in shards.iterdir():
            s3.upload_file(str(p), "shards", f"cc/train/{p.name}")
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}}
        try:
            first = make("s3://shards/cc/train", tiny_tokenizer)
            assert same(take(first, 3), reference[:3])
            second = make("s3://shards/cc/train", tiny_tokenizer)
            second.load_state_dict(first.state_dict())
            assert same(take(second, TOTAL - 3), reference[3:])
            # a missing object is found before training
            s3.delete_object(Bucket="shards", Key="cc/train/train-000002.tar")
            fsspec.filesystem("s3").invalidate_cache()
            with pytest.raises(ValueError, match="train-000002.tar: missing"):
                make("s3://shards/cc/train", tiny_tokenizer)
        finally:
            fsspec.config.conf.pop("s3", None)
