#!/usr/bin/env bash
# The one prepared GPU check for a session that has a device machine (see the device tool's README):
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
# It uses what the 'cuda' image ships (CuPy, numba-cuda, torch, transformers) and installs nothing.
# 1. fast/gpu.py's kernels and a whole tiny model against ref, on the device (no simulator);
# 2. fast.bench with the GPU rows (HF CUDA bf16 eager, fast GPU), CPU rows skipped to save time.
set -uo pipefail
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0 PYTHONPATH="$PWD:$PWD/tests"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import cupy, numba, torch, transformers; print('cupy', cupy.__version__, 'numba', numba.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== kernels and model on the device"
timeout 240 python3 tests/gpu_sim_check.py 2>&1 | tee "${OUT:-/tmp}/gpu_check.txt"
echo "== benchmark"
timeout 280 python3 -m fast.bench --skip hf-f32,hf-bf16,ref,fast --repeats 3 --json "${OUT:-/tmp}/bench_gpu.json" 2>&1 | tee "${OUT:-/tmp}/bench_gpu.txt"
