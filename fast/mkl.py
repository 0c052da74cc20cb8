"""Intel's MKL for the prefill's float32 products, where its wheel (`pip install mkl`, in the `fast` extra on
x86-64 Linux) is installed: one single-threaded `cblas_sgemm` per call, which fast.cpu runs on every core by
splitting the output's rows over its own threads (`cpu.on_every_core`, `cpu._Crew.product`).

On an Intel Xeon (Ice Lake, 2 cores) MKL runs the bench model's products at 310-330 GFLOP/s where numpy's
OpenBLAS runs them at 255-280; on the AMD hosts this project has had, torch's MKL was the slower one. So
fast.cpu measures both on this machine before it picks one (`cpu.choose_blas`). MKL's sequential layer
starts no thread pool of its own (an OpenMP pool would spin against Numba's and OpenBLAS's threads
between products), and it needs no OpenMP runtime in the process.

Compiled code calls the same library through `gemm_at`, given `SGEMM` or `DGEMM`, the functions' addresses
(fast.prefill's attention runs its tiles' products that way, with no Python between them, and fast.cpu's
helper threads their shares of a product, without the GIL).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS_LAYOUT and CBLAS_TRANSPOSE values
THREADING_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL: calls run on the calling thread alone
INT32_MAX = 2**31 - 1  # the LP64 interface takes 32-bit sizes


def _library_paths() -> list[Path]:
    """Where libmkl_rt may be: the lib/ folders of this environment (the wheel puts its libraries in
    <prefix>/lib)."""
    folders = dict.fromkeys(Path(p) / "lib" for p in (sys.prefix, sys.base_prefix))
    return [f / n for f in folders for n in ("libmkl_rt.so.3", "libmkl_rt.so.2")]


def _open():
    """libmkl_rt with its sequential threading layer, or None where it is absent or will not take that layer
    (another part of the process loaded it first and chose a threaded one)."""
    if not sys.platform.startswith("linux"):
        return None
    for path in _library_paths():
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if lib.MKL_Set_Threading_Layer(THREADING_SEQUENTIAL) != THREADING_SEQUENTIAL:
            return None
        f = lib.cblas_sgemm
        f.restype = None
        f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        return lib
    return None


LIB = _open()


def _address(name: str) -> int:
    """The address of LIB's function `name`, 0 where MKL is absent."""
    return 0 if LIB is None else ctypes.cast(getattr(LIB, name), ctypes.c_void_p).value


SGEMM, DGEMM = _address("cblas_sgemm"), _address("cblas_dgemm")  # for `gemm_at`


@intrinsic
def gemm_at(typingctx, fn, trans_a, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc):
    """In compiled code: the CBLAS gemm at address fn (SGEMM for float32 alpha and beta, DGEMM for
    float64), row-major, B as it is: C [M, N] = alpha op(A) B + beta C, op(A) = A [M, K] for trans_a =
    NO_TRANS, A^T for A [K, M] with TRANS. a, b, c are the matrices' addresses (integers), lda, ldb, ldc
    their row strides in elements; sizes below 2^31 (the LP64 interface). Nothing is checked: the caller
    passes an address that LIB gave and matrices that hold what the sizes say."""
    sizes, addresses = (trans_a, M, N, K, lda, ldb, ldc), (fn, a, b, c)
    if not (isinstance(alpha, types.Float) and beta == alpha
            and all(isinstance(t, types.Integer) for t in sizes + addresses)):
        return None

    def codegen(context, builder, signature, args):
        i32, ptr = ir.IntType(32), ir.IntType(8).as_pointer()
        real = ir.FloatType() if alpha == types.float32 else ir.DoubleType()
        gemm = ir.FunctionType(ir.VoidType(), [i32] * 6 + [real, ptr, i32, ptr, i32, real, ptr, i32]).as_pointer()
        size = lambda i: context.cast(builder, args[i], signature.args[i], types.int32)  # noqa: E731
        address = lambda i, to=ptr: builder.inttoptr(  # noqa: E731
            context.cast(builder, args[i], signature.args[i], types.intp), to)
        builder.call(address(0, gemm), [ir.Constant(i32, ROW_MAJOR), size(1), ir.Constant(i32, NO_TRANS), size(2),
                                         size(3), size(4), args[5], address(6), size(7), address(8), size(9),
                                         args[10], address(11), size(12)])
        return context.get_dummy_value()

    return types.void(fn, trans_a, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc), codegen


def _row_stride(a: np.ndarray) -> int:
    """a [R, C] float32 with unit column stride -> its row stride in elements (BLAS's leading dimension)."""
    if a.dtype != np.float32 or a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != 4) or a.strides[0] % 4:
        raise ValueError(f"sgemm takes float32 matrices with contiguous rows, got {a.dtype} {a.shape} {a.strides}")
    return max(a.strides[0] // 4, a.shape[1], 1)


def check_product(a: np.ndarray, b: np.ndarray, out: np.ndarray, b_transposed: bool = False) -> None:
    """ValueError unless out [M, N] = a [M, K] @ b [K, N] (b_transposed: b [N, K]) is a product `sgemm` and
    `gemm_at` can run: float32 matrices with contiguous rows, sizes below 2^31."""
    M, K = a.shape
    N = b.shape[0] if b_transposed else b.shape[1]
    if (b.shape[1] if b_transposed else b.shape[0]) != K or out.shape != (M, N):
        raise ValueError(f"sgemm shapes: {a.shape} @ {b.shape}{'^T' if b_transposed else ''} -> {out.shape}")
    if max(M, N, K) > INT32_MAX:
        raise ValueError("sgemm: a size above the 32-bit interface")
    for m in (a, b, out):
        if m.size:
            _row_stride(m)


def sgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, b_transposed: bool = False) -> None:
    """out [M, N] = a [M, K] @ b [K, N], or with b_transposed a [M, K] @ b^T for b [N, K]; float32 matrices
    whose rows are contiguous (any row stride: out may be a slice of columns of a wider array). Runs on the
    calling thread alone, without the GIL (ctypes releases it)."""
    check_product(a, b, out, b_transposed)
    (M, N), K = out.shape, a.shape[1]
    if M == 0 or N == 0:
        return
    LIB.cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS if b_transposed else NO_TRANS, M, N, K, 1.0, a.ctypes.data,
                    _row_stride(a), b.ctypes.data, _row_stride(b), 0.0, out.ctypes.data, _row_stride(out))
