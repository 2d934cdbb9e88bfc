#!/bin/bash
# Train eP-ALM under Open MPI's mpirun, for clusters without SLURM. Ranks are found by DeepSpeed's MPI
# discovery (mpi4py): RANK/LOCAL_RANK/WORLD_SIZE from MPI, MASTER_ADDR = rank 0's first `hostname -I`
# address, MASTER_PORT = 29500 (DeepSpeed's default; one job per master host at a time). Run from the
# repository root, on the first host:
#
#   NP=16 HOSTFILE=hosts CONFIG=launch/configs/image/vqa_v2.yaml launch/mpi/train.sh [key=value ...]
#
# Arguments are config overrides. Variables:
#   CONFIG       run config YAML                                             (required)
#   NP           number of ranks, one per GPU                                (default 2)
#   HOSTFILE     Open MPI hostfile, lines like "node1 slots=8"; without it every rank runs on this host
#   DS_CONFIG    DeepSpeed JSON, or auto (the fastest engine that fits)      (default auto)
#   PRECISION    fp32 | bf16 | fp16, overrides the JSON's
#   RESUME       passed to --resume                                          (default auto)
#   PYTHON       interpreter with epalm and mpi4py installed, same path on every host (default python)
#   MPIRUN_ARGS  extra mpirun options, e.g. "--mca btl_tcp_if_include eth0 --oversubscribe"
# Every NCCL_*, HF_*, TORCH_*, DS_*, OMP_*, CUDA_*, PYTHON* and PATH-like variable set here is passed to
# all ranks with -x. --allow-run-as-root is added only when running as root (Open MPI refuses root otherwise).
# The code and data must be at the same paths on every host (a shared filesystem).
# Exit codes as launch/train.py: 0 done, 2 bad configuration, 75 stopped by SIGTERM/SIGUSR1 after a
# checkpoint (run again; --resume auto continues). mpirun forwards SIGTERM/SIGUSR1 to the ranks.
set -euo pipefail

: "${CONFIG:?set CONFIG=launch/configs/... (the run config YAML)}"
NP=${NP:-2}
DS_CONFIG=${DS_CONFIG:-auto}
RESUME=${RESUME:-auto}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/../.."

mpi_args=(-np "$NP" --bind-to none)
[[ $(id -u) == 0 ]] && mpi_args+=(--allow-run-as-root)
[[ -n ${HOSTFILE:-} ]] && mpi_args+=(--hostfile "$HOSTFILE")
while IFS= read -r name; do
    mpi_args+=(-x "$name")
done < <(compgen -e | grep -E '^(NCCL_|HF_|TRANSFORMERS_|TORCH_|DS_|OMP_|CUDA_|PYTHON|DEEPSPEED_|EPALM_|PATH$|LD_LIBRARY_PATH$)' || true)
read -r -a extra <<<"${MPIRUN_ARGS:-}"

args=(launch/train.py --config "$CONFIG" --ds_config "$DS_CONFIG" --resume "$RESUME")
[[ -n ${PRECISION:-} ]] && args+=(--precision "$PRECISION")
exec mpirun "${mpi_args[@]}" "${extra[@]}" "$PYTHON" "${args[@]}" "$@"
