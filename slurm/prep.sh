#!/bin/bash
# Submit halo-prep on a Slurm cluster: an array of TASKS jobs that split the shards among them, then
# one job that starts when every task succeeded and writes manifest.json.
#
#   bash slurm/prep.sh [--sbatch-option=value ...] TASKS -o OUT --tokenizer NAME INPUT... [halo-prep options]
#
# sbatch options (before TASKS, each as one --name=value word) apply to both jobs, e.g.
# --partition=cpu --cpus-per-task=32 --time=4:00:00. Job logs: slurm-halo-prep-<job id>.out here.
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/prep.sbatch"

SBATCH_OPTS=()
while [ $# -gt 0 ] && [[ $1 == -* ]]; do
    SBATCH_OPTS+=("$1")
    shift
done
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash slurm/prep.sh [--sbatch-option=value ...] TASKS -o OUT --tokenizer NAME INPUT... \
(TASKS: how many array tasks, at least 1)" >&2
    exit 2
fi
TASKS=$1
shift
ARRAY=$(sbatch --parsable "${SBATCH_OPTS[@]}" --array=0-$(( TASKS - 1 )) "$SCRIPT" "$@")
ARRAY=${ARRAY%%;*}
MERGE=$(sbatch --parsable "${SBATCH_OPTS[@]}" --dependency=afterok:"$ARRAY" --kill-on-invalid-dep=yes "$SCRIPT" "$@")
echo "halo-prep: array job $ARRAY ($TASKS tasks), then job ${MERGE%%;*} writes manifest.json (once every task succeeded)"
