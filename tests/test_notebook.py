"""notebooks/quickstart.ipynb runs top to bottom (nbclient, this venv's ipykernel) on a tiny real training run and
demo digit shards: its answers are the API's, it draws its figures, and the committed copy carries no outputs."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import pytest

from epalm.run import layout
from tests.test_eval_run import build_digit_shards
from tests.training_fixtures import ROOT, launch, write_setup

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
NUM_SAMPLES = 6


def test_committed_notebook_is_valid_and_stripped():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert all(not c.metadata for c in nb.cells)  # no collapsed/scrolled/execution timings either
    assert set(nb.metadata) == {"kernelspec", "language_info"}


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run trained for real (torchrun, 2 ranks; val metric logged, best/ kept) and demo digits test shards."""
    tmp = tmp_path_factory.mktemp("notebook")
    config = write_setup(tmp, max_steps=4, eval_every=2, save_every=2)
    r = launch(
        "torchrun", config, "--precision", "fp32", "--ds_config", str(ROOT / "ds_configs" / "zero0.json")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run", build_digit_shards(tmp / "data", {"digits_vqa": "test"}) / "digits_vqa" / "test"


def _shard_samples(shards: Path, n: int) -> list[tuple[dict, object]]:
    from PIL import Image

    from epalm.data import schema
    from epalm.data.stream import iter_range, load_manifest

    _, shard_list = load_manifest(shards)
    pieces = [(i, 0, count) for i, count in enumerate(shard_list.counts)]
    out = []
    for _, s in iter_range(shard_list, pieces, lambda m: m in (schema.JSON, schema.IMAGE)):
        image = Image.open(io.BytesIO(s.members[schema.IMAGE])).convert("RGB")
        out.append((json.loads(s.members[schema.JSON]), image))
        if len(out) == n:
            return out
    return out


def _text(cell) -> str:
    return "".join(
        o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"
    )


@pytest.mark.slow
@pytest.mark.distributed  # the run it reads is trained by torchrun on 2 ranks
@pytest.mark.timeout(600)
def test_notebook_runs_top_to_bottom_with_the_apis_answers(run_and_shards, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from epalm.api import Predictor
    from epalm.evaluation.report import read_jsonl

    run, shards = run_and_shards
    assert (run / layout.BEST).is_dir()  # the notebook's default adapter, the best one
    monkeypatch.setenv("EPALM_RUN_DIR", str(run))
    monkeypatch.setenv("EPALM_SHARDS", str(shards))
    monkeypatch.setenv("EPALM_NUM_SAMPLES", str(NUM_SAMPLES))
    for name in ("EPALM_ADAPTER", "EPALM_IMAGE", "EPALM_QUESTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the API's answers below are computed on the CPU too
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is ipykernel's kernel in the running interpreter: this venv's python
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) when a cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not any(o.output_type == "error" for o in c.outputs) for c in code)
    assert f"adapter: {run / layout.BEST}" in _text(code[0])

    # the answers the notebook printed are the API's, for the same held-out samples, question ids and truths
    predictor = Predictor.load(run / layout.BEST, device="cpu")
    samples = _shard_samples(shards, NUM_SAMPLES)
    expected = predictor.ask([image for _, image in samples], [meta["question"] for meta, _ in samples])
    answer_cell = next(c for c in code if "exact match:" in _text(c))
    rows = [line.split("\t") for line in _text(answer_cell).splitlines() if "\t" in line]
    assert [int(r[0]) for r in rows] == [meta["question_id"] for meta, _ in samples]
    assert [ast.literal_eval(r[2]) for r in rows] == expected
    assert [ast.literal_eval(r[3]) for r in rows] == [meta["multiple_choice_answer"] for meta, _ in samples]

    # figures: the results grid, both training curves, your own image
    figures = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) == 3
    records = read_jsonl(run / layout.METRICS)
    curves = next(c for c in code if "records in" in _text(c))
    assert f"{len(records)} records in" in _text(curves) and "validation metrics: ['accuracy']" in _text(
        curves
    )

    # "your own image": the first sample's original file, as the demo wrote it
    first = samples[0][0]
    original = shards.parents[1] / "raw" / "digits" / "images" / first["image_path"]
    own = next(c for c in code if "answer: " in _text(c))
    assert f"answer: {predictor.ask(original, first['question'])!r}" in _text(own)
    sampled = _text(code[-1]).splitlines()[-1].split(": ", 1)[1]
    assert ast.literal_eval(sampled) == predictor.ask(
        original, first["question"], do_sample=True, top_k=50, seed=0
    )
