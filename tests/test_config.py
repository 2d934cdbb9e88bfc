"""Configs: one error listing every problem; every shipped YAML resolves; describe prints the paper's counts."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from epalm.config import ConfigError, build_config, gradient_accumulation_steps, load_config
from epalm.preflight import build_run_config
from testing.support import tiny_tree

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "launch" / "configs").rglob("*.yaml"))


def test_all_problems_reported_at_once():
    tree = tiny_tree()
    tree["model"]["adapter"]["colour"] = "blue"  # unknown key
    tree["model"]["lm"]["dtype"] = "float8"  # not a choice
    tree["train"] = {"lr": "fast"}  # wrong type
    with pytest.raises(ConfigError) as err:
        build_config(tree, ["eval.num_beams=three"])
    text = str(err.value)
    assert "4 problem(s)" in text
    for needle in (
        "model.adapter.colour: unknown key",
        "model.lm.dtype",
        "train.lr: expected float",
        "eval.num_beams",
    ):
        assert needle in text


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.encoder.num_states=6"], "cannot be spread"),  # 6 states into 4 layers
        (["model.adapter.end_layer=9"], "past the LM's depth"),
        (["model.adapter.start_layer=4", "model.adapter.end_layer=2"], "start_layer < end_layer"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "not a multiple"),
        (["train.log_every=0"], "train.log_every: must be positive"),
        (["train.save_every=-1"], "train.save_every: must be >= 0"),
    ],
)
def test_impossible_values(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_run_config(tiny_tree(), overrides)


def test_overrides_parse_yaml_values():
    cfg = build_config(
        tiny_tree(), ["train.lr=3e-4", "model.adapter.shared_connector=true", "train.max_steps=5"]
    )
    assert cfg.train.lr == 3e-4 and cfg.model.adapter.shared_connector and cfg.train.max_steps == 5


def test_config_is_frozen():
    cfg = build_config(tiny_tree())
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0


def test_batch_arithmetic():
    cfg = build_config(tiny_tree(), ["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert gradient_accumulation_steps(cfg.train, 2) == 4
    with pytest.raises(ConfigError, match="not divisible") as e:
        gradient_accumulation_steps(cfg.train, 3)
    assert "(train.global_batch_size=36 would divide)" in str(e.value)  # 32 is not a multiple of 3 ranks
    with pytest.raises(ConfigError) as e:
        gradient_accumulation_steps(cfg.train, 16)  # 2 samples per rank: a micro-batch of 4 cannot be
    assert "(train.micro_batch_size=2 divides it: 2 samples per rank and step)" in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "launch" / "configs")))
def test_shipped_yaml_resolves_and_describes(path):
    cfg = load_config(path)
    from epalm.cli.describe import describe
    from epalm.model.epalm import build_model

    lines = describe(build_model(cfg.model, device="meta"), cfg)
    assert lines[-1].startswith("trainable=")


def _describe_last_line(config: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "epalm.cli.describe", config],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_describe_gives_the_papers_trainable_counts():
    assert _describe_last_line("launch/configs/image/vqa_v2_pt_L.yaml") == (
        "trainable=4239360 total=6966014976 ratio=0.0609%"
    )
    assert _describe_last_line("launch/configs/image/vqa_v2.yaml").startswith("trainable=24949760 ")


def test_model_code_imports_no_training_infrastructure():
    """epalm/model/ is plain PyTorch: no deepspeed, torch.distributed, YAML or environment reads."""
    banned = ("deepspeed", "torch.distributed", "yaml", "os.environ", "getenv")
    for path in (ROOT / "epalm" / "model").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        for name in names:
            assert not name.startswith(banned), f"{path.name} imports {name}"
        assert "os.environ" not in path.read_text() and "getenv" not in path.read_text(), path.name


def test_structural_and_cross_field_and_file_problems_arrive_together(tmp_path):
    """Six problems of three kinds, one error (they used to come back two at a time)."""
    tree = tiny_tree()
    tree["model"]["adapter"]["colour"] = "blue"  # unknown key
    tree["train"] = {"lr": "fast", "global_batch_size": 10, "micro_batch_size": 4}  # wrong type; no divide
    tree["model"]["adapter"]["end_layer"] = 9  # past the 6-layer LM
    tree["model"]["lm"]["tokenizer"] = str(tmp_path / "no_tokenizer")
    tree["data"] = {"train": [{"path": str(tmp_path / "no_shards")}]}
    with pytest.raises(ConfigError) as err:
        build_run_config(tree, paths=True)
    text = str(err.value)
    assert "6 problem(s)" in text, text
    for needle in (
        "model.adapter.colour: unknown key",
        "train.lr: expected float",
        "not a multiple",
        "past the LM's depth",
        f"tokenizer directory not found: {tmp_path / 'no_tokenizer'}",
        f"shard directory not found: {tmp_path / 'no_shards'}",
    ):
        assert needle in text


def test_a_broken_field_does_not_raise_spurious_cross_field_problems():
    tree = tiny_tree()
    tree["train"] = {"global_batch_size": 10, "micro_batch_size": "four"}
    with pytest.raises(ConfigError) as err:
        build_config(tree)
    assert "1 problem(s)" in str(err.value) and "train.micro_batch_size: expected int" in str(err.value)


def test_modality_must_match_the_encoder():
    tree = tiny_tree()
    tree["data"] = {"modality": "video"}  # a ViT takes images
    with pytest.raises(ConfigError, match="does not match model.encoder.kind 'vit'"):
        build_config(tree)


def test_a_video_run_may_mix_in_image_datasets_but_not_audio():
    tree = tiny_tree()
    tree["model"]["encoder"] = {"kind": "timesformer", "name": "timesformer", "pretrained": False}
    tree["data"] = {"modality": "video", "train": [{"path": "v"}, {"path": "i", "modality": "image"}]}
    assert build_config(tree).data.train[1].modality == "image"  # read as still clips
    tree["data"]["train"].append({"path": "a", "modality": "audio"})
    with pytest.raises(ConfigError, match=r"data.train\[2\].modality: 'audio'.*takes video or image input"):
        build_config(tree)
    tree["model"]["encoder"] = {"kind": "vit"}  # a ViT run takes images only
    tree["data"] = {"modality": "image", "train": [{"path": "v", "modality": "video"}]}
    with pytest.raises(ConfigError, match=r"data.train\[0\].modality: 'video'.*takes image input"):
        build_config(tree)


def test_missing_local_tokenizer_names_the_directory(tmp_path):
    from epalm.data.text import build_tokenizer

    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        build_tokenizer(str(tmp_path / "tok"))
