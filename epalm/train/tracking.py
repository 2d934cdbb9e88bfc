"""What the training loop measures and where it goes: loss, lr, throughput, data wait and peak memory,
into TensorBoard, a JSONL file and a tqdm bar (rank 0), and Weights & Biases with `train.tracker: wandb`."""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from epalm.atomic import write_text_atomic
from epalm.run.layout import METRICS, TENSORBOARD, TRACKER


@dataclass
class Window:
    """Sums since the last log line, on this rank; `reduce` combines the ranks (collective)."""

    losses: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    samples: int = 0
    steps: int = 0
    time: float = 0.0
    data_wait: float = 0.0
    # micro-batches per modality (equal on all ranks: the trainer checks each one)
    modalities: dict[str, int] = field(default_factory=dict)
    # steps skipped for a NaN/inf loss or gradient (all ranks agree on them); their losses are not in `loss`
    nonfinite_steps: int = 0

    def add(self, loss: torch.Tensor | None, tokens: int, samples: int, modality: str | None = None) -> None:
        if loss is not None:  # None: the micro-batch of a skipped (non-finite) step
            self.losses.append(loss)  # kept as tensors: no device sync per micro-step
        self.tokens += tokens
        self.samples += samples
        if modality is not None:
            self.modalities[modality] = self.modalities.get(modality, 0) + 1

    def add_step(
        self, losses: list[torch.Tensor], batches: list[dict], skipped: bool, seconds: float
    ) -> None:
        """One optimizer step's micro-batches (a skipped step's data counts, its losses do not)."""
        for loss, b in zip(losses, batches):
            tokens, samples = int(b["attention_mask"].sum()), len(b["input_ids"])
            self.add(None if skipped else loss, tokens, samples, b["modality"])
        self.nonfinite_steps += skipped
        self.steps += 1
        self.time += seconds

    def reduce(self, world_size: int) -> dict[str, float]:
        loss_sum = torch.stack(self.losses).sum().cpu() if self.losses else torch.zeros(())
        device = self.losses[0].device if self.losses else "cpu"
        sums = torch.tensor(
            [float(loss_sum), len(self.losses), self.tokens, self.samples, self.data_wait],
            dtype=torch.float64,
        ).to(device)
        dist.all_reduce(sums)
        loss, micro, tokens, samples, wait = sums.tolist()
        elapsed = max(self.time, 1e-9)
        return {  # a window whose every step was skipped has no loss: NaN here, null in metrics.jsonl
            "loss": loss / micro if micro else float("nan"),
            "nonfinite_steps": float(self.nonfinite_steps),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_pct": 100.0 * wait / world_size / elapsed,
            "peak_mem_mb": peak_memory_mb(),
            **{f"micro_batches/{m}": float(n) for m, n in sorted(self.modalities.items())},
        }


def peak_memory_mb() -> float:
    """CUDA: the allocator's peak; CPU: the process's max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the rows of `path` logged at or before `step` (and no torn last line); return how many went."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None  # a line cut short by a kill
        if row_step is not None and row_step <= step:
            keep.append(line + "\n")
        elif line.strip():
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(keep))
    return dropped


class WandbSink:
    """One W&B run per training run, rank 0 only: its id is the run's `run_id` (kept in every checkpoint),
    opened with resume="allow", so a resumed or requeued run continues it (mode, entity, key: W&B's WANDB_*).

    A step's records (train metrics, then evaluation) go out as one committed row at `flush`. W&B history is
    append-only (no purge_step as TensorBoard has), so a resumed run does not send again the steps an earlier
    attempt handed over (the last one is in tracker.json): a step appears once. A kill -9 loses what W&B had
    not yet written (its offline file is flushed every WANDB__TRANSACTION_LOG_FLUSH_INTERVAL seconds, 15 by
    default); those steps stay missing rather than appear twice. A record for a step already sent by this
    process (the final test evaluation) goes into the run summary.
    """

    def __init__(self, run_dir: Path, run_id: str, project: str, config: dict):
        import wandb

        self.path, self.run_id = run_dir / TRACKER, run_id
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.floor = int(state.get("step", 0)) if state.get("run_id") == run_id else 0
        self.sent = self.floor
        self.pending: dict[str, float] = {}
        self.pending_step: int | None = None
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.floor:
            return  # an earlier attempt of this run sent it
        if self.pending_step is not None and step != self.pending_step:
            self.flush()
        if step <= self.sent:
            self.run.summary.update(values)
            return
        self.pending.update(values)
        self.pending_step = step

    def flush(self) -> None:
        if self.pending_step is None:
            return
        self.run.log(self.pending, step=self.pending_step, commit=True)
        self.sent, self.pending, self.pending_step = self.pending_step, {}, None
        write_text_atomic(self.path, json.dumps({"run_id": self.run_id, "step": self.sent}))

    def close(self) -> None:
        self.flush()
        self.run.finish()


class MetricWriter:
    """Rank 0 writes; other ranks hold a do-nothing writer so the loop has no rank checks."""

    def __init__(
        self, run_dir: Path, main: bool, total_steps: int, start_step: int, wandb: WandbSink | None = None
    ):
        self.main, self.wandb = main, wandb
        self.bar = self.tb = self.jsonl = None
        if not main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        # rows and events past the resumed step belong to the lost progress: drop them, or they repeat
        self.tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)
        truncate_metrics(run_dir / METRICS, start_step)
        self.jsonl = open(run_dir / METRICS, "a")  # noqa: SIM115 (open for the run's lifetime)
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0
        )
        self._last_step = start_step

    def advance(self, step: int) -> None:
        if self.main:
            self.bar.update(step - self._last_step)
            self._last_step = step

    def log(self, step: int, metrics: dict[str, float], lrs: dict[str, float]) -> None:
        if not self.main:
            return
        record = {"step": step, **metrics, **lrs}
        self._write(step, record)
        loss = record["loss"]
        loss = "n/a" if loss is None else f"{loss:.4f}"
        self.bar.set_postfix(loss=loss, lr=f"{next(iter(lrs.values()), 0):.2e}")

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.main and metrics:
            self._write(step, {"step": step, **metrics})
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _write(self, step: int, record: dict) -> None:
        # NaN/inf are not JSON: null, and the keys they were under, so every line parses
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        record.update(dict.fromkeys(bad))
        if bad:
            record["nonfinite"] = bad
        record["time"] = time.time()
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        scalars = {
            key if "/" in key else f"train/{key}": value
            for key, value in record.items()
            if key not in ("step", "time") and isinstance(value, int | float) and not isinstance(value, bool)
        }
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, scalars)

    def flush(self) -> None:
        """The step's records are all written: hand them to W&B as one row (the loop calls it every step)."""
        if self.wandb is not None:
            self.wandb.flush()

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.close()
