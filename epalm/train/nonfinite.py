"""Non-finite steps: a NaN/inf loss or gradient on any rank skips the optimizer update on every rank, is logged
with the samples of the step and counted, and `train.max_nonfinite_steps` such steps in a row stop the run
(NonFiniteError, exit 1). Also the check that keeps NaN/inf out of every checkpoint and adapter export.

DeepSpeed skips an update by itself only on fp16 overflow (and bf16 with its `check_grad_overflow`), while
ZeRO-0 in fp32 applies the NaNs, so the check is ours and the same on every engine: after the last backward
of a step and before `engine.step()`, the gradients through DeepSpeed's `safe_get_full_grad` (the public,
engine-independent accessor; collective under ZeRO 1-3). A skipped step still runs `engine.step()`, with the
wrapped optimizer's own update made a no-op, so DeepSpeed's counters, gradient buffers and the lr schedule
move on as after any step: the step counts (its batches are consumed, the schedule is that of its number)
and a resume stays aligned. Under fp16 an overflowing gradient is the dynamic loss scaler's business (it
skips and lowers the scale, several steps in a row at the start): there only a non-finite loss counts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training cannot go on without writing or applying NaN/inf values; the message says what and where."""


def nonfinite_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of `state` that hold a NaN or an inf."""
    return sorted(name for name, t in state.items() if not torch.isfinite(t).all())


def require_finite(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """`state`, or NonFiniteError naming its non-finite tensors: nothing non-finite is ever written."""
    bad = nonfinite_names(state)
    if bad:
        raise NonFiniteError(f"{what}: non-finite values (NaN/inf) in {', '.join(bad)}; nothing written")
    return state


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers a DeepSpeed wrapper (ZeRO 1-3, BF16/FP16_Optimizer) steps, or `optimizer` itself."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    found = []
    for name in ("optimizer", "backup_optimizer"):
        inner = getattr(optimizer, name, None)
        if inner is not None and inner is not optimizer:
            found += _inner_optimizers(inner)
    return found


@contextlib.contextmanager
def update_skipped(ds_engine) -> Iterator[None]:
    """`ds_engine.step()` inside this block does everything but change the weights and optimizer moments;
    the lr schedule moves on also when DeepSpeed's own overflow check skipped it (ZeRO 1-3 may check too)."""
    inner = _inner_optimizers(ds_engine.optimizer)
    if not inner:
        raise RuntimeError(f"cannot find the optimizer inside {type(ds_engine.optimizer).__name__}")

    def no_update(*args, **kwargs) -> None:
        return None

    no_update._wrapped_by_lr_sched = True  # what torch's LRScheduler looks for on optimizer.step
    for opt in inner:
        opt.step = no_update  # an instance attribute shadows the class's step
        opt._opt_called = True  # (torch's LRScheduler warns about a schedule stepped before the optimizer)
    try:
        yield
    finally:
        for opt in inner:
            del opt.step
    if not ds_engine.was_step_applied() and ds_engine.lr_scheduler is not None:
        ds_engine.lr_scheduler.step()


class NonFiniteGuard:
    """Decides, on every rank alike, whether a step's update is applied; counts the skipped ones."""

    def __init__(self, engine, limit: int, rank: int):
        """`engine`: epalm.train.engine.Engine (the model and the DeepSpeed engine around it)."""
        fp16 = engine.ds_engine.fp16_enabled()
        self.params = [] if fp16 else [p for _, p in engine.model.trainable_named_parameters()]
        self.limit, self.rank, self.device = limit, rank, engine.ds_engine.device
        self.in_a_row = 0
        self.first_bad = 0

    def grads_finite(self) -> bool:
        """Every trainable parameter's gradient is finite (call on every rank: collective under ZeRO)."""
        finite = True
        for p in self.params:  # each call may be a collective: never stop early
            g = safe_get_full_grad(p)
            finite &= g is None or bool(torch.isfinite(g).all())
        return finite

    def skip(self, step: int, losses: list[torch.Tensor], batches: list[dict]) -> bool:
        """True when step `step` must not update (a rank's loss or the gradient is NaN/inf); after
        `limit` such steps in a row, NonFiniteError. Call between the last backward and `engine.step()`."""
        loss_ok = bool(torch.isfinite(torch.stack(losses)).all())
        flags = torch.tensor([int(not loss_ok), int(not self.grads_finite())], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        any_loss, any_grad = bool(flags[0]), bool(flags[1])
        if not (any_loss or any_grad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.first_bad = self.first_bad if self.in_a_row > 1 else step
        if not loss_ok or not any_loss:  # the ranks whose data gave NaN/inf say which samples (all: a grad)
            samples = [f"{b.get('dataset', '?')}/{k}" for b in batches for k in b.get("keys", [])]
            what = "loss" if not loss_ok else "gradient (every loss finite)"
            log.warning(
                "step %d: non-finite %s on rank %d; update skipped (%d in a row, limit %d); samples: %s",
                step,
                what,
                self.rank,
                self.in_a_row,
                self.limit,
                ", ".join(samples),
            )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"steps {self.first_bad}..{step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                f"loss or gradient (train.max_nonfinite_steps={self.limit}); stopping without a checkpoint. "
                "The adapter and the last checkpoint are finite; the warnings above name the samples"
            )
        return True
