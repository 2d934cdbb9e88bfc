"""Every command line fails one way on bad input: exit 2, exactly one stderr line starting `error: ` that
names the problem (a config's problems may follow it, indented), and never a traceback. argparse's own usage
errors exit 2 in argparse's two-line form (`usage: ...`, then `<prog>: error: ...`); that form is accepted for
them only. Each case runs the command as a user would: a child process, started outside the repository.
Every option of every command also has help text, shown with its default."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from unittest import mock

import pytest

from epalm.cli.common import HelpFormatter
from testing.shard_fixtures import jpeg_bytes, write_dataset
from testing.support import ROOT, cpu_child_env
from tests.test_eval_run import make_adapter
from tests.training_fixtures import write_setup

PY = sys.executable
SHIPPED = ROOT / "launch" / "configs" / "image" / "vqa_v2.yaml"  # the LM's depth is known offline


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """Good inputs to spoil one at a time, and the bad ones: all small, written once."""
    root = tmp_path_factory.mktemp("cli_errors")
    d = SimpleNamespace(
        root=root, missing=root / "missing", config=write_setup(root / "setup"), shipped=SHIPPED
    )
    d.adapter = make_adapter(root / "model")
    d.bad_adapter = root / "bad_adapter"  # an export whose weights file is not safetensors
    d.bad_adapter.mkdir()
    shutil.copy(d.adapter / "config.yaml", d.bad_adapter / "config.yaml")
    (d.bad_adapter / "adapter.safetensors").write_bytes(b"these are not tensors")
    d.shards = write_dataset(root / "shards", [2], task="qa", modality="image")
    d.images = root / "images"
    d.images.mkdir()
    d.image = d.images / "cat.jpg"
    d.image.write_bytes(jpeg_bytes())
    d.bad_json = root / "bad.json"
    d.bad_json.write_text('{"images": [')
    d.annotations = root / "dataset_coco.json"
    image = {
        "filepath": "",
        "filename": "cat.jpg",
        "split": "val",
        "cocoid": 1,
        "sentences": [{"raw": "a cat"}],
    }
    d.annotations.write_text(json.dumps({"images": [image]}))
    d.a_file = root / "a_file"
    d.a_file.write_text("not a directory")
    d.empty = root / "empty"
    d.empty.mkdir()
    d.bad_run = root / "bad_run"
    d.bad_run.mkdir()
    (d.bad_run / "config.yaml").write_text("run_dir: [unclosed\n")
    d.garbage_checkpoint = root / "garbage.pth"
    d.garbage_checkpoint.write_bytes(b"\x80\x02 not a pickle at all")
    d.cwd = root / "elsewhere"  # outside the repository, as an installed command would run
    d.cwd.mkdir()
    return d


# How each case's first word runs; any other first word is a module run with `python -m`.
COMMANDS = {
    "train": [PY, str(ROOT / "launch" / "train.py")],  # every launcher starts it; epalm-train runs its main
    "supervise": [PY, str(ROOT / "launch" / "supervise.py")],
    "eval.run": [PY, "-m", "eval.run", "--no-progress"],
    "data_shards.build": [PY, "-m", "data_shards.build", "--no-progress"],
}
KARPATHY = "--source coco_karpathy --split val --out {root}/b --annotations"
EXTRACT = "data_shards.extract --encoder {config} --out {root}/x --shards"
OFFICIAL = "epalm.cli.official --out {root}/o --checkpoint"
VQA = "--config {shipped}"
# (id, command: whitespace-separated words with {placeholders} for the `files` fixture, what the error names)
CASES = [
    ("train-missing-config", "train --config {missing}/c.yaml", "file not found"),
    ("train-bad-overrides", "train --config {config} train.lr=abc nope.key=1", "train.lr|nope: unknown key"),
    ("train-missing-ds-config", "train --config {config} --ds_config {missing}/ds.json", "DeepSpeed config"),
    ("supervise-no-command", "supervise", "no launcher command"),
    ("supervise-unknown-launcher", "supervise no-such-launcher --nproc 2", "no-such-launcher"),
    ("eval-run-missing-adapter", "eval.run --adapter {missing} --shards {shards} --task vqav2", "missing"),
    (
        "eval-run-unreadable-adapter",
        "eval.run --adapter {bad_adapter} --shards {shards} --task vqav2",
        "bad_adapter",
    ),
    (
        "eval-run-bad-override",
        "eval.run --adapter {adapter} --shards {shards} --task vqav2 train.lr=abc",
        "train.lr",
    ),
    ("eval-run-missing-shards", "eval.run --adapter {adapter} --shards {missing} --task vqav2", "--shards"),
    (
        "eval-run-wrong-task",
        "eval.run --adapter {adapter} --shards {shards} --task caption",
        "--task caption",
    ),
    (
        "eval-vqa-missing-file",
        "eval.vqa --predictions {missing}/p.json --questions {bad_json} --annotations {bad_json}",
        "p.json: no such file",
    ),
    (
        "eval-vqa-bad-json",
        "eval.vqa --predictions {bad_json} --questions {bad_json} --annotations {bad_json}",
        "not valid JSON",
    ),
    (
        "eval-caption-missing-file",
        "eval.caption --no-spice --predictions {missing}/p.json --references {bad_json}",
        "p.json: no such file",
    ),
    (
        "eval-qa-missing-file",
        "eval.qa --predictions {missing}/p.json --references {bad_json}",
        "p.json: no such file",
    ),
    ("build-missing-annotations", f"data_shards.build {KARPATHY} {{missing}}/ann.json", "ann.json"),
    ("build-unparseable-annotations", f"data_shards.build {KARPATHY} {{bad_json}}", "bad.json"),
    (
        "build-missing-media-root",
        f"data_shards.build {KARPATHY} {{annotations}} --media-root {{missing}}",
        "--media-root",
    ),
    ("extract-missing-shards", f"{EXTRACT} {{missing}}", "--shards"),
    ("extract-unreadable-shards", f"{EXTRACT} {{empty}}", "--shards"),
    ("demo-out-under-a-file", "data_shards.demo --out {a_file}/demo", "--out"),
    ("describe-missing-config", "epalm.cli.describe {missing}/c.yaml", "file not found"),
    (
        "describe-bad-overrides",
        "epalm.cli.describe {shipped} train.lr=abc nope.key=1",
        "train.lr|nope: unknown",
    ),
    ("generate-missing-adapter", "epalm.cli.generate --adapter {missing} --image {image}", "missing"),
    (
        "generate-unreadable-adapter",
        "epalm.cli.generate --adapter {bad_adapter} --image {image}",
        "bad_adapter",
    ),
    ("generate-missing-image", "epalm.cli.generate --adapter {adapter} --image {missing}/x.jpg", "x.jpg"),
    (
        "generate-bad-override",
        "epalm.cli.generate --adapter {adapter} --image {image} train.lr=abc",
        "train.lr",
    ),
    ("official-missing-checkpoint", f"{OFFICIAL} {{missing}}/c.pth {VQA}", "c.pth"),
    ("official-unreadable-checkpoint", f"{OFFICIAL} {{garbage_checkpoint}} {VQA}", "garbage.pth"),
    (
        "official-missing-config",
        f"{OFFICIAL} {{garbage_checkpoint}} --config {{missing}}/c.yaml",
        "file not found",
    ),
    ("official-bad-override", f"{OFFICIAL} {{garbage_checkpoint}} {VQA} train.lr=abc", "train.lr"),
    ("report-missing-dir", "epalm.cli.report {missing}", "not a directory"),
    ("report-not-a-run-dir", "epalm.cli.report {empty}", "not a run directory"),
    ("report-unparseable-file", "epalm.cli.report {bad_run}", "cannot be parsed"),
]
INFER = "epalm.cli.infer --out {root}/answers.jsonl"
CASES += [
    ("infer-missing-adapter", f"{INFER} --adapter {{missing}} --inputs {{images}}", "missing"),
    ("infer-missing-inputs", f"{INFER} --adapter {{adapter}} --inputs {{missing}}/photos", "photos"),
    ("infer-unreadable-adapter", f"{INFER} --adapter {{bad_adapter}} --inputs {{images}}", "bad_adapter"),
]
# argparse's own usage errors: a missing required option, a value outside its choices
USAGE_CASES = [
    ("train-no-config", "train", "--config"),
    ("eval-run-unknown-task", "eval.run --adapter {adapter} --shards {shards} --task nope", "invalid choice"),
    ("build-unknown-source", f"data_shards.build {KARPATHY} {{annotations}} --source nope", "invalid choice"),
]


def check_bad_input(r: subprocess.CompletedProcess, text: str, usage_error: bool) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if usage_error:  # argparse: `usage: ...` lines, then exactly one `<prog>: error: ...`
        errors = [i for i, line in enumerate(lines) if ": error: " in line and not line.startswith(" ")]
        assert lines and lines[0].startswith("usage: "), r.stderr
    else:
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, f"want exactly one error line:\n{r.stderr}"
    # the message names the problem: on its line, or in the indented list a config's problems follow it with
    block = [lines[errors[0]]] + [line for line in lines[errors[0] + 1 :] if line.startswith("  ")]
    for part in text.split("|"):  # each problem the input has
        assert part in "\n".join(block), f"{part!r} not in the error:\n{r.stderr}"


def run_case(files: SimpleNamespace, command: str) -> subprocess.CompletedProcess:
    first, *rest = command.split()
    cmd = COMMANDS.get(first, [PY, "-m", first]) + [word.format(**vars(files)) for word in rest]
    return subprocess.run(
        cmd, cwd=files.cwd, env=cpu_child_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def outcomes(files) -> dict[str, subprocess.CompletedProcess]:
    """Every case run once, as many at a time as there are cores: each child spends seconds importing torch
    (one case selected with -k still runs them all)."""
    cases = CASES + USAGE_CASES
    with ThreadPoolExecutor(max(1, min(4, len(os.sched_getaffinity(0))))) as pool:
        done = pool.map(lambda case: run_case(files, case[1]), cases)
        return {case[0]: r for case, r in zip(cases, done)}


@pytest.mark.slow  # ~40 child processes, most of them importing torch: a minute or more on 2 cores
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, command, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(outcomes, name, command, text):
    check_bad_input(outcomes[name], text, usage_error=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, command, text", USAGE_CASES, ids=[c[0] for c in USAGE_CASES])
def test_usage_errors_are_argparse_s_and_exit_2(outcomes, name, command, text):
    check_bad_input(outcomes[name], text, usage_error=True)


def test_the_check_refuses_a_traceback_a_second_error_line_or_an_unnamed_problem():
    """The assertion itself: a config's problem list passes; each of the faults after it fails."""
    ok = subprocess.CompletedProcess([], 2, "", "error: x.yaml: 1 problem(s):\n  - train.lr: not a float\n")
    check_bad_input(ok, "train.lr", usage_error=False)
    for code, stderr in [
        (1, "error: train.lr\n"),  # exit 1
        (2, "Traceback (most recent call last):\nerror: train.lr\n"),
        (2, "error: train.lr\nerror: train.lr\n"),
        (2, "usage: p [-h]\np: error: train.lr\n"),  # argparse's form for our own error
        (2, "error: something else\n"),  # the problem not named
    ]:
        with pytest.raises(AssertionError):
            check_bad_input(subprocess.CompletedProcess([], code, "", stderr), "train.lr", usage_error=False)


# The modules whose main() parses each command's arguments (launch/train.py runs epalm.cli.train's).
MAINS = ["epalm.cli.train", "eval.run", "eval.vqa", "eval.caption", "eval.qa", "data_shards.build"]
MAINS += ["data_shards.extract", "data_shards.demo", "epalm.cli.describe", "epalm.cli.generate"]
MAINS += ["epalm.cli.official", "epalm.cli.report", "epalm.cli.infer", "epalm.cli.push", "epalm.cli.web_demo"]


class _Captured(Exception):
    pass


def parser_of(module_name: str) -> argparse.ArgumentParser:
    """The parser `main` builds, caught as it starts parsing (nothing after that runs)."""
    captured = {}

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(_Captured):
        importlib.import_module(module_name).main([])
    return captured["parser"]


@pytest.mark.parametrize("name", MAINS)
def test_every_option_has_help_that_shows_its_default(name):
    parser = parser_of(name)
    formatter = parser._get_formatter()
    # required: an option the parser insists on, alone or as one of a required either-or group
    required = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        what = f"{name}: {'/'.join(action.option_strings) or action.dest}"
        assert (action.help or "").strip(), f"{what} has no help text"
        if action.option_strings and not action.required and id(action) not in required:
            # "(default: ...)" appended by the formatter, or said in words where the default is not a value
            shown = "%(default)" in formatter._get_help_string(action) or "default" in action.help.lower()
            assert shown, f"{what}: --help does not say its default"
    assert issubclass(parser.formatter_class, HelpFormatter), f"{name}: use epalm.cli.common.HelpFormatter"
