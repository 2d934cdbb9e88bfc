"""What a loader reads and how: `DatasetSpec` (one shard directory) and `LoaderSettings` (batching, sample
format and reading options shared by every dataset of a loader), each built from the run config in one
place (`from_config`), so training, in-training evaluation and `eval.run` read shards alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epalm.data import schema
from epalm.data.remote_read import ReadLimits
from epalm.data.stream import UNSAFE_POLICIES
from epalm.data.transforms import Normalization

if TYPE_CHECKING:
    from epalm.config import Config


@dataclass(frozen=True)
class DatasetSpec:
    """One shard directory (with manifest.json) and how to read it."""

    path: str  # a local dir, http(s):// or fsspec URL, or `pipe:` template (docs/loader.md); a Path is stored as str
    task: str  # "qa" | "caption"
    modality: str  # "image" | "video" | "audio"
    weight: float = 1.0
    use_features: bool = False  # read feats.npy as `encoder_states`; media is never decoded
    # checked against the manifest's when use_features (schema.check_fingerprint)
    expected_fingerprint: dict | None = field(default=None, hash=False)
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))  # accept a Path, stay hashable and printable
        if self.task not in schema.TASKS or self.modality not in schema.MODALITIES:
            raise ValueError(
                f"{self.path}: task {self.task!r} / modality {self.modality!r} not in {schema.TASKS} / {schema.MODALITIES}"
            )
        if not self.weight > 0:
            raise ValueError(f"{self.path}: weight must be > 0, got {self.weight}")

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        path: str,
        weight: float = 1.0,
        *,
        modality: str | None = None,
        task: str | None = None,
        fingerprint: dict | None = None,
    ) -> DatasetSpec:
        """A shard directory read as the run config says (its task, modality and feature cache)."""
        d = cfg.data
        return cls(path, task or d.task, modality or d.modality, weight, d.use_features, fingerprint)


@dataclass(frozen=True)
class LoaderSettings:
    """Everything but the datasets and the tokenizer that `build_train_loader` / `build_eval_loader` take."""

    batch_size: int  # per rank
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0  # data order and per-sample randomness (training)
    # how a sample becomes model inputs
    image_size: int = 224
    normalization: Normalization = "clip"
    answer_only: bool = False  # labels on the answer tokens only (QA training)
    double_question_mark: bool = False
    # training order
    shuffle_buffer: int = 1000
    batches_per_epoch: int | None = None  # default: the sum of the datasets' own batch counts
    # reading (docs/loader.md)
    unsafe_members: str = "error"
    retries: int | None = None  # remote reads: at most this many retries in a row (None: the budget decides)
    retry_budget_s: float = 120.0
    read_timeout_s: float = 60.0
    connect_timeout_s: float = 30.0
    cache_dir: str | None = None
    max_skip_fraction: float = 0.0
    verify_checksums: bool = False
    # torch DataLoader
    pin_memory: bool = False
    multiprocessing_context: str | None = None
    prefetch_factor: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.unsafe_members not in UNSAFE_POLICIES:
            raise ValueError(f"unsafe_members must be one of {UNSAFE_POLICIES}, got {self.unsafe_members!r}")
        if not 0 <= self.max_skip_fraction < 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1), got {self.max_skip_fraction}")
        self.read_limits  # noqa: B018 (checks the timeouts and retries)

    @property
    def read_limits(self) -> ReadLimits:
        """Timeouts and retries of every remote read (epalm.data.remote_read)."""
        return ReadLimits(self.connect_timeout_s, self.read_timeout_s, self.retry_budget_s, self.retries)

    @classmethod
    def from_config(
        cls, cfg: Config, *, batch_size: int, rank: int, world_size: int, num_workers: int
    ) -> LoaderSettings:
        """The settings a run config gives, for one rank and batch size (training or evaluation)."""
        d, m = cfg.data, cfg.model
        return cls(
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=cfg.train.seed,
            image_size=d.image_size,
            normalization=d.normalization,
            answer_only=m.answer_only_loss,
            double_question_mark=m.double_question_mark,
            unsafe_members=d.unsafe_members,
            retries=d.retries,
            retry_budget_s=d.retry_budget_s,
            read_timeout_s=d.read_timeout_s,
            connect_timeout_s=d.connect_timeout_s,
            cache_dir=d.cache_dir,
            max_skip_fraction=d.max_skip_fraction,
            verify_checksums=d.verify_checksums,
        )
