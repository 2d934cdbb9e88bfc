"""The shard bytes: data_shards writes them with webdataset's TarWriter, deterministically (fixed metadata,
sorted members), and a user's own plain `wds.WebDataset` pipeline reads them, from disk and over HTTP."""

from __future__ import annotations

import io
import json
import tarfile

import webdataset as wds

from data_shards.writer import write_tar
from testing.shard_fixtures import jpeg_bytes
from tests.remote_fixtures import serve

SAMPLES = [
    (
        f"{i:09d}",
        {"json": json.dumps({"id": i}).encode(), "jpg": jpeg_bytes(shade=10 * i), "frame000.jpg": b"x" * i},
    )
    for i in range(5)
]


def test_write_tar_is_deterministic_with_fixed_metadata(tmp_path):
    write_tar(tmp_path / "a.tar", SAMPLES)
    write_tar(tmp_path / "b.tar", list(SAMPLES))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [f"{k}.{e}" for k, m in SAMPLES for e in sorted(m)]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }
    # the same bytes as a plain tarfile writer given the same fixed metadata (what the builder wrote before)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in SAMPLES:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(members[ext]), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(members[ext]))
    assert ref.getvalue() == (tmp_path / "a.tar").read_bytes()


def test_plain_webdataset_reads_our_shards_from_disk_and_http(tmp_path):
    write_tar(tmp_path / "train-000000.tar", SAMPLES[:3])
    write_tar(tmp_path / "train-000001.tar", SAMPLES[3:])
    want = [(k, m["json"], m["jpg"]) for k, m in SAMPLES]
    local = [str(tmp_path / f"train-00000{i}.tar") for i in range(2)]
    with serve(tmp_path) as server:
        for urls in (local, [f"{server.url}/train-00000{i}.tar" for i in range(2)]):
            got = [(s["__key__"], s["json"], s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)]
            assert got == want
