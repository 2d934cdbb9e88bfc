"""Shards are untrusted: pickle members are never run; cached features are checked and used without media."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from epalm.data import collate
from epalm.data.loader import DatasetSpec, LoaderSettings, build_train_loader
from epalm.data.stream import UnsafeMemberError
from testing.shard_fixtures import npy_bytes, write_dataset

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


FINGERPRINT = {
    "encoder": "vit_tiny",
    "weights_hash": "0123abcd",
    "layers": 6,
    "preprocessing": "clip",
    "image_size": 16,
}


class Payload:
    """Unpickling this creates the file `path`: proof that something ran the pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def poisoned(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps(Payload(str(target)))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(str(control))))
    assert control.exists(), "the payload must be live for the test to mean anything"
    evil = {"pyd": payload, "pickle": payload, "pth": payload, "jpg.pt": payload}
    root = write_dataset(tmp_path / "shards", [6, 6], extra={2: evil, 9: {"pyd": payload}})
    return root, target


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle shard data")

    for module, name in [(pickle, "loads"), (pickle, "load"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)


def test_pickle_member_refused_by_default(poisoned, tiny_tokenizer, no_unpickling):
    root, target = poisoned
    loader = build_train_loader(
        [DatasetSpec(root, "qa", "image")],
        tiny_tokenizer,
        LoaderSettings(batch_size=2, rank=0, world_size=1, image_size=16),
    )
    with pytest.raises(UnsafeMemberError, match=r"s0000[29]\.(pyd|pickle|pth|jpg\.pt)"):
        list(loader)
    assert not target.exists()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pickle_member_skipped_when_asked(poisoned, tiny_tokenizer, no_unpickling, num_workers):
    root, target = poisoned
    loader = build_train_loader(
        [DatasetSpec(root, "qa", "image")],
        tiny_tokenizer,
        LoaderSettings(
            batch_size=2, rank=0, world_size=1, num_workers=num_workers, image_size=16, unsafe_members="skip"
        ),
    )
    keys = {k for batch in loader for k in batch["keys"]}
    # the poisoned samples still train from their safe json + jpg; only the foreign members are dropped
    assert {"s00002", "s00009"} <= keys and len(keys) == 12
    assert not target.exists()


def test_object_npy_is_not_unpickled(tmp_path, tiny_tokenizer):
    target = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(str(target))], dtype=object), allow_pickle=True)
    # a safe-looking name with a pickled object array inside: numpy must refuse it
    root = write_dataset(tmp_path / "bad", [4], features=(6, 8), extra={1: {"feats.npy": buf.getvalue()}})
    spec = DatasetSpec(root, "qa", "image", use_features=True)
    loader = build_train_loader(
        [spec], tiny_tokenizer, LoaderSettings(batch_size=4, rank=0, world_size=1, image_size=16)
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        list(loader)
    assert not target.exists()


@pytest.fixture
def features_dir(tmp_path):
    return write_dataset(tmp_path / "feats", [5, 5], features=(6, 8), fingerprint=FINGERPRINT)


def test_fingerprint_mismatch_is_a_clear_error(features_dir, tiny_tokenizer):
    wrong = FINGERPRINT | {"weights_hash": "ffff0000", "layers": 12}
    spec = DatasetSpec(features_dir, "qa", "image", use_features=True, expected_fingerprint=wrong)
    with pytest.raises(ValueError, match="fingerprint") as err:
        build_train_loader([spec], tiny_tokenizer, LoaderSettings(batch_size=2, rank=0, world_size=1))
    assert "weights_hash" in str(err.value) and "layers" in str(err.value)


def test_features_without_fingerprint_refused(tmp_path, tiny_tokenizer):
    root = write_dataset(tmp_path / "plain", [4])  # no features, fingerprint null
    spec = DatasetSpec(root, "qa", "image", use_features=True, expected_fingerprint=FINGERPRINT)
    with pytest.raises(ValueError, match="no cached features"):
        build_train_loader([spec], tiny_tokenizer, LoaderSettings(batch_size=2, rank=0, world_size=1))


def test_feature_batches_have_encoder_states_and_no_media(features_dir, tiny_tokenizer, monkeypatch):
    def no_decode(data):
        raise AssertionError("media decoded although cached features were asked for")

    monkeypatch.setattr(collate, "decode_image", no_decode)
    spec = DatasetSpec(features_dir, "qa", "image", use_features=True, expected_fingerprint=FINGERPRINT)
    loader = build_train_loader([spec], tiny_tokenizer, LoaderSettings(batch_size=2, rank=1, world_size=2))
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert "media" not in batch
        states = batch["encoder_states"]
        assert states.shape == (2, 6, 8) and states.dtype == torch.float32
        # feats.npy of sample i is filled with i
        assert [int(s[0, 0]) for s in states] == [int(k[1:]) for k in batch["keys"]]


def test_npy_bytes_round_trip():
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    assert np.array_equal(collate.decode_npy(npy_bytes(arr)), arr)
