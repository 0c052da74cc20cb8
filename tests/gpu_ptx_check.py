"""Compile fast/gpu.py's CUDA kernels for a real GPU target (PTX for compute capability 9.0: H100, H200),
without a GPU: the check the CUDA simulator cannot make (the simulator runs the kernels as Python, so a
construct that Numba's CUDA target cannot type or lower passes there and fails on the device). Run by
tests/test_fast_gpu.py in a subprocess, with CUDA_HOME where libNVVM is. Prints one line per kernel."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
from numba import cuda

CC = (9, 0)

try:
    import cupy  # noqa: F401
except ImportError:  # fast.gpu imports CuPy at load; compiling its kernels needs none of it
    sys.modules["cupy"] = types.ModuleType("cupy")

import numba.cuda.dispatcher as dispatcher  # noqa: E402

# A kernel's device functions compile for the current device's compute capability; there is none here.
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)

from fast import gpu  # noqa: E402


SIGNATURES = gpu.SIGNATURES
PARAM_BYTES = {"u64": 8, "s64": 8, "b64": 8, "f32": 4, "u32": 4, "s32": 4, "b32": 4, "u8": 1, "s8": 1, "b8": 1}


def example(ty):
    """A host value of a signature's type: arrays of shape (2, 3, ...) (any data; only the layout counts)."""
    if hasattr(ty, "ndim"):
        return np.zeros(tuple(range(2, 2 + ty.ndim)), np.dtype(str(ty.dtype)))
    return np.dtype(str(ty)).type(1)


def check_abi(name, ptx):
    """The parameters fast.gpu.kernel_args lays out for this kernel = the PTX entry's, one by one in size."""
    entry = re.search(r"\.entry\s+[^\s(]+\(([^)]*)\)", ptx)
    want = [PARAM_BYTES[p.split()[1].lstrip(".")] for p in entry.group(1).split(",")]
    got = [np.asarray(a).itemsize for a in gpu.kernel_args(SIGNATURES[name], [example(t) for t in SIGNATURES[name]])]
    if got != want:
        raise AssertionError(f"kernel_args gives {len(got)} parameters {got}, the PTX takes {len(want)} {want}")


kernels = sorted(name for name, obj in vars(gpu).items()
                 if isinstance(obj, dispatcher.CUDADispatcher) and not obj.targetoptions.get("device"))
if kernels != sorted(SIGNATURES):
    sys.exit(f"kernels in fast/gpu.py {kernels} != checked {sorted(SIGNATURES)}: give each new kernel its signature")
failed = 0
for name in kernels:
    try:
        ptx, _ = cuda.compile_ptx(getattr(gpu, name).py_func, SIGNATURES[name], cc=CC)
        check_abi(name, ptx)
        print(f"ok {name}: {len(ptx)} bytes of PTX for sm_{CC[0]}{CC[1]}, its parameters as kernel_args lays them")
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        failed += 1
        print(f"FAILED {name}: {type(e).__name__}: {e}")
sys.exit(1 if failed else 0)
