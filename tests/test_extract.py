"""data_shards.extract: the same feature shards as the builder's in-worker cache, whatever the world size;
resumable after kill -9 and SIGTERM (exit 75); encoder failures skipped and counted; training reads them."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_shards import extract
from epalm.data import schema
from epalm.distributed import free_port
from testing.support import cpu_child_env, fault_env
from tests.fixtures_data import dump, jpeg, read_split, run_build

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
TINY_VIT = "{depth: 3, embed_dim: 16, num_heads: 2, img_size: 16, patch_size: 8}"
NUM_IMAGES = 9  # 5 shards of 2, 2, 2, 2, 1: two ranks do not divide them


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Media shards, the builder's feature shards of the same records, and the encoder's run config."""
    t = tmp_path_factory.mktemp("extract")
    for i in range(NUM_IMAGES):
        jpeg(t / "img" / f"n{i}.jpg", size=(24 + 3 * i, 20), seed=i)
    questions = {str(i): {"imageId": f"n{i}", "question": "what?", "answer": "a"} for i in range(NUM_IMAGES)}
    ann = dump(t / "gqa.json", questions)
    (t / "enc.yaml").write_text(
        "model:\n  encoder: {kind: vit, name: vit_base_patch16_224, pretrained: false, num_states: 2, "
        f"config_overrides: {TINY_VIT}}}\ndata: {{image_size: 16, normalization: clip}}\n"
    )
    common = ["--source", "gqa", "--annotations", ann, "--media-root", t / "img", "--split", "val"]
    common += ["--image-size", 20, "--samples-per-shard", 2]
    assert run_build(*common, "--out", t / "media") == 0
    assert run_build(*common, "--out", t / "built", "--encoder", t / "enc.yaml") == 0
    return t


def run_extract(data: Path, out: Path, *more: str) -> int:
    argv = ["--shards", str(data / "media"), "--encoder", str(data / "enc.yaml"), "--out", str(out)]
    return extract.main([*argv, "--no-progress", *more])


def cli(data: Path, out: Path, *more: str, fault: str = "", torchrun: int = 0):
    args = ["-m", "data_shards.extract", "--shards", str(data / "media"), "--encoder", str(data / "enc.yaml")]
    args += ["--out", str(out), "--no-progress", "--workers", "1", *more]
    if torchrun:
        launcher = [str(ROOT / ".venv" / "bin" / "torchrun"), "--nproc_per_node", str(torchrun)]
        cmd = [*launcher, "--master_port", str(free_port()), *args]
    else:
        cmd = [PY, *args]
    env = cpu_child_env(**fault_env(fault))  # tests/fault_hook patches the tar writer
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def keys_of(out: Path) -> list[str]:
    manifest = json.loads((out / schema.MANIFEST).read_text())
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})
    return keys


@pytest.fixture(scope="module")
def one_rank(data) -> Path:
    out = data / "one_rank"
    assert run_extract(data, out, "--workers", "0") == 0  # workers 1+: the subprocess tests
    return out


def test_one_rank_is_byte_identical_to_the_builder_cache(data, one_rank):
    built = digests(data / "built")
    got = digests(one_rank)
    tars = [n for n in built if n.endswith(".tar")]
    assert len(tars) == 5 and {n: got[n] for n in tars} == {n: built[n] for n in tars}
    a = json.loads((data / "built" / schema.MANIFEST).read_text())
    b = json.loads((one_rank / schema.MANIFEST).read_text())
    assert b["args"].pop("extract") == {"batch_size": 16, "device": "cpu"}
    a["args"]["encoder"] = b["args"]["encoder"] = None  # the builder was given another spelling of the path
    assert a == b and b["fingerprint"]["layers"] == 2
    assert keys_of(one_rank) == [f"{i:09d}" for i in range(NUM_IMAGES)]


def test_bf16_features_within_bf16_rounding_of_fp32(data, one_rank):
    out = data / "bf16"
    assert run_extract(data, out, "--workers", "0", "--dtype", "bfloat16", "--batch-size", "3") == 0
    manifest, bf16 = read_split(out)
    _, fp32 = read_split(one_rank)
    assert manifest["fingerprint"]["encoder"].endswith(":bfloat16")
    for a, b in zip(fp32, bf16):
        fa, fb = (np.load(io.BytesIO(s[schema.FEATURES])).astype(np.float32) for s in (a, b))
        assert a[schema.IMAGE] == b[schema.IMAGE] and not np.array_equal(fa, fb)
        np.testing.assert_allclose(fb, fa, atol=0.1, rtol=0.05)  # bf16 keeps 8 bits of mantissa


def test_encoder_failures_are_skipped_and_counted_and_other_encoders_refused(data, one_rank, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for p in (data / "media").iterdir():
        (media / p.name).write_bytes(p.read_bytes())
    with (
        tarfile.open(data / "media" / "val-000001.tar") as src,
        tarfile.open(media / "val-000001.tar", "w") as dst,
    ):
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if m.name == "000000002.jpg":
                payload = b"not a jpeg"
            m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    argv = ["--shards", str(media), "--encoder", str(data / "enc.yaml"), "--no-progress", "--workers", "0"]
    assert extract.main([*argv, "--out", str(tmp_path / "out")]) == 3  # 1/9 > --max-skip-fraction 0.05
    assert not (tmp_path / "out" / schema.MANIFEST).exists()
    assert extract.main([*argv, "--out", str(tmp_path / "out"), "--max-skip-fraction", "0.2"]) == 0
    manifest = json.loads((tmp_path / "out" / schema.MANIFEST).read_text())
    assert manifest["skipped"] == {"encoder_error": 1}
    assert (manifest["num_samples"], manifest["num_records"]) == (NUM_IMAGES - 1, NUM_IMAGES)
    done = json.loads((tmp_path / "out" / "val-000001.tar.json").read_text())
    assert done["skipped_samples"][0][:2] == ["2", "encoder_error"]
    # the features of every other sample are those of the clean run
    assert digests(tmp_path / "out")["val-000002.tar"] == digests(one_rank)["val-000002.tar"]
    # a re-run into the same folder with another encoder (K=1) is refused, the shards stay
    before = digests(tmp_path / "out")
    assert extract.main([*argv, "--out", str(tmp_path / "out"), "--encoder-layers", "1"]) == 2
    assert {k: v for k, v in digests(tmp_path / "out").items() if k != schema.MANIFEST} == {
        k: v for k, v in before.items() if k != schema.MANIFEST
    }


def test_weights_that_differ_from_the_fingerprint_are_an_error(data):
    import torch

    from data_shards.features import check_weights, make_spec

    spec, encoder = make_spec(str(data / "enc.yaml"), 1, "image", 16, 8)
    check_weights(encoder, spec, "here")
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="here: encoder weights hash"):
        check_weights(encoder, spec, "here")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_under_torchrun_give_the_same_files(data, one_rank):
    out = data / "two_ranks"
    r = cli(data, out, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 rank(s)" in r.stdout
    assert digests(out) == digests(one_rank)  # tars, done-records and manifest
    keys = keys_of(out)
    assert len(keys) == len(set(keys)) == NUM_IMAGES  # every sample exactly once


@pytest.mark.slow
def test_kill9_then_sigterm_then_rerun_is_byte_identical(data, one_rank):
    out = data / "interrupted"
    r = cli(data, out, fault="extract_kill_in_shard:2")
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (out / schema.MANIFEST).exists() and list(out.glob("*.tmp"))
    assert len(list(out.glob("*.tar.json"))) == 1
    r = cli(data, out, fault="extract_sigterm_after_shard:1")
    assert r.returncode == extract.EXIT_REQUEUE, r.stderr[-3000:]
    assert "1 already done" in r.stdout and "stopped by a signal" in r.stdout
    assert not (out / schema.MANIFEST).exists() and 2 <= len(list(out.glob("*.tar.json"))) < 5
    r = cli(data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already done" in r.stdout and not list(out.glob("*.tmp"))
    assert digests(out) == digests(one_rank)


def _train(data: Path, shards: Path, run: Path) -> list[float]:
    from epalm.data.tokenizer_trainer import save_tokenizer
    from testing.support import tiny_tree
    from tests.training_fixtures import read_jsonl

    tok = data / "tok"
    if not tok.exists():
        save_tokenizer(["what? a"] * 40, tok, vocab_size=300)
    tree = tiny_tree()
    tree["model"]["encoder"] = yaml.safe_load((data / "enc.yaml").read_text())["model"]["encoder"]
    tree["model"]["lm"]["tokenizer"] = str(tok)
    tree["data"] = {"task": "qa", "modality": "image", "train": [{"path": str(shards)}], "image_size": 16,
                    "use_features": True, "num_workers": 0}  # fmt: skip
    tree["train"] = {"global_batch_size": 2, "micro_batch_size": 2, "max_steps": 3, "lr": 5e-2,
                     "prompt_lr": 5e-2, "warmup_steps": 1, "log_every": 1, "eval_every": 0, "save_every": 100}  # fmt: skip
    tree["run_dir"] = str(run)
    config = run.parent / f"{run.name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    cmd = [PY, "launch/train.py", "--config", str(config), "--precision", "fp32"]
    r = subprocess.run(cmd, cwd=ROOT, env=cpu_child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]


@pytest.mark.slow
def test_training_on_extracted_features_reaches_the_builders_loss(data, one_rank):
    extracted = _train(data, one_rank, data / "run_extracted")
    built = _train(data, data / "built", data / "run_built")
    assert len(extracted) == 3 and extracted == built


@pytest.mark.slurm
@pytest.mark.slow
def test_extract_sbatch_two_tasks_on_local_slurm(data, one_rank):
    from testing.slurm_cluster import SlurmCluster, install_slurm

    reason = install_slurm()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(cpus=2, gpus=2).start()
    try:
        out = data / "slurm_out"
        env = cpu_child_env(
            SHARDS=str(data / "media"), ENCODER=str(data / "enc.yaml"), OUT=str(out), PYTHON=PY,
            MASTER_PORT=str(free_port()),
        )  # fmt: skip
        options = (
            "--ntasks-per-node=2",
            "--gpus-per-node=2",
            "--cpus-per-task=1",
            f"--output={data}/slurm.out",
        )
        job = cluster.sbatch(ROOT / "launch/slurm/extract.sbatch", "--workers", "0", options=options, env=env)
        info = cluster.wait(job, timeout=300)
        log = (data / "slurm.out").read_text(errors="replace")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
        assert "2 tasks on 1 node(s)" in log and "on 2 rank(s)" in log
        assert digests(out) == digests(one_rank)
    finally:
        cluster.stop()
