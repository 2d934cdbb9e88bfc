#!/usr/bin/env bash
# Run on a machine WITH PyPI access, before going to the GPU machine (which has no network).
# Fills the git-ignored .whl/ with every wheel tests/gpu/run.sh needs that the GPU machine's image lacks,
# for CPython 3.12 manylinux x86_64 (that image: Python 3.12, torch 2.11, transformers 5.17, timm, numpy,
# pyyaml, safetensors, psutil, py-cpuinfo, msgpack, einops, ninja, tqdm, packaging, nvidia-ml-py; no
# deepspeed, webdataset, hjson or pydantic). Checks the total stays under 64 MiB.
#
#   bash tests/gpu/prepare.sh            # then carry .whl/ with the working tree
#
# deepspeed is an sdist: built here as a pure-Python wheel (DS_BUILD_OPS=0); its ops JIT-build there (nvcc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PY=${PYTHON:-.venv/bin/python}
OUT=.whl
LIMIT_MIB=64
DEEPSPEED=deepspeed==0.19.8
# deepspeed's and webdataset's requirements the image lacks, pinned to what requirements.txt resolves here;
# transformers 5.24 because 5.17's OPT layers take `past_key_values=`, not the `cache=` that
# epalm/model/injection.py passes (5.24 accepts hub 1.33 and tokenizers 0.23.2, which the image has);
# timm pinned so `forward_intermediates` behaves as tested
BINARY=(
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  webdataset==1.0.2
  braceexpand==0.1.7
  transformers==5.24.0
  timm==1.0.31
)
rm -rf "$OUT"
mkdir -p "$OUT"

"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$OUT" \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "${BINARY[@]}"

# pure-Python deepspeed: no ops compiled here; --no-build-isolation so its setup.py sees this venv's torch
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
  --wheel-dir "$OUT" "$DEEPSPEED"

for w in "$OUT"/deepspeed-*.whl; do
  case "$w" in *-py3-none-any.whl) ;; *) echo "prepare: $w is not a pure-Python wheel" >&2; exit 1 ;; esac
done
bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "prepare: $(ls "$OUT" | wc -l) wheels, $((bytes / 1024)) KiB in $OUT/"
ls -1 "$OUT"
if (( bytes > LIMIT_MIB * 1024 * 1024 )); then
  echo "prepare: $OUT is over $LIMIT_MIB MiB" >&2
  exit 1
fi
git check-ignore -q "$OUT" || { echo "prepare: $OUT/ is not git-ignored" >&2; exit 1; }
