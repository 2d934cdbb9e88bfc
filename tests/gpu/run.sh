#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with one CUDA GPU and no network (bounded to 6 minutes):
#   0. installs the wheels tests/gpu/prepare.sh put in .whl/ (deepspeed, webdataset, transformers pin, ...)
#      with `pip install --no-index --target .cache/gpu_site` and puts that first on PYTHONPATH;
#   a. training at full size (tests/gpu/check_train.py): pt-L, bf16, micro-batch 16/64 under each engine of
#      --ds_config auto (zero0, zero2, sharded zero3, zero3_whole_frozen, and what auto picks here), ZeRO-3 with
#      quantized frozen weights, one fp16 step: samples/s beside the time plan's prediction, MFU, peak memory
#      beside the memory plan;
#   b. decoding (tests/gpu/check_generation.py, if present): greedy and beam 3, batch 64, 30 new tokens, default,
#      static cache, compiled (CUDA graphs) and stock generate, each against the weight-reading roofline from the
#      bandwidth measured in the same call;
#   c. feature extraction (tests/gpu/check_extract.py, if present).
# One summary line per measurement ("RESULT ..."); JSONs in $OUT (else runs/gpu_check/), merged into gpu_check.json.
#
#   bash tests/gpu/prepare.sh        # first, on a machine with PyPI access
#   bash tests/gpu/run.sh            # on the GPU machine; "SKIP" and exit 0 when there is no CUDA
#   bash tests/gpu/run.sh --dry-run  # CPU, tiny shapes, same scripts and code path (CI runs this)
#
# STATUS (2026-12-06): NOT YET RUN ON A GPU (none was available to the engine/decoding change either; its --dry-run
# passed on CPU). Earlier (2026-12-01): prepare.sh was run (10 wheels, 21 MiB). On CPU, check_train.py --dry-run
# passed ZeRO-0/2 at both micro-batches in one process; the ZeRO-3 path (zero.Init + no_init_weights) and this
# script end to end under the launcher were not verified (the shared CPU machine was too loaded to finish them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS

dry_run=0
for arg in "$@"; do [[ "$arg" == "--dry-run" || "$arg" == "--dry-run-cpu" ]] && dry_run=1; done
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ $dry_run == 1 && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
out=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$out"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore::FutureWarning
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [[ $dry_run == 1 ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  flag=--dry-run
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "SKIP: no CUDA device visible to $PY (tests/gpu/run.sh needs one GPU; --dry-run checks the code path)"
    exit 0
  fi
  export DS_ACCELERATOR=cuda OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  flag=
  # 0. carried wheels: only on the GPU machine (the dry run uses the venv, which has them all)
  if compgen -G ".whl/*.whl" >/dev/null; then
    site=$PWD/.cache/gpu_site
    if [[ ! -f "$site/.done" ]]; then
      rm -rf "$site"
      "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
      touch "$site/.done"
    fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"
  else
    echo "note: no .whl/ (run tests/gpu/prepare.sh where PyPI is reachable); using what $PY has"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c 'import torch, transformers, deepspeed; print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)'
fi

budget() {  # seconds left of the 6-minute budget, minus a reserve for the steps after this one
  local left=$((360 - (SECONDS - start) - $1))
  ((left < 20)) && left=20
  echo "$left"
}
status=0
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
set +e
# a. training: under the deepspeed launcher (as launch/train.py runs), one rank
timeout "$(budget 150)" "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$port" \
  tests/gpu/check_train.py --out "$out" $flag 2>&1 | tee "$out/gpu_train.log" | grep -E "^(RESULT|SKIP|wrote|device)"
rc=${PIPESTATUS[0]}
[[ $rc != 0 ]] && { echo "FAIL: check_train.py exited $rc (log: $out/gpu_train.log)"; status=1; }
# b, c. the other checks, each with the same flag convention, if they are there
for check in check_generation check_extract; do
  script=tests/gpu/$check.py
  [[ -f $script ]] || { echo "RESULT $check: not present ($script)"; continue; }
  timeout "$(budget 20)" "$PY" "$script" --out "$out" ${flag:+--dry-run} 2>&1 | tee "$out/$check.log" | grep -E "^(RESULT|SKIP)" || true
  rc=${PIPESTATUS[0]}
  [[ $rc != 0 ]] && { echo "FAIL: $script exited $rc (log: $out/$check.log)"; status=1; }
done
set -e
"$PY" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "gpu_check.json"}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=1))
print(f"wrote {out / 'gpu_check.json'} ({', '.join(merged)})")
EOF
echo "gpu check: $((SECONDS - start)) s wall, status $status"
exit "$status"
