"""Typed, frozen run configuration: dataclasses built from one YAML file plus `key=value` overrides.

A leaf module (it imports nothing from epalm). Unknown keys, wrong types and impossible values are
collected in one pass and reported in one `ConfigError`; checks that need more than the config (the
LM's depth, files on disk) are passed in as `checks` by `epalm.preflight`. Derived numbers (gradient
accumulation, per-rank batch) are functions of the config, never stored in it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Dtype = Literal["float32", "float16", "bfloat16"]
# the input each encoder kind takes (a config with another data.modality cannot run)
ENCODER_MODALITY = {"vit": "image", "timesformer": "video", "ast": "audio"}
# what a training dataset may hold besides: a TimeSformer reads an image as a still clip (every frame the image)
EXTRA_MODALITIES = {"timesformer": ("image",)}


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems, self.source = problems, source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class LMConfig:
    """The frozen OPT language model."""

    name: str = "facebook/opt-2.7b"  # hub id, local directory, or an architecture key ("125m" ... "6.7b")
    pretrained: bool = True  # False: random weights from the architecture table (tests, describe, benchmarks)
    dtype: Dtype = "float32"  # weights are cast to it at load time (bf16 for OPT-6.7B on GPUs)
    tokenizer: str | None = None  # hub id or local directory; defaults to `name`
    attn_implementation: Literal["sdpa", "eager"] = (
        "sdpa"  # OPT's attention kernel (FlashAttention-2 unsupported)
    )
    config_overrides: dict = field(default_factory=dict)  # applied to the OPTConfig (tiny test models)


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen perception encoder; its last `num_states` blocks give the [CLS] tokens that are injected."""

    kind: Literal["vit", "timesformer", "ast"] = (
        "vit"  # timm ViT (image), HF TimeSformer (video), HF AST (audio)
    )
    name: str = "vit_base_patch16_224"  # timm model name (vit) or HF hub id / local directory
    pretrained: bool = True  # False: random weights under a fixed seed (tests, describe, benchmarks)
    checkpoint: str | None = None  # local weights file (timm .safetensors/.npz/.pth read safely)
    num_states: int = 6  # how many of the last blocks' [CLS] tokens are injected
    dtype: Dtype = "float32"  # the frozen encoder's weights and activations
    config_overrides: dict = field(default_factory=dict)  # timm kwargs / HF config fields (tiny test models)


@dataclass(frozen=True)
class AdapterConfig:
    """The trainable part: linear connection(s) into LM layers [start_layer, end_layer) and the soft prompt."""

    start_layer: int = 19  # first LM layer that receives an injected token
    end_layer: int = 31  # one past the last injected LM layer; (end - start) must divide by num_states
    shared_connector: bool = False  # one Linear for every state instead of one per state
    prompt_tokens: int = 10  # soft prompt length; 0 disables the prompt
    prompt_mlp: bool = True  # reparameterise the prompt through an MLP while training
    # "original" lets the injected token attend to every position, later text and padding included
    # (the original code's all-zero mask row); "causal" makes it attend only to itself.
    visual_attention: Literal["causal", "original"] = "causal"


@dataclass(frozen=True)
class ModelConfig:
    """The whole model: frozen LM and encoder, the trainable adapter, and how the loss is formed."""

    lm: LMConfig = field(default_factory=LMConfig)  # the frozen language model
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen perception encoder
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # what trains
    lm_loss_weight: float = 0.1  # the original's weight on the summed token loss
    answer_only_loss: bool = False  # True: loss on answer tokens only; False: on question and answer
    double_question_mark: bool = False  # the original's "...??</a>" quirk


@dataclass(frozen=True)
class DatasetConfig:
    """One training dataset in a (weighted) mixture."""

    path: str  # a shard directory holding manifest.json
    weight: float = 1.0  # relative sampling weight in the mixture
    # this dataset's input when it is not data.modality (image datasets in a video run: EXTRA_MODALITIES)
    modality: Literal["image", "video", "audio"] | None = None


@dataclass(frozen=True)
class DataConfig:
    """What the loader reads and how it turns samples into model inputs."""

    task: Literal["qa", "caption"] = "qa"  # the text format: question -> answer, or caption
    modality: Literal["image", "video", "audio"] = "image"  # must match model.encoder.kind
    train: list[DatasetConfig] = field(default_factory=list)  # shard directories, mixed by weight
    val: str | None = None  # shard directory for validation loss and the in-training metric
    test: str | None = None  # shard directory scored once after training (captioning runs)
    image_size: int = 224  # the encoder's input resolution (images and video frames)
    num_frames: int = 8  # video frames sampled per clip
    normalization: Literal["clip", "imagenet", "half"] = "clip"  # pixel mean/std (the original used clip)
    use_features: bool = False  # read pre-computed encoder states instead of media (no encoder built)
    num_workers: int = 2  # DataLoader worker processes per rank
    unsafe_members: Literal["error", "skip"] = "error"  # a non-SAFE_EXTENSIONS member: stop, or drop it
    # remote shards (docs/loader.md): every read is bounded, and a failing one retried with backoff (0.5 s,
    # 1 s, 2 s, ... at most 10 s) for retry_budget_s, which rides through a server restart of a minute
    retries: int | None = None  # at most this many retries in a row as well (None: the budget alone decides)
    retry_budget_s: float = 120.0  # seconds a failing read is retried, from its first failure
    read_timeout_s: float = 60.0  # a read that gets no byte for this long has stalled: it fails, is retried
    connect_timeout_s: float = 30.0  # a connection not made in this long fails (and is retried)
    cache_dir: str | None = None  # keep a local copy of every remote shard here; later epochs read it
    max_skip_fraction: float = 0.05  # stop past this share of a worker's epoch skipped as bad samples
    verify_checksums: bool = False  # check each local shard's sha256 against the manifest before training


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation as in the paper's configs (docs/training.md); steps, not epochs, drive the loop."""

    global_batch_size: int = 256  # samples per optimizer step over all ranks (= micro x accumulation x world)
    micro_batch_size: int = 64  # samples per forward on one rank
    epochs: float = 8  # passes over the training mixture (fractions allowed); ignored with max_steps
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-5  # connector peak learning rate
    prompt_lr: float = 1e-5  # soft prompt peak learning rate (same schedule shape)
    weight_decay: float = 0.02  # AdamW decoupled weight decay
    warmup_steps: int = 400  # linear warmup from warmup_lr to lr
    warmup_lr: float = 1e-5  # learning rate at step 0
    min_lr: float = 1e-6  # floor of the cosine decay
    gradient_clipping: float = 0.0  # global grad-norm clip; 0 disables
    optimizer: Literal["auto", "apex", "deepspeed", "torch"] = (
        "auto"  # auto: Apex, else DeepSpeed, else torch
    )
    seed: int = 42  # data order, random init of random-weight models, dropout
    log_every: int = 50  # steps between metric lines (console, TensorBoard, metrics.jsonl)
    eval_every: int = 1000  # steps between validation loss + generation metric; 0 disables
    save_every: int = 1000  # steps between resumable checkpoints; 0: only the final one
    keep_last: int = 3  # resumable checkpoints kept (older ones pruned)
    init_adapter: str | None = None  # adapter to start from (CC3M pretraining): a directory or org/name[@rev]
    # wandb: metrics to Weights & Biases too (rank 0; WANDB_MODE=offline works without network); a resumed
    # or requeued run continues the same W&B run and sends no step twice (docs/training.md)
    tracker: Literal["none", "wandb"] = "none"
    wandb_project: str = "epalm"  # the W&B project (entity: WANDB_ENTITY); the W&B run id is the run's run_id
    # a step whose loss or gradient is NaN/inf on any rank is skipped (no update, logged with its samples);
    # this many such steps in a row stop the run with exit 1 (docs/training.md, "Non-finite steps")
    max_nonfinite_steps: int = 3
    # a collective (all-reduce, barrier) waiting longer than this fails the job: a rank stopped or was lost
    collective_timeout_s: float = 600.0
    # after this long without a step: "no step for N s on rank R", naming ranks that show no sign of life; 0: off
    watchdog_s: float = 300.0


@dataclass(frozen=True)
class EvalConfig:
    """Generation for in-training evaluation, eval.run and epalm.cli.generate."""

    num_beams: int = 3  # 1: greedy
    max_new_tokens: int = 30  # generation stops here or at EOS
    use_cache: bool = True  # KV cache; False recomputes every step (the original's behaviour)
    batch_size: int = 64  # eval samples per rank and generate call
    # in-training evaluation generates on the first max_samples val samples (split over the ranks), which
    # keeps it bounded on large val splits (COCO val: 5000 images x beam search)
    max_samples: int | None = 5000  # cap on in-training generation samples; None: the whole val split
    do_sample: bool = (
        False  # sample instead of search, as the original's March-2023 scripts (needs num_beams: 1)
    )
    temperature: float = 1.0  # sampling: divides the logits (> 0)
    top_k: int = (
        50  # sampling: only the k most likely tokens (0: all); 50 is transformers' and the original's
    )
    top_p: float = 1.0  # sampling: only the fewest tokens holding this much probability, in (0, 1]
    seed: int | None = (
        0  # sampling: a torch.Generator seed on the model's device, per eval run (None: global RNG)
    )
    sort_window: int = (
        16  # eval batches read ahead and re-cut by prompt length, less padding (0 or 1: loader order)
    )


@dataclass(frozen=True)
class Config:
    """One run: model, data, optimisation, evaluation, and where it writes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"  # checkpoints, logs, adapter exports, report.md


# --------------------------------------------------------------------------- building

_INVALID = object()  # a value that failed its check: the field keeps its default, so validation can go on
Check = Callable[[Config, Callable[..., bool]], list[str]]  # (config, ok(*paths)) -> problems


class _Report:
    """Problems found so far and the dotted paths they broke (their checks are skipped in `validate`)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.broken: set[str] = set()

    def add(self, path: str, problem: str) -> None:
        self.problems.append(problem)
        self.broken.add(path)

    def ok(self, *paths: str) -> bool:
        """True when none of `paths` (or a parent or child of one) had a structural problem."""
        return not any(
            b == p or b.startswith(p + ".") or p.startswith(b + ".") or b.startswith(p + "[")
            for p in paths
            for b in self.broken
        )


def _check_value(value: Any, tp: Any, path: str, report: _Report) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, path, report)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            report.add(path, f"{path}: {value!r} is not one of {list(choices)}")
            return _INVALID
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            report.add(path, f"{path}: expected a mapping, got {type(value).__name__}")
            return _INVALID
        return _build(tp, value, path, report)
    if origin is list:
        if not isinstance(value, list):
            report.add(path, f"{path}: expected a list, got {type(value).__name__}")
            return _INVALID
        (inner,) = typing.get_args(tp)
        items = [_check_value(v, inner, f"{path}[{i}]", report) for i, v in enumerate(value)]
        return [v for v in items if v is not _INVALID]
    if tp is dict:
        if not isinstance(value, dict):
            report.add(path, f"{path}: expected a mapping, got {type(value).__name__}")
            return _INVALID
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads "3e-4" (no dot) as a string: accept any float literal
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        report.add(path, f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return _INVALID
    return value


def _build(cls: type, data: dict, prefix: str, report: _Report) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            path = f"{prefix}{'.' if prefix else ''}{key}"
            report.add(path, f"{path}: unknown key (known: {sorted(names)})")
    kwargs = {}
    complete = True
    for f in dataclasses.fields(cls):
        path = f"{prefix}{'.' if prefix else ''}{f.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in data:
            value = _check_value(data[f.name], hints[f.name], path, report)
            if value is not _INVALID:
                kwargs[f.name] = value
            elif required:
                complete = False
        elif required:
            report.add(path, f"{path}: required")
            complete = False
    return cls(**kwargs) if complete else _INVALID


def _apply_override(tree: dict, override: str, report: _Report) -> None:
    if "=" not in override:
        report.add(override, f"override {override!r}: expected key=value")
        return
    key, raw = override.split("=", 1)
    node = tree
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            report.add(key, f"override {override!r}: {part} is not a mapping")
            return
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def build_config(
    tree: dict, overrides: Sequence[str] = (), source: str = "config", checks: Sequence[Check] = ()
) -> Config:
    """Build and validate a Config from a nested mapping; raise ConfigError listing every problem.

    One pass: structural problems (unknown keys, wrong types), `validate`'s cross-field checks on the
    fields that are sound, and every extra check in `checks` (`epalm.preflight` passes the LM's depth
    and the filesystem), all in one error.
    """
    report = _Report()
    tree = _deep_copy(tree)
    for override in overrides:
        _apply_override(tree, override, report)
    cfg = _build(Config, tree, "", report)
    if cfg is _INVALID:  # only a required field below a list can get here; lists drop such items
        cfg = Config()
    for check in (validate, *checks):
        report.problems += check(cfg, report.ok)
    if report.problems:
        raise ConfigError(report.problems, source)
    return cfg


def read_config_tree(path: str | Path) -> dict:
    """The YAML mapping of a config file; ConfigError for a missing file or invalid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], str(path))
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], str(path)) from e
    if not isinstance(tree, dict):
        raise ConfigError(["top level must be a mapping"], str(path))
    return tree


def load_config(path: str | Path, overrides: Sequence[str] = (), checks: Sequence[Check] = ()) -> Config:
    """Load a YAML config file plus `key=value` overrides (values parsed as YAML)."""
    return build_config(read_config_tree(path), overrides, source=str(path), checks=checks)


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


def validate(cfg: Config, ok: Callable[..., bool] = lambda *paths: True) -> list[str]:
    """Checks across fields that need nothing but the config; `ok(*paths)` skips fields already broken."""
    problems = []
    m = cfg.model
    a = m.adapter
    if ok("model.adapter.prompt_tokens") and a.prompt_tokens < 0:
        problems.append(f"model.adapter.prompt_tokens: must be >= 0, got {a.prompt_tokens}")
    if ok("model.encoder.kind", "data.modality", "data.use_features"):
        expected = ENCODER_MODALITY[m.encoder.kind]
        if cfg.data.modality != expected:
            problems.append(
                f"data.modality: {cfg.data.modality!r} does not match model.encoder.kind "
                f"{m.encoder.kind!r}, which takes {expected} input"
            )
        allowed = (expected, *EXTRA_MODALITIES.get(m.encoder.kind, ()))
        for i, d in enumerate(cfg.data.train):
            if ok(f"data.train[{i}]") and d.modality is not None and d.modality not in allowed:
                problems.append(
                    f"data.train[{i}].modality: {d.modality!r}, but model.encoder.kind {m.encoder.kind!r} "
                    f"takes {' or '.join(allowed)} input"
                )
    t = cfg.train
    for name in ("global_batch_size", "micro_batch_size"):
        if ok(f"train.{name}") and getattr(t, name) <= 0:
            problems.append(f"train.{name}: must be positive, got {getattr(t, name)}")
    batches_ok = ok("train.global_batch_size", "train.micro_batch_size")
    if batches_ok and t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train: global_batch_size {t.global_batch_size} is not a multiple of "
            f"micro_batch_size {t.micro_batch_size}"
        )
    if ok("train.log_every") and t.log_every <= 0:
        problems.append(f"train.log_every: must be positive, got {t.log_every}")
    for name in ("eval_every", "save_every"):
        if ok(f"train.{name}") and getattr(t, name) < 0:
            problems.append(f"train.{name}: must be >= 0 (0 disables), got {getattr(t, name)}")
    for name in ("lr", "prompt_lr", "warmup_lr", "min_lr"):
        if ok(f"train.{name}") and getattr(t, name) < 0:
            problems.append(f"train.{name}: must be >= 0")
    if ok("train.max_nonfinite_steps") and t.max_nonfinite_steps < 1:
        problems.append(f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")
    if ok("train.collective_timeout_s") and not t.collective_timeout_s > 0:
        problems.append(f"train.collective_timeout_s: must be positive, got {t.collective_timeout_s}")
    if ok("train.watchdog_s") and t.watchdog_s < 0:
        problems.append(f"train.watchdog_s: must be >= 0 (0 disables), got {t.watchdog_s}")
    if ok("eval.num_beams") and cfg.eval.num_beams < 1:
        problems.append(f"eval.num_beams: must be >= 1, got {cfg.eval.num_beams}")
    e = cfg.eval
    if ok("eval.do_sample", "eval.num_beams") and e.do_sample and e.num_beams != 1:
        problems.append(
            f"eval.do_sample: draws one sequence per prompt; set eval.num_beams=1 (is {e.num_beams})"
        )
    if ok("eval.temperature", "eval.top_k", "eval.top_p") and (
        not e.temperature > 0 or e.top_k < 0 or not 0 < e.top_p <= 1
    ):
        problems.append(
            f"eval: need temperature > 0, top_k >= 0, 0 < top_p <= 1 (got {e.temperature}, {e.top_k}, {e.top_p})"
        )
    data = cfg.data
    for name in ("read_timeout_s", "connect_timeout_s"):
        if ok(f"data.{name}") and not getattr(data, name) > 0:
            problems.append(f"data.{name}: must be positive, got {getattr(data, name)}")
    if ok("data.retry_budget_s") and data.retry_budget_s < 0:
        problems.append(f"data.retry_budget_s: must be >= 0, got {data.retry_budget_s}")
    if ok("data.retries") and data.retries is not None and data.retries < 0:
        problems.append(f"data.retries: must be >= 0 or null (the budget alone decides), got {data.retries}")
    if ok("data.train"):
        for i, d in enumerate(cfg.data.train):
            if d.weight <= 0:
                problems.append(f"data.train[{i}].weight: must be positive, got {d.weight}")
    return problems


def batch_check(world_size: int) -> Check:
    """The batch arithmetic on `world_size` ranks as a `build_config` check, so a global batch that does not
    divide is reported with every other problem of the config (the launcher's world size is known first)."""

    def check(cfg: Config, ok: Callable[..., bool]) -> list[str]:
        t = cfg.train
        if (
            not ok("train.global_batch_size", "train.micro_batch_size")
            or min(t.global_batch_size, t.micro_batch_size) <= 0
        ):
            return []  # reported already
        try:
            gradient_accumulation_steps(t, world_size)
        except ConfigError as e:
            return e.problems
        return []

    return check


def gradient_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """global = micro x accumulation x world; refuse numbers that do not add up."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            [
                f"train.global_batch_size {train.global_batch_size} is not divisible by "
                f"micro_batch_size {train.micro_batch_size} x world_size {world_size} = {per_step}"
                f"{_batch_hint(train.global_batch_size, train.micro_batch_size, world_size)}"
            ]
        )
    return train.global_batch_size // per_step


def _batch_hint(global_batch: int, micro: int, world_size: int) -> str:
    """What would divide: the largest micro-batch up to `micro` that splits each rank's share of the global batch,
    else the nearest global batch the micro-batch and world size do divide."""
    if global_batch % world_size == 0 and global_batch >= world_size:
        share = global_batch // world_size
        fits = max(m for m in range(1, min(micro, share) + 1) if share % m == 0)
        return f" (train.micro_batch_size={fits} divides it: {share} samples per rank and step)"
    per_step = micro * world_size
    return f" (train.global_batch_size={per_step * max(1, round(global_batch / per_step))} would divide)"
