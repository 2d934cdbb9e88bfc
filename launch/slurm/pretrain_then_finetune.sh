#!/bin/bash
# Two-stage training as a chain of SLURM jobs: CC3M pretraining, then task finetuning that starts from the
# pretraining run's adapter export (train.init_adapter=<pretrain run_dir>/adapter). The finetuning job
# waits with --dependency=afterok, so it starts only when pretraining COMPLETED (a requeued pretraining
# job keeps its id, so preemption does not break the chain). Run it from the repository root:
#
#   launch/slurm/pretrain_then_finetune.sh --nodes=4 --ntasks-per-node=8 --gpus-per-node=8
#
# Usage: pretrain_then_finetune.sh [sbatch option ...] [-- key=value ...]
#   sbatch options go to both jobs; key=value overrides after `--` go to both stages' configs.
# Variables:
#   PRETRAIN_CONFIG      default launch/configs/pretrain/cc3m_pt_L.yaml
#   FINETUNE_CONFIG      default launch/configs/image/vqa_v2_pt_L.yaml
#   PRETRAIN_RUN_DIR     default runs/cc3m_pt_L            (its adapter/ seeds the finetuning)
#   FINETUNE_RUN_DIR     default runs/<finetune config name>_from_cc3m
#   PRETRAIN_OVERRIDES   extra key=value for pretraining only, whitespace-separated
#   FINETUNE_OVERRIDES   extra key=value for finetuning only, whitespace-separated
#   DS_CONFIG, PRECISION, NCCL_*, ... as for launch/slurm/train.sbatch (it runs both stages).
# Prints the two job ids ("pretrain job N", "finetune job M").
set -euo pipefail

PRETRAIN_CONFIG=${PRETRAIN_CONFIG:-launch/configs/pretrain/cc3m_pt_L.yaml}
FINETUNE_CONFIG=${FINETUNE_CONFIG:-launch/configs/image/vqa_v2_pt_L.yaml}
PRETRAIN_RUN_DIR=${PRETRAIN_RUN_DIR:-runs/cc3m_pt_L}
FINETUNE_RUN_DIR=${FINETUNE_RUN_DIR:-runs/$(basename "$FINETUNE_CONFIG" .yaml)_from_cc3m}
SCRIPT=launch/slurm/train.sbatch

sbatch_opts=()
while (($#)) && [[ $1 != "--" ]]; do
    sbatch_opts+=("$1")
    shift
done
(($#)) && shift # the `--`
read -r -a pre_over <<<"${PRETRAIN_OVERRIDES:-}"
read -r -a fine_over <<<"${FINETUNE_OVERRIDES:-}"

pre=$(CONFIG=$PRETRAIN_CONFIG sbatch --parsable --job-name=epalm-pretrain "${sbatch_opts[@]}" \
    "$SCRIPT" run_dir="$PRETRAIN_RUN_DIR" "$@" "${pre_over[@]}")
pre=${pre%%;*}
echo "pretrain job $pre: $PRETRAIN_CONFIG -> $PRETRAIN_RUN_DIR"

fine=$(CONFIG=$FINETUNE_CONFIG sbatch --parsable --job-name=epalm-finetune --dependency=afterok:"$pre" \
    --kill-on-invalid-dep=yes "${sbatch_opts[@]}" "$SCRIPT" run_dir="$FINETUNE_RUN_DIR" \
    train.init_adapter="$PRETRAIN_RUN_DIR/adapter" "$@" "${fine_over[@]}")
fine=${fine%%;*}
echo "finetune job $fine: $FINETUNE_CONFIG -> $FINETUNE_RUN_DIR (after job $pre, from $PRETRAIN_RUN_DIR/adapter)"
