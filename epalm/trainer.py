"""The one training loop: step-based, with logging, validation loss, checkpoints, exact resume and signal handling.
Generation metrics, the best adapter and the final test evaluation live in `epalm.train_eval`.

`prepare` checks everything that can be checked before a model is built; `Trainer.fit` runs the steps.
A SIGTERM or SIGUSR1 on any rank stops every rank after the current step with a checkpoint and EXIT_REQUEUE.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from epalm import checkpoint as ckpt
from epalm.config import Config, ConfigError, save_config
from epalm.data import schema
from epalm.data.loader import DatasetSpec, ResumableLoader, build_train_loader, io_options
from epalm.data.text import build_tokenizer
from epalm.distributed import DistInfo
from epalm.engine import (
    Engine,
    build_ds_config,
    build_engine,
    choose_optimizer,
    frozen_checksum,
    full_frozen_digest,
    gather_adapter_state,
)
from epalm.train_eval import GenerationEval, build_generation_eval, final_outputs
from epalm.train_metrics import MetricWriter, Window, tensor_digest

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and --resume auto
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
VAL_MAX_BATCHES = 100  # per rank and evaluation: a validation loss estimate, not a full pass
STOPPED_MARKER = "stopped_by_signal.json"  # for launchers that do not pass the exit code on (torchrun)
EvalHook = Callable[["Trainer", int], dict]  # (trainer, step) -> metrics; called on every rank


@dataclass
class Prepared:
    cfg: Config
    info: DistInfo
    ds_config: dict
    loader: ResumableLoader
    val_loaders: list[ResumableLoader]
    tokenizer: object  # for eval hooks
    total_steps: int
    resume_from: Path | None
    run_dir: Path
    eval_hooks: list[EvalHook] = field(default_factory=list)
    final_eval: GenerationEval | None = None  # also the generation hook in eval_hooks, when data.val is set


def prepare(
    cfg: Config, ds_base: dict, info: DistInfo, resume: str | None, precision: str | None
) -> Prepared:
    """Every check that needs no model: batch arithmetic, optimizer, shards, fingerprints, resume path.

    Raises ConfigError (the same on every rank, so no rank waits for another that failed).
    """
    cuda = torch.cuda.is_available()
    ds_config = build_ds_config(ds_base, cfg.train, info.world_size, precision, cuda)
    choose_optimizer(cfg.train.optimizer, cuda)
    if not cfg.data.train:
        raise ConfigError(["data.train: no training datasets"])
    loader_kwargs = dict(
        batch_size=cfg.train.micro_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.train.seed,
        image_size=cfg.data.image_size,
        normalization=cfg.data.normalization,
        answer_only=cfg.model.answer_only_loss,
        double_question_mark=cfg.model.double_question_mark,
        **io_options(cfg.data),
    )
    try:
        tokenizer = build_tokenizer(cfg.model.lm.tokenizer or cfg.model.lm.name)
        fingerprint = _expected_fingerprint(cfg) if cfg.data.use_features else None
        specs = [_spec(cfg, d.path, d.weight, fingerprint) for d in cfg.data.train]
        loader = build_train_loader(specs, tokenizer, num_workers=cfg.data.num_workers, **loader_kwargs)
        # built now so a bad validation set fails before training; reset to its start at each evaluation
        val_loaders = (
            [build_train_loader([_spec(cfg, cfg.data.val, 1.0, fingerprint)], tokenizer, **loader_kwargs)]
            if cfg.data.val
            else []
        )
        generation = build_generation_eval(cfg, tokenizer, info)
    except (OSError, ValueError) as e:
        raise ConfigError([f"data: {e}"]) from e
    accum = ds_config["gradient_accumulation_steps"]
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(loader) / accum)
    run_dir = Path(cfg.run_dir)
    resume_from = _resume_path(resume, run_dir)
    hooks = [generation] if generation is not None and generation.val is not None else []
    return Prepared(
        cfg, info, ds_config, loader, val_loaders, tokenizer, total, resume_from, run_dir, hooks, generation
    )


def _spec(cfg: Config, path: str, weight: float, fingerprint: dict | None) -> DatasetSpec:
    d = cfg.data
    return DatasetSpec(path, d.task, d.modality, weight, d.use_features, fingerprint)


def _expected_fingerprint(cfg: Config) -> dict:
    """What data_shards.features recorded for this encoder (random encoders are built under seed 0 there too)."""
    from epalm.model.encoders import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_encoder(cfg.model.encoder)
    d = cfg.data
    return schema.encoder_fingerprint(
        cfg.model.encoder, encoder.state_dict(), d.modality, d.image_size, d.num_frames, d.normalization
    )


def _resume_path(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return ckpt.find_latest(run_dir / "checkpoints")
    path = Path(resume)
    if (path / ckpt.TRAINER_STATE).is_file():
        return path
    latest = ckpt.find_latest(path)
    if latest is None:
        raise ConfigError([f"--resume {resume}: neither a checkpoint nor a directory with '{ckpt.LATEST}'"])
    return latest


class Trainer:
    def __init__(self, prep: Prepared, eng: Engine):
        self.prep, self.cfg, self.eng = prep, prep.cfg, eng
        self.rank, self.world = prep.info.rank, prep.info.world_size
        self.main = self.rank == 0
        self.step = 0
        self._saved_step = -1
        self._stop = False
        self._iter = None
        self.device = eng.engine.device
        self.ckpt_root = prep.run_dir / "checkpoints"
        self.eval_hooks = prep.eval_hooks
        self.fault = _Fault.from_env(self.rank)
        self._val_start = prep.val_loaders[0].state_dict() if prep.val_loaders else None

    # ------------------------------------------------------------------ setup

    def _start(self) -> None:
        p = self.prep
        if self.main:
            p.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, p.run_dir / "config.yaml")
            (p.run_dir / "ds_config.json").write_text(json.dumps(p.ds_config, indent=1))
            (p.run_dir / STOPPED_MARKER).unlink(missing_ok=True)
        self.frozen_start = frozen_checksum(self.eng.model)
        if p.resume_from is not None:
            state = ckpt.load_training_state(self.eng.engine, p.resume_from, rank=self.rank)
            if state.get("world_size") == self.world and state.get("frozen_checksum") != self.frozen_start:
                raise RuntimeError(
                    f"{p.resume_from}: the frozen weights differ from the ones this checkpoint trained with"
                )
            p.loader.load_state_dict(state["loader"])
            self.step = self._saved_step = int(state["step"])
            for hook in self._stateful_hooks():  # e.g. the best value so far, so `best/` keeps its meaning
                hook.load_state_dict(state.get("eval_state", {}).get(hook.name), self.step, p.run_dir)
            # the optimizer's param groups must carry the restored scheduler's lr, whatever restored them
            for group, lr in zip(self.eng.engine.optimizer.param_groups, self.eng.scheduler.get_last_lr()):
                group["lr"] = lr
            log.info("resumed from %s at step %d", p.resume_from, self.step)
        self.metrics = MetricWriter(p.run_dir, self.main, self.prep.total_steps, self.step)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to total_steps; return 0, or EXIT_REQUEUE after a signal-triggered checkpoint."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._start()
            self.eng.engine.train()
            window = Window()
            total = self.prep.total_steps
            while self.step < total:
                if self._stop_requested():
                    self.save()
                    self._write_marker()
                    self._finish(stopped=True)
                    return EXIT_REQUEUE
                self._train_step(window)
                self.step += 1
                self.metrics.advance(self.step)
                self.fault.after_step(self.step)
                if self.step % self.cfg.train.log_every == 0 or self.step == total:
                    metrics = {**window.reduce(self.world), **self.prep.loader.skip_metrics(self.device)}
                    self.metrics.log(self.step, metrics, self._lrs())
                    window = Window()
                if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
                    self.evaluate()
                if self.step % self.cfg.train.save_every == 0 and self.step < total:
                    self.save()
            self.save()
            self._finish(stopped=False)
            final_outputs(self)  # the test split (captioning runs), then report.md
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if hasattr(self, "metrics"):
                self.metrics.close()

    def _train_step(self, window: Window) -> None:
        engine = self.eng.engine
        start = time.perf_counter()
        for _ in range(engine.gradient_accumulation_steps()):
            wait = time.perf_counter()
            batch = self._next_batch()
            window.data_wait += time.perf_counter() - wait
            self._check_modality(batch["modality"])
            out = engine(**self._inputs(batch))
            engine.backward(out.loss)
            engine.step()
            window.add(
                out.loss.detach().float(), int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]
            )
        window.steps += 1
        window.time += time.perf_counter() - start

    def _next_batch(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.prep.loader)
        try:
            return next(self._iter)
        except StopIteration:  # end of an epoch; the loader continues from its position
            self._iter = iter(self.prep.loader)
            return next(self._iter)

    def _inputs(self, batch: dict) -> dict:
        keys = ("input_ids", "attention_mask", "labels", "media", "encoder_states")
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys if batch.get(k) is not None}

    def _check_modality(self, modality: str) -> None:
        """ZeRO-3 hangs if ranks run different modules; the loader promises equal modalities: verify cheaply."""
        code = schema.MODALITIES.index(modality)
        t = torch.tensor([code, -code], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError(f"step {self.step}: ranks got different modalities (this rank: {modality})")

    def _lrs(self) -> dict[str, float]:
        groups = self.eng.engine.optimizer.param_groups
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(groups)}

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        log.warning("rank %d got %s: checkpointing after this step", self.rank, signal.Signals(signum).name)
        self._stop = True

    def _stop_requested(self) -> bool:
        """Every rank learns of a signal that reached any rank, at the same step."""
        t = torch.tensor([int(self._stop)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _write_marker(self) -> None:
        if self.main:
            marker = {"step": self.step, "exit_code": EXIT_REQUEUE, "resume": "--resume auto"}
            (self.prep.run_dir / STOPPED_MARKER).write_text(json.dumps(marker))

    # ------------------------------------------------------------------ evaluation and checkpoints

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss, then the eval hooks (generation metrics). Every rank takes part."""
        metrics = {}
        engine = self.eng.engine
        engine.eval()
        for loader in self.prep.val_loaders:
            loader.load_state_dict(self._val_start)
            total = torch.zeros(2, device=self.device)
            for i, batch in enumerate(loader):
                if i >= VAL_MAX_BATCHES:
                    break
                total += torch.stack(
                    [engine(**self._inputs(batch)).loss.float(), torch.ones((), device=self.device)]
                )
            dist.all_reduce(total)
            metrics["val/loss"] = (total[0] / total[1].clamp(min=1)).item()
        for hook in self.eval_hooks:
            metrics.update(hook(self, self.step))
        engine.train()
        self.metrics.log_eval(self.step, metrics)
        return metrics

    def _stateful_hooks(self) -> list:
        return [h for h in self.eval_hooks if hasattr(h, "state_dict")]

    def save(self) -> Path:
        if self.step == self._saved_step:  # nothing changed since (a signal right after a save or resume)
            return self.ckpt_root / ckpt.tag_for(self.step)
        checksum = frozen_checksum(self.eng.model)
        if checksum != self.frozen_start:
            raise RuntimeError(f"step {self.step}: frozen weights changed during training")
        adapter = gather_adapter_state(self.eng.model)
        state = {
            "loader": self.prep.loader.state_dict(),
            "frozen_checksum": checksum,
            "world_size": self.world,
            "total_steps": self.prep.total_steps,
            "eval_state": {h.name: h.state_dict() for h in self._stateful_hooks()},
        }
        self._saved_step = self.step
        return ckpt.save_training_state(
            self.eng.engine,
            self.ckpt_root,
            self.step,
            state,
            rank=self.rank,
            barrier=dist.barrier,
            adapter_state=adapter,
            cfg=self.cfg,
            keep_last=self.cfg.train.keep_last,
            fault=lambda where: self.fault.in_save(self.step),
        )

    def _finish(self, stopped: bool) -> None:
        """Final adapter export and a summary a test (or a person) can check the run against."""
        adapter = gather_adapter_state(self.eng.model)
        adapter_digests = [None] * self.world
        dist.all_gather_object(adapter_digests, tensor_digest(adapter))
        frozen_full = [None] * self.world
        dist.all_gather_object(frozen_full, full_frozen_digest(self.eng.model))
        if self.main:
            if not stopped:
                ckpt.save_adapter(adapter, self.cfg, self.prep.run_dir / "adapter")
            summary = {
                "step": self.step,
                "stopped_by_signal": stopped,
                "optimizer": self.eng.optimizer_kind,
                "zero_stage": self.eng.stage,
                "frozen_checksum": self.frozen_start,
                "frozen_full_digests": frozen_full,
                "adapter_digests": adapter_digests,
            }
            (self.prep.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


class _Fault:
    """Test-only fault injection from EPALM_FAULT=kind:step[:rank] (kill_after_step, kill_in_save, sigterm_at_step)."""

    def __init__(self, kind: str | None, step: int, rank: int | None, my_rank: int):
        self.kind, self.step, self.rank, self.my_rank = kind, step, rank, my_rank

    @classmethod
    def from_env(cls, my_rank: int) -> _Fault:
        spec = os.environ.get("EPALM_FAULT", "")
        if not spec:
            return cls(None, -1, None, my_rank)
        kind, step, *rank = spec.split(":")
        return cls(kind, int(step), int(rank[0]) if rank else None, my_rank)

    def _mine(self, kind: str, step: int) -> bool:
        return self.kind == kind and step == self.step and self.rank in (None, self.my_rank)

    def after_step(self, step: int) -> None:
        if self._mine("kill_after_step", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._mine("sigterm_at_step", step):
            os.kill(os.getpid(), signal.SIGTERM)

    def in_save(self, step: int) -> None:
        if self._mine("kill_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)


def run(prep: Prepared) -> int:
    """Build the engine and train; the return value is the process exit code."""
    eng = build_engine(
        prep.cfg, prep.ds_config, prep.total_steps, with_encoder=not prep.cfg.data.use_features
    )
    return Trainer(prep, eng).fit()
