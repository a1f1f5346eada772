#!/bin/bash
# halo-train on the CPU, for debugging a config or the code: fp32, gloo, no GPU needed.
#
#   bash launch/cpu_debug.sh --config RUN.yaml [key.path=value ...]
#   NPROC=2 bash launch/cpu_debug.sh --config quickstart train.steps=20     (2 ranks, deepspeed launcher)
#
#   NPROC         processes (default 1: a plain process, no launcher)
#   MASTER_PORT   rendezvous port when NPROC > 1 (default 29500)
#   HALO_PYTHON   the Python that has halo-pretrain's dependencies (default: python3)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [NPROC=n] bash launch/cpu_debug.sh --config RUN.yaml [key.path=value ...]" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
PY=${HALO_PYTHON:-python3}
NPROC=${NPROC:-1}
# fp32 first, so a config's bf16 does not reach the CPU; the caller's overrides come after and win
if [ "$NPROC" -eq 1 ]; then
    CMD=("$PY" -m halo_pretrain.train "$@" train.precision=fp32)
else
    CMD=("$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}"
         --module halo_pretrain.train "$@" train.precision=fp32)
fi
echo "+ DS_ACCELERATOR=cpu ${CMD[*]}" >&2
exec "${CMD[@]}"
