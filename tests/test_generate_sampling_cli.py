"""`python -m epalm.cli.generate` sampling flags: a seed fixes the output, bad settings are an error (exit 2), and the
GPU generation check runs its CPU dry run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.test_eval_run import make_adapter
from tests.test_generate_cli import cli


@pytest.fixture(scope="module")
def adapter_and_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_cli")
    png = root / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)).save(png)
    return make_adapter(root), png


def test_seeded_sampling_is_reproducible(adapter_and_image, capsys):
    adapter, png = adapter_and_image
    base = [
        "--adapter",
        str(adapter),
        "--image",
        str(png),
        "--do-sample",
        "--top-k",
        "0",
        "--max-new-tokens",
        "8",
    ]
    outs = []
    for seed in ("1", "1", "2", "3"):
        code, out, err = cli(capsys, *base, "--seed", seed, "--temperature", "1.5")
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1]
    assert len(set(outs[1:])) > 1  # 8 tokens from ~300 at temperature 1.5: other seeds, other text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-1"], "top_k"),
        (["--num-beams", "3"], "num_beams=1"),
    ],
)
def test_bad_sampling_settings_are_an_error(adapter_and_image, capsys, flags, message):
    adapter, png = adapter_and_image
    code, _, err = cli(capsys, "--adapter", str(adapter), "--image", str(png), "--do-sample", *flags)
    assert code == 2 and message in err
