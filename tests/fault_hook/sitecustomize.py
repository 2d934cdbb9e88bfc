"""Test-only fault injection for training and extraction subprocesses; the library and the tools know nothing of it.

A test puts this directory first on PYTHONPATH and sets EPALM_FAULT=kind:step[:rank] (testing.support.fault_env);
Python imports `sitecustomize` at start-up, and this one patches modules as they load:
  epalm.train.trainer
    kill_after_step:N              SIGKILL right after optimizer step N
    sigterm_at_step:N              SIGTERM to itself right after step N (the trainer checkpoints and exits 75)
  epalm.run.checkpoint
    kill_in_save:N                 SIGKILL in the middle of step N's checkpoint (after DeepSpeed's files)
  epalm.data.resumable
    kill_at_batch:N                SIGKILL just before the loader hands out training batch N (its batch index,
                                   from 0, counted across resumes as the checkpoint's consumed batches)
  epalm.data.collate
    stall_batch:N                  the N-th training batch this process assembles never comes: its reader
                                   sleeps for good, as on a shard server that stopped sending (and touches
                                   $EPALM_FAULT_MARK, if set, so a test knows the stall began)
  data_shards.writer, only under `python -m data_shards.extract` (a module run as __main__ is not imported, so
  extract's own functions cannot be patched; the tar writer it calls can); N counts the tars this process writes:
    extract_kill_in_shard:N        SIGKILL with the N-th shard's tar half written (its .tmp left behind)
    extract_sigterm_after_shard:N  SIGTERM to itself once the N-th tar is written (extract exits 75)

EPALM_TRACE_DIR=DIR (with or without a fault) records, for tests/test_resume_world_size.py: every training batch's
sample keys with its loader index (DIR/keys-rank<R>-<pid>.jsonl), and after a resume the restored trainable state
(DIR/restored.pt, rank 0).
"""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import sys
import time

_SPEC = os.environ.get("EPALM_FAULT", "")
_TRACE = os.environ.get("EPALM_TRACE_DIR", "")


def _parse():
    kind, step, *rank = _SPEC.split(":")
    return kind, int(step), int(rank[0]) if rank else None


def _mine(kind: str, step: int) -> bool:
    if not _SPEC:
        return False
    want_kind, want_step, want_rank = _parse()
    from epalm.distributed import get_dist_info  # imported by now: the trainer is running

    my_rank = get_dist_info().rank
    return kind == want_kind and step == want_step and want_rank in (None, my_rank)


def _patch_trainer(module) -> None:
    original = module.Trainer._train_step

    def train_step(self, window, *args, **kwargs):
        original(self, window, *args, **kwargs)
        done = self.step + 1  # the loop increments `step` right after this returns
        if _mine("kill_after_step", done):
            os.kill(os.getpid(), signal.SIGKILL)
        if _mine("sigterm_at_step", done):
            os.kill(os.getpid(), signal.SIGTERM)

    module.Trainer._train_step = train_step
    if _TRACE:
        start = module.Trainer._start

        def start_then_dump(self):
            start(self)
            if self.setup.resume_from is not None:
                import torch

                from epalm.train.trainable_state import gather_trainable_state

                state = gather_trainable_state(self.engine)  # a collective: every rank calls it
                if self.rank == 0:
                    torch.save(state, os.path.join(_TRACE, "restored.pt"))

        module.Trainer._start = start_then_dump


def _patch_resumable(module) -> None:
    original = module.ResumableLoader.__iter__

    def logged(self):
        for batch in original(self):
            if batch.get("dataset") == "train":
                index = self.consumed - 1  # the batch about to be handed out
                if _mine("kill_at_batch", index):
                    os.kill(os.getpid(), signal.SIGKILL)
                if _TRACE:
                    name = f"keys-rank{os.environ['RANK']}-{os.getpid()}.jsonl"
                    with open(os.path.join(_TRACE, name), "a") as f:
                        f.write(json.dumps({"index": index, "keys": batch["keys"]}) + "\n")
            yield batch

    module.ResumableLoader.__iter__ = logged


def _patch_checkpoint(module) -> None:
    original = module.save_training_state

    def save_training_state(engine, root, step, *args, **kwargs):
        if _mine("kill_in_save", step):
            save = engine.save_checkpoint

            def save_then_die(*a, **k):
                save(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)

            engine.save_checkpoint = save_then_die
        return original(engine, root, step, *args, **kwargs)

    module.save_training_state = save_training_state


def _patch_collate(module) -> None:
    original = module.BatchBuilder.assemble
    made = 0

    def assemble(self, samples, prepared):
        nonlocal made
        if self.train:
            made += 1
            if _mine("stall_batch", made):
                mark = os.environ.get("EPALM_FAULT_MARK")
                if mark:
                    open(mark, "w").close()
                while True:
                    time.sleep(60)
        return original(self, samples, prepared)

    module.BatchBuilder.assemble = assemble


def _in_extract() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == "data_shards.extract"


def _patch_writer(module) -> None:
    original = module.write_tar
    written = 0

    def write_tar(path, samples):
        nonlocal written
        original(path, samples)
        if not _in_extract():
            return
        written += 1
        if _mine("extract_kill_in_shard", written):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        if _mine("extract_sigterm_after_shard", written):
            os.kill(os.getpid(), signal.SIGTERM)

    module.write_tar = write_tar


_PATCHES = {
    "epalm.train.trainer": _patch_trainer,
    "epalm.run.checkpoint": _patch_checkpoint,
    "epalm.data.resumable": _patch_resumable,
    "epalm.data.collate": _patch_collate,
    "data_shards.writer": _patch_writer,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the patched modules to patch them once executed."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if _SPEC or _TRACE:
    sys.meta_path.insert(0, _PatchOnImport())
