#!/usr/bin/env bash
# `make demo`: the whole system on this CPU machine, end to end, in a few minutes.
#   1. demo data in the datasets' real formats, then shards   (python -m data_shards.demo)
#   2. the frozen parts' "pretraining", train split only       (launch/demo/tokenizer.py, pretrain_encoder.py)
#   3. training with the real launcher, 2 ranks, ZeRO-3        (deepspeed --num_gpus 2 launch/train.py)
#   4. evaluation on the held-out test split                   (python -m eval.run), then a results table
# Variables: DEMO_OUT (default demo_out), DS_CONFIG (default ds_configs/zero3.json).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"
# One thread per process: two ranks on two cores, and torch's default oversubscribes (10x slower here).
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::FutureWarning
start=$(date +%s)

echo "== 1/4 demo data and shards -> $OUT"
$PY -m data_shards.demo --out "$OUT" | tail -n 13

echo "== 2/4 unimodal pretraining of the frozen parts (train split only)"
$PY launch/demo/tokenizer.py --raw "$OUT/raw/digits" --out "$OUT/tokenizer"
$PY launch/demo/pretrain_encoder.py --raw "$OUT/raw/digits" --out "$OUT/encoder/vit_digits.safetensors" | tail -n 2

echo "== 3/4 training: deepspeed --num_gpus 2 launch/train.py --ds_config $DS_CONFIG"
rm -rf "$OUT/runs/digits_vqa"
overrides=(model.lm.tokenizer="$OUT/tokenizer" model.encoder.checkpoint="$OUT/encoder/vit_digits.safetensors"
           "data.train=[{path: $OUT/shards/digits_vqa/train}]" data.val="$OUT/shards/digits_vqa/val"
           run_dir="$OUT/runs/digits_vqa")
deepspeed --num_gpus 2 launch/train.py --ds_config "$DS_CONFIG" --config launch/configs/demo/digits_vqa.yaml \
    "${overrides[@]}"

echo "== 4/4 evaluation on the held-out test split: python -m eval.run"
$PY -m eval.run --adapter "$OUT/runs/digits_vqa/adapter" --shards "$OUT/shards/digits_vqa/test" --task vqav2 \
    --num-beams 3 --out "$OUT/eval/digits_vqa"
$PY launch/demo/summary.py --scores "$OUT/eval/digits_vqa/scores.json" --num-answers 10 \
    --seconds $(( $(date +%s) - start ))
