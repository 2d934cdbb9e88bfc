"""Adapters by Hub id and portable exports: an export copies its small local frozen parts (tokenizer, encoder
checkpoint) in, so a copy moved elsewhere, the originals gone, gives the same logits and tokens; a large part
keeps its absolute path with a warning; an adapter that huggingface_hub itself downloaded into a cache (from a
stand-in Hub on 127.0.0.1) loads by `org/name` and `org/name@commit` with HF_HUB_OFFLINE=1, also as
`train.init_adapter` in the preflight checks."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml

from testing.support import TINY_VIT, cpu_child_env
from tests.hub_fixtures import write_timm_vit
from tests.test_eval_run import make_adapter

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny-adapter"
QUESTIONS = ["what digit is this?", "what is this?", "a handwritten digit"]


def outputs(ref: str | Path) -> tuple[torch.Tensor, list[list[int]]]:
    """(logits, greedy tokens) of the adapter `ref` on fixed random images and QUESTIONS."""
    from epalm.data.text import format_qa, tokenize
    from epalm.evaluation.decoding import Decoding, generate
    from epalm.evaluation.predict import load_eval_model

    model, tok, cfg = load_eval_model(ref)
    media = torch.randn(
        len(QUESTIONS),
        3,
        cfg.data.image_size,
        cfg.data.image_size,
        generator=torch.Generator().manual_seed(0),
    )
    ids, mask = tokenize(tok, [format_qa(q, None, tok.eos_token) for q in QUESTIONS], padding_side="left")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, media=media).logits
    tokens = generate(
        model,
        ids,
        mask,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        media=media,
        decoding=Decoding(num_beams=1, max_new_tokens=6),
    )
    return logits, tokens.tolist()


def tiny_adapter(root: Path) -> Path:
    """`make_adapter` with a pretrained encoder read from a local timm checkpoint file (seed 7: not the
    random init), so both the tokenizer and the encoder are local frozen parts."""
    vit = write_timm_vit(root / "weights" / "vit_tiny.safetensors", seed=7)
    encoder = {
        "kind": "vit",
        "name": "vit_base_patch16_224",
        "pretrained": True,
        "checkpoint": str(vit),
        "num_states": 2,
        "config_overrides": dict(TINY_VIT),
    }
    return make_adapter(root, encoder=encoder)


def test_a_copied_export_loads_without_the_originals_and_answers_the_same(tmp_path):
    from epalm.run.adapter import load_adapter

    adapter = tiny_adapter(tmp_path / "train")
    model = yaml.safe_load((adapter / "config.yaml").read_text())["model"]
    assert model["lm"]["tokenizer"] == "./frozen/tokenizer"
    assert model["encoder"]["checkpoint"] == "./frozen/encoder_checkpoint/vit_tiny.safetensors"
    assert str(tmp_path) not in yaml.safe_dump(model)  # the model section names nothing outside the export
    logits, tokens = outputs(adapter)

    moved = tmp_path / "elsewhere" / "shared_adapter"
    shutil.copytree(adapter, moved)
    shutil.rmtree(tmp_path / "train")  # tokenizer, encoder weights and the original export, all gone
    _, cfg = load_adapter(moved)
    assert cfg.model.lm.tokenizer == str(moved / "frozen" / "tokenizer")
    assert cfg.model.encoder.checkpoint == str(
        moved / "frozen" / "encoder_checkpoint" / "vit_tiny.safetensors"
    )
    moved_logits, moved_tokens = outputs(moved)
    assert torch.equal(logits, moved_logits) and moved_tokens == tokens


def test_a_large_local_part_keeps_its_absolute_path_with_a_warning(tmp_path, monkeypatch, caplog):
    from epalm.run import adapter as adapter_module

    monkeypatch.setattr(adapter_module, "PORTABLE_MAX_BYTES", 1000)  # the tokenizer is a few kB
    monkeypatch.setattr(adapter_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="epalm.run.adapter"):
        adapter = make_adapter(tmp_path)
    tokenizer = yaml.safe_load((adapter / "config.yaml").read_text())["model"]["lm"]["tokenizer"]
    assert tokenizer == str((tmp_path / "tok").resolve()) and not (adapter / "frozen").exists()
    assert "does not load on a machine without it" in caplog.text and str(tmp_path / "tok") in caplog.text


# --------------------------------------------------------------------------- a stand-in Hub on 127.0.0.1


def _git_oid(data: bytes) -> str:
    """A file's id on the Hub (non-LFS files): git's blob hash, which huggingface_hub names cache blobs by."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stand_in_hub(repo_id: str, folder: Path) -> tuple[ThreadingHTTPServer, str]:
    """The three Hub endpoints `snapshot_download` calls (revision info, tree listing, file resolve), serving
    `folder` as the one commit of `repo_id`; returns (server, commit sha). huggingface_hub ships no local Hub
    to test against, and a cache built by hand would test our idea of its layout rather than its own."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    commit = hashlib.sha1(json.dumps({k: _git_oid(v) for k, v in files.items()}).encode()).hexdigest()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            headers, body, code = {"Content-Type": "application/json"}, b"", 200
            if path.startswith(f"/api/models/{repo_id}/revision/"):
                body = json.dumps(
                    {"id": repo_id, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                )
            elif path.startswith(f"/api/models/{repo_id}/tree/"):
                tree = [
                    {"type": "file", "oid": _git_oid(v), "size": len(v), "path": k} for k, v in files.items()
                ]
                body = json.dumps(tree)
            elif path.startswith(f"/{repo_id}/resolve/") and path.split("/", 5)[-1] in files:
                body = files[path.split("/", 5)[-1]]
                headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_oid(body)}"'}
            else:
                code, headers = 404, {"X-Error-Code": "RepoNotFound"}
            body = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, str, Path]:
    """(HF cache huggingface_hub filled by downloading REPO from the stand-in Hub, commit, local adapter)."""
    root = tmp_path_factory.mktemp("hub")
    adapter = tiny_adapter(root / "train")
    server, commit = stand_in_hub(REPO, adapter)
    cache = root / "cache"
    fill = f"from huggingface_hub import snapshot_download; print(snapshot_download({REPO!r}))"
    env = cpu_child_env(
        HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_CACHE=str(cache)
    )
    try:
        r = subprocess.run([sys.executable, "-c", fill], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == cache / "models--org--tiny-adapter" / "snapshots" / commit
    return cache, commit, adapter


def test_the_cache_is_huggingface_hubs_layout(hub_cache):
    cache, commit, adapter = hub_cache
    repo = cache / "models--org--tiny-adapter"
    assert (repo / "refs" / "main").read_text() == commit
    snapshot = repo / "snapshots" / commit
    files = sorted(str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()) == files
    for name in files:  # snapshot entries are links to content-addressed blobs
        link = snapshot / name
        assert link.is_symlink() and link.resolve().parent == repo / "blobs"
        assert link.resolve().name == _git_oid((adapter / name).read_bytes())


OFFLINE_SCRIPT = """
import json, sys
from tests.test_hub_adapters import outputs
from epalm.config import ConfigError
from epalm.preflight import build_run_config
from testing.support import tiny_tree
result = {}
for ref in sys.argv[1:3]:
    logits, tokens = outputs(ref)
    result[ref] = {"tokens": tokens, "logits_sum": logits.double().sum().item()}
tree = tiny_tree()
tree["run_dir"] = sys.argv[3]
for ref in (sys.argv[1], "org/not-cached"):
    try:
        build_run_config(tree, [f"train.init_adapter={ref}"], paths=True)
        result["preflight " + ref] = "ok"
    except ConfigError as e:
        result["preflight " + ref] = [p for p in e.problems if p.startswith("train.init_adapter")]
print(json.dumps(result))
"""


def test_an_adapter_loads_by_hub_id_offline_from_the_cache(hub_cache, tmp_path):
    cache, commit, adapter = hub_cache
    logits, tokens = outputs(adapter)
    env = cpu_child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    refs = [REPO, f"{REPO}@{commit}"]
    r = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, *refs, str(tmp_path / "run")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for ref in refs:
        assert result[ref]["tokens"] == tokens, ref
        assert (
            result[ref]["logits_sum"] == logits.double().sum().item()
        )  # bit-equal logits (JSON keeps a float)
    assert result[f"preflight {REPO}"] == "ok"
    (problem,) = result["preflight org/not-cached"]
    assert problem.startswith("train.init_adapter: org/not-cached: not a local directory, and the Hub repo")


def test_the_generate_cli_takes_a_hub_id(hub_cache, tmp_path):
    from PIL import Image

    cache, _, adapter = hub_cache
    image = tmp_path / "digit.png"
    Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3).save(image)
    env = cpu_child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    answers = []
    for ref in (str(adapter), REPO):
        cmd = [sys.executable, "-m", "epalm.cli.generate", "--adapter", ref, "--image", str(image)]
        r = subprocess.run(
            [*cmd, "--question", "what digit is this?"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        answers.append(r.stdout)
    assert answers[0] == answers[1] and answers[0].strip()


def test_a_missing_adapter_is_one_clear_error(tmp_path):
    from epalm.run.adapter import load_adapter

    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        load_adapter(tmp_path / "nope" / "deeper")
    with pytest.raises(FileNotFoundError, match="org/never-pushed: not a local directory"):
        load_adapter("org/never-pushed")  # HF_HUB_OFFLINE=1 in tests: the cache has no such repo
