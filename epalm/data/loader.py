"""The streaming loader: shard shuffle -> rank split -> worker split -> buffer shuffle -> decode -> batch.

`build_train_loader` mixes datasets by weight with every rank on the same dataset at each step,
yields the same number of batches on every rank and resumes exactly from `state_dict()`;
`build_eval_loader` yields left-padded generation prompts, each sample once. See docs/loader.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

from epalm.data import schema, sources
from epalm.data.collate import BatchBuilder
from epalm.data.resumable import DatasetPlan, ResumableLoader, eval_batches_per_rank
from epalm.data.stream import UNSAFE_POLICIES, check_shards, load_manifest
from epalm.data.transforms import Normalization
from epalm.locations import shard_location

__all__ = [
    "DatasetSpec",
    "ResumableLoader",
    "build_eval_loader",
    "build_train_loader",
    "eval_batches_per_rank",
    "io_options",
]
log = logging.getLogger(__name__)


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


def io_options(data: object) -> dict:
    """The reading options of an `epalm.config.DataConfig`, as keyword arguments of the build_*_loader functions."""
    keys = ("unsafe_members", "retries", "cache_dir", "max_skip_fraction", "verify_checksums")
    return {k: getattr(data, k) for k in keys if hasattr(data, k)}


def _dataloader_kwargs(
    num_workers: int, pin_memory: bool, multiprocessing_context: str | None, prefetch_factor: int | None
) -> dict:
    kwargs: dict = {"pin_memory": pin_memory}
    if num_workers > 0:
        # workers restart every epoch so they see the new epoch's positions
        kwargs.update(multiprocessing_context=multiprocessing_context, persistent_workers=False)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return kwargs


def _plan(
    spec: DatasetSpec,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    train: bool,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    image_size: int,
    normalization: Normalization,
    answer_only: bool,
    double_question_mark: bool,
    shuffle_buffer: int,
    unsafe_members: str,
    retries: int,
    cache_dir: str | None,
    max_skip_fraction: float,
    verify_checksums: bool,
) -> DatasetPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if unsafe_members not in UNSAFE_POLICIES:
        raise ValueError(f"unsafe_members must be one of {UNSAFE_POLICIES}, got {unsafe_members!r}")
    if not 0 <= max_skip_fraction < 1:
        raise ValueError(f"max_skip_fraction must be in [0, 1), got {max_skip_fraction}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    manifest, shards = load_manifest(spec.path, retries)
    shards = replace(shards, cache_dir=cache_dir if shard_location(spec.path) != "local" else None)
    check_shards(
        shards, verify_checksums
    )  # before any model is built: a missing or truncated shard fails now
    if spec.use_features:
        if spec.expected_fingerprint is not None:
            schema.check_fingerprint(manifest.get("fingerprint"), spec.expected_fingerprint)
        else:
            log.warning("%s: cached features used without a fingerprint check", spec.path)
    name = spec.name or sources.display_name(spec.path)
    builder = BatchBuilder(
        tokenizer,
        spec.task,
        spec.modality,
        name,
        index,
        train,
        spec.use_features,
        image_size,
        normalization,
        answer_only,
        double_question_mark,
    )
    return DatasetPlan(
        shards,
        builder,
        rank,
        world_size,
        batch_size,
        max(1, num_workers),
        shuffle_buffer,
        unsafe_members,
        max_skip_fraction,
    )


def build_train_loader(
    datasets: Sequence[DatasetSpec],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    seed: int = 0,
    image_size: int = 224,
    normalization: Normalization = "clip",
    answer_only: bool = False,
    double_question_mark: bool = False,
    shuffle_buffer: int = 1000,
    batches_per_epoch: int | None = None,
    unsafe_members: str = "error",
    retries: int = 3,
    cache_dir: str | None = None,
    max_skip_fraction: float = 0.0,
    verify_checksums: bool = False,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    prefetch_factor: int | None = None,
) -> ResumableLoader:
    """Training batches of `batch_size` (per rank) mixed from `datasets` by weight.

    A dataset yields num_samples // (world_size * batch_size) batches per rank and epoch (the
    remainder is dropped, a different one each epoch). An epoch of the mix is `batches_per_epoch`
    steps, by default the sum of the datasets' own counts.
    """
    if not datasets:
        raise ValueError("no datasets to train on")
    common = dict(
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        image_size=image_size,
        normalization=normalization,
        answer_only=answer_only,
        double_question_mark=double_question_mark,
        shuffle_buffer=shuffle_buffer,
        unsafe_members=unsafe_members,
        retries=retries,
        cache_dir=cache_dir,
        max_skip_fraction=max_skip_fraction,
        verify_checksums=verify_checksums,
    )
    plans = [_plan(spec, i, tokenizer, True, **common) for i, spec in enumerate(datasets)]
    for spec, plan in zip(datasets, plans):
        if plan.num_batches < 1:
            raise ValueError(
                f"{spec.path}: {plan.shards.num_samples} samples make no full batch of "
                f"{batch_size} on each of {world_size} ranks"
            )
    per_epoch = batches_per_epoch or sum(p.num_batches for p in plans)
    if len(plans) > 1 or per_epoch != plans[0].num_batches:
        # a worker may then be asked for any dataset, so each worker needs a share of each
        for spec, plan in zip(datasets, plans):
            if plan.num_batches < max(1, num_workers):
                raise ValueError(
                    f"{spec.path}: {plan.num_batches} batches per rank cannot be shared by "
                    f"{num_workers} workers; use fewer workers or a smaller batch"
                )
    kwargs = _dataloader_kwargs(num_workers, pin_memory, multiprocessing_context, prefetch_factor)
    return ResumableLoader(
        plans,
        [s.weight for s in datasets],
        train=True,
        seed=seed,
        num_workers=num_workers,
        batches_per_epoch=per_epoch,
        dataloader_kwargs=kwargs,
    )


def build_eval_loader(
    dataset: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    image_size: int = 224,
    normalization: Normalization = "clip",
    double_question_mark: bool = False,
    unsafe_members: str = "error",
    retries: int = 3,
    cache_dir: str | None = None,
    max_skip_fraction: float = 0.0,
    verify_checksums: bool = False,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ResumableLoader:
    """Generation prompts (left padded) over rank `rank`'s contiguous slice, every sample once.

    Ranks may get one batch more or fewer than each other (`eval_batches_per_rank`); no sample is
    dropped or repeated, so a ZeRO-3 caller must add dummy generation steps itself.
    """
    plan = _plan(
        dataset,
        0,
        tokenizer,
        False,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        image_size=image_size,
        normalization=normalization,
        answer_only=False,
        double_question_mark=double_question_mark,
        shuffle_buffer=0,
        unsafe_members=unsafe_members,
        retries=retries,
        cache_dir=cache_dir,
        max_skip_fraction=max_skip_fraction,  # unused: an eval sample that fails is an error, not a skip
        verify_checksums=verify_checksums,
    )
    num_batches = eval_batches_per_rank(plan.shards.num_samples, world_size, batch_size)[rank]
    kwargs = _dataloader_kwargs(num_workers, pin_memory, multiprocessing_context, None)
    return ResumableLoader(
        [plan],
        [1.0],
        train=False,
        seed=0,
        num_workers=num_workers,
        batches_per_epoch=num_batches,
        dataloader_kwargs=kwargs,
    )
