"""The streaming loader: shard shuffle -> rank split -> worker split -> buffer shuffle -> decode -> batch.

`build_train_loader` mixes datasets by weight with every rank on the same dataset at each step,
yields the same number of batches on every rank and resumes exactly from `state_dict()`;
`build_eval_loader` yields left-padded generation prompts, each sample once. See docs/loader.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from epalm.data import schema, sources
from epalm.data.collate import BatchBuilder
from epalm.data.resumable import DatasetPlan, ResumableLoader, eval_batches_per_rank
from epalm.data.settings import DatasetSpec, LoaderSettings
from epalm.data.stream import check_shards, load_manifest
from epalm.locations import shard_location

__all__ = [
    "DatasetSpec",
    "ResumableLoader",
    "build_eval_loader",
    "build_train_loader",
    "LoaderSettings",
    "eval_batches_per_rank",
]
log = logging.getLogger(__name__)


def _dataloader_kwargs(s: LoaderSettings) -> dict:
    kwargs: dict = {"pin_memory": s.pin_memory}
    if s.num_workers > 0:
        # workers restart every epoch so they see the new epoch's positions
        kwargs.update(multiprocessing_context=s.multiprocessing_context, persistent_workers=False)
        if s.prefetch_factor is not None:
            kwargs["prefetch_factor"] = s.prefetch_factor
    return kwargs


def _plan(
    spec: DatasetSpec, index: int, tokenizer: PreTrainedTokenizerBase, train: bool, settings: LoaderSettings
) -> DatasetPlan:
    s = settings
    manifest, shards = load_manifest(spec.path, s.read_limits)
    shards = replace(shards, cache_dir=s.cache_dir if shard_location(spec.path) != "local" else None)
    check_shards(
        shards, s.verify_checksums
    )  # before any model is built: a missing or truncated shard fails now
    if spec.use_features:
        if spec.expected_fingerprint is not None:
            schema.check_fingerprint(manifest.get("fingerprint"), spec.expected_fingerprint)
        else:
            log.warning("%s: cached features used without a fingerprint check", spec.path)
    builder = BatchBuilder(tokenizer, spec, spec.name or sources.display_name(spec.path), index, train, s)
    return DatasetPlan(
        shards,
        builder,
        s.rank,
        s.world_size,
        s.batch_size,
        max(1, s.num_workers),
        s.shuffle_buffer,
        s.unsafe_members,
        s.max_skip_fraction,
    )


def build_train_loader(
    datasets: Sequence[DatasetSpec], tokenizer: PreTrainedTokenizerBase, settings: LoaderSettings
) -> ResumableLoader:
    """Training batches of `settings.batch_size` (per rank) mixed from `datasets` by weight.

    A dataset yields num_samples // (world_size * batch_size) batches per rank and epoch (the
    remainder is dropped, a different one each epoch). An epoch of the mix is `batches_per_epoch`
    steps, by default the sum of the datasets' own counts.
    """
    if not datasets:
        raise ValueError("no datasets to train on")
    s = settings
    plans = [_plan(spec, i, tokenizer, True, s) for i, spec in enumerate(datasets)]
    for spec, plan in zip(datasets, plans):
        if plan.num_batches < 1:
            raise ValueError(
                f"{spec.path}: {plan.shards.num_samples} samples make no full batch of "
                f"{s.batch_size} on each of {s.world_size} ranks"
            )
    per_epoch = s.batches_per_epoch or sum(p.num_batches for p in plans)
    if len(plans) > 1 or per_epoch != plans[0].num_batches:
        # a worker may then be asked for any dataset, so each worker needs a share of each
        for spec, plan in zip(datasets, plans):
            if plan.num_batches < max(1, s.num_workers):
                raise ValueError(
                    f"{spec.path}: {plan.num_batches} batches per rank cannot be shared by "
                    f"{s.num_workers} workers; use fewer workers or a smaller batch"
                )
    return ResumableLoader(
        plans,
        [d.weight for d in datasets],
        train=True,
        seed=s.seed,
        num_workers=s.num_workers,
        batches_per_epoch=per_epoch,
        dataloader_kwargs=_dataloader_kwargs(s),
    )


def build_eval_loader(
    dataset: DatasetSpec, tokenizer: PreTrainedTokenizerBase, settings: LoaderSettings
) -> ResumableLoader:
    """Generation prompts (left padded) over rank `settings.rank`'s contiguous slice, every sample once.

    Ranks may get one batch more or fewer than each other (`eval_batches_per_rank`); no sample is
    dropped or repeated, so a ZeRO-3 caller must add dummy generation steps itself. The training-only
    settings (seed, answer_only, shuffle_buffer, batches_per_epoch) do not apply; an eval sample that
    fails is an error, never a skip.
    """
    s = replace(settings, answer_only=False, shuffle_buffer=0, prefetch_factor=None)
    plan = _plan(dataset, 0, tokenizer, False, s)
    num_batches = eval_batches_per_rank(plan.shards.num_samples, s.world_size, s.batch_size)[s.rank]
    return ResumableLoader(
        [plan],
        [1.0],
        train=False,
        seed=0,
        num_workers=s.num_workers,
        batches_per_epoch=num_batches,
        dataloader_kwargs=_dataloader_kwargs(s),
    )
