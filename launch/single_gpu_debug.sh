#!/bin/bash
# halo-train on one GPU as a plain process (no launcher), with synchronous CUDA errors: the first
# thing to run when a multi-GPU job fails.
#
#   bash launch/single_gpu_debug.sh --config RUN.yaml [key.path=value ...]
#
#   GPU           which GPU (default 0)
#   HALO_PYTHON   the Python that has halo-pretrain installed (default: python3)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [GPU=i] bash launch/single_gpu_debug.sh --config RUN.yaml [key.path=value ...]" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${HALO_PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=${GPU:-0} CUDA_LAUNCH_BLOCKING=1 TORCH_SHOW_CPP_STACKTRACES=1 PYTHONUNBUFFERED=1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "launch/single_gpu_debug.sh: error: no CUDA GPU visible (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES);" \
         "on a machine without one use launch/cpu_debug.sh" >&2
    exit 2
fi
# ZeRO-0 first: one GPU has nothing to partition; the caller's overrides come after and win
CMD=("$PY" -m halo_pretrain.train "$@" deepspeed.zero_stage=0)
echo "+ CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES CUDA_LAUNCH_BLOCKING=1 ${CMD[*]}" >&2
exec "${CMD[@]}"
