#!/bin/bash
# halo-train on every GPU of this machine through the deepspeed launcher (deepspeed --num_gpus).
#
#   bash launch/single_node.sh --config RUN.yaml [key.path=value ...]
#   NUM_GPUS=4 bash launch/single_node.sh --config 125m data.path=data/corpus-gpt2
#
#   NUM_GPUS      processes, one per GPU (default: all GPUs nvidia-smi lists; set it with DS_ACCELERATOR=cpu
#                 to run that many CPU ranks)
#   MASTER_PORT   rendezvous port (default 29500)
#   HALO_PYTHON   the Python that has halo-pretrain installed (default: python3)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [NUM_GPUS=n] bash launch/single_node.sh --config RUN.yaml [key.path=value ...]" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${HALO_PYTHON:-python3}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NUM_GPUS=${NUM_GPUS:-$GPUS}
if [ "${NUM_GPUS:-0}" -lt 1 ]; then
    echo "launch/single_node.sh: error: no GPU found; set NUM_GPUS (with DS_ACCELERATOR=cpu for CPU ranks)" \
         "or use launch/cpu_debug.sh" >&2
    exit 2
fi
CMD=("$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}"
     --module halo_pretrain.train "$@")
echo "+ ${CMD[*]}" >&2
exec "${CMD[@]}"
