"""Everything a training run needs that can be built and checked before the model: the DeepSpeed config
with our batch arithmetic, the optimizer choice, the tokenizer, the loaders (with feature fingerprints),
the evaluation hook, the (verified) checkpoint to resume from and how the config changed since it; a fresh
start into a directory holding a run is refused here. A problem here is a ConfigError, raised the same on
every rank, so no rank waits for another that failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from epalm.config import Config, ConfigError
from epalm.data import schema
from epalm.data.loader import DatasetSpec, LoaderSettings, ResumableLoader, build_train_loader
from epalm.data.text import build_tokenizer
from epalm.distributed import DistInfo, broadcast_from_rank0
from epalm.evaluation.hook import GenerationEval, build_generation_eval
from epalm.run.manifest import read_trainer_state
from epalm.run.resume import agreed_resume
from epalm.run.resume_changes import ResumeChanges, check_resume_changes, data_identity
from epalm.train.ds_config import build_ds_config
from epalm.train.optimizer import choose_optimizer


@dataclass
class TrainSetup:
    """The checked inputs of one training run on this rank."""

    cfg: Config
    info: DistInfo
    ds_config: dict
    loader: ResumableLoader
    val_loaders: list[ResumableLoader]
    tokenizer: Any
    total_steps: int
    resume_from: Path | None
    run_dir: Path
    evaluation: GenerationEval | None = None  # the generation metric on data.val and/or the final test eval
    resume_changes: ResumeChanges | None = None  # the config's differences from the checkpoint's
    data_identity: list[str] | None = None  # the training shards' manifest digests, kept in each checkpoint


def build_train_setup(
    cfg: Config,
    ds_base: dict,
    info: DistInfo,
    resume: str | None,
    precision: str | None,
    move_aside: bool = False,
    allow_inexact: bool = False,
) -> TrainSetup:
    """Batch arithmetic, optimizer, shards, fingerprints, resume path and config changes; raises ConfigError.
    `move_aside`: a fresh start moves a run found in run_dir aside; `allow_inexact`: apply config changes
    that break the exact resume (epalm.run.resume_changes)."""
    cuda = torch.cuda.is_available()
    ds_config = build_ds_config(ds_base, cfg.train, info.world_size, precision, cuda)
    choose_optimizer(cfg.train.optimizer, cuda)
    if not cfg.data.train:
        raise ConfigError(["data.train: no training datasets"])
    settings = LoaderSettings.from_config(
        cfg,
        batch_size=cfg.train.micro_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=cfg.data.num_workers,
    )
    try:
        tokenizer = build_tokenizer(cfg.model.lm.tokenizer or cfg.model.lm.name)
        fingerprint = expected_fingerprint(cfg) if cfg.data.use_features else None
        specs = [
            DatasetSpec.from_config(cfg, d.path, d.weight, modality=d.modality, fingerprint=fingerprint)
            for d in cfg.data.train
        ]
        loader = build_train_loader(specs, tokenizer, settings)
        # built now so a bad validation set fails before training; reset to its start at each evaluation
        val_settings = replace(settings, num_workers=0)
        val_spec = (
            DatasetSpec.from_config(cfg, cfg.data.val, fingerprint=fingerprint) if cfg.data.val else None
        )
        val_loaders = [build_train_loader([val_spec], tokenizer, val_settings)] if val_spec else []
        evaluation = build_generation_eval(cfg, tokenizer, info)
    except (OSError, ValueError) as e:
        raise ConfigError([f"data: {e}"]) from e
    accum = ds_config["gradient_accumulation_steps"]
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(loader) / accum)
    run_dir = Path(cfg.run_dir)
    resume_from = agreed_resume(resume, run_dir, info, move_aside)  # verified; a bad newest step is skipped
    data = data_identity([plan.shards for plan in loader.plans])
    changes = None if resume_from is None else agreed_changes(resume_from, cfg, info, allow_inexact, data)
    return TrainSetup(
        cfg, info, ds_config, loader, val_loaders, tokenizer, total, resume_from, run_dir, evaluation,
        resume_changes=changes, data_identity=data,
    )  # fmt: skip


def agreed_changes(
    step_dir: Path, cfg: Config, info: DistInfo, allow_inexact: bool, data: list[str]
) -> ResumeChanges:
    """Rank 0 compares (and logs), every rank gets its answer or the same ConfigError."""
    outcome: tuple[ResumeChanges | None, list[str]] = (None, [])
    if info.rank == 0:
        try:
            state = read_trainer_state(step_dir)
            outcome = (check_resume_changes(step_dir, state, cfg, allow_inexact, data), [])
        except ConfigError as e:
            outcome = (None, e.problems)
        except Exception as e:  # never leave the other ranks waiting in the broadcast
            outcome = (None, [f"{step_dir}: {type(e).__name__}: {e}"])
    changes, problems = broadcast_from_rank0(outcome, info)
    if problems:
        raise ConfigError(problems, "resume")
    return changes


def expected_fingerprint(cfg: Config) -> dict:
    """What the feature cache recorded for this encoder (random encoders built under the same seed)."""
    from epalm.model.encoders import build_reference_encoder

    encoder = build_reference_encoder(cfg.model.encoder)
    d = cfg.data
    return schema.encoder_fingerprint(
        cfg.model.encoder, encoder.state_dict(), d.modality, d.image_size, d.num_frames, d.normalization
    )
