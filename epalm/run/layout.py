"""The run directory's file names, defined once: the trainer writes them, and the report, the evaluation,
resume, the launch scripts' helpers and the tests read them from here. A leaf (no torch), so light tools
can import it.

    run_dir/
      config.yaml  ds_config.json  metrics.jsonl  tb/  summary.json  report.md  loss.png  eval_metric.png
      adapter/     best/  best.json  eval/scores.json  run.lock  run.json  stopped_by_signal.json  heartbeat/
      tracker.json  wandb/   (with train.tracker: wandb; wandb/ is W&B's own directory)
      checkpoints/latest  checkpoints/step_00000040/...  checkpoints/set_aside/
"""

from __future__ import annotations

import re

CONFIG = "config.yaml"  # the resolved config (also the adapter export's config file)
DS_CONFIG = "ds_config.json"  # the DeepSpeed JSON the run used, batch sizes injected
METRICS = "metrics.jsonl"  # one JSON object per logged step or evaluation
TENSORBOARD = "tb"
SUMMARY = "summary.json"  # step, engine, digests: what a finished or stopped run ended with
REPORT, LOSS_PNG, METRIC_PNG = "report.md", "loss.png", "eval_metric.png"
ADAPTER = "adapter"  # the final adapter export
BEST, BEST_RECORD = "best", "best.json"  # the adapter with the best val metric, and what it scored
EVAL = "eval"  # the final test evaluation's predictions, references and scores
SCORES = "scores.json"  # in every evaluation output directory
LOCK = "run.lock"
STOPPED = "stopped_by_signal.json"  # for launchers that do not pass the exit code on (torchrun)
TRACKER = "tracker.json"  # the external tracker's run id and the last step handed to it (never sent twice)
LINEAGE = "run.json"  # {"run_id": ...}: the run this directory holds; --resume auto takes only its steps
HEARTBEATS = "heartbeat"  # rank-NNNNN.json per rank: its step, phase and last sign of life (the watchdog's)
MOVED_ASIDE = "{name}.moved-{stamp}"  # beside run_dir: where --move-aside puts the run a fresh start found

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # a file holding the tag of the newest complete checkpoint (same format as DeepSpeed's)
SET_ASIDE = "set_aside"  # newer steps of an abandoned line (bad ones, or past an explicit --resume)
TAG = re.compile(r"^step_(\d{8,})$")
# inside a step directory, beside DeepSpeed's files and rng_rank*.pt
TRAINER_STATE = "trainer_state.json"  # step, loader position, run lineage, eval state
RUN_ID = (
    "run_id"  # the TRAINER_STATE key of the run's id: made at a fresh start, kept by every resume (W&B's id)
)
CHECKPOINT_MANIFEST = "checkpoint_manifest.json"  # sizes and SHA-256 of every file, written last
PORTABLE = "trainable_state.pt"  # full fp32 adapter, Adam moments, steps, scheduler: any world size or stage

ADAPTER_WEIGHTS = "adapter.safetensors"  # inside an adapter export, beside CONFIG
FROZEN = "frozen"  # inside an adapter export: small local frozen parts (tokenizer, tiny encoder) copied in


def tag_for(step: int) -> str:
    """The checkpoint directory name of `step`."""
    return f"step_{step:08d}"
