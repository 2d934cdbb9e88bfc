"""The one training loop: step-based, with logging, validation loss, checkpoints, exact resume and signal handling.

`epalm.train.setup` checks everything that can be checked before a model is built; `Trainer.fit` runs the
steps. Generation metrics, the best adapter and the final test evaluation are the evaluation hook's
(`epalm.evaluation.hook`), which sees the run through an `EvalContext` only.
A SIGTERM or SIGUSR1 on any rank, even one waiting for data, stops every rank with a checkpoint and exit 75.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from epalm import exit_codes
from epalm.atomic import write_text_atomic
from epalm.config import save_config
from epalm.digest import state_digest
from epalm.distributed import broadcast_from_rank0
from epalm.evaluation.hook import EvalContext
from epalm.exit_codes import STOP_SIGNALS
from epalm.run import checkpoint as ckpt
from epalm.run import layout
from epalm.run.adapter import save_adapter
from epalm.run.resume_changes import apply_schedule
from epalm.train.engine import Engine, build_engine, frozen_checksum, full_frozen_digest, gather_adapter_state
from epalm.train.fetch import StepFetcher
from epalm.train.nonfinite import NonFiniteGuard, require_finite, update_skipped
from epalm.train.setup import TrainSetup
from epalm.train.supervisor import stop_requested_early
from epalm.train.tracking import MetricWriter, WandbSink, Window
from epalm.train.trainable_state import gather_trainable_state, restore_trainable_state
from epalm.train.watchdog import Watchdog

log = logging.getLogger(__name__)

VAL_MAX_BATCHES = 100  # per rank and evaluation: a validation loss estimate, not a full pass


class Trainer:
    def __init__(self, setup: TrainSetup, engine: Engine):
        self.setup, self.cfg, self.engine = setup, setup.cfg, engine
        self.ds = engine.ds_engine
        self.rank, self.world = setup.info.rank, setup.info.world_size
        self.main = self.rank == 0
        self.step = 0
        self._saved_step = -1
        self._stop = False
        self.device = self.ds.device
        self.fetch = StepFetcher(setup.loader, self.device)
        self.guard = NonFiniteGuard(engine, self.cfg.train.max_nonfinite_steps, self.rank)  # NaN/inf steps
        self.ckpt_root = setup.run_dir / layout.CHECKPOINTS
        self.evaluation = setup.evaluation
        self.eval_ctx = EvalContext(
            model=engine.model,
            tokenizer=setup.tokenizer,
            cfg=setup.cfg,
            run_dir=setup.run_dir,
            rank=self.rank,
            world_size=self.world,
            zero_stage=engine.stage,
            gather_adapter=lambda: require_finite(gather_adapter_state(engine.model), "best/: the adapter"),
        )
        self._val_start = setup.val_loaders[0].state_dict() if setup.val_loaders else None

    # ------------------------------------------------------------------ setup

    def _start(self) -> None:
        p = self.setup
        if self.main:
            p.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, p.run_dir / layout.CONFIG)
            (p.run_dir / layout.DS_CONFIG).write_text(json.dumps(p.ds_config, indent=1))
            (p.run_dir / layout.STOPPED).unlink(missing_ok=True)
        self.frozen_start = frozen_checksum(self.engine.model)
        run_id = None
        if p.resume_from is not None:
            # another world size or ZeRO stage: DeepSpeed's per-rank files cannot load, the portable state does
            portable = ckpt.needs_portable(p.resume_from, self.world, self.engine.stage)
            restore = (lambda saved: restore_trainable_state(self.engine, saved)) if portable else None
            state = ckpt.load_training_state(self.ds, p.resume_from, rank=self.rank, restore_portable=restore)
            if p.resume_changes is not None and p.resume_changes.fresh_loader:  # epalm.run.resume_changes
                state["loader"] = p.loader.state_dict()
            if not portable and state.get("frozen_checksum") != self.frozen_start:  # (per partition)
                raise RuntimeError(
                    f"{p.resume_from}: the frozen weights differ from the ones this checkpoint trained with"
                )
            p.loader.load_state_dict(state["loader"], reshard=True)  # on a new partition: the epoch's rest
            self.step = self._saved_step = int(state["step"])
            run_id = state.get(layout.RUN_ID)  # absent from checkpoints older than run ids: a new one
            if self.evaluation is not None:  # the best value so far, so `best/` keeps its meaning
                hook = self.evaluation
                hook.load_state_dict(state.get("eval_state", {}).get(hook.name), self.step, p.run_dir)
            # the optimizer's param groups must carry the restored scheduler's lr, whatever restored them
            for group, lr in zip(self.ds.optimizer.param_groups, self.engine.scheduler.get_last_lr()):
                group["lr"] = lr
            where = f" (saved on {state.get('world_size')} ranks: its portable state)" if portable else ""
            log.info("resumed from %s at step %d%s", p.resume_from, self.step, where)
            apply_schedule(self.ds.optimizer, self.engine.scheduler, self.cfg)  # this config's lrs, here
        # the run's id, made at a fresh start and kept in every checkpoint: a resumed run is the same run
        self.run_id = run_id or broadcast_from_rank0(uuid.uuid4().hex)
        if self.main:  # the lineage `--resume auto` keeps to (epalm.run.resume)
            write_text_atomic(p.run_dir / layout.LINEAGE, json.dumps({layout.RUN_ID: self.run_id}))
        wandb = None
        if self.main and self.cfg.train.tracker == "wandb":
            config = dataclasses.asdict(self.cfg)
            wandb = WandbSink(p.run_dir, self.run_id, self.cfg.train.wandb_project, config)
        self.metrics = MetricWriter(p.run_dir, self.main, self.setup.total_steps, self.step, wandb)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to total_steps; return 0, or exit_codes.REQUEUE after a signal-triggered checkpoint."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._stop = self._stop or stop_requested_early()  # a signal during the model build counts too
        self.watchdog = Watchdog(self.setup.run_dir, self.rank, self.world, self.cfg.train)
        try:
            self._start()
            self.ds.train()
            window = Window()
            total = self.setup.total_steps
            while self.step < total:
                wait, self.watchdog.phase = time.perf_counter(), "waiting for data"
                batches = self.fetch.next_step(self.ds.gradient_accumulation_steps(), lambda: self._stop)
                if batches is None:  # a rank got a stop signal: all stop here, at the same step
                    self.save()
                    self._finish(stopped=True)
                    return exit_codes.REQUEUE
                window.data_wait += time.perf_counter() - wait
                self._train_step(window, batches, since=wait)
                self.step += 1
                self.watchdog.stepped(self.step)
                self.metrics.advance(self.step)
                if self.step % self.cfg.train.log_every == 0 or self.step == total:
                    metrics = {**window.reduce(self.world), **self.setup.loader.skip_metrics(self.device)}
                    self.metrics.log(self.step, metrics, self._lrs())
                    window = Window()
                if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
                    self.evaluate()
                self.metrics.flush()  # this step's records are complete (before a checkpoint marks it done)
                save_every = self.cfg.train.save_every  # 0: only the final checkpoint
                if save_every and self.step % save_every == 0 and self.step < total:
                    self.save()
            self.save()
            self._finish(stopped=False)
            self._final_outputs()
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.watchdog.close()
            if hasattr(self, "metrics"):
                self.metrics.close()

    def _train_step(self, window: Window, batches: list[dict], since: float) -> None:
        engine, losses, self.watchdog.phase = self.ds, [], "in a training step"
        for i, batch in enumerate(batches):  # (the fetcher checked that every rank has the same modalities)
            out = engine(**self._inputs(batch))
            engine.backward(out.loss)
            losses.append(out.loss.detach().float())
            if i < len(batches) - 1:  # the last step() applies the update: after the finiteness check
                engine.step()
        skip = self.guard.skip(self.step + 1, losses, batches)
        with update_skipped(engine) if skip else contextlib.nullcontext():
            engine.step()
        window.add_step(losses, batches, skip, time.perf_counter() - since)

    def _inputs(self, batch: dict) -> dict:
        keys = ("input_ids", "attention_mask", "labels", "media", "encoder_states")
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys if batch.get(k) is not None}

    def _lrs(self) -> dict[str, float]:
        groups = self.ds.optimizer.param_groups
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(groups)}

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        log.warning("rank %d got %s: checkpointing after this step", self.rank, signal.Signals(signum).name)
        self._stop = True

    # ------------------------------------------------------------------ evaluation and checkpoints

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss, then the eval hooks (generation metrics). Every rank takes part."""
        metrics, engine, self.watchdog.phase = {}, self.ds, "in evaluation"
        engine.eval()
        for loader in self.setup.val_loaders:
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
        if self.evaluation is not None and self.evaluation.val is not None:
            metrics.update(self.evaluation(self.eval_ctx, self.step))
        engine.train()
        self.metrics.log_eval(self.step, metrics)
        return metrics

    def save(self) -> Path:
        if self.step == self._saved_step:  # nothing changed since (a signal right after a save or resume)
            return self.ckpt_root / layout.tag_for(self.step)
        checksum, self.watchdog.phase = frozen_checksum(self.engine.model), "writing a checkpoint"
        if checksum != self.frozen_start:
            raise RuntimeError(f"step {self.step}: frozen weights changed during training")
        adapter = require_finite(gather_adapter_state(self.engine.model), f"checkpoint of step {self.step}")
        state = {
            "loader": self.fetch.state_dict(),  # where the last step handed out ended (epalm.train.fetch)
            "config": dataclasses.asdict(self.cfg),  # what resume compares against (epalm.run.resume_changes)
            "data_identity": self.setup.data_identity,
            "frozen_checksum": checksum,
            "world_size": self.world,
            "zero_stage": self.engine.stage,  # with world_size: whether DeepSpeed's files can load on resume
            "total_steps": self.setup.total_steps,
            layout.RUN_ID: self.run_id,
            "eval_state": {}
            if self.evaluation is None
            else {self.evaluation.name: self.evaluation.state_dict()},
        }
        portable = gather_trainable_state(self.engine)  # collective: every rank
        self._saved_step = self.step
        return ckpt.save_training_state(
            self.ds,
            self.ckpt_root,
            self.step,
            state,
            rank=self.rank,
            barrier=dist.barrier,
            adapter_state=adapter,
            cfg=self.cfg,
            keep_last=self.cfg.train.keep_last,
            portable=portable if self.main else None,
        )

    def _final_outputs(self) -> None:
        """After a completed run: the test split of a captioning run, then report.md (rank 0)."""
        self.watchdog.phase = "in the final evaluation"
        if self.evaluation is not None and self.evaluation.test is not None:
            self.ds.eval()
            self.metrics.log_eval(self.step, self.evaluation.final(self.eval_ctx, self.step))
        if self.main:
            from epalm.evaluation.report import write_report

            try:  # a plotting problem must not turn a finished run into a failed job
                log.info("report: %s", write_report(self.setup.run_dir))
            except Exception as e:  # noqa: BLE001
                log.warning("report.md not written: %s", e)

    def _finish(self, stopped: bool) -> None:
        """Final adapter export and a summary a test (or a person) can check the run against."""
        adapter = require_finite(gather_adapter_state(self.engine.model), "the final adapter")
        adapter_digests = [None] * self.world
        dist.all_gather_object(adapter_digests, state_digest(adapter))
        frozen_full = [None] * self.world
        dist.all_gather_object(frozen_full, full_frozen_digest(self.engine.model))
        if self.main:
            if not stopped:
                save_adapter(adapter, self.cfg, self.setup.run_dir / layout.ADAPTER)
            else:  # for launchers that do not pass the exit code on
                marker = {"step": self.step, "exit_code": exit_codes.REQUEUE, "resume": "--resume auto"}
                (self.setup.run_dir / layout.STOPPED).write_text(json.dumps(marker))
            summary = {
                "step": self.step,
                "stopped_by_signal": stopped,
                "optimizer": self.engine.optimizer_kind,
                "zero_stage": self.engine.stage,
                "frozen_checksum": self.frozen_start,
                "frozen_full_digests": frozen_full,
                "adapter_digests": adapter_digests,
            }
            (self.setup.run_dir / layout.SUMMARY).write_text(json.dumps(summary, indent=1))


def run(setup: TrainSetup) -> int:
    """Build the engine and train; the return value is the process exit code."""
    engine = build_engine(
        setup.cfg, setup.ds_config, setup.total_steps, with_encoder=not setup.cfg.data.use_features
    )
    return Trainer(setup, engine).fit()
