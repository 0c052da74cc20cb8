#!/usr/bin/env bash
# The prepared GPU check for a session that has a device machine (see the device tool's README), in two
# calls on one warm machine (each call may run at most 10 minutes):
#   run(command="bash tools/gpu_check.sh check", timeout_s=420)   # 1 and 2
#   run(command="bash tools/gpu_check.sh probe", timeout_s=300)   # 3
# It uses what the 'cuda' image ships (CuPy, numba-cuda, torch, transformers) and installs nothing.
# 1. fast/gpu.py's kernels, the captured decoding step and whole tiny models against ref, on the device (no
#    simulator), launched through CuPy (the default) and through Numba's own launcher;
# 2. fast.bench's GPU rows (HF CUDA bf16 eager, fast GPU; CPU rows skipped to save time) on the bench model
#    and on the 12B-wide one (--wide: the real model's sizes, 2 layers);
# 3. tools/gpu_probe.py: launch costs, the GEMV against torch's, attention, the step's graph alone.
set -uo pipefail
# That image's numba-cuda registers an overload for np.row_stack when it first compiles a kernel, and its
# NumPy (2.5) no longer has row_stack: every kernel failed to compile (seen 2026-12-04). An alias, for
# this image only, in a sitecustomize outside the repository.
compat=$(mktemp -d)
printf 'import numpy\nif not hasattr(numpy, "row_stack"):\n    numpy.row_stack = numpy.vstack\n' > "$compat/sitecustomize.py"
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0 PYTHONPATH="$PWD:$PWD/tests:$compat"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "from importlib.metadata import version as v; print(*(f'{n} {v(n)}' for n in ('cupy-cuda13x', 'numba', 'numba-cuda', 'numpy', 'torch', 'transformers')))"
part=${1:-check}
if [ "$part" = check ]; then
  for launch in cupy numba; do
    echo "== kernels, step and model on the device, $launch launches"
    FAST_GPU_LAUNCH=$launch timeout 100 python3 tests/gpu_sim_check.py 2>&1 | grep -v -i "warn" | tee "${OUT:-/tmp}/gpu_check_$launch.txt"
  done
  echo "== benchmark, bench model"
  timeout 120 python3 -m fast.bench --skip hf-f32,hf-bf16,ref,fast --repeats 3 --json "${OUT:-/tmp}/bench_gpu.json" 2>&1 | grep -v -i "warn" | tee "${OUT:-/tmp}/bench_gpu.txt"
  echo "== benchmark, 12B-wide model (2 layers)"
  timeout 150 python3 -m fast.bench --wide --skip hf-f32,hf-bf16,ref,fast --repeats 3 --json "${OUT:-/tmp}/bench_gpu_wide.json" 2>&1 | grep -v -i "warn" | tee "${OUT:-/tmp}/bench_gpu_wide.txt"
else
  echo "== probe"
  timeout 280 python3 tools/gpu_probe.py 2>&1 | grep -v -i "warn" | tee "${OUT:-/tmp}/probe_gpu.txt"
fi
