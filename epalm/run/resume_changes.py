"""Config changes on resume, made explicit: the resumed config is compared with the one the checkpoint trained
with (kept in its trainer_state.json), every difference is logged, and each kind has one rule:

- schedule and optimizer settings (lr, prompt_lr, warmup_*, min_lr, max_steps/epochs, weight_decay,
  gradient_clipping) take effect at the resumed step: `apply_schedule` rebuilds the lr schedule from the new
  config there (a restored LambdaLR would keep the checkpoint's base lr);
- what a step computes or which data it reads (batch sizes, seed, optimizer, data.train and its decoding,
  the model) breaks the exact resume: refused, unless `--allow-inexact-resume` says to apply it; the loader
  then starts its data afresh where its saved position means nothing (another seed, other datasets), and
  goes on with the interrupted epoch's rest as on another world size after another micro-batch or workers;
- everything else (logging, evaluation, checkpoint cadence, remote-read settings) is applied as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from epalm.config import Config, ConfigError, read_config_tree
from epalm.run.layout import CONFIG

log = logging.getLogger(__name__)

FLAG = "--allow-inexact-resume"
SCHEDULE = ("train.lr", "train.prompt_lr", "train.warmup_steps", "train.warmup_lr", "train.min_lr")
LENGTH = ("train.max_steps", "train.epochs")
OPTIMIZER = ("train.weight_decay", "train.gradient_clipping")
INEXACT = (
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.seed",
    "train.optimizer",
    "data.train",
    "data.task",
    "data.modality",
    "data.image_size",
    "data.num_frames",
    "data.normalization",
    "data.use_features",
    "data.num_workers",
    "model",
)
# the loader's saved position means nothing after these: it restarts at the beginning of the data (another
# micro-batch or worker count is a new partition, which the loader itself carries over: epalm.data.resumable)
LOADER = ("train.seed", "data.train")
NOT_COMPARED = ("run_dir", "train.init_adapter")  # a resume loads the checkpoint, never the initial adapter


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def rule(key: str) -> str:
    if _under(key, SCHEDULE + LENGTH):
        return "applied: the lr schedule is rebuilt at the resumed step"
    if _under(key, OPTIMIZER):
        return "applied from the resumed step"
    if _under(key, INEXACT):
        return f"breaks the exact resume; applied under {FLAG}"
    return "applied"


@dataclasses.dataclass(frozen=True)
class ResumeChanges:
    """What differs from the checkpoint's config: key -> (checkpoint's value, this run's)."""

    changed: dict[str, tuple[object, object]]

    @property
    def inexact(self) -> list[str]:
        return [k for k in self.changed if _under(k, INEXACT)]

    @property
    def fresh_loader(self) -> bool:
        return any(_under(k, LOADER) for k in self.changed)

    def lines(self) -> list[str]:
        return [f"{k}: {old!r} -> {new!r} ({rule(k)})" for k, (old, new) in self.changed.items()]


def checkpoint_config(step_dir: Path, state: dict) -> dict | None:
    """The config the checkpoint trained with: its trainer state's, else (older checkpoints) the run's
    config.yaml, which its last start wrote; None when neither is there."""
    if isinstance(state.get("config"), dict):
        return state["config"]
    path = step_dir.parent.parent / CONFIG
    try:
        return read_config_tree(path) if path.is_file() else None
    except ConfigError:
        return None


def data_identity(shard_lists: Sequence) -> list[str]:
    """Per training dataset, a digest of what its manifest lists (shard names, sample counts, sizes, SHA-256):
    the same shards read through another path (http -> pipe:, a mirror, a copy) give the same digests."""
    return [
        hashlib.sha256(json.dumps([s.names, s.counts, s.sizes, s.sha256]).encode()).hexdigest()[:16]
        for s in shard_lists
    ]


def _paths_only(old: object, new: object) -> bool:
    """Two `data.train` lists that differ in their paths alone (weights, modalities and order kept)."""
    if not (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)):
        return False
    strip = lambda entries: [{k: v for k, v in e.items() if k != "path"} for e in entries]  # noqa: E731
    return strip(old) == strip(new)


def compare(old: dict, cfg: Config, same_data: bool = False) -> ResumeChanges:
    """The differences; with `same_data` (the manifests' digests agree) new paths to the same shards are none."""
    before, after = _flat(old), _flat(dataclasses.asdict(cfg))
    keys = [k for k in after if not _under(k, NOT_COMPARED)]
    keys += [k for k in before if k not in after and not _under(k, NOT_COMPARED)]
    changed = {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}
    if same_data and "data.train" in changed and _paths_only(*changed["data.train"]):
        log.info(
            "resume: data.train reads the same shards through new paths: %s", changed.pop("data.train")[1]
        )
    return ResumeChanges(changed)


def check_resume_changes(
    step_dir: Path, state: dict, cfg: Config, allow_inexact: bool, data: list[str] | None = None
) -> ResumeChanges:
    """The differences, logged (call on one rank); ConfigError naming FLAG for inexact ones without it.
    `data`: this run's `data_identity`, compared with the one the checkpoint recorded."""
    old = checkpoint_config(step_dir, state)
    if old is None:
        log.warning("resume: %s records no config; changes to it cannot be checked", step_dir)
        return ResumeChanges({})
    changes = compare(old, cfg, same_data=data is not None and state.get("data_identity") == data)
    if changes.inexact and not allow_inexact:
        raise ConfigError(
            [
                f"resuming {step_dir} with {k}: {changes.changed[k][0]!r} -> {changes.changed[k][1]!r} "
                f"changes what a step computes or reads, so the resume would not be exact; pass {FLAG} to "
                "apply it anyway, or keep the checkpoint's value"
                for k in changes.inexact
            ],
            "resume",
        )
    if changes.changed:
        log.warning(
            "resume from %s with a changed config:\n  %s", step_dir.name, "\n  ".join(changes.lines())
        )
    if changes.fresh_loader:
        log.warning(
            "resume: the loader's saved position does not fit the new config: it starts the data afresh"
        )
    return changes


def apply_schedule(optimizer, scheduler, cfg: Config) -> None:
    """After a restore: base lrs and weight decay from `cfg`, the lr of each group recomputed by the (new)
    schedule at the restored scheduler step. With an unchanged config the lrs come out identical."""
    base = {"connector": cfg.train.lr, "prompt": cfg.train.prompt_lr}
    groups = optimizer.param_groups
    scheduler.base_lrs = [base.get(g.get("name"), g.get("initial_lr", g["lr"])) for g in groups]
    for group, lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
        group["weight_decay"] = cfg.train.weight_decay
    scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports (torch keeps it there)
