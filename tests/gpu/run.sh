#!/usr/bin/env bash
# GPU check of training: OPT-6.7B + ViT-L/16 shapes (launch/configs/image/vqa_v2_pt_L.yaml with random weights,
# nothing downloaded), bf16, ZeRO-3, one GPU, a few steps through epalm.engine under the deepspeed launcher.
# Reports samples/s, MFU (4 x N_lm x tokens for the frozen LM's forward + backward, plus the ViT forward, over
# 989 TFLOP/s dense bf16) and peak GPU memory; writes $OUT/gpu_train.json (else runs/gpu_check/).
#
# STATUS: NOT YET RUN ON A GPU. Only `bash -n` and the CPU dry run (`--dry-run-cpu`, tiny model) were checked.
#
#   bash tests/gpu/run.sh                 # on a CUDA machine; exits 0 with "SKIP" when there is no CUDA
#   bash tests/gpu/run.sh --dry-run-cpu   # same launcher + code path on CPU, tiny model
#   bash tests/gpu/run.sh --micro 2       # extra flags go to tests/gpu/check_train.py
# Budget: model init (6.7B random init on the host, cast to bf16, moved to the GPU) is most of it; the
# whole script is bounded by a 420 s timeout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi

dry_run=0
for arg in "$@"; do [[ "$arg" == "--dry-run-cpu" ]] && dry_run=1; done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore::FutureWarning
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [[ $dry_run == 1 ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "SKIP: no CUDA device visible to $PY (tests/gpu/run.sh needs one GPU; --dry-run-cpu checks the code path)"
    exit 0
  fi
  export DS_ACCELERATOR=cuda
  # the 6.7B random init runs on the host: give it every core (a caller's OMP_NUM_THREADS=1 would crawl)
  export OMP_NUM_THREADS=${GPU_CHECK_THREADS:-$(nproc)}
  "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)'
fi

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$out"
set +e
timeout 420 "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" \
  tests/gpu/check_train.py --out "$out" "$@" 2>&1 | tee "$out/gpu_train.log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc == 124 ]]; then echo "FAIL: timed out after 420 s"; fi
if [[ $rc == 0 && -f "$out/gpu_train.json" ]]; then echo "OK: $out/gpu_train.json"; fi
exit "$rc"
