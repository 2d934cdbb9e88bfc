"""Bounded waits on remote shards (issue 25, item 2): a server that accepts and then sends nothing fails the
read within `read_timeout_s`, logged with the shard and the bytes read; a server restarted within
`retry_budget_s` is ridden through; the default budget outlasts a restart of a minute."""

from __future__ import annotations

import io
import logging
import threading
import time

import pytest

from epalm.data import remote_read, sources
from epalm.data.loader import DatasetSpec, LoaderSettings, build_eval_loader, build_train_loader
from epalm.data.remote_read import DEFAULT_LIMITS, ReadLimits
from epalm.data.sources import ShardReadError
from epalm.data.stream import load_manifest
from testing.shard_fixtures import take, write_dataset
from tests.remote_fixtures import ShardServer, serve
from tests.test_loader_remote import same

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]
SHARD = "train/train-000000.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stall") / "train", [6, 6], prefix="a")


def eval_loader(path, tokenizer, **kw):
    settings = LoaderSettings(batch_size=4, rank=0, world_size=1, image_size=16, **kw)
    return build_eval_loader(DatasetSpec(path, "qa", "image"), tokenizer, settings)


def train_loader(path, tokenizer, **kw):
    settings = LoaderSettings(
        batch_size=3, rank=0, world_size=1, seed=3, image_size=16, shuffle_buffer=4, **kw
    )
    return build_train_loader([DatasetSpec(path, "qa", "image")], tokenizer, settings)


def test_a_stalled_shard_fails_within_the_read_timeout_naming_shard_and_bytes(shards, tiny_tokenizer, caplog):
    with serve(shards.parent) as server:
        loader = eval_loader(f"{server.url}/train", tiny_tokenizer, read_timeout_s=2, retries=1)
        server.stall[SHARD] = 3000  # headers and 3000 bytes, then silence with the connection open
        start = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(ShardReadError) as err:
            list(loader)
        elapsed = time.monotonic() - start
        assert server.requests[SHARD] == 2  # the first try and one retry, each ended by the stall
    url = f"{server.url}/{SHARD}"
    assert 4 <= elapsed < 20, elapsed  # two stalls of 2 s (and a backoff), not forever
    assert f"{url}: read failed at sample 0 after 2 tries: no data for 2 s after 3000 bytes" in str(err.value)
    retry = [r.getMessage() for r in caplog.records if "retry 1" in r.getMessage()]
    assert retry and url in retry[0] and "no data for 2 s after 3000 bytes" in retry[0]


def test_a_manifest_whose_server_sends_nothing_fails_in_time(shards):
    with serve(shards.parent) as server:
        server.stall["train/manifest.json"] = None  # accepts the connection and never answers
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match=r"manifest\.json.*no data for 1 s after 0 bytes"):
            load_manifest(f"{server.url}/train", ReadLimits(read_timeout_s=1, retries=0))
        assert time.monotonic() - start < 10


def test_a_stalled_pipe_command_is_killed_and_its_shard_skipped_in_training(shards, tiny_tokenizer, tmp_path):
    """A `pipe:` reader that stops writing (here after 3000 bytes of the first shard) is bounded the same way;
    in training the shard's samples are then skipped and counted, so the run stops past max_skip_fraction."""
    marker = tmp_path / "still-running"
    tar = f"head -c 3000 {shards}/{{name}}; sleep 30; touch {marker}"  # 3000 bytes, then a silent reader
    command = f"pipe:if [ {{name}} = manifest.json ]; then cat {shards}/{{name}}; else {tar}; fi"
    loader = train_loader(command, tiny_tokenizer, read_timeout_s=1, retries=0, max_skip_fraction=0.0)
    start = time.monotonic()
    with pytest.raises(ValueError, match="max_skip_fraction") as err:
        take(loader, 4)
    assert time.monotonic() - start < 20
    assert "shard_read_error" in str(err.value) and "no data for 1 s" in str(err.value)
    time.sleep(0.5)
    assert not marker.exists()  # the whole command (its process group) was killed, not left sleeping


def test_a_server_restarted_within_the_budget_is_ridden_through(shards, tiny_tokenizer, caplog):
    reference = take(train_loader(shards, tiny_tokenizer), 4)
    server = ShardServer(shards.parent).__enter__()
    port = server.httpd.server_address[1]
    path = f"{server.url}/train"
    loader = train_loader(path, tiny_tokenizer, retry_budget_s=30)  # the manifest is read now
    server.__exit__()  # the server goes away mid-run (connections refused) and is back 3 s later
    restarted: list[ShardServer] = []
    timer = threading.Timer(3, lambda: restarted.append(ShardServer(shards.parent, port).__enter__()))
    timer.start()
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="epalm.data.stream"):
            got = take(loader, 4)
        assert time.monotonic() - start >= 2.5
    finally:
        timer.join()
        for s in restarted:
            s.__exit__()
    assert same(got, reference)
    assert any("retry 1" in r.getMessage() and path in r.getMessage() for r in caplog.records)

    # with a budget shorter than the outage the read fails, naming the shard
    server = ShardServer(shards.parent, port).__enter__()
    loader = train_loader(path, tiny_tokenizer, retry_budget_s=1, max_skip_fraction=0.0)
    server.__exit__()
    with pytest.raises(ValueError, match=rf"{path}/train-00000\d\.tar: read failed"):
        take(loader, 4)


class FakeClock:
    """time.monotonic and time.sleep of a clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(("outage", "rides_through"), [(60.0, True), (100.0, True), (200.0, False)])
def test_the_default_budget_outlasts_a_restart_of_a_minute(monkeypatch, outage, rides_through):
    clock = FakeClock()
    monkeypatch.setattr(sources, "time", clock)
    monkeypatch.setattr(remote_read, "time", clock)
    tries = []

    def fetch() -> bytes:
        tries.append(clock.now)
        if clock.now < outage:
            raise OSError("curl exited with 7: curl: (7) Failed to connect to 127.0.0.1: Connection refused")
        return b"ok"

    if rides_through:
        assert sources.with_retries(fetch, DEFAULT_LIMITS, "http://x/manifest.json") == b"ok"
        assert tries[-1] - outage <= 10  # found again within one backoff step (at most 10 s) of coming back
    else:
        with pytest.raises(OSError, match=r"after \d+ tries"):
            sources.with_retries(fetch, DEFAULT_LIMITS, "http://x/manifest.json")
        assert DEFAULT_LIMITS.retry_budget_s - 10 <= tries[-1] <= DEFAULT_LIMITS.retry_budget_s


def test_a_missing_file_is_not_retried_for_the_whole_budget(shards):
    """404 is an answer, not an outage: the default budget would otherwise make a typo wait two minutes."""
    with serve(shards.parent) as server:
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match="404"):
            load_manifest(f"{server.url}/nothing")
        assert time.monotonic() - start < 5 and server.requests["nothing/manifest.json"] == 1


def test_an_fsspec_store_that_stops_answering_is_bounded_too():
    """fsspec files (s3fs, gcsfs, ...) are read on a helper thread: a read or an `info` that blocks is
    abandoned after read_timeout_s. Here a registered test filesystem hangs after its first 5 bytes."""
    import fsspec
    from fsspec.spec import AbstractFileSystem

    from epalm.data.stream import ShardList, check_shards

    release = threading.Event()

    class Stuck(io.RawIOBase):
        sent = False

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if not self.sent:
                self.sent = True
                buffer[:5] = b"hello"
                return 5
            release.wait(60)
            return 0

    class StuckFS(AbstractFileSystem):
        protocol = "stuckstore"

        def _open(self, path, mode="rb", **kwargs):
            return Stuck()

        def info(self, path, **kwargs):
            release.wait(60)
            return {"name": path, "size": 5, "type": "file"}

    fsspec.register_implementation("stuckstore", StuckFS, clobber=True)
    limits = ReadLimits(read_timeout_s=1, retries=0)
    try:
        stream = sources.open_stream("stuckstore://bucket/train/x.tar", limits)
        start = time.monotonic()
        with pytest.raises(OSError, match="no data for 1 s after 5 bytes"):
            stream.read(100)
        sources.close_stream(stream, ok=False)
        shards = ShardList("stuckstore://bucket/train", ("x.tar",), (1,), (5,), limits=limits)
        with pytest.raises(ValueError, match=r"x\.tar: no answer \(no data for 1 s"):
            check_shards(shards)
        assert time.monotonic() - start < 10
    finally:
        release.set()
