#!/usr/bin/env bash
# The GPU suite: every test marked `gpu` (tests/test_gpu_*.py), on this machine's CUDA GPU, in one command.
#
#   bash benchmarks/gpu_suite.sh [extra pytest arguments]
#
# On the lent GPU machine (device tool): carry [".whl"], filled here by ../shared/gpu/make-wheels.sh; the
# wheels (deepspeed and what the image lacks) are installed first. Writes gpu-suite.log, gpu-suite.xml
# (JUnit) and gpu-suite-env.txt to $OUT (default /tmp/gpu-suite). Exits with pytest's status.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_suite.sh: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# TORCH_CUDA_ARCH_LIST: the image's default "9.0a" breaks DeepSpeed's op builder; NVLink multicast stays off
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-suite}
mkdir -p "$out"
{ date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)"
} > "$out/gpu-suite-env.txt" 2>&1
cat "$out/gpu-suite-env.txt"
python3 -m pytest -q -m gpu -rfEs --durations=15 --junitxml="$out/gpu-suite.xml" "$@" 2>&1 | tee "$out/gpu-suite.log"
exit "${PIPESTATUS[0]}"
