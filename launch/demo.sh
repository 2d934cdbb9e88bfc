#!/usr/bin/env bash
# `make demo`: the whole system on this CPU machine, end to end, in a few minutes.
#   Three tasks: digits VQA (image, ViT), shapes QA (video, TimeSformer), tones captions (audio, AST).
#   1. demo data in the datasets' real formats, then shards   (python -m data_shards.demo)
#   2. the frozen parts' "pretraining", train split only       (launch/demo/tokenizer.py, pretrain_encoder.py)
#   3. training with the real launcher, 2 ranks, ZeRO-3        (deepspeed --num_gpus 2 launch/train.py)
#   4. evaluation on the held-out test splits                  (python -m eval.run), then a results table
# Variables: DEMO_OUT (default demo_out), DS_CONFIG (default ds_configs/zero3_small.json: ZeRO-3 without
# persistent parameters, docs/training.md), DEMO_PRECISION (default
# fp32: CPUs without bf16 instructions, like this 2-core AVX2 machine, run bf16 matmuls ~2.4x slower; measured
# 0.95 vs 0.40 s per digits step. On GPUs leave it to the JSON's bf16: DEMO_PRECISION=bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_small.json}
PRECISION=${DEMO_PRECISION:-fp32}
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"
# One thread per process: two ranks on two cores, and torch's default oversubscribes (10x slower here).
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::FutureWarning
start=$(date +%s)

echo "== 1/4 demo data and shards -> $OUT"
$PY -m data_shards.demo --out "$OUT" --tasks digits_vqa shapes_qa tones_caption | tail -n 11

echo "== 2/4 unimodal pretraining of the frozen parts (train split only)"
$PY launch/demo/tokenizer.py --raw "$OUT/raw/digits" --out "$OUT/tokenizer"
# The three encoders are independent single-threaded jobs: run them side by side on the 2 cores.
pretrain() { local log="$OUT/encoder/$1.log"; shift; "$PY" "$@" >"$log" 2>&1 || { cat "$log"; return 1; }; grep -v "Writing model" "$log" | tail -n 2; }
mkdir -p "$OUT/encoder"
jobs=()
pretrain vit launch/demo/pretrain_encoder.py --raw "$OUT/raw/digits" --out "$OUT/encoder/vit_digits.safetensors" &
jobs+=($!)
pretrain timesformer launch/demo/pretrain_media.py --kind timesformer --shards "$OUT/shards/shapes_qa/train" \
    --val "$OUT/shards/shapes_qa/val" --out "$OUT/encoder/timesformer_shapes" &
jobs+=($!)
pretrain ast launch/demo/pretrain_media.py --kind ast --shards "$OUT/shards/tones_caption/train" \
    --val "$OUT/shards/tones_caption/val" --out "$OUT/encoder/ast_tones" &
jobs+=($!)
for job in "${jobs[@]}"; do wait "$job"; done

# train TASK CONFIG ENCODER-OVERRIDE: one task with the real launcher, 2 ranks
train() {
    local task=$1 config=$2 encoder=$3
    rm -rf "$OUT/runs/$task"
    deepspeed --num_gpus 2 launch/train.py --ds_config "$DS_CONFIG" --precision "$PRECISION" --config "$config" \
        model.lm.tokenizer="$OUT/tokenizer" "$encoder" "data.train=[{path: $OUT/shards/$task/train}]" \
        data.val="$OUT/shards/$task/val" run_dir="$OUT/runs/$task"
}
echo "== 3/4 training: deepspeed --num_gpus 2 launch/train.py --ds_config $DS_CONFIG --precision $PRECISION (image, video, audio)"
train digits_vqa launch/configs/demo/digits_vqa.yaml model.encoder.checkpoint="$OUT/encoder/vit_digits.safetensors"
train shapes_qa launch/configs/demo/shapes_qa.yaml model.encoder.name="$OUT/encoder/timesformer_shapes"
train tones_caption launch/configs/demo/tones_caption.yaml model.encoder.name="$OUT/encoder/ast_tones"

echo "== 4/4 evaluation on the held-out test splits: python -m eval.run"
evaluate() {  # evaluate TASK EVAL-TASK: one process each, the three side by side
    mkdir -p "$OUT/eval"
    $PY -m eval.run --adapter "$OUT/runs/$1/adapter" --shards "$OUT/shards/$1/test" --task "$2" \
        --num-beams 3 --no-progress --out "$OUT/eval/$1" >"$OUT/eval/$1.log" 2>&1 || { cat "$OUT/eval/$1.log"; return 1; }
}
evaluate digits_vqa vqav2 &
jobs=($!)
evaluate shapes_qa video_qa &
jobs+=($!)
evaluate tones_caption audio_caption &
jobs+=($!)
for job in "${jobs[@]}"; do wait "$job"; done
for task in digits_vqa shapes_qa tones_caption; do grep -m 1 " test: " "$OUT/eval/$task.log" || true; done
$PY launch/demo/summary.py --vqa "$OUT/eval/digits_vqa" --video "$OUT/eval/shapes_qa" \
    --audio "$OUT/eval/tones_caption" --seconds $(( $(date +%s) - start ))
