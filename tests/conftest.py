"""Pytest fixtures: tiny, random, offline models shared by the tests. Nothing downloads.

Only fixtures and hooks live here; the constants and helpers that test modules import are in testing/support.py.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from epalm.config import build_config  # noqa: E402
from testing.support import tiny_tree  # noqa: E402


@pytest.fixture(name="one_torch_thread")
def _one_torch_thread():
    """One intra-op thread for the test (opt in: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    from testing.shard_fixtures import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture
def tiny_config():
    return build_config(tiny_tree())


@pytest.fixture
def tiny_model(tiny_config):
    from epalm.model.epalm import build_model

    torch.manual_seed(0)
    return build_model(tiny_config.model)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from epalm.data.text import build_tokenizer
    from epalm.data.tokenizer_trainer import save_tokenizer

    texts = [
        "what digit is this?",
        "a handwritten digit seven",
        "zero one two three four five six eight nine",
    ]
    path = save_tokenizer(texts * 20, tmp_path_factory.mktemp("tok"), vocab_size=300)
    return build_tokenizer(str(path))
