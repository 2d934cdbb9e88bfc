"""Typed, frozen run configuration: dataclasses built from one YAML file plus `key=value` overrides.

Unknown keys, wrong types and impossible values are all collected and reported in one `ConfigError`.
Derived numbers (gradient accumulation, per-rank batch) are functions of the config, never stored in it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Dtype = Literal["float32", "float16", "bfloat16"]


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class LMConfig:
    """The frozen OPT language model."""

    name: str = "facebook/opt-2.7b"  # hub id, local directory, or an architecture key ("125m" ... "6.7b")
    pretrained: bool = True  # False: random weights from the architecture table (tests, describe, benchmarks)
    dtype: Dtype = "float32"
    tokenizer: str | None = None  # defaults to `name`
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    config_overrides: dict = field(default_factory=dict)  # applied to the OPTConfig (tiny test models)


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen perception encoder; its last `num_states` blocks give the [CLS] tokens that are injected."""

    kind: Literal["vit", "timesformer", "ast"] = "vit"
    name: str = "vit_base_patch16_224"  # timm model name (vit) or HF hub id / local directory
    pretrained: bool = True
    checkpoint: str | None = None  # local weights file (timm .safetensors/.npz/.pth read safely)
    num_states: int = 6
    dtype: Dtype = "float32"
    config_overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterConfig:
    """The trainable part: linear connection(s) into LM layers [start_layer, end_layer) and the soft prompt."""

    start_layer: int = 19
    end_layer: int = 31
    shared_connector: bool = False
    prompt_tokens: int = 10
    prompt_mlp: bool = True
    # "original" lets the injected token attend to every position, later text and padding included
    # (the original code's all-zero mask row); "causal" makes it attend only to itself.
    visual_attention: Literal["causal", "original"] = "causal"


@dataclass(frozen=True)
class ModelConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lm_loss_weight: float = 0.1
    answer_only_loss: bool = False
    double_question_mark: bool = False  # the original's "...??</a>" quirk


@dataclass(frozen=True)
class DatasetConfig:
    path: str  # a shard directory holding manifest.json
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    task: Literal["qa", "caption"] = "qa"
    modality: Literal["image", "video", "audio"] = "image"
    train: list[DatasetConfig] = field(default_factory=list)
    val: str | None = None
    test: str | None = None
    image_size: int = 224
    num_frames: int = 8
    normalization: Literal["clip", "imagenet", "half"] = "clip"
    use_features: bool = False
    num_workers: int = 2
    unsafe_members: Literal["error", "skip"] = "error"  # a non-SAFE_EXTENSIONS member: stop, or drop it
    retries: int = 3  # retries of a failing remote shard or manifest (backoff 0.5 s, 1 s, 2 s, ...)
    cache_dir: str | None = None  # keep a local copy of every remote shard here; later epochs read it
    max_skip_fraction: float = 0.05  # stop past this share of a worker's epoch skipped as bad samples
    verify_checksums: bool = False  # check each local shard's sha256 against the manifest before training


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation as in the paper's configs (reference §3.2); steps, not epochs, drive the loop."""

    global_batch_size: int = 256
    micro_batch_size: int = 64
    epochs: float = 8
    max_steps: int | None = None
    lr: float = 2e-5  # connector
    prompt_lr: float = 1e-5
    weight_decay: float = 0.02
    warmup_steps: int = 400
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    gradient_clipping: float = 0.0
    optimizer: Literal["auto", "apex", "deepspeed", "torch"] = "auto"
    seed: int = 42
    log_every: int = 50
    eval_every: int = 1000
    save_every: int = 1000
    keep_last: int = 3
    init_adapter: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    num_beams: int = 3
    max_new_tokens: int = 30
    use_cache: bool = True
    batch_size: int = 64
    # in-training evaluation generates on the first max_samples val samples (split over the ranks), which
    # keeps it bounded on large val splits (COCO val: 5000 images x beam search)
    max_samples: int | None = 5000


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"


# --------------------------------------------------------------------------- building


def _check_value(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, path, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        return _build(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return []
        (inner,) = typing.get_args(tp)
        return [_check_value(v, inner, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads "3e-4" (no dot) as a string: accept any float literal
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        problems.append(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{prefix}{'.' if prefix else ''}{key}: unknown key (known: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{'.' if prefix else ''}{f.name}"
        if f.name in data:
            kwargs[f.name] = _check_value(data[f.name], hints[f.name], path, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{path}: required")
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # problems already recorded


def _apply_override(tree: dict, override: str, problems: list[str]) -> None:
    if "=" not in override:
        problems.append(f"override {override!r}: expected key=value")
        return
    key, raw = override.split("=", 1)
    node = tree
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"override {override!r}: {part} is not a mapping")
            return
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def build_config(tree: dict, overrides: list[str] = (), source: str = "config") -> Config:
    """Build and validate a Config from a nested mapping; raise ConfigError listing every problem."""
    problems: list[str] = []
    tree = _deep_copy(tree)
    for override in overrides:
        _apply_override(tree, override, problems)
    cfg = _build(Config, tree, "", problems)
    if cfg is not None and not problems:
        problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a YAML config file plus `key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], str(path))
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], str(path)) from e
    if not isinstance(tree, dict):
        raise ConfigError(["top level must be a mapping"], str(path))
    return build_config(tree, overrides, source=str(path))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used)."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> list[str]:
    """Checks across fields; each returns a readable problem string."""
    from epalm.model.injection import schedule_problems
    from epalm.model.language_model import find_lm_config

    problems = []
    m = cfg.model
    a = m.adapter
    if a.prompt_tokens < 0:
        problems.append(f"model.adapter.prompt_tokens: must be >= 0, got {a.prompt_tokens}")
    lm_config = find_lm_config(m.lm)
    num_layers = lm_config.num_hidden_layers if lm_config is not None else None
    problems += schedule_problems(a.start_layer, a.end_layer, m.encoder.num_states, num_layers)
    t = cfg.train
    for name in ("global_batch_size", "micro_batch_size"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name}: must be positive, got {getattr(t, name)}")
    if t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train: global_batch_size {t.global_batch_size} is not a multiple of "
            f"micro_batch_size {t.micro_batch_size}"
        )
    for name in ("lr", "prompt_lr", "warmup_lr", "min_lr"):
        if getattr(t, name) < 0:
            problems.append(f"train.{name}: must be >= 0")
    if cfg.eval.num_beams < 1:
        problems.append(f"eval.num_beams: must be >= 1, got {cfg.eval.num_beams}")
    for i, d in enumerate(cfg.data.train):
        if d.weight <= 0:
            problems.append(f"data.train[{i}].weight: must be positive, got {d.weight}")
    return problems


def gradient_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """global = micro x accumulation x world; refuse numbers that do not add up."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            [
                f"train.global_batch_size {train.global_batch_size} is not divisible by "
                f"micro_batch_size {train.micro_batch_size} x world_size {world_size} = {per_step}"
            ]
        )
    return train.global_batch_size // per_step
