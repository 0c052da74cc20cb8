"""CPU kernels (Numba): the same contracts as ref's `Kernels`, with the hot loops compiled.

Weights stay as stored: a bf16 matrix is read as its uint16 bits and upcast exactly inside the kernel
(`bits << 16` is the float32 value), so decoding streams half the bytes of a float32 model while every
product and sum is float32. Prefill GEMMs upcast a block of weight rows into a scratch buffer and call
BLAS (numpy's OpenBLAS or Intel's MKL, whichever runs faster here: `choose_blas`), which beats a Numba GEMM
at every size we measured (fast/bench.py); up to TOKEN_MINOR_MAX_M rows
they compute w @ x^T, the layout numpy's OpenBLAS runs fastest here (`matmul_t`). Decode (few rows of x)
uses a Numba GEMV that reads each weight once for all rows, and the projections of one input (q, k, v;
gate, up) in one pass.

Each parallel loop runs over a "program id": a block of output rows for the GEMV, one (batch row, key
chunk) for decode attention. Prefill attention is BLAS tiles with a compiled softmax between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload
from numba.np.ufunc import parallel as nb_parallel

from ref.config import SLIDING
from ref.decoder import KVCache, Kernels
from ref.masks import MaskSpec
from ref.safetensors_io import Bf16, to_f32

from . import mkl, team


FM = {"reassoc", "contract"}  # reassociate sums (vectorised reductions), allow fused multiply-add
ROWS = 32  # weight rows per GEMV program (see STREAMS)
GEMV_MAX_M = 8  # up to this many rows of x a GEMV beats upcast + BLAS (measured, see fast/bench.py)
# From GEMV_MAX_M to this many rows of x, products run token-minor (w @ x^T, see `matmul_t`), measured.
TOKEN_MINOR_MAX_M = 512
SCRATCH_FLOATS = 1 << 26  # upcast at most this many weights (256 MB) per BLAS call during prefill


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MB for reuse instead of returning them to the kernel.
    A prefill allocates and frees the same activation sizes layer after layer; by default each fresh
    block is page-faulted in again (measured: ~4200 faults and ~30 ms of system time per 512-token
    prefill, 7 %). Blocks above 32 MB are still mapped and unmapped; the heap's high-water mark stays
    allocated. -> whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def available_memory(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process can still allocate without swapping or being killed: the kernel's MemAvailable,
    or less where a memory cgroup (a container's limit) leaves less: its limit less its working set
    (usage without the inactive page cache, which it can reclaim), for this process's cgroup and each one
    above it. None off Linux."""
    try:
        with open(f"{proc}/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    for room in _cgroup_headroom(proc, cgroups):
        free = min(free, room)
    return free


def _cgroup_headroom(proc: str, cgroups: str):
    """Yield limit - working set for each memory cgroup from this process's up to the root (v2 unified, or
    v1's memory controller); nothing where no limit is set or the files cannot be read."""
    try:
        with open(f"{proc}/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return
    for _, controllers, path in entries:
        if controllers == "":  # v2: memory.max, memory.current, memory.stat's inactive_file
            root, files = Path(cgroups), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root, files = Path(cgroups) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                     "total_inactive_file")
        else:
            continue
        node = root / path.lstrip("/")
        while True:
            try:
                limit = (node / files[0]).read_text().strip()
                used = int((node / files[1]).read_text())
                stat = dict(line.split() for line in (node / "memory.stat").read_text().splitlines())
                if limit != "max":  # v2's "no limit"; v1 writes ~2^63 instead, which never binds
                    yield int(limit) - (used - int(stat.get(files[2], 0)))
            except (OSError, ValueError):
                pass
            if node == root or node == node.parent:
                break
            node = node.parent


def _aligned_empty(nbytes: int, align: int) -> np.ndarray:
    """An uninitialised uint8 buffer of nbytes that starts on a multiple of `align` bytes: a slice of a
    numpy buffer `align` bytes longer (numpy asks for 2 MB pages for buffers from 4 MB)."""
    raw = np.empty(nbytes + align, np.uint8)
    at = -raw.ctypes.data % align
    return raw[at:at + nbytes]


def resident_copy(tensors: dict, progress: bool = False) -> dict:
    """{name: array or Bf16, memory-mapped} -> the same tensors copied, bits unchanged and read-only, into one
    anonymous buffer, which numpy asks the kernel to back with 2 MB pages. Streaming the weights from there
    decoded the bench model 0.28 ms/token faster (8 of 10 interleaved pairs; 3-4 % of the weight stream, in
    both bandwidth phases of this host) than from the checkpoint's page cache, which this kernel maps mostly
    in 4 KB pages. Each tensor's file pages are dropped from this process's mapping once copied (they stay
    in the page cache), so the resident set never holds the file twice. `progress`: a bar on stderr (the copy
    reads the whole checkpoint: ~1 s per GB from the page cache)."""
    from tqdm import tqdm

    sources = {name: t.bits if isinstance(t, Bf16) else t for name, t in tensors.items()}
    total = sum(a.nbytes for a in sources.values())
    buf = _aligned_empty(total + 64 * len(sources), 64)
    out, at = {}, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="copying weights into memory", file=sys.stderr,
              disable=not progress) as bar:
        for name, a in sources.items():
            copy = buf[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
            np.copyto(copy, a)
            copy.flags.writeable = False
            _drop_mapped_pages(a)
            at += a.nbytes + -a.nbytes % 64  # every tensor starts 64-byte aligned
            out[name] = Bf16(copy) if isinstance(tensors[name], Bf16) else copy
            bar.update(a.nbytes)
    return out


def _drop_mapped_pages(a: np.ndarray) -> None:
    """Unmap the pages under a read-only memory-mapped view from this process (MADV_DONTNEED: a later read
    maps them again from the page cache; nothing is lost). No-op for an array that is not a memory map."""
    mm = getattr(a, "_mmap", None)
    if mm is None or a.nbytes == 0 or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = a.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data
    first = start - start % mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, first, start + a.nbytes - first)


def _blas_symbol(name: str):
    """The function `name` of numpy's OpenBLAS, found among the libraries this process has loaded; None
    where there is none (another BLAS, not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split(maxsplit=5)[-1].strip() for line in f if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        try:
            return getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
    return None


_BLAS_SHUTDOWN = _blas_symbol("blas_thread_shutdown_")  # its worker threads exit; its next call starts them
if _BLAS_SHUTDOWN is not None:
    _BLAS_SHUTDOWN.restype = ctypes.c_int
# cblas_somatcopy of numpy's own OpenBLAS build (64-bit integers): out = alpha * a^T, here alpha = 1 (exact)
_OMATCOPY = _blas_symbol("scipy_cblas_somatcopy64_")
if _OMATCOPY is not None:
    _OMATCOPY.restype = None
    _OMATCOPY.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
_BLAS_RAN = [False]  # a BLAS product ran since the last GEMV


def park_blas_threads() -> bool:
    """Let OpenBLAS's worker threads exit now. After a call they spin for tens of milliseconds waiting for
    the next one, and on a small machine they take cores from the GEMV's threads: the first 6-7 tokens
    after a 512-token prefill took 15-22 ms instead of 8.5 (measured). Parking costs ~60 us; the next
    prefill's first product starts the threads again. fast calls it at the first GEMV after BLAS work.
    Not for a process whose other threads run numpy products at the same time. -> whether it did."""
    _BLAS_RAN[0] = False
    return _BLAS_SHUTDOWN is not None and _BLAS_SHUTDOWN() == 0


# ---- matrix products ----------------------------------------------------------------------------

@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as the float32 with those bits (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


# Streamed (non-temporal) stores go around the caches to memory; x86-64 only (its sfence orders them).
STREAM = platform.machine().lower() in ("x86_64", "amd64")
_LANES = 16  # float32 values per streamed store: one 64-byte cache line


@nb.njit(inline="always")
def _to_line(address):
    """float32 values from a 4-byte-aligned address to the next cache line (64 bytes) -> 0..15."""
    return (-(address // 4)) % _LANES


@intrinsic
def _stream_bf16_line(typingctx, src, i, dst, j):
    """dst[j:j + 16] = the float32 values of the bf16 bits src[i:i + 16], as one streamed store of a whole
    cache line: src, dst 1-D C-contiguous uint16 / float32, dst's address at j a multiple of 64 bytes."""
    def codegen(context, builder, signature, args):
        s, i, d, j = args
        s_ptr = builder.gep(context.make_array(signature.args[0])(context, builder, s).data, [i])
        d_ptr = builder.gep(context.make_array(signature.args[2])(context, builder, d).data, [j])
        halves, words, floats = (ir.VectorType(t, _LANES) for t in (ir.IntType(16), ir.IntType(32), ir.FloatType()))
        bits = builder.zext(builder.load(builder.bitcast(s_ptr, halves.as_pointer()), align=2), words)
        value = builder.bitcast(builder.shl(bits, ir.Constant(words, [16] * _LANES)), floats)
        store = builder.store(value, builder.bitcast(d_ptr, floats.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(src, i, dst, j), codegen


@intrinsic
def _store_fence(typingctx):
    """The streamed stores before it reach memory before any store after it (such as the one that hands
    the buffer to BLAS's threads): x86's sfence, elsewhere a full fence."""
    def codegen(context, builder, signature, args):
        if STREAM:
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@nb.njit(inline="always")
def bf16(bits):
    """One bf16 (uint16 bits) -> its exact float32 value."""
    return _bits_to_f32(np.uint32(bits) << np.uint32(16))


def as_f32(value):
    """A stored weight value -> float32: uint16 is bf16 bits, a float is converted (Numba only)."""
    raise NotImplementedError("compiled by Numba")


@overload(as_f32)
def _as_f32(value):
    if isinstance(value, types.Integer):
        return lambda value: bf16(value)
    return lambda value: np.float32(value)


# A GEMV of one row of x reads each weight row as 32-bit pairs of bf16 where it can (`_gemv_program`).
PAIRS = sys.byteorder == "little"  # the pair's first bf16 is its low half


@nb.njit(cache=True)
def part_of(first, i):
    """first int64 [n + 1], non-decreasing, part k spanning first[k] .. first[k + 1] - 1; i < first[n]
    -> the part k that holds i (an empty part holds nothing)."""
    k = 0
    while i >= first[k + 1]:
        k += 1
    return k


# Where x's pairs lie. On the 2-core Zen 4 the row loop streamed well below the memory where the weight rows
# and x's pairs both started on 32-byte boundaries (the model's weights start on 64, `resident_copy`, and
# Numba's allocator put the pairs on 32), and where x's odd elements sat at the same offset within a 4 KB
# page as its even ones (4096-wide rows: 41-42 GB/s, against 55-58 with them 2 KB apart). So the even
# elements start X_PHASE bytes past a 32-byte boundary and the odd ones ODD_SHIFT bytes further within the
# page. Decoding the bench model where memory read ~55-58 GB/s: 8.2 -> 7.4 ms a token with X_PHASE, then
# 7.0 -> 6.8 with ODD_SHIFT (in-model A/Bs, fast/PERFORMANCE.md).
X_PHASE = 16
ODD_SHIFT = 2048


@nb.njit(cache=True)
def _gemv_layout(x, ws, count):
    """The programs of a GEMV of x [M, In] over the first `count` matrices of ws -> (first, col, pairs):
    first, col int64 [count + 1], the first program and the first output column of each matrix
    (first[count] programs in all); pairs float32 [2, >= In // 2], x's even and odd elements for the pairs
    path of `_gemv_program` (M == 1, In even) in their first In // 2 columns, else [2, 0]. The even row
    starts X_PHASE bytes past a 32-byte boundary and the odd row ODD_SHIFT bytes further within a 4 KB page
    (the rows padded for it)."""
    first, col = np.zeros(count + 1, np.int64), np.zeros(count + 1, np.int64)
    for k in range(count):
        first[k + 1] = first[k] + (ws[k].shape[0] + ROWS - 1) // ROWS
        col[k + 1] = col[k] + ws[k].shape[0]
    M, In = x.shape
    half = In // 2 if PAIRS and M == 1 and In % 2 == 0 else 0
    row = half + (ODD_SHIFT - 4 * half) % 4096 // 4 if half else 0  # floats from the even row to the odd
    room = np.empty(2 * row + 8, np.float32)  # room for the pairs from any 4-byte-aligned start
    skip = (X_PHASE - room.ctypes.data % 32) % 32 // 4
    pairs = room[skip:skip + 2 * row].reshape(2, row)
    for i in range(half):
        pairs[0, i], pairs[1, i] = x[0, 2 * i], x[0, 2 * i + 1]
    return first, col, pairs


@nb.njit(fastmath=FM, cache=True)
def _gemv_program(x, pairs, ws, first, col, pid, out):
    """GEMV program pid (a block of ROWS rows of one matrix of ws; first, col, pairs from `_gemv_layout`):
    out[:, its columns] = x @ those rows^T. x [M, In] f32, ws a tuple of [Out_k, In] uint16 (bf16 bits).
    Each weight row comes from memory once; the other rows of x reuse it from cache. With one row of x the
    weights upcast on the fly. Where pairs holds x's even and odd elements (and the matrix starts on 4
    bytes), each 32-bit word of a row holds two bf16: `word << 16` is the first one's float32 and
    `word & 0xFFFF0000` the second's, two cheap operations where widening each 16-bit value costs a
    shuffle, so a core issues fewer instructions per byte and keeps more loads in flight; on the 2-core
    Zen 4 that took the bench model's decode from 8.95 to 7.47 ms per token (medians of 118 interleaved
    pairs, 115 faster; fast/PERFORMANCE.md). There STREAMS rows share each load of x, one from each
    STREAMS-th of the block (`_pairs_rows`)."""
    M, In = x.shape
    k = part_of(first, pid)
    w, c = ws[k], col[k]
    o, end = (pid - first[k]) * ROWS, min(w.shape[0], (pid - first[k] + 1) * ROWS)
    if pairs.shape[1] > 0 and w.ctypes.data % 4 == 0:  # so M == 1 and In <= 2 * pairs.shape[1]
        _pairs_rows(w.view(np.uint32), pairs[0], pairs[1], In // 2, o, end, out[0, c:])
        return
    if M == 1:  # upcast on the fly
        for r in range(o, end):
            acc = np.float32(0.0)
            for i in range(In):
                acc += x[0, i] * bf16(w[r, i])
            out[0, c + r] = acc
        return
    row = np.empty(In, np.float32)
    for r in range(o, end):
        for i in range(In):  # upcast once into L1, reuse for every row of x
            row[i] = bf16(w[r, i])
        for m in range(M):
            acc = np.float32(0.0)
            for i in range(In):
                acc += x[m, i] * row[i]
            out[m, c + r] = acc


# Weight rows per load of x in the pairs loop, each from its own STREAMS-th of a program's block. On the
# 2-core Zen 1 (nineteenth session) the one-row loop held a 256 MB GEMV to 25-26 GB/s where a probe read
# 31: its loads of x (8 bytes per 4 of weights) kept the core near its own limit. Four rows per load of x
# read 28.5-30.2 at widths 1024-15360, but only with the rows a quarter-block apart: four adjacent rows
# (2 or 4 KB apart, so two to four streams within one 4 KB page) read 18.6 at 1024 wide, and two adjacent
# rows were the Zen 4's "21 against 34 GB/s" (fast/PERFORMANCE.md). With four streams a program's 32 rows
# (ROWS) read faster than 16 at 1024 wide (27.5 against 25.6 GB/s; the same at 4096). 1 restores the
# one-row loop. In the model, 16 tokens after a 64-token prompt: 16.2 -> 14.8 ms a token with the streams,
# then 16.2 -> 15.4 with 32 rows (each against the previous commit, alternated in one process, every round
# faster; the host's memory read 29 and then 26 GB/s). Either 4 or 1.
STREAMS = 4


@nb.njit(fastmath=FM, cache=True)
def _pairs_rows(words, even, odd, half, o, end, out):
    """out[r] = the dot product of weight row r with x, for rows o..end-1: words [Out, >= half] uint32, each
    two bf16 (the first in the low half), even/odd [>= half] float32, x's even and odd elements. With
    STREAMS = 4 and s = (end - o) // 4, rows o + j, o + s + j, o + 2s + j and o + 3s + j (j < s) share
    each load of x, and the rows after o + 4s (at most three) go one at a time; with STREAMS = 1 every row
    does."""
    s = (end - o) // 4 if STREAMS == 4 else 0  # rows per stream
    for r in range(o, o + s):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(half):
            e, d = even[i], odd[i]
            w0, w1, w2, w3 = words[r, i], words[r + s, i], words[r + 2 * s, i], words[r + 3 * s, i]
            a0 += e * _bits_to_f32(w0 << np.uint32(16)) + d * _bits_to_f32(w0 & np.uint32(0xFFFF0000))
            a1 += e * _bits_to_f32(w1 << np.uint32(16)) + d * _bits_to_f32(w1 & np.uint32(0xFFFF0000))
            a2 += e * _bits_to_f32(w2 << np.uint32(16)) + d * _bits_to_f32(w2 & np.uint32(0xFFFF0000))
            a3 += e * _bits_to_f32(w3 << np.uint32(16)) + d * _bits_to_f32(w3 & np.uint32(0xFFFF0000))
        out[r], out[r + s], out[r + 2 * s], out[r + 3 * s] = a0, a1, a2, a3
    for r in range(o + 4 * s, end):
        a0 = a1 = np.float32(0.0)
        for i in range(half):
            word = words[r, i]
            a0 += even[i] * _bits_to_f32(word << np.uint32(16))
            a1 += odd[i] * _bits_to_f32(word & np.uint32(0xFFFF0000))
        out[r] = a0 + a1


@nb.njit(parallel=True, fastmath=FM, cache=True)
def _gemv_bf16(x, ws, out):
    """x [M, In] f32, ws a tuple of weights [Out_k, In] uint16 (bf16 bits) -> out [M, sum of Out_k] f32:
    x @ w.T for each w, side by side, over all their programs (`_gemv_program`), so projections of one x
    (q, k, v; gate, up) stream as one pass with one launch."""
    first, col, pairs = _gemv_layout(x, ws, len(ws))
    for pid in nb.prange(first[-1]):
        _gemv_program(x, pairs, ws, first, col, pid, out)


@nb.njit(cache=True)
def _upcast_rows(w, lo, hi, out):
    """w [Out, In] uint16 (bf16 bits) -> out[:hi - lo] = float32 of rows lo..hi-1, exact; both C-contiguous.
    One thread, so no thread pool is left spinning against BLAS's next call. On x86-64 the stores stream
    past the caches (`_stream_bf16_line`) wherever out is aligned to a cache line: the upcast writes 16 MB
    for a 4096 x 1024 matrix, which BLAS's product before it has pushed out of the L3, and an ordinary
    store first reads each line back from memory. On the 2-core Zen 4 this took a 512-token prefill's 54
    upcasts from 72 to 24 ms and the prefill from 864 to 819 ms (medians of ten interleaved pairs in one
    process, nine faster); on the Zen 5 no faster or slower (fast/PERFORMANCE.md)."""
    src = w[lo:hi].reshape(-1)
    dst = out[:hi - lo].reshape(-1)
    n = src.size
    body = lead = 0
    if STREAM:
        lead = min(n, _to_line(dst.ctypes.data))  # values before the first whole line
        body = (n - lead) // _LANES * _LANES
    for k in range(lead):
        dst[k] = bf16(src[k])
    for k in range(lead, lead + body, _LANES):
        _stream_bf16_line(src, k, dst, k)
    for k in range(lead + body, n):
        dst[k] = bf16(src[k])
    if body:
        _store_fence()


def _gemv(x2: np.ndarray, bits: tuple) -> np.ndarray:
    """x2 [M, In] float32, bits: bf16 matrices [Out_i, In] -> [M, sum of Out_i], the products side by side."""
    if _BLAS_RAN[0]:
        park_blas_threads()
    out = np.empty((x2.shape[0], sum(b.shape[0] for b in bits)), np.float32)
    _gemv_bf16(np.ascontiguousarray(x2), bits, out)
    return out


def _upcast_blocks(bits: np.ndarray):
    """bits [Out, In] bf16 -> yields (lo, hi, float32 rows lo..hi-1 exactly): the whole matrix at once
    when it fits the scratch buffer (SCRATCH_FLOATS), else blocks of rows, each overwriting the last."""
    _BLAS_RAN[0] = True
    bits = np.ascontiguousarray(bits)
    Out, In = bits.shape
    rows = max(1, min(Out, SCRATCH_FLOATS // In))
    buf = _scratch(rows * In).reshape(rows, In)
    for lo in range(0, Out, rows):
        hi = min(Out, lo + rows)
        _upcast_rows(bits, lo, hi, buf)
        yield lo, hi, buf[: hi - lo]


def matmul(x2: np.ndarray, w) -> np.ndarray:
    """x2 [M, In] float32, w [Out, In] (Bf16 or float array) -> [M, Out] float32."""
    return matmuls(x2, [w])[0]


def _product(x2: np.ndarray, xT: np.ndarray | None, w) -> np.ndarray:
    """x2 [M, In] float32 (xT: its transpose, given for token-minor rows counts), w [Out, In] -> x2 @ w^T:
    the GEMV for a few rows, the token-minor product, or the weights upcast for x2 @ w^T in BLAS."""
    M = x2.shape[0]
    if not isinstance(w, Bf16):
        return x2 @ np.asarray(w, np.float32).T
    if M <= GEMV_MAX_M:
        return _gemv(x2, (w.bits,))
    if xT is not None:
        return transpose(matmul_t(w, xT))
    return _upcast_product(w.bits, 1, M, lambda f32, out: f32_product(x2, f32, out, b_transposed=True))


def matmul_t(w, xT: np.ndarray) -> np.ndarray:
    """w [Out, In] (Bf16 or float array), xT [In, M] float32 C-contiguous -> w @ xT [Out, M] float32, the
    product with the tokens as the output's contiguous axis ((x w^T)^T). numpy's OpenBLAS runs it faster
    than x @ w^T on this project's machine (2-core Zen 5): 5-15 % at 300-512 rows, up to 2x at 16-64
    (products alone); a whole prefill, transposes in and out included, 3-6 % faster at 300-512 tokens,
    10-20 % at 32-128, none at 1000 (measured in the model, interleaved)."""
    if not isinstance(w, Bf16):
        return np.asarray(w, np.float32) @ xT
    return _upcast_product(w.bits, 0, xT.shape[1], lambda f32, out: f32_product(f32, xT, out))


def matmuls_t(ws: list, xT: np.ndarray) -> list[np.ndarray]:
    """ws: matrices [Out_i, In], xT [In, M] float32 C-contiguous -> [w_i @ xT], each [Out_i, M] float32,
    as `matmul_t`. Where every w_i is bf16 and all fit the scratch buffer at once, in one product: their
    rows upcast one after another into the scratch and multiplied together, the results row ranges of one
    output (the same sums, fewer and larger products)."""
    In, M = xT.shape
    rows = [w.shape[0] for w in ws]
    if len(ws) < 2 or not all(isinstance(w, Bf16) for w in ws) or sum(rows) * In > SCRATCH_FLOATS:
        return [matmul_t(w, xT) for w in ws]
    _BLAS_RAN[0] = True
    buf = _scratch(sum(rows) * In).reshape(sum(rows), In)
    edges = np.cumsum([0] + rows)
    for w, lo, hi in zip(ws, edges[:-1], edges[1:]):
        _upcast_rows(np.ascontiguousarray(w.bits), 0, hi - lo, buf[lo:hi])
    out = np.empty((sum(rows), M), np.float32)
    f32_product(buf, xT, out)
    return [out[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]


def _upcast_product(bits: np.ndarray, axis: int, M: int, product) -> np.ndarray:
    """bits [Out, In] bf16 -> a [M, Out] (axis 1) or [Out, M] (axis 0) float32 result, filled by
    product(w, out) over the weights w upcast exactly to float32 (`_upcast_blocks`): one call where the
    whole matrix fits the scratch, else one per block of rows, each into its slice of the result."""
    out = np.empty((M, bits.shape[0]) if axis else (bits.shape[0], M), np.float32)
    for lo, hi, f32 in _upcast_blocks(bits):
        product(f32, out[:, lo:hi] if axis else out[lo:hi])
    return out


# ---- which BLAS runs the prefill's products: numpy's OpenBLAS or Intel's MKL (fast/mkl.py) ----------

BLAS_LIBRARIES = ("openblas", "mkl")
BLAS = [None]  # the library `f32_product` uses, chosen by `choose_blas` at the first product
BLAS_SPEEDS: dict = {}  # library -> GFLOP/s that `choose_blas` measured (empty where it measured nothing)
BLAS_ROUNDS_WON: dict = {}  # library -> the rounds of that timing in which it was the faster
CHOICE_SHAPE = (1024, 1024, 512)  # M, K, N of the product `choose_blas` times: the bench model's q, 512 tokens
CHOICE_ROUNDS = 11
OPENBLAS_ROUNDS = 0.75  # the share of those rounds OpenBLAS must win to be chosen over MKL (`_faster_blas`)


def f32_product(a: np.ndarray, b: np.ndarray, out: np.ndarray, b_transposed: bool = False,
                library: str | None = None) -> None:
    """out [M, N] = a [M, K] @ b [K, N] (b_transposed: a @ b^T for b [N, K]), float32, rows contiguous, in
    `library` (default: the chosen one, `choose_blas`). numpy's OpenBLAS threads itself; MKL runs a
    single-threaded call per core on a share of a's rows (`on_every_core`'s cut; `_Crew.product` where b is
    not transposed), so no second pool spins."""
    if (library or choose_blas()) == "openblas":
        np.matmul(a, b.T if b_transposed else b, out=out)
        return
    if b_transposed:
        on_every_core(a.shape[0], lambda lo, hi: mkl.sgemm(a[lo:hi], b, out[lo:hi], b_transposed))
        return
    parts = _parts_for(a.shape[0])
    if parts < 2:
        mkl.sgemm(a, b, out)
    else:
        _crew().product(a, b, out, parts)


def blas_libraries() -> tuple[str, ...]:
    """The libraries the prefill's products can run in here: numpy's OpenBLAS, and MKL where it is installed."""
    return BLAS_LIBRARIES if mkl.LIB is not None else ("openblas",)


def choose_blas() -> str:
    """The library for the prefill's products, chosen once per process: $FAST_BLAS where set (openblas or
    mkl), numpy's OpenBLAS where MKL is not installed, else whichever ran a CHOICE_SHAPE product faster here
    in CHOICE_ROUNDS rounds of one call each, MKL unless OpenBLAS won most of them clearly (`_faster_blas`;
    ~0.15 s on the Ice Lake). Which is faster depends on the CPU: MKL by ~5-15 % on an Intel Xeon (Ice
    Lake), OpenBLAS on the AMD hosts measured before."""
    if BLAS[0] is None:
        BLAS[0] = requested_blas() or (_faster_blas() if len(blas_libraries()) > 1 else "openblas")
    return BLAS[0]


def requested_blas() -> str | None:
    """The library $FAST_BLAS asks for, or None where it is unset or empty; ValueError, naming the problem,
    for a name other than BLAS_LIBRARIES' or for mkl where MKL is not installed."""
    wanted = os.environ.get("FAST_BLAS", "").strip()
    if wanted and wanted not in BLAS_LIBRARIES:
        raise ValueError(f"FAST_BLAS={wanted!r}: expected one of {', '.join(BLAS_LIBRARIES)}")
    if wanted == "mkl" and mkl.LIB is None:
        raise ValueError("FAST_BLAS=mkl, but MKL (libmkl_rt) is not installed here: pip install mkl")
    return wanted or None


def _faster_blas() -> str:
    """Time both libraries on CHOICE_SHAPE, one call each per round -> "openblas" where it was the faster in
    at least OPENBLAS_ROUNDS of the rounds, else "mkl" (BLAS_ROUNDS_WON: each one's rounds won; BLAS_SPEEDS:
    each one's fastest call). Rounds, not each one's best call: the two calls of a round run milliseconds
    apart, on a host in one state, where the best calls came from whatever quiet moment each met (on the Ice
    Lake VM, whose speed moves within seconds, a best-of pick once took OpenBLAS, 114 against 93 GFLOP/s,
    where MKL was the faster in 28 of 30 timings after it). MKL unless OpenBLAS wins clearly: with MKL
    fast also runs attention by whole heads in compiled code (`prefill.attention_heads_t`; a sliding
    layer 1.9x faster on the Ice Lake), which one product's timing does not see, and a lead of a few per
    cent in the product changes sides from round to round there (MKL won 4 to 11 of 11 rounds in 30
    timings in a row)."""
    M, K, N = CHOICE_SHAPE
    rng = np.random.default_rng(0)
    a, b, out = rng.random((M, K), np.float32), rng.random((K, N), np.float32), np.empty((M, N), np.float32)
    seconds = {name: [] for name in BLAS_LIBRARIES}
    for r in range(CHOICE_ROUNDS + 1):
        for name in BLAS_LIBRARIES:
            t0 = time.perf_counter()
            f32_product(a, b, out, library=name)
            if r:  # the first round warms each up
                seconds[name].append(time.perf_counter() - t0)
    for name, s in seconds.items():
        BLAS_SPEEDS[name] = 2 * M * K * N / min(s) / 1e9
    times = np.array([seconds[name] for name in BLAS_LIBRARIES])  # [library, round]
    won = np.bincount(times.argmin(axis=0), minlength=len(BLAS_LIBRARIES))
    BLAS_ROUNDS_WON.clear()
    BLAS_ROUNDS_WON.update(zip(BLAS_LIBRARIES, won.tolist()))
    return "openblas" if BLAS_ROUNDS_WON["openblas"] >= OPENBLAS_ROUNDS * CHOICE_ROUNDS else "mkl"


@nb.njit(cache=True)
def _transpose(a, out):
    """a [R, C] -> out [C, R] = a^T, in 8 x 8 tiles, where numpy's OpenBLAS has no transposing copy. Rows of
    a power-of-two width are 4 KB apart and fight over the same cache sets: numpy's copy of a transposed
    view took 3-4x as long (measured), OpenBLAS's somatcopy a third."""
    R, C = a.shape
    for r0 in range(0, R, 8):
        r1 = min(R, r0 + 8)
        for c0 in range(0, C, 8):
            for c in range(c0, min(C, c0 + 8)):
                for r in range(r0, r1):
                    out[c, r] = a[r, c]


def transpose(a: np.ndarray, blas: bool = True) -> np.ndarray:
    """a [R, C] float32 -> a^T as a new C-contiguous [C, R] array: OpenBLAS's somatcopy (0.1 ms for
    512 x 1024 on the 2-core Zen 5), or `_transpose` (0.35 ms) without it or with blas=False."""
    a = np.ascontiguousarray(a, np.float32)
    out = np.empty((a.shape[1], a.shape[0]), np.float32)
    if blas and _OMATCOPY is not None and a.size:
        _OMATCOPY(101, 112, a.shape[0], a.shape[1], 1.0, a.ctypes.data, a.shape[1], out.ctypes.data,
                  a.shape[0])  # row-major, transposed
    else:
        _transpose(a, out)
    return out


def matmuls(x2: np.ndarray, ws: list) -> list[np.ndarray]:
    """x2 [M, In] float32, ws [w_i [Out_i, In]] -> [x2 @ w_i.T]. A few rows of x over bf16 matrices: one
    GEMV pass over all of them (one launch, no ramp between matrices: 3-5 % of a layer's decode GEMVs,
    measured), returned as column views. Token-minor rows counts transpose x once for all of them.
    Otherwise one product each: stacking gains nothing in BLAS."""
    M = x2.shape[0]
    bf16 = [isinstance(w, Bf16) for w in ws]
    if M <= GEMV_MAX_M and len(ws) > 1 and all(bf16):
        bits = tuple(_read_only(w.bits) for w in ws)
        out, lo = _gemv(x2, bits), 0
        views = []
        for b in bits:
            views.append(out[:, lo:lo + b.shape[0]])
            lo += b.shape[0]
        return views
    xT = transpose(x2) if GEMV_MAX_M < M <= TOKEN_MINOR_MAX_M and any(bf16) else None
    return [_product(x2, xT, w) for w in ws]


def _read_only(a: np.ndarray) -> np.ndarray:
    """a as a read-only C-ordered array (a checkpoint's memory map already is): the one Numba type that
    the matrices of a GEMV tuple must share."""
    if a.flags.c_contiguous and not a.flags.writeable:
        return a
    a = np.ascontiguousarray(a).view()
    a.flags.writeable = False
    return a


_SCRATCH = [np.empty(0, np.float32)]


def _scratch(n: int) -> np.ndarray:
    """A float32 buffer of at least n values, reused across calls (fresh pages would cost a zeroing pass),
    starting on a cache line (64 bytes), where `_upcast_rows`'s streamed stores begin."""
    if _SCRATCH[0].size < n:
        _SCRATCH[0] = _aligned_empty(4 * n, 64).view(np.float32)
    return _SCRATCH[0][:n]


def linear(x: np.ndarray, w, b=None) -> np.ndarray:
    """[..., In] -> [..., Out], as ref.layers.linear."""
    return linears(x, [w], [b])[0]


def linears(x: np.ndarray, ws: list, bs: list) -> list[np.ndarray]:
    """[..., In] -> [[..., Out_i]], as ref.decoder.linears (`matmuls` for the products)."""
    ys = matmuls(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32), ws)
    return [(y if b is None else y + to_f32(b)).reshape(x.shape[:-1] + (-1,)) for y, b in zip(ys, bs)]


# ---- norms and the MLP --------------------------------------------------------------------------

@nb.njit(fastmath=FM, cache=True)
def _rms_norm(x, w, eps, out):
    """x [R, N] -> out [R, N]: x * (mean(x^2) + eps)^-0.5 * w, w [N] float or bf16 bits. One thread:
    memory-bound and short, a parallel launch costs more than it saves."""
    R, N = x.shape
    for r in range(R):
        ss = np.float32(0.0)
        for i in range(N):
            ss += x[r, i] * x[r, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(N) + eps)
        for i in range(N):
            out[r, i] = x[r, i] * inv * as_f32(w[i])


_ONES: dict[int, np.ndarray] = {}


def norm_weight(w, n: int) -> np.ndarray:
    """A norm's weight [n] as the compiled norms read it (`as_f32`): a bf16 tensor's bits, a float tensor
    as float32, or None (no scale) as ones, kept per size."""
    if w is None:
        if n not in _ONES:
            _ONES[n] = np.ones(n, np.float32)
        return _ONES[n]
    return w.bits if isinstance(w, Bf16) else to_f32(w)


def rms_norm(x: np.ndarray, w=None, eps: float = 1e-6) -> np.ndarray:
    """[..., N] -> [..., N], as ref.layers.rms_norm."""
    N = x.shape[-1]
    x2 = np.ascontiguousarray(x.reshape(-1, N), np.float32)
    out = np.empty_like(x2)
    _rms_norm(x2, norm_weight(w, N), np.float32(eps), out)
    return out.reshape(x.shape)


def mlp(h: np.ndarray, p) -> np.ndarray:
    """[B, T, D] -> [B, T, D]: down(gelu(gate h) * up h). From GEMV_MAX_M to TOKEN_MINOR_MAX_M rows,
    the hidden activations stay token-minor ([inter, rows], see `matmul_t`): h is transposed once on the
    way in and the result once on the way out. (Gate and up upcast into one scratch matrix for one BLAS
    call measured 2-3 % slower: 32 MB of float32 no longer fits the 32 MB L3.)"""
    h2 = np.ascontiguousarray(h.reshape(-1, h.shape[-1]), np.float32)
    if GEMV_MAX_M < h2.shape[0] <= TOKEN_MINOR_MAX_M:
        hT = transpose(h2)
        gT, uT = matmul_t(p.gate_proj.weight, hT), matmul_t(p.up_proj.weight, hT)
        gelu_tanh_mul(gT, uT)
        return transpose(matmul_t(p.down_proj.weight, gT)).reshape(h.shape)
    g, u = (np.ascontiguousarray(y) for y in matmuls(h2, [p.gate_proj.weight, p.up_proj.weight]))
    gelu_tanh_mul(g, u)
    return matmul(g, p.down_proj.weight).reshape(h.shape)


# ---- exp and tanh in float32 operations that LLVM vectorises ------------------------------------

LOG2E, LN2_HI, LN2_LO = np.float32(1.4426950408889634), np.float32(0.693145751953125), np.float32(1.4286068e-06)


@nb.njit(inline="always", fastmath=FM)
def _ln2_split(x):
    """float32 x in [-87, 0] -> (k, r, 2^k): x = k ln2 + r with |r| <= ln2/2, k integral, 2^k from its
    exponent bits. ln2 comes in two parts, the first with 16 significant bits, so k times it is exact."""
    k = np.floor(x * LOG2E + np.float32(0.5))
    r = x - k * LN2_HI - k * LN2_LO
    return k, r, _bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))


@nb.njit(inline="always", fastmath=FM)
def exp32(x):
    """e^x for a float32 x <= 0 (softmax arguments), in operations LLVM vectorises (numpy's exp is one call
    per array; libm's is scalar): 2^k e^r (`_ln2_split`), e^r by its Taylor series to r^7 (truncation
    < 1e-8 relative). Measured max error 7.7e-8 relative over [-87, 0] (numpy's float32 exp: 2.0e-7).
    Below -87 (and -inf) -> 0: e^-87 < 2^-125, nothing beside a row maximum of e^0 = 1."""
    k, r, two_k = _ln2_split(max(x, np.float32(-87.0)))
    e = np.float32(1 / 5040)
    for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        e = e * r + np.float32(c)
    return e * two_k if x >= np.float32(-87.0) else np.float32(0.0)


@nb.njit(inline="always", fastmath=FM)
def tanh32(a):
    """tanh of a float32, in operations LLVM vectorises: with m = e^(-2|a|) - 1 in (-1, 0],
    tanh|a| = -m / (2 + m), the sign put back. m is 2^k (e^r - 1) + (2^k - 1) (`_ln2_split`), e^r - 1 by
    its Taylor series to r^8, so near a = 0 nothing cancels: the result is accurate relative to tanh
    itself, as soft-capped logits near 0 need (the form (1 - e) / (1 + e) lost all relative accuracy
    there). Measured against float64: 1.65e-7 relative (2.8 float32 ulps) and 1.5e-7 absolute over
    [-50, 50] and down to 1e-30 (numpy's float32 tanh: 1.1e-7 relative). Exactly +-1 from |a| >= 43.5,
    NaN stays NaN. Call it from functions compiled with error_model="numpy": Python's check for a zero
    divisor (2 + m never is) keeps LLVM from vectorising."""
    k, r, two_k = _ln2_split(max(np.float32(-2.0) * abs(a), np.float32(-87.0)))
    p = np.float32(1 / 40320)
    for c in (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0):
        p = p * r + np.float32(c)
    m = two_k * (p * r) + (two_k - np.float32(1.0))
    t = -m / (np.float32(2.0) + m)
    return t if a >= np.float32(0.0) else -t if a < np.float32(0.0) else a


@nb.njit(fastmath=FM, error_model="numpy", nogil=True, cache=True)
def _gelu_mul(x, u):
    """x <- gelu_tanh(x) * u, as ref's mlp, in one pass over memory; x, u [R, C]. ref's 0.5 x (1 + tanh(y)),
    y = sqrt(2/pi) (x + 0.044715 x^3), is the same function as x sigmoid(2y): with E = e^(-2|y|) in [0, 1]
    (`exp32`), sigmoid(2y) is 1 / (1 + E) for y >= 0 and E / (1 + E) below. One exp and one division per
    value where `tanh32` needs a longer series and the sign's fix-up: 7.0 -> 5.7 ms per 4096 x 512 on the
    2-core Zen 1, and nearer ref's numbers (2.6e-7 of |x u| at most against 3.3e-7; tests/test_fast.py
    derives the bound). Not numpy's bits; multiply-adds may fuse. Infinities and NaN come out as ref's:
    -inf gives -inf x 0 = NaN, as -inf (1 + tanh(-inf)) does."""
    c2, a = np.float32(2.0 * np.sqrt(2.0 / np.pi)), np.float32(0.044715)
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            v = x[r, i]
            y2 = c2 * (v + a * v * v * v)
            e = exp32(-abs(y2))
            x[r, i] = v * (np.float32(1.0) if y2 >= np.float32(0.0) else e) / (np.float32(1.0) + e) * u[r, i]


# Values from which GELU runs on every core (`gelu_tanh_mul`, `on_every_core`). On the 2-core Zen 1 one
# 4096 x 512 GELU (2M values) takes 5.7 ms on one core; parking OpenBLAS's workers and restarting them costs
# ~90 us. (The token-minor softmax split the same way gained nothing in the model: 3.5 ms a layer at one
# core, the park and restart around each query tile taking most of what the second core saves.)
SPLIT_MIN = 1 << 18
_CREW: dict = {}  # process id -> _Crew, made at the first split
# An idle helper spins team.SPINS loads, then yields its core at each of HELPER_YIELDS looks (a few ms in
# all, about the longest gap between two split calls of a prefill: an MLP matrix's upcast, attention), then
# sleeps until the next call wakes it.
HELPER_YIELDS = 1 << 12
NEVER = 1 << 62  # yields enough to wait for a helper that is at work


class _Crew:
    """The rows' helper threads (`on_every_core`). A ThreadPoolExecutor's worker sleeps between calls, and
    on the 2-core Ice Lake VM it started its share of a product ~160-260 us after the caller started its
    own (median, up to 4.8 ms), 56 calls a 512-token prefill; a helper here waits for the next call by
    spinning, then yielding its core, without the GIL (`team.wait_change`), and sleeps on a condition only
    after a few ms idle. The caller waits for the helpers' shares the same way. Each call is one job number
    (`go`); helper i runs its part of it, if any, and then marks the number done (`done[i]`).
    A product (`product`, MKL's) reaches the helpers as words of int64 that they run in compiled code
    (`_serve_products`), and the caller's side is compiled too, so that no part waits for the GIL or runs
    Python: in the model on the 2-core Ice Lake VM a helper had started its share of each product 90-200
    us after the caller started its own, and a 64 x 64 product over the crew took 112 us warm and 364 us
    after a 64 MB pass, against 15 and 204 us this way (medians of 390 alternated calls); a 512-token
    prefill runs 36 products."""

    def __init__(self, helpers: int):
        self.go = np.zeros(1, np.int64)
        self.done = np.zeros(helpers, np.int64)
        self.products = np.zeros((helpers, PRODUCT_WORDS), np.int64)  # helper i's product of this job, if any
        self.sleeping = 0  # helpers asleep on `asleep` (a call must wake them), read and changed under the GIL
        self.jobs: list = [None] * helpers
        self.errors: list = [None] * helpers
        self.asleep = threading.Condition()
        self.calls = threading.Lock()
        self.caller = None  # the thread in `run` or `product`, if any
        threads = [threading.Thread(target=self._serve, args=(i,), name=f"fast-rows-{i}", daemon=True)
                   for i in range(helpers)]
        for t in threads:
            t.start()
        self.helpers = {t.ident for t in threads}

    def _serve(self, i: int) -> None:
        seen = 0
        while True:
            job = _serve_products(self.go, self.done, i, seen, HELPER_YIELDS, self.products)
            if job == seen:  # idle for a while: sleep until the next call, then take it as any other
                with self.asleep:
                    self.sleeping += 1  # before the look at go: a call published after that look sees it
                    while self.go[0] == seen:
                        self.asleep.wait()
                    self.sleeping -= 1
                continue
            seen = job
            if self.jobs[i] is not None:
                work, a, b = self.jobs[i]
                try:
                    work(a, b)
                except BaseException as e:  # handed to the caller, which raises it
                    self.errors[i] = e
            self.done[i] = job

    def run(self, cut: list, work) -> None:
        """work(cut[k], cut[k + 1]) for every k: helper i takes k = i + 1, this thread k = 0 and any k
        beyond the helpers; returns when all are done (also when this thread's part raised), raising the
        first error. Called from inside a part (a helper's, or the caller's own), every part runs here."""
        if self._nested():
            for k in range(len(cut) - 1):
                work(cut[k], cut[k + 1])
            return
        with self._job() as job:
            for i in range(len(self.jobs)):
                self.jobs[i] = (work, cut[i + 1], cut[i + 2]) if i + 2 < len(cut) else None
                self.errors[i] = None
            self.products[:, 0] = 0
            team.publish(self.go, 0, job)
            self._wake()
            try:
                work(cut[0], cut[1])
                for k in range(len(self.jobs) + 1, len(cut) - 1):
                    work(cut[k], cut[k + 1])
            finally:  # the helpers' parts still write into the caller's arrays until they are done
                for i in range(len(self.jobs)):
                    team.wait_change(self.done, i, job - 1, NEVER)
        for e in self.errors:
            if e is not None:
                raise e

    def _nested(self) -> bool:
        """Whether this thread runs a part of a call now (a helper's, or the caller's own)."""
        me = threading.get_ident()
        return me in self.helpers or me == self.caller

    @contextlib.contextmanager
    def _job(self):
        """The next job's number, with this thread its caller until the block ends (calls from several
        threads take turns)."""
        with self.calls:
            self.caller = threading.get_ident()
            try:
                yield int(self.go[0]) + 1
            finally:
                self.caller = None

    def _wake(self) -> None:
        """Wake the helpers that sleep, once a job is published (a helper counts itself asleep before its
        last look at `go`: `_serve`, so none misses the job)."""
        if self.sleeping:
            with self.asleep:
                self.asleep.notify_all()

    def product(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, parts: int) -> None:
        """out = a @ b (float32, rows contiguous, `mkl.sgemm`'s checks) through MKL, a's rows cut into
        `parts` equal runs as `run` cuts them: the helpers run theirs from words of int64 (`_hand_over`),
        this thread the first and any beyond the helpers (`_lead`), without Python in between. Called from
        inside a part, it runs whole there."""
        mkl.check_product(a, b, out)
        if self._nested() or a.shape[0] == 0 or b.shape[1] == 0:
            mkl.sgemm(a, b, out)
            return
        with self._job() as job:
            for i in range(len(self.jobs)):
                self.jobs[i] = self.errors[i] = None
            _hand_over(mkl.SGEMM, self.products, a, b, out, parts, self.go, job)
            self._wake()
            _lead(mkl.SGEMM, self.done, job, a, b, out, parts)


PRODUCT_WORDS = 11  # a helper's product: 1, the gemm's address, M, N, K, a, lda, b, ldb, c, ldc (`_hand_over`)


@nb.njit(cache=True)
def _part(rows, parts, k):
    """Part k of `rows` rows cut into `parts` equal runs, as `on_every_core` cuts them -> (lo, hi); empty
    for k >= parts."""
    if k >= parts:
        return rows, rows
    return rows * k // parts, rows * (k + 1) // parts


@nb.njit(inline="always")
def _ld(m):
    """m [R, C] float32 with contiguous rows -> its row stride in elements, as `mkl._row_stride` (BLAS's
    leading dimension, at least C: a one-row matrix's stride may be anything)."""
    return max(m.strides[0] // 4, m.shape[1], 1)


@nb.njit(cache=True)
def _words(fn, a, b, out, k, parts, w):
    """w [PRODUCT_WORDS] <- part k of out = a @ b (rows `_part(M, parts, k)` of a and out) as words for
    `_gemm_words`, which runs them through the gemm at address fn (mkl.SGEMM; mkl.gemm_at)."""
    M, K = a.shape
    lo, hi = _part(M, parts, k)
    w[0], w[1], w[2], w[3], w[4] = 1, fn, hi - lo, b.shape[1], K
    w[5], w[6] = a.ctypes.data + lo * a.strides[0], _ld(a)
    w[7], w[8] = b.ctypes.data, _ld(b)
    w[9], w[10] = out.ctypes.data + lo * out.strides[0], _ld(out)


@nb.njit(cache=True)
def _hand_over(fn, products, a, b, out, parts, go, job):
    """products[i] <- the words of helper i's part of out = a @ b (part i + 1, `_words`), for
    `_serve_products`; then go[0] <- job (`team.store`: after the words)."""
    for i in range(products.shape[0]):
        _words(fn, a, b, out, i + 1, parts, products[i])
    team.store(go, 0, job)


@nb.njit(nogil=True, cache=True)
def _gemm_words(w):
    """The product that `_hand_over` wrote as words w [PRODUCT_WORDS], if it has rows."""
    if w[2] > 0:
        mkl.gemm_at(w[1], mkl.NO_TRANS, w[2], w[3], w[4], np.float32(1.0), w[5], w[6], w[7], w[8],
                    np.float32(0.0), w[9], w[10])


@nb.njit(nogil=True, cache=True)
def _lead(fn, done, job, a, b, out, parts):
    """The calling thread's side of a crew's product once job `job` is published: its parts of out = a @ b
    (part 0 and those beyond the helpers, `_words`), then a wait for every helper to mark the job done."""
    w = np.empty(PRODUCT_WORDS, np.int64)
    for k in range(parts):
        if not 1 <= k <= done.size:
            _words(fn, a, b, out, k, parts, w)
            _gemm_words(w)
    for i in range(done.size):
        team.wait_change(done, i, job - 1, NEVER)


@nb.njit(nogil=True, cache=True)
def _serve_products(go, done, i, seen, yields, products):
    """Helper i's wait for the crew's next job after job `seen` (`team.wait_change`), running those that are
    a product (products[i, 0] = 1) here, without the GIL, and marking them done -> the number of the first
    job that is not (Python runs it), or `seen` if none came within the wait."""
    while True:
        job = team.wait_change(go, 0, seen, yields)
        if job == seen or products[i, 0] == 0:
            return job
        _gemm_words(products[i])
        team.store(done, i, job)
        seen = job


def _crew() -> _Crew:
    """The rows' helper threads, one crew per process: a forked child inherits the parent's crew without
    its threads, and work handed to it would wait forever."""
    pid = os.getpid()
    if pid not in _CREW:
        _CREW.clear()
        _CREW[pid] = _Crew(max(1, nb.get_num_threads() - 1))
    return _CREW[pid]


def thread_count() -> int:
    """nb.get_num_threads(), less its check that Numba's pool was started, once it runs: called right after a
    product or a decoding step, on caches their operands went through, that check costs most of the call
    (41 -> 12 us, medians after a 64 MB pass, the 2-core Ice Lake; 40 -> 15 us on the Zen 1)."""
    count = getattr(nb_parallel, "_get_num_threads", None)  # set when the pool starts
    return count() if count is not None else nb.get_num_threads()


def on_every_core(rows: int, work) -> None:
    """work(a, b) for row ranges that cover 0..rows once, as many as Numba's thread count (at most one a
    row): this thread runs the first, the helper threads (`_Crew`) the rest; to run at once, work must
    release the GIL (a nogil kernel, a ctypes call). OpenBLAS's workers are parked first, so none spins
    against them (a Numba-parallel loop in this place was 10 % slower, its OpenMP pool spinning against the
    next product in turn: fast/PERFORMANCE.md); the next product starts them again (~90 us for both,
    measured). Only between products (as `park_blas_threads`); calls from several threads take turns."""
    parts = _parts_for(rows)
    if parts < 2:
        work(0, rows)
        return
    _crew().run([rows * i // parts for i in range(parts + 1)], work)


def _parts_for(rows: int) -> int:
    """The parts `on_every_core` (or `_Crew.product`) cuts `rows` rows into: Numba's thread count, at most
    one a row; from 2 parts, OpenBLAS's workers parked first (`on_every_core`)."""
    parts = min(thread_count(), rows)
    if parts >= 2:
        park_blas_threads()
    return parts


def gelu_tanh_mul(g: np.ndarray, u: np.ndarray) -> None:
    """g <- gelu_tanh(g) * u in place, as ref's mlp (`_gelu_mul`). g, u float32 [R, C], C-contiguous. One
    compiled pass instead of numpy's three (argument, tanh, product), its rows over every core from SPLIT_MIN
    values (`on_every_core`): on the 2-core Zen 1 a GELU and the product after it 36.4 -> 33.7 ms, a
    512-token prefill of the bench model 2264 -> 2232 ms (medians of 12 interleaved rounds, 9 faster). Each
    value is computed alone, so the numbers are the same either way."""
    if g.size < SPLIT_MIN:
        _gelu_mul(g, u)
    else:
        on_every_core(g.shape[0], lambda a, b: _gelu_mul(g[a:b], u[a:b]))


# RoPE in ref's operation order without fastmath: no fused multiply-add, so each result is the float32
# that numpy computes in ref (bit for bit), in one pass over memory instead of one per op.

@nb.njit(cache=True)
def _rope(x, cos, sin, out):
    """x [R, N, Dh], cos/sin [R, Dh] -> out: x * cos + rotate_half(x) * sin, rotate_half(x) =
    concat(-x[half:], x[:half]) with half = Dh // 2 (its first part is the longer one for an odd Dh).
    An even Dh takes each pair (i, i + half) in one step, which LLVM vectorises (6x the general loop)."""
    R, N, Dh = x.shape
    half = Dh // 2
    first = Dh - half
    for r in range(R):
        for n in range(N):
            if first == half:
                for i in range(half):
                    a, b = x[r, n, i], x[r, n, i + half]
                    out[r, n, i] = a * cos[r, i] + -b * sin[r, i]
                    out[r, n, i + half] = b * cos[r, i + half] + a * sin[r, i + half]
                continue
            for i in range(first):
                out[r, n, i] = x[r, n, i] * cos[r, i] + -x[r, n, i + half] * sin[r, i]
            for i in range(first, Dh):
                out[r, n, i] = x[r, n, i] * cos[r, i] + x[r, n, i - first] * sin[r, i]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [B, T, N, Dh], cos/sin [B, T, Dh] -> [B, T, N, Dh], as ref.layers.apply_rope."""
    B, T, N, Dh = x.shape
    c = np.ascontiguousarray
    out = np.empty((B * T, N, Dh), np.float32)
    _rope(c(x, np.float32).reshape(B * T, N, Dh), c(cos, np.float32).reshape(B * T, Dh),
          c(sin, np.float32).reshape(B * T, Dh), out)
    return out.reshape(B, T, N, Dh)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _softcap(x, cap):
    """x <- cap tanh(x / cap) in place (`tanh32`), x float32 [N], cap > 0."""
    for i in range(x.size):
        x[i] = cap * tanh32(x[i] / cap)


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """x [...] float32, C-contiguous -> x soft-capped in place (ref's softcap, `_softcap`), returned; None:
    x as it is. numpy's float32 tanh is a call per element where it has no SIMD form (on AVX2: 0.27 ms for
    a 32768-word vocabulary against 0.07 ms here, the 2-core Zen 1)."""
    if cap is not None:
        _softcap(x.reshape(-1), np.float32(cap))
    return x


def lm_head(h: np.ndarray, table, cap: float | None) -> np.ndarray:
    """h [B, T, D], table [V, D] -> soft-capped logits [B, T, V]. A few positions (decoding) go straight to
    `_product` (the GEMV for a bf16 table), past `linear`'s lists and reshapes (~20 us a token, measured)."""
    B, T, D = h.shape
    if B * T <= GEMV_MAX_M:
        x2 = np.ascontiguousarray(h.reshape(B * T, D), np.float32)
        return softcap(_product(x2, None, table).reshape(B, T, -1), cap)
    return softcap(np.ascontiguousarray(linear(h, table), np.float32), cap)


# ---- attention ----------------------------------------------------------------------------------

@intrinsic
def _value_sums(typingctx):
    """A pointer to 2 x VALUE_COLUMNS float32 values on the calling function's stack. LLVM keeps such values
    in registers through a loop; a heap array's it loads and stores at every step, unable to tell that the
    loop's other arrays do not overlap it."""
    def codegen(context, builder, signature, args):
        slots = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), 2 * VALUE_COLUMNS))
        return builder.bitcast(slots, ir.PointerType(ir.FloatType()))

    return types.CPointer(types.float32)(), codegen


TWO_PASS_GROUP = 4  # query heads per kv head from which a decode program takes two passes (`_decode_two_pass`)
VALUE_COLUMNS = 32  # columns of two heads' value sums held in registers (2 x 4 of AVX2's 16 vectors)
VALUE_KEYS = 64  # keys whose value rows `_decode_two_pass` sums together (64-128 KB at one kv head of 256-512)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _decode_program(q, k, v, mask, chunk, part_m, part_l, part_acc, pid):
    """Split-key attention for a few queries (decode), one program: pid = (b, key chunk c), into part_m/part_l
    [B, C, T, H] (each head's maximum score m over the chunk's visible keys, and the sum of e^(score - m))
    and part_acc [B, C, T, H, Dh] (the value rows weighted by e^(score - m)); `_combine` merges the chunks.
    A program reads its chunk's rows for all heads (GQA), so a single query still spreads over every core.
    Where a kv head serves few query heads, a key's K and V rows cost more to read than to use:
    `_decode_per_key`, whose arithmetic covers its loads. Where it serves TWO_PASS_GROUP or more (the
    global layers), the arithmetic is the cost: `_decode_two_pass`, with a third less of it.
    q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] bool."""
    if q.shape[2] // k.shape[2] >= TWO_PASS_GROUP:
        _decode_two_pass(q, k, v, mask, chunk, part_m, part_l, part_acc, pid)
    else:
        _decode_per_key(q, k, v, mask, chunk, part_m, part_l, part_acc, pid)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _decode_per_key(q, k, v, mask, chunk, part_m, part_l, part_acc, pid):
    """`_decode_program` in one pass over the chunk's visible keys in memory order, K and V row side by side:
    for every query the scores of all heads, then each head's running max, exp-sum and exp-weighted sum of
    values, rescaled by e^(old max - new max) at every key (exactly 1 where the max stays: no branch, so the
    heads' softmax step vectorises). (Against separate score, exp and value passes: 0.16 ms less per token of
    the bench model; against a rescale only when the max grows: 544 keys of 4 kv heads of 128 for 8 heads 171
    against 183 us cold, 122 against 132 warm, of one kv head of 256 239 against 261 and 194 against 216 (minima
    of 40 interleaved rounds, the Zen 1).) q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] bool."""
    T, H, Dh = q.shape[1], q.shape[2], q.shape[3]
    S, G, C = k.shape[1], H // k.shape[2], part_m.shape[1]
    b, c = pid // C, pid % C
    s0 = c * chunk
    m, den = part_m[b, c], part_l[b, c]
    acc = part_acc[b, c]
    m[:], den[:], acc[:] = -np.inf, 0, 0
    score, r, e = np.empty(H, np.float32), np.empty(H, np.float32), np.empty(H, np.float32)
    for j in range(s0, min(S, s0 + chunk)):
        for t in range(T):
            if not mask[b, t, j]:
                continue
            for h in range(H):
                dot = np.float32(0.0)
                for i in range(Dh):
                    dot += q[b, t, h, i] * k[b, j, h // G, i]
                score[h] = dot
            mt, dt = m[t], den[t]
            for h in range(H):
                top = max(mt[h], score[h])
                r[h] = exp32(mt[h] - top)  # -inf (nothing seen yet) -> 0
                e[h] = exp32(score[h] - top)
                dt[h] = dt[h] * r[h] + e[h]
                mt[h] = top
            for h in range(H):
                a, vh, rh, eh = acc[t, h], v[b, j, h // G], r[h], e[h]
                for i in range(Dh):
                    a[i] = a[i] * rh + eh * vh[i]


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _scores(q, k, b, t, keys, n, w):
    """w[jj, h] = q[b, t, h] . k[b, keys[jj], h // G] for jj < n, two keys at a time (keys[n] a valid key
    where n is odd; row n of w is then written too), and where G is even two heads of one kv head with
    them: four products per load of two key rows and two query rows. q [B, T, H, Dh], k [B, S, K, Dh],
    keys int64 [n + 1], w [n + 1, H]."""
    H, Dh = q.shape[2], q.shape[3]
    G = H // k.shape[2]
    for jj in range(0, n, 2):
        j0, j1 = keys[jj], keys[jj + 1]
        if G % 2 == 0:
            for h in range(0, H, 2):
                k0, k1, qa, qb = k[b, j0, h // G], k[b, j1, h // G], q[b, t, h], q[b, t, h + 1]
                s0a = s0b = s1a = s1b = np.float32(0.0)
                for i in range(Dh):
                    s0a += qa[i] * k0[i]
                    s0b += qb[i] * k0[i]
                    s1a += qa[i] * k1[i]
                    s1b += qb[i] * k1[i]
                w[jj, h], w[jj, h + 1], w[jj + 1, h], w[jj + 1, h + 1] = s0a, s0b, s1a, s1b
        else:
            for h in range(H):
                k0, k1, qa = k[b, j0, h // G], k[b, j1, h // G], q[b, t, h]
                s0a = s1a = np.float32(0.0)
                for i in range(Dh):
                    s0a += qa[i] * k0[i]
                    s1a += qa[i] * k1[i]
                w[jj, h], w[jj + 1, h] = s0a, s1a


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _weighted_rows(v, b, kh, keys, n, w, h, h2, out, out2):
    """out[i] += sum over jj < n of w[jj, h] v[b, keys[jj], kh, i], and out2 the same with w[:, h2] (two
    heads of kv head kh; h2 may be h). VALUE_COLUMNS columns at a time, their sums in registers
    (`_value_sums`) while every key's row adds to both: per key, one load of the row's columns for two
    multiply-adds, where sums in memory would be loaded and stored at every key too.
    v [B, S, K, Dh], keys int64 [>= n], w [>= n, H], out/out2 [Dh]."""
    Dh = out.shape[0]
    sums = nb.carray(_value_sums(), 2 * VALUE_COLUMNS)
    i0 = 0
    while i0 + VALUE_COLUMNS <= Dh:
        for i in range(VALUE_COLUMNS):
            sums[i] = out[i0 + i]
            sums[VALUE_COLUMNS + i] = out2[i0 + i]
        for jj in range(n):
            row, wa, wb = v[b, keys[jj], kh], w[jj, h], w[jj, h2]
            for i in range(VALUE_COLUMNS):
                sums[i] += wa * row[i0 + i]
                sums[VALUE_COLUMNS + i] += wb * row[i0 + i]
        for i in range(VALUE_COLUMNS):
            out[i0 + i] = sums[i]
            out2[i0 + i] = sums[VALUE_COLUMNS + i]
        i0 += VALUE_COLUMNS
    for i in range(i0, Dh):  # a head width that is not a multiple of VALUE_COLUMNS
        sa, sb = out[i], out2[i]
        for jj in range(n):
            sa += w[jj, h] * v[b, keys[jj], kh, i]
            sb += w[jj, h2] * v[b, keys[jj], kh, i]
        out[i], out2[i] = sa, sb


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _decode_two_pass(q, k, v, mask, chunk, part_m, part_l, part_acc, pid):
    """`_decode_program` in two passes over the chunk's visible keys: every head's scores first
    (`_scores`), so each head's maximum is known before any exp and nothing is rescaled, then the value rows
    weighted by e^(score - m), VALUE_KEYS keys at a time for every pair of heads (`_weighted_rows`; an odd
    group sums each head twice, h2 = h). A chunk's scores are ~S / 4 keys x H floats. Alone on one core
    (560 keys, warm, at 2 GHz), one kv head of 256 serving 8 heads: 692 against `_decode_per_key`'s 1307
    cycles a key; 4 kv heads of 128 serving 2 each: 500 against 810, but slower from memory, where K and V
    read in separate stretches leave too little arithmetic to cover the loads (fast/PERFORMANCE.md)."""
    T, H = q.shape[1], q.shape[2]
    S, C = k.shape[1], part_m.shape[1]
    G = H // k.shape[2]
    b, c = pid // C, pid % C
    s0, s1 = c * chunk, min(S, c * chunk + chunk)
    keys = np.empty(max(s1 - s0, 1) + 1, np.int64)  # a query's visible keys (+ a partner for an odd count)
    w = np.empty((max(s1 - s0, 1) + 1, H), np.float32)  # their scores, then e^(score - m)
    pair = 2 if G % 2 == 0 else 1  # heads whose value sums go together: two of one kv head where G is even
    for t in range(T):
        m, den, acc = part_m[b, c, t], part_l[b, c, t], part_acc[b, c, t]
        n = 0
        for j in range(s0, s1):
            if mask[b, t, j]:
                keys[n] = j
                n += 1
        keys[n] = keys[n - 1] if n else s0
        _scores(q, k, b, t, keys, n, w)
        m[:], den[:], acc[:] = -np.inf, 0, 0
        for jj in range(n):
            for h in range(H):
                m[h] = max(m[h], w[jj, h])
        for jj in range(n):
            for h in range(H):
                e = exp32(w[jj, h] - m[h])
                w[jj, h] = e
                den[h] += e
        for j0 in range(0, n, VALUE_KEYS):
            for h in range(0, H, pair):
                _weighted_rows(v, b, h // G, keys[j0:], min(VALUE_KEYS, n - j0), w[j0:], h, h + pair - 1,
                               acc[h], acc[h + pair - 1])


@nb.njit(fastmath=FM, cache=True)
def _decode_serial(q, k, v, mask, chunk, part_m, part_l, part_acc):
    for pid in range(part_m.shape[0] * part_m.shape[1]):
        _decode_program(q, k, v, mask, chunk, part_m, part_l, part_acc, pid)


@nb.njit(parallel=True, fastmath=FM, cache=True)
def _decode_parallel(q, k, v, mask, chunk, part_m, part_l, part_acc):
    for pid in nb.prange(part_m.shape[0] * part_m.shape[1]):
        _decode_program(q, k, v, mask, chunk, part_m, part_l, part_acc, pid)


@nb.njit(fastmath=FM, cache=True)
def _combine(v, part_m, part_l, part_acc, out):
    """Merge the chunks of `_decode_program` into out [B, T, H, Dh]: rescale each chunk to the overall
    max. A query that sees no key gets the mean of all values, as ref and HF."""
    B, C, T, H = part_m.shape
    S, K, Dh = v.shape[1], v.shape[2], v.shape[3]
    for b in range(B):
        for t in range(T):
            for h in range(H):
                m = np.float32(-np.inf)
                for c in range(C):
                    m = max(m, part_m[b, c, t, h])
                o = out[b, t, h]
                o[:] = 0
                if m == -np.inf:
                    for s in range(S):
                        for i in range(Dh):
                            o[i] += v[b, s, h // (H // K), i]
                    o /= np.float32(S)
                    continue
                den = np.float32(0.0)
                for c in range(C):
                    scale = exp32(part_m[b, c, t, h] - m)
                    den += part_l[b, c, t, h] * scale
                    for i in range(Dh):
                        o[i] += part_acc[b, c, t, h, i] * scale
                o /= den


MASK_CACHE_MAX = 1 << 24  # query-key pairs up to which a layer kind's whole mask is built (and kept)


def dense_mask(spec) -> np.ndarray | None:
    """spec.dense() [B, T, S] (built once per MaskSpec, which every layer of a kind shares within a forward
    pass), or None when larger than MASK_CACHE_MAX pairs: long prefills build it a tile at a time."""
    if spec.key_ok.shape[0] * len(spec.q_idx) * len(spec.k_idx) > MASK_CACHE_MAX:
        return None
    return spec.dense()


# Above this many queries, attention runs in BLAS tiles; at or below it, the split-key kernels. Alone,
# tiles win from ~4 queries (8 queries x 520 keys: 192 vs 261 us), but between decode GEMVs they would
# wake OpenBLAS's threads, which then spin against the GEMV's; decode steps are 1 query.
TILED_MIN_QUERIES = 16
# Heads wider than this sum their prefill attention scores in float64 and round each once, as ref's
# `attention` does: OpenBLAS adds up each score in one float32 chain, which over 512-wide heads (the real
# model's global layers) put the logits of seven random models a median 1.16x as far from float64 as HF's
# (up to 2.24x), 0.76x exact (tests/test_parity_hf.py; README, "What is exact"). At 128 its float32 chain
# is as exact as torch's. Float64 for every head cost 4-7 % of the bench model's 512-token prefill; for its
# 256-wide global heads alone the whole prefill's A/B saw nothing through the host's noise, but timed alone
# a global layer's attention takes 52 against 34 ms (512 tokens, the Zen 1): ~36 ms, 1.6 % of that prefill.
EXACT_SCORES_DH = 128

PARALLEL_ATTENTION_WORK = 1 << 18  # query-key pairs x head dim above which two threads pay off


def score_dtype(head_dim: int):
    """The dtype in which prefill attention sums its scores for heads of head_dim (see EXACT_SCORES_DH)."""
    return np.float64 if head_dim > EXACT_SCORES_DH else np.float32


NO_KEY = np.int32(-(1 << 31))  # below every float's order key: a masked score


@nb.njit(inline="always")
def _order_key(bits):
    """The int32 bits of a float32 -> an int32 that orders as the floats do (-0 just below +0; NaN aside).
    Its own inverse: the key's key is the bits again."""
    return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))


@nb.njit(fastmath=FM, cache=True)
def _softmax_tile(p, mask, G, m, den, scale):
    """One key tile of the online softmax, in place. p [K, R, s] scores of rows r = query * G + group;
    mask [R // G, s]; m, den [K, R] running max and denominator, updated; scale [K, R] <- the factor
    e^(old max - new max) the caller applies to its running sum of values. Masked scores -> 0."""
    K, R, S = p.shape
    keys = p.view(np.int32)
    for h in range(K):
        for r in range(R):
            t = r // G
            # The row's max over visible scores, taken on their order keys: LLVM vectorises an integer max,
            # not a float one (3.6x, measured: 0.043 against 0.155 ms per 4 x 256 x 512 tile).
            top = NO_KEY
            for j in range(S):
                key = _order_key(keys[h, r, j]) if mask[t, j] else NO_KEY
                top = key if key > top else top
            mx = m[h, r]
            if top != NO_KEY:
                best = _bits_to_f32(_order_key(top))
                mx = best if best > mx else mx
            if mx == -np.inf:  # nothing visible yet
                scale[h, r] = 1.0
                p[h, r, :] = 0.0
                continue
            total = np.float32(0.0)
            for j in range(S):
                e = exp32(p[h, r, j] - mx) if mask[t, j] else np.float32(0.0)
                p[h, r, j] = e
                total += e
            scale[h, r] = exp32(m[h, r] - mx)
            den[h, r] = den[h, r] * scale[h, r] + total
            m[h, r] = mx


def tiled_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec, tile: int = 128,
                    key_tile: int = 512) -> np.ndarray:
    """Prefill attention through BLAS, `tile` queries at a time against `key_tile` keys at a time, with an
    online softmax across key tiles: memory O(tile x key_tile), never T x S (beyond a mask of at most
    MASK_CACHE_MAX pairs). Only the span of keys that some query of the tile can see is visited (the
    window and causality bound it); key tiles the mask closes entirely are skipped. q [B, T, H, Dh],
    k/v [B, S, K, Dh], MaskSpec -> [B, T, H, Dh]. The sizes are the fastest measured on a 2-core Zen 5
    (512 and 2048 tokens). Scores of heads wider than EXACT_SCORES_DH are exact, rounded once (ref's);
    narrower ones float32 BLAS products."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    dt = score_dtype(Dh)
    out = np.empty(q.shape, np.float32)
    dense = dense_mask(spec)  # shared by every layer of the kind, when small enough to keep
    for b in range(B):
        kt, vt = k[b].transpose(1, 2, 0).astype(dt, copy=False), v[b].transpose(1, 0, 2)  # [K, Dh, S], [K, S, Dh]
        for t0 in range(0, T, tile):
            t1 = min(T, t0 + tile)
            n = t1 - t0
            rows = dense[b, t0:t1] if dense is not None else MaskSpec(
                spec.cfg, spec.kind, spec.q_idx[t0:t1], spec.k_idx, spec.key_ok[b:b + 1],
                spec.q_block[b:b + 1, t0:t1], spec.k_block[b:b + 1]).dense()[0]  # [n, S]
            seen = np.flatnonzero(rows.any(axis=0))
            lo, hi = (seen[0], seen[-1] + 1) if seen.size else (0, 0)  # the span of keys the tile can see
            qg = q[b, t0:t1].reshape(n, K, G, Dh).transpose(1, 0, 2, 3).reshape(K, n * G, Dh).astype(dt, copy=False)
            m = np.full((K, n * G), -np.inf, np.float32)  # running max of each (kv head, query, group) row
            den, scale = np.zeros((K, n * G), np.float32), np.empty((K, n * G), np.float32)
            acc = None  # exp-weighted values [K, n*G, Dh]
            for s0 in range(lo, hi, key_tile):
                s1 = min(hi, s0 + key_tile)
                sub = np.ascontiguousarray(rows[:, s0:s1])
                if not sub.any():
                    continue
                p = (qg @ kt[:, :, s0:s1]).astype(np.float32, copy=False)  # scores [K, n*G, s] -> probabilities
                _softmax_tile(p, sub, G, m, den, scale)
                if acc is None:
                    acc = p @ vt[:, s0:s1]
                else:
                    acc *= scale[..., None]
                    acc += p @ vt[:, s0:s1]
            if acc is None:  # the whole tile sees no key
                acc = np.zeros((K, n * G, Dh), np.float32)
            blind = den == 0  # a query that sees no key: the mean of all values, as ref and HF
            if blind.any():
                acc[blind] = v[b].mean(axis=0)[np.nonzero(blind)[0]]
                den[blind] = 1
            acc /= den[..., None]
            out[b, t0:t1] = acc.reshape(K, n, G, Dh).transpose(1, 0, 2, 3).reshape(n, H, Dh)
    return out


MIN_KEY_CHUNK = 32  # keys per decode program at least


@nb.njit(cache=True)
def split_keys(keys: int, threads: int) -> int:
    """Keys per program when split-key attention runs on `threads` threads: about two programs per
    thread, at least MIN_KEY_CHUNK keys each."""
    return max(MIN_KEY_CHUNK, -(-keys // (2 * threads)))


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec, key_chunk: int | None = None,
                     parallel: bool | None = None) -> np.ndarray:
    """q [B, T, H, Dh], k/v [B, S, K, Dh], MaskSpec -> [B, T, H, Dh] through the split-key kernels, for a
    few queries. key_chunk None: about two programs per thread in all; parallel None: by the work."""
    B, T, H, Dh = q.shape
    S = k.shape[1]
    if parallel is None:
        parallel = B * T * H * S * Dh > PARALLEL_ATTENTION_WORK
    if key_chunk is None:
        key_chunk = split_keys(S * B, thread_count()) if parallel else S
    C = max(1, -(-S // key_chunk))
    part_m, part_l = np.empty((B, C, T, H), np.float32), np.empty((B, C, T, H), np.float32)
    part_acc = np.empty((B, C, T, H, Dh), np.float32)
    c = np.ascontiguousarray
    v = c(v, np.float32)
    mask = c(spec.dense())  # a few queries: small even where a prefill's would not be kept
    (_decode_parallel if parallel else _decode_serial)(c(q, np.float32), c(k, np.float32), v, mask, key_chunk,
                                                       part_m, part_l, part_acc)
    out = np.empty(q.shape, np.float32)
    _combine(v, part_m, part_l, part_acc, out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec) -> np.ndarray:
    """q [B, T, H, Dh], k/v [B, S, K, Dh], MaskSpec -> [B, T, H, Dh], as ref's masked_attention: tiled
    through BLAS for prefill, split-key Numba kernels for a few queries (decode)."""
    if q.shape[1] > TILED_MIN_QUERIES:
        return tiled_attention(q, k, v, spec)
    return decode_attention(q, k, v, spec)


KERNELS = Kernels(linear=linear, linears=linears, rms_norm=rms_norm, apply_rope=apply_rope, attention=attention,
                  mlp=mlp, lm_head=lm_head)


# ---- the KV cache -------------------------------------------------------------------------------

@nb.njit(cache=True)
def claim_slot(slots, q):
    """slots [cap] int64: the absolute index each slot holds, -1 where none yet; the held slots are always a
    prefix (tokens take slot index % cap in order, and a prefill fills slots 0.. first). Token q takes slot
    q % cap -> (slot, n): n = the held slots now, found by bisecting the prefix."""
    slot = q % slots.size
    slots[slot] = q
    lo, hi = 0, slots.size
    while lo < hi:
        mid = (lo + hi) // 2
        if slots[mid] >= 0:
            lo = mid + 1
        else:
            hi = mid
    return slot, lo


HUGE_PAGE = 2 << 20


def huge_empty(shape: tuple) -> np.ndarray:
    """An uninitialised float32 array of `shape`; from half a 2 MB page up, one that starts on a 2 MB
    boundary of a buffer numpy asks the kernel to back with 2 MB pages (numpy does so from 4 MB). A decode
    step reads every layer's keys and values once, cold; in 4 KB pages the hardware prefetcher starts over
    at every page and the TLB misses more. On the 2-core Zen 1, 8 layers of 544 keys (4 heads of 128,
    2.2 MB each) took 166 against 184 us a layer (182 against 207 in another sitting; medians of 20
    interleaved rounds); in the model, 16 tokens after the 512-token prompt, 20.05 against 20.86 ms a token
    (19 of 30 rounds, within this host's noise)."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes < HUGE_PAGE // 2:
        return np.empty(shape, np.float32)
    return _aligned_empty(max(HUGE_PAGE, nbytes), HUGE_PAGE)[:nbytes].view(np.float32).reshape(shape)


class RingKVCache(KVCache):
    """Preallocated cache: full layers hold [B, max_len, K, Dh], sliding layers a ring of `window` slots
    (slot = index % window), so a decoding step writes one row and copies nothing; a ring no longer than
    max_len, which it then never wraps (a 512-token prefill for 32 more tokens, window 1024: 545 slots,
    where 1024 had 479 left for `_zero_unclaimed` to write, 2 MB a layer of the bench model). `xp` is the array module
    that holds K and V (fast.gpu's subclass: CuPy); the slots and flags stay NumPy arrays on the host."""

    xp = np

    def __init__(self, batch: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.key_ok = np.zeros((batch, max_len), bool)
        self.block = np.full((batch, max_len), -1, np.int64)
        self.slots = {}  # layer -> [cap] absolute index of the token each slot holds (-1: none yet)
        self._uploaded = {}  # this call's index arrays already on the device, by content (`_on_device`)

    def _empty(self, shape: tuple) -> np.ndarray:
        """An uninitialised float32 array of `shape` for K or V: on the host one in 2 MB pages (`huge_empty`).
        `_zero_unclaimed` zeroes what the first call's tokens leave unwritten."""
        return huge_empty(shape) if self.xp is np else self.xp.empty(shape, np.float32)

    def _zero_unclaimed(self, i: int) -> None:
        """Zero layer i's K/V slots that no token holds yet. Run once, after the first call's rows are
        stored: zeroing the whole cache first wrote a prompt's rows twice (the bench model's 8 layers after
        a 512-token prompt: 7.5 -> 6.2 ms, medians of 30 interleaved rounds, the Zen 1). The slots left
        (a tail; none where a prompt fills a ring) read zeros, as in a cache zeroed whole."""
        free = np.flatnonzero(self.slots[i] < 0)
        if free.size:
            rows = _as_slice(free) or self._on_device(free)
            self.keys[i][:, rows] = 0
            self.values[i][:, rows] = 0

    def append_tokens(self, key_ok: np.ndarray, block: np.ndarray) -> int:
        start, T = self.length, key_ok.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens, asked for {start + T}")
        self.key_ok[:, start:start + T] = key_ok
        self.block[:, start:start + T] = block
        self.length += T
        self._uploaded = {}
        return start

    def _on_device(self, a: np.ndarray):
        """A host index array as `xp` holds it. Every layer of a kind stores a prompt's rows in the same
        slots, so each distinct array is uploaded once per call of the decoder, not once per layer: an
        upload from pageable memory makes the host wait for the device's queue to drain."""
        if self.xp is np:
            return a
        key = (a.dtype.str, a.tobytes())
        if key not in self._uploaded:
            self._uploaded[key] = self.xp.asarray(a)
        return self._uploaded[key]

    def claim(self, i: int, q: int) -> tuple[int, int]:
        """Give token q (absolute index) its slot in layer i's allocated arrays -> (slot, n): its K/V row goes
        to the slot, and a query now attends over the first n slots."""
        slot, n = claim_slot(self.slots[i], q)
        return int(slot), int(n)

    def extend(self, i, k, v, q_idx, kind, window):
        B, T, K, Dh = k.shape
        fresh = i not in self.keys
        if fresh:
            cap = min(window, self.max_len) if kind == SLIDING else self.max_len
            self.keys[i] = self._empty((B, cap, K, Dh))
            self.values[i] = self._empty((B, cap, K, Dh))
            self.slots[i] = np.full(cap, -1, np.int64)
        keys, values, slots = self.keys[i], self.values[i], self.slots[i]
        cap = keys.shape[1]
        filled = None if T == 1 else slots >= 0
        if T == 1 or not filled.any():
            # attend over what the ring holds plus the new rows; then store the new rows
            if T > 1:  # empty cache, long prompt: attend over the new rows directly
                k_att, v_att, idx_att = k, v, q_idx
            else:
                slot, n = self.claim(i, int(q_idx[0]))
                keys[:, slot], values[:, slot] = k[:, 0], v[:, 0]
                if fresh:
                    self._zero_unclaimed(i)
                return keys[:, :n], values[:, :n], slots[:n]
        else:
            held = np.flatnonzero(filled)
            on = self._on_device(held)
            k_att = self.xp.concatenate([keys[:, on], k], axis=1)
            v_att = self.xp.concatenate([values[:, on], v], axis=1)
            idx_att = np.concatenate([slots[held], q_idx])
        keep = q_idx > q_idx[-1] - cap if kind == SLIDING else np.ones(T, bool)
        s, kept = q_idx[keep] % cap, np.flatnonzero(keep)
        rows, src = _as_slice(s), _as_slice(kept)
        if rows is None or src is None:  # the ring wraps: scattered rows
            rows, src = self._on_device(s), self._on_device(kept)  # indices: no device sync to count
        keys[:, rows], values[:, rows], slots[s] = k[:, src], v[:, src], q_idx[keep]
        if fresh:
            self._zero_unclaimed(i)
        return k_att, v_att, idx_att


def _as_slice(idx: np.ndarray) -> slice | None:
    """idx [n] int, ascending by one -> the slice that selects the same rows; None for any other idx. A
    prompt's rows mostly land in consecutive slots, and a slice copies them at memory speed where an index
    array gathers row by row (1 MB of keys: 0.07 against 0.46 ms, the Zen 1)."""
    if idx.size == 0 or idx[-1] - idx[0] != idx.size - 1 or np.any(np.diff(idx) != 1):
        return None
    return slice(int(idx[0]), int(idx[-1]) + 1)


# ---- compiling ahead of the first call ----------------------------------------------------------

def compile_kernels() -> None:
    """Compile every kernel (or load it from Numba's on-disk cache) by calling each once on tiny arrays
    of the types the model passes, so that the first real call measures the model, not the compiler."""
    f32, u16 = np.ones((2, 4), np.float32), np.full((3, 4), 0x3F80, np.uint16)
    u16.flags.writeable = False  # checkpoint weights are read-only memory maps: a type of their own to Numba
    for n in (1, 2, 3):  # one matrix; gate and up; q, k and v
        _gemv_bf16(f32, (u16,) * n, np.empty((2, 3 * n), np.float32))
    _upcast_rows(u16, 0, 3, np.empty((3, 4), np.float32))
    _transpose(f32, np.empty((4, 2), np.float32))
    for w in (np.ones(4, np.float32), u16[0]):
        _rms_norm(f32, w, np.float32(1e-6), np.empty_like(f32))
    _gelu_mul(f32.copy(), f32)
    _softcap(f32.copy().reshape(-1), np.float32(30.0))
    _rope(np.ones((1, 2, 4), np.float32), f32[:1], f32[:1], np.empty((1, 2, 4), np.float32))
    rows = np.ones((1, 2, 3), np.float32)
    _softmax_tile(rows, np.ones((2, 3), np.bool_), 1, np.full((1, 2), -np.inf, np.float32),
                  np.zeros((1, 2), np.float32), np.empty((1, 2), np.float32))
    q, kv = np.ones((1, 1, 2, 4), np.float32), np.ones((1, 3, 1, 4), np.float32)
    parts = (np.empty((1, 1, 1, 2), np.float32), np.empty((1, 1, 1, 2), np.float32),
             np.empty((1, 1, 1, 2, 4), np.float32))
    for run in (_decode_serial, _decode_parallel):
        run(q, kv, kv, np.ones((1, 1, 3), np.bool_), 3, *parts)
    _combine(kv, *parts, np.empty_like(q))
    split_keys(1, 1)
    claim_slot(np.full(2, -1, np.int64), 0)
    go, words = np.zeros(1, np.int64), np.zeros((1, PRODUCT_WORDS), np.int64)
    _serve_products(go, np.zeros(1, np.int64), 0, 0, 0, words)  # no job comes: back after its spin
    if mkl.LIB is not None:  # the caller's side of a crew's product, with no helper: one gemm here
        _hand_over(mkl.SGEMM, words[:0], f32, f32.T.copy(), np.empty((2, 2), np.float32), 1, go, 0)
        _lead(mkl.SGEMM, go[:0], 1, f32, f32.T.copy(), np.empty((2, 2), np.float32), 1)


# ---- a probe for the benchmark ------------------------------------------------------------------

@nb.njit(parallel=True, fastmath=FM, cache=True)
def read_all(a):
    """Sum a 2-D array with every core, ROWS rows per program into one float32 per program: a
    read-bandwidth probe. a [R, C] -> float32 (the sum, in a reassociated order).
    With `reassoc` the loop becomes several vector accumulators, so the cores issue loads faster than
    memory delivers them. (A row-wide accumulator in memory stalled on its own loads and stores near
    55 GB/s on a host that reads 80 GB/s: a probe that slow makes every decode look closer to the
    limit than it is.)"""
    R, C = a.shape
    n = (R + ROWS - 1) // ROWS
    parts = np.zeros(n, np.float32)
    for blk in nb.prange(n):
        s = np.float32(0.0)
        for r in range(blk * ROWS, min(R, (blk + 1) * ROWS)):
            for c in range(C):
                s += a[r, c]
        parts[blk] = s
    return parts.sum()


TASK_WORDS = 1 << 18  # 2 MB of the buffers per task of `read_words`


@nb.njit(parallel=True, cache=True)
def read_words(words, task=TASK_WORDS):
    """Sum every word of a typed list of uint64 arrays [n_k] with every core -> uint64 (wrapping): a
    read-bandwidth probe over buffers that already exist (a model's own weights), with integer adds,
    which any bit pattern leaves at full speed. The buffers are read as one stream cut into tasks of
    `task` words; a task takes each buffer it covers from the list once. (Reading the list once per 64
    KB held the probe ~12 % under `read_all` over one 1 GB buffer and ~21 % under it over the same
    gigabyte cut into the bench model's matrix sizes, where `read_all` read 58 GB/s; this way 2-7 %
    under it in four sittings, cut or not.)"""
    start = np.zeros(len(words) + 1, np.int64)  # where each buffer begins in the stream
    for k in range(len(words)):
        start[k + 1] = start[k] + words[k].size
    n = (start[-1] + task - 1) // task
    parts = np.zeros(n, np.uint64)
    for t in nb.prange(n):
        at, end = t * task, min(start[-1], (t + 1) * task)
        k = part_of(start, at)
        s = np.uint64(0)
        while at < end:
            stop = min(end, start[k + 1])
            for v in words[k][at - start[k]:stop - start[k]]:  # over a slice: an index loop ran at a third
                s += v
            at, k = stop, k + 1
        parts[t] = s
    total = np.uint64(0)
    for p in parts:
        total += p
    return total
