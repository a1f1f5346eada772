#!/usr/bin/env bash
# Issue 8 on a lent GPU: throughput sweep (mode "throughput") or equal-token quality (mode "quality").
# Usage (device tool, carry .whl): bash benchmarks/gpu_train_e2e.sh throughput|quality [extra args]
set -uo pipefail
mode=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; work=/tmp/bench; mkdir -p "$out" "$work"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys,torch,triton,deepspeed;print('python',sys.version.split()[0],'torch',torch.__version__,'triton',triton.__version__,'deepspeed',deepspeed.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
[ -f /tmp/corpus/manifest.json ] || python3 benchmarks/train_throughput.py prep --out /tmp/corpus > "$out/prep.log" 2>&1 || { tail -20 "$out/prep.log"; exit 1; }
tail -3 "$out/prep.log" 2>/dev/null
timeout "${BENCH_SECONDS:-540}" python3 benchmarks/train_throughput.py "$mode" --data /tmp/corpus --out "$work" "$@"
rc=$?
cp "$work"/*.json "$work"/*.md "$out"/ 2>/dev/null
(cd "$work" && find runs \( -name metrics.jsonl -o -name '*.yaml' -o -name stdout.log \) -print0 \
  | tar czf "$out/runs.tgz" --null -T -)  # metrics for halo-plot; checkpoints stay behind
exit $rc
