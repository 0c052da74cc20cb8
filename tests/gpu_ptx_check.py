"""Compile fast/gpu.py's CUDA kernels for a real GPU target (PTX for compute capability 9.0: H100, H200),
without a GPU: the check the CUDA simulator cannot make (the simulator runs the kernels as Python, so a
construct that Numba's CUDA target cannot type or lower passes there and fails on the device). Run by
tests/test_fast_gpu.py in a subprocess, with CUDA_HOME where libNVVM is. Prints one line per kernel."""

from __future__ import annotations

import sys
import types

from numba import cuda
from numba import types as nt

CC = (9, 0)

try:
    import cupy  # noqa: F401
except ImportError:  # fast.gpu imports CuPy at load; compiling its kernels needs none of it
    sys.modules["cupy"] = types.ModuleType("cupy")

import numba.cuda.dispatcher as dispatcher  # noqa: E402

# A kernel's device functions compile for the current device's compute capability; there is none here.
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)

from fast import gpu  # noqa: E402


def arr(dtype, ndim):
    return nt.Array(dtype, ndim, "C")


f32 = nt.float32
# The argument types fast/gpu.py's wrappers pass (matmul, rms_norm, query_attention, block_attention).
SIGNATURES = {
    "_gemv_bf16": (arr(f32, 2), arr(nt.uint16, 2), arr(f32, 2)),
    "_rms_norm": (arr(f32, 2), arr(f32, 1), f32, arr(f32, 2)),
    "_attention": (arr(f32, 4), arr(f32, 4), arr(f32, 4), arr(nt.int64, 1), arr(nt.int64, 1), arr(nt.boolean, 2),
                   arr(nt.int64, 2), arr(nt.int64, 2), nt.int64, nt.int64, arr(f32, 4)),
    "_block_attention": (arr(f32, 4), arr(f32, 4), arr(f32, 4), arr(nt.boolean, 3), arr(f32, 2), arr(f32, 4)),
}

kernels = sorted(name for name, obj in vars(gpu).items()
                 if isinstance(obj, dispatcher.CUDADispatcher) and not obj.targetoptions.get("device"))
if kernels != sorted(SIGNATURES):
    sys.exit(f"kernels in fast/gpu.py {kernels} != checked {sorted(SIGNATURES)}: give each new kernel its signature")
failed = 0
for name in kernels:
    try:
        ptx, _ = cuda.compile_ptx(getattr(gpu, name).py_func, SIGNATURES[name], cc=CC)
        print(f"ok {name}: {len(ptx)} bytes of PTX for sm_{CC[0]}{CC[1]}")
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        failed += 1
        print(f"FAILED {name}: {type(e).__name__}: {e}")
sys.exit(1 if failed else 0)
