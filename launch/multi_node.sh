#!/bin/bash
# halo-train on several machines through the deepspeed launcher. Two forms:
#
# 1. ssh between nodes: run once, on the first node; the launcher starts the others over ssh (pdsh).
#      HOSTFILE=hosts bash launch/multi_node.sh --config RUN.yaml [key.path=value ...]
#
# 2. no ssh (most clusters): run once per node, with the same hostfile and that node's rank.
#      HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=node0 bash launch/multi_node.sh --config RUN.yaml   # on node0
#      HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=node0 bash launch/multi_node.sh --config RUN.yaml   # on node1
#
# hosts lists every node in order, "<hostname> slots=<GPUs>" per line (DeepSpeed's hostfile format).
#   MASTER_ADDR   address of node rank 0, reachable from every node (default: the first host in HOSTFILE)
#   MASTER_PORT   rendezvous port (default 29500)
#   HALO_PYTHON   the Python that has halo-pretrain installed, the same path on every node (default: python3)
# Every node must see the same run directory (a shared filesystem) and the same data.
set -euo pipefail
if [ $# -lt 1 ] || [ -z "${HOSTFILE:-}" ]; then
    echo "usage: HOSTFILE=hosts [NODE_RANK=k MASTER_ADDR=addr] bash launch/multi_node.sh --config RUN.yaml [...]" >&2
    exit 2
fi
if [ ! -f "$HOSTFILE" ]; then
    echo "launch/multi_node.sh: error: HOSTFILE=$HOSTFILE does not exist (or is not a file)" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${HALO_PYTHON:-python3}
FIRST_HOST=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
CMD=("$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}"
     --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
    CMD+=(--no_ssh --node_rank "$NODE_RANK")
fi
CMD+=(--module halo_pretrain.train "$@")
echo "+ ${CMD[*]}" >&2
exec "${CMD[@]}"
