"""GPU kernels (CuPy arrays, Numba CUDA kernels): the contracts of ref's `Kernels` on the device.

Weights live on the device as stored: bf16 as uint16 bits, upcast exactly inside the kernels. Products of
more than GEMV_MAX_M rows split x into three bf16 summands (`_split3`: exact) and run one bf16 tensor-core
GEMM with float32 accumulation over the three (`split_product`, cuBLAS gemmEx); a bf16 times a bf16 is
exact in float32, so the sum of the three products is x @ w^T to float32 accumulation (GEMM = "f32",
FAST_GPU_GEMM=f32: the matrix upcast and cuBLAS sgemm, CuPy leaving TF32 off). Decode uses a GEMV kernel
that reads each weight once, four bf16 per 8-byte word, GEMV_ROWS rows per block. RMSNorm, RoPE and GELU x
up are one kernel each. The kernels of fast/gpu_step.py's captured decoding step are here too (q/k/v's
norms and RoPE with the cache write, attention split by keys and its merge, the residual add with both
norms, the token's embedding, greedy selection), and those of fast/gpu_prefill.py's prompt pass, which
take products as their three summands and write the next product's input split.

Without a GPU the same module runs on NumPy arrays with Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1):
that is how CI checks the kernels' indexing and the data flow. Only `as_f32` differs between the two,
because the simulator has no libdevice (and no warp shuffles: reductions go through shared memory). A
block computes a row of the output for RMSNorm, and one (batch, head, query) for the layer code's decode
attention (its threads split the keys); a prompt's attention is ref's own function on device arrays
(cuBLAS), or a thread per query when its scores would not fit.

On a GPU the kernels are compiled by Numba to PTX for their declared signatures (SIGNATURES) and
launched through CuPy (`_Kernel`): on an H200, Numba's own launcher took 88-132 us per call (it types
each CuPy argument through the driver), CuPy's 26-39 us with our argument packing (a CuPy elementwise op:
13-16 us).
FAST_GPU_LAUNCH=numba keeps Numba's launcher, for comparison. Measurements: fast/PERFORMANCE.md, "On a GPU".
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
from numba import cuda, float32, int32, int64, uint16, uint32, uint64
from numba import types as nt

from ref.decoder import Kernels
from ref.layers import F32_MIN
from ref.layers import attention as dense_masked_attention
from ref.safetensors_io import Bf16, to_f32

from .maskrule import attend_query, mode_of

_attend_query = cuda.jit(device=True)(attend_query)


SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATED:
    xp = np
else:
    import cupy as xp

LAUNCH = "numba" if SIMULATED else os.environ.get("FAST_GPU_LAUNCH", "cupy")
THREADS = 4 if SIMULATED else 128  # threads per block (the simulator runs each as a Python thread)
WIDE = 8 if SIMULATED else 1024  # threads of a kernel that runs as one block or few (a power of 2, >= THREADS)
GEMV_MAX_M = 8
GEMV_ROWS = 4  # output rows per GEMV block (the kernel's four accumulators)
STEP_SPLITS = 4 if SIMULATED else 32  # key chunks per head in a decoding step's attention (`_step_attention`)
ARGMAX_BLOCKS = 2 if SIMULATED else 128  # blocks of a step's greedy selection over the vocabulary
UPCAST_FLOATS = 1 << 26  # float32 values (256 MB) of upcast weights, or of split products, at a time
# A prompt's products: "split" (x as three bf16 through bf16 tensor-core GEMMs, `split_product`) or "f32"
# (the weights upcast, cuBLAS sgemm); on an H200 at the 12B model's shapes split took 0.25-0.36x the time
GEMM = os.environ.get("FAST_GPU_GEMM", "split")
if GEMM not in ("split", "f32"):
    raise ValueError(f"FAST_GPU_GEMM={GEMM!r}: use 'split' or 'f32'")

if SIMULATED:
    @cuda.jit(device=True)
    def as_f32(bits):
        return np.uint32(bits).view(np.float32)

    @cuda.jit(device=True)
    def f32_bits(v):
        return np.float32(v).view(np.uint32)
else:
    @cuda.jit(device=True, inline=True)
    def as_f32(bits):
        return cuda.libdevice.int_as_float(int32(bits))

    @cuda.jit(device=True, inline=True)
    def f32_bits(v):
        return uint32(cuda.libdevice.float_as_int(v))


@cuda.jit(device=True, inline=True)
def _bf16_nearest(v):
    """float32 v -> (the bf16 nearest to v, ties to even, as its 16 bits; that bf16 as a float32). Finite
    v only (past the largest bf16 it rounds to infinity)."""
    u = f32_bits(v)
    top = (u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16)
    return top, as_f32(top << uint32(16))


@cuda.jit(device=True, inline=True)
def _split3(v, parts, i, j):
    """Writes float32 v as three bf16 whose sum is v exactly: parts[0, i, j] = v rounded to bf16,
    parts[1, i, j] = what is left rounded, parts[2, i, j] = the rest (24 significand bits in 8 + 8 + 8;
    each remainder is exact in float32). Exact for |v| >= 2^-100; below, what the parts miss is under 2^-126."""
    a, fa = _bf16_nearest(v)
    r = v - fa
    b, fb = _bf16_nearest(r)
    c, _ = _bf16_nearest(r - fb)
    parts[0, i, j], parts[1, i, j], parts[2, i, j] = uint16(a), uint16(b), uint16(c)


@cuda.jit(device=True, inline=True)
def _dot_quad(word, x0, x1, x2, x3):
    """x0..x3 times the four bf16 of one uint64 word (little-endian: the lowest 16 bits are the first)."""
    lo, hi = uint32(word & uint64(0xFFFFFFFF)), uint32(word >> uint64(32))
    return (x0 * as_f32(lo << uint32(16)) + x1 * as_f32(lo & uint32(0xFFFF0000))) + \
        (x2 * as_f32(hi << uint32(16)) + x3 * as_f32(hi & uint32(0xFFFF0000)))


@cuda.jit
def _gemv_bf16(x, w0, w1, w2, out):
    """x [M, In] f32; w0, w1, w2 [Out_i, In / 4] uint64 (bf16 weights, four per 8-byte word); out [M, Out]
    with Out = the rows of the matrices side by side, w0's first (one product: pass its matrix three times and
    out [M, Out0]). Block = GEMV_ROWS output rows of one matrix (Out0 and Out1 are multiples of GEMV_ROWS):
    its threads stride over the words, each loading the x values of a word once for all GEMV_ROWS rows, so
    every thread has GEMV_ROWS 8-byte loads in flight; then one shared-memory tree sums all rows at once."""
    tid = cuda.threadIdx.x
    first = cuda.blockIdx.x * GEMV_ROWS
    n0, n1 = w0.shape[0], w1.shape[0]
    w, r = (w0, first) if first < n0 else (w1, first - n0) if first < n0 + n1 else (w2, first - n0 - n1)
    left = out.shape[1] - first  # (this Numba's CUDA target types no `min`, of ints or floats)
    rows = left if left < GEMV_ROWS else GEMV_ROWS
    last = r + rows - 1  # rows past the end (the last block of an Out not a multiple of GEMV_ROWS) read this one
    r1, r2, r3 = (r + 1 if rows > 1 else last), (r + 2 if rows > 2 else last), (r + 3 if rows > 3 else last)
    part = cuda.shared.array((GEMV_ROWS, THREADS), float32)
    for m in range(x.shape[0]):
        a0, a1, a2, a3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
        for j in range(tid, w.shape[1], THREADS):
            x0, x1, x2, x3 = x[m, 4 * j], x[m, 4 * j + 1], x[m, 4 * j + 2], x[m, 4 * j + 3]
            u0, u1, u2, u3 = w[r, j], w[r1, j], w[r2, j], w[r3, j]
            a0 += _dot_quad(u0, x0, x1, x2, x3)
            a1 += _dot_quad(u1, x0, x1, x2, x3)
            a2 += _dot_quad(u2, x0, x1, x2, x3)
            a3 += _dot_quad(u3, x0, x1, x2, x3)
        part[0, tid], part[1, tid], part[2, tid], part[3, tid] = a0, a1, a2, a3
        cuda.syncthreads()
        step = THREADS // 2
        while step > 0:
            if tid < step:
                for i in range(GEMV_ROWS):
                    part[i, tid] += part[i, tid + step]
            cuda.syncthreads()
            step //= 2
        if tid < rows:
            out[m, first + tid] = part[tid, 0]
        cuda.syncthreads()  # part is read before the next row of x overwrites it


@cuda.jit(device=True)
def _block_reduce(red, take_max):
    """Every thread of the block has put its value in red[tid] (shared, [>= threads]) -> the block's sum,
    or max, for every thread. A tree in shared memory; all threads must call it; red is free again
    when it returns."""
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            a, b = red[tid], red[tid + step]
            red[tid] = (a if a > b else b) if take_max else a + b
        cuda.syncthreads()
        step //= 2
    result = red[0]
    cuda.syncthreads()
    return result


@cuda.jit(device=True)
def _exp_minus_max(row, red):
    """row [S], strided over by the block's threads (each reads back only what it wrote), in place ->
    row[j] = exp(row[j] - max(row)); returns (max, sum of the new row) to every thread. A row of -inf keeps
    max -inf (its values turn NaN: the caller tests the max). red: the block's [THREADS] shared scratch."""
    tid = cuda.threadIdx.x
    top = float32(-math.inf)
    for j in range(tid, row.shape[0], cuda.blockDim.x):
        top = row[j] if row[j] > top else top
    red[tid] = top
    top = _block_reduce(red, True)
    total = float32(0.0)
    for j in range(tid, row.shape[0], cuda.blockDim.x):
        p = math.exp(row[j] - top)
        row[j] = p
        total += p
    red[tid] = total
    return top, _block_reduce(red, False)


@cuda.jit(device=True)
def _inv_rms(row, eps, red):
    """row [N], strided over by the block's threads -> (mean(row^2) + eps)^-0.5 to every thread."""
    tid = cuda.threadIdx.x
    acc = float32(0.0)
    for i in range(tid, row.shape[0], cuda.blockDim.x):
        acc += row[i] * row[i]
    red[tid] = acc
    return float32(1.0) / math.sqrt(_block_reduce(red, False) / float32(row.shape[0]) + eps)


@cuda.jit
def _rms_norm(x, w, eps, out):
    """x [R, N] -> out [R, N] = x * (mean(x^2) + eps)^-0.5 * w. Block = one row."""
    r = cuda.blockIdx.x
    red = cuda.shared.array(WIDE, float32)
    inv = _inv_rms(x[r], eps, red)
    for i in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        out[r, i] = x[r, i] * inv * w[i]


@cuda.jit
def _attention(q, k, v, q_idx, k_idx, key_ok, q_block, k_block, mode, window, out):
    """Thread = one (b, h, t) query, computed by the body fast/cpu.py compiles too (fast/maskrule.py),
    accumulating straight into its row of out."""
    B, T, H, Dh = q.shape
    pid = cuda.grid(1)
    if pid >= B * H * T:
        return
    row = out[pid // (H * T), pid % T, (pid // T) % H]
    for i in range(Dh):
        row[i] = 0.0
    _attend_query(q, k, v, q_idx, k_idx, key_ok, q_block, k_block, mode, window, pid, row)


@cuda.jit(device=True, inline=True)
def _dot4(a, b, n):
    """sum(a[:n] * b[:n]) of two 1-D float32 rows, four running sums (four loads in flight)."""
    a0, a1, a2, a3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
    i = 0
    while i + 3 < n:
        a0 += a[i] * b[i]
        a1 += a[i + 1] * b[i + 1]
        a2 += a[i + 2] * b[i + 2]
        a3 += a[i + 3] * b[i + 3]
        i += 4
    while i < n:
        a0 += a[i] * b[i]
        i += 1
    return (a0 + a1) + (a2 + a3)


@cuda.jit(device=True)
def _score_keys(q, k, kh, mask, lo, hi, scores, red):
    """q [Dh] against keys lo..hi-1 of k [>= hi, K, Dh] (KV head kh), by the whole block: every thread scores
    its keys (mask[s] true: visible; masked ones -inf, whose exp is 0) into scores[s], then the row turns into
    exp(score - max) (`_exp_minus_max`) -> (max, sum) to every thread. red: the block's [THREADS] scratch."""
    for s in range(lo + cuda.threadIdx.x, hi, THREADS):
        scores[s] = _dot4(q, k[s, kh], q.shape[0]) if mask[s] else float32(-math.inf)
    return _exp_minus_max(scores[lo:hi], red)


@cuda.jit(device=True)
def _weighted_values(scores, v, kh, lo, hi, i):
    """sum over keys s in lo..hi-1 of scores[s] * v[s, kh, i]: four keys a step, four loads in flight (the
    loop is latency-bound)."""
    a0, a1, a2, a3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
    s = lo
    while s + 3 < hi:
        a0 += scores[s] * v[s, kh, i]
        a1 += scores[s + 1] * v[s + 1, kh, i]
        a2 += scores[s + 2] * v[s + 2, kh, i]
        a3 += scores[s + 3] * v[s + 3, kh, i]
        s += 4
    while s < hi:
        a0 += scores[s] * v[s, kh, i]
        s += 1
    return (a0 + a1) + (a2 + a3)


@cuda.jit(device=True)
def _mean_value(v, kh, n, i):
    """The mean of v[0..n-1, kh, i]: what a query that sees no key gets, as in ref and HF."""
    acc = float32(0.0)
    for s in range(n):
        acc += v[s, kh, i]
    return acc / float32(n)


@cuda.jit(device=True)
def _attend(q, k, v, kh, mask, S, scores, out, red):
    """One query q [Dh] over keys 0..S-1 of k, v [>= S, K, Dh] (KV head kh), by the whole block: scores and
    their exp (`_score_keys`), then each thread owns head dims and sums probability x value over all keys
    into out [Dh]."""
    top, total = _score_keys(q, k, kh, mask, 0, S, scores, red)
    for i in range(cuda.threadIdx.x, q.shape[0], THREADS):
        out[i] = _mean_value(v, kh, S, i) if top == -math.inf else _weighted_values(scores, v, kh, 0, S, i) / total


@cuda.jit
def _block_attention(q, k, v, mask, scratch, out):
    """q [B, T, H, Dh], k/v [B, S, K, Dh], ref's dense mask [B, T, S] -> out [B, T, H, Dh]. Block = one
    (b, h, t) query (`_attend`), its scores in scratch [B*H*T, S]."""
    B, T, H, Dh = q.shape
    pid = cuda.blockIdx.x
    b, h, t = pid // (H * T), (pid // T) % H, pid % T
    red = cuda.shared.array(THREADS, float32)
    _attend(q[b, t, h], k[b], v[b], h // (H // k.shape[2]), mask[b, t], k.shape[1], scratch[pid], out[b, t, h], red)


@cuda.jit
def _step_attention(q, keys, values, mask, nums, j, scratch, part_m, part_l, part_acc):
    """A decoding step's attention for one layer, split by keys (as flash-decoding): q [H, Dh] over the first
    n slots of its cache keys/values [cap, K, Dh], n = nums[2j + 1] (nums: this step's (slot, key count) per
    cache, on the device, so a captured graph replays it for any step), cut into C = part_m.shape[1] chunks
    of ceil(n / C) keys; mask [>= n] int32: which slots this layer's kind may see. Block = (head, chunk):
    its max score -> part_m [H, C], its sum of exp -> part_l, its exp-weighted values -> part_acc [H, C, Dh]
    (a chunk with no key or none visible: part_m -inf, nothing else written). `_merge_splits` combines them.
    Scores go to scratch [H, >= n]."""
    C = part_m.shape[1]
    h, c = cuda.blockIdx.x // C, cuda.blockIdx.x % C
    n = nums[2 * j + 1]
    chunk = (n + C - 1) // C
    lo = c * chunk
    hi = lo + chunk if lo + chunk < n else n
    kh = h // (q.shape[0] // keys.shape[1])
    red = cuda.shared.array(THREADS, float32)
    top, total = float32(-math.inf), float32(0.0)
    if lo < hi:
        top, total = _score_keys(q[h], keys, kh, mask, lo, hi, scratch[h], red)
    if cuda.threadIdx.x == 0:
        part_m[h, c] = top
    if top == -math.inf:
        return
    if cuda.threadIdx.x == 0:
        part_l[h, c] = total
    for i in range(cuda.threadIdx.x, q.shape[1], THREADS):
        part_acc[h, c, i] = _weighted_values(scratch[h], values, kh, lo, hi, i)


@cuda.jit
def _merge_splits(part_m, part_l, part_acc, values, nums, j, out):
    """_step_attention's chunks -> out [H, Dh]: with M the largest chunk max, sum_c acc_c exp(m_c - M) /
    sum_c l_c exp(m_c - M) (the online softmax's merge); a head that saw no key gets the mean of the n values.
    Block = one head, launched with WIDE threads: with at least Dh of them, thread (g, i) sums head dim i
    over chunks g, g + G, ... (G = threads // Dh groups), then group 0 adds the G partial sums; with fewer,
    each thread sums whole head dims."""
    h, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    C, Dh = part_m.shape[1], out.shape[1]
    top = float32(-math.inf)
    for c in range(C):
        top = part_m[h, c] if part_m[h, c] > top else top
    if top == -math.inf:
        for i in range(tid, Dh, nt):
            out[h, i] = _mean_value(values, h // (out.shape[0] // values.shape[1]), nums[2 * j + 1], i)
        return
    scale = cuda.shared.array(STEP_SPLITS, float32)  # exp(m_c - M); 0 for a chunk that wrote nothing
    for c in range(tid, C, nt):
        scale[c] = math.exp(part_m[h, c] - top) if part_m[h, c] != -math.inf else float32(0.0)
    cuda.syncthreads()
    total = float32(0.0)
    for c in range(C):
        if scale[c] > 0:
            total += part_l[h, c] * scale[c]
    groups, g, first, stride = (nt // Dh, tid // Dh, tid % Dh, Dh) if nt >= Dh else (1, 0, tid, nt)
    partial = cuda.shared.array(WIDE, float32)  # [groups, Dh]
    for i in range(first, Dh if g < groups else 0, stride):  # threads past the last group have no head dim
        acc = float32(0.0)
        for c in range(g, C, groups):
            if scale[c] > 0:
                acc += part_acc[h, c, i] * scale[c]
        if groups == 1:
            out[h, i] = acc / total
        else:
            partial[g * Dh + i] = acc
    if groups > 1:
        cuda.syncthreads()
        if g == 0:
            acc = float32(0.0)
            for k in range(groups):
                acc += partial[k * Dh + first]
            out[h, first] = acc / total


@cuda.jit(device=True, inline=True)
def _rotated(y, partner, first, c, s):
    """RoPE of one value, as ref.layers.apply_rope: y * cos + rotate_half * sin, where rotate_half is -partner
    for the first half of the head dims (first) and partner for the second (pairs (i, i + Dh/2))."""
    return y * c + (-partner if first else partner) * s


@cuda.jit
def _head_prep(proj, q_w, k_w, cos, sin, heads, kv_heads, v_at, nums, j, eps, q, keys, values):
    """A decoding step's q, k, v from the token's projections proj [P] (q's heads, then k's, then v's from
    column v_at; a k_eq_v layer's v_at is k's), as ref.decoder.qkv: q = RoPE(rms_norm(q, q_w)), k likewise
    with k_w, v = rms_norm(v) unscaled. q -> q [heads, Dh]; k, v -> row nums[2j] (the token's slot) of the
    cache keys/values [cap, K, Dh]. cos/sin [Dh]: this position's RoPE row (pairs (i, i + Dh/2), as ref's
    apply_rope). Block = one head: heads + 2 kv_heads blocks (heads alone for a KV-shared layer)."""
    b = cuda.blockIdx.x
    Dh = q.shape[1]
    half = Dh // 2
    kv = b >= heads
    is_v = b >= heads + kv_heads
    at = v_at + (b - heads - kv_heads) * Dh if is_v else b * Dh
    row = proj[at:at + Dh]
    w = k_w if kv else q_w
    red = cuda.shared.array(THREADS, float32)
    inv = _inv_rms(row, eps, red)
    slot = nums[2 * j]
    for i in range(cuda.threadIdx.x, Dh, THREADS):
        if is_v:
            values[slot, b - heads - kv_heads, i] = row[i] * inv
            continue
        p = i + half if i < half else i - half
        y, partner = row[i] * inv * w[i], row[p] * inv * w[p]
        y = _rotated(y, partner, i < half, cos[i], sin[i])
        if kv:
            keys[slot, b - heads, i] = y
        else:
            q[b, i] = y


@cuda.jit
def _residual_norm(x, y, y_w, scale, next_w, eps, h):
    """x, y, h [D], one block: x <- (x + rms_norm(y, y_w)) * scale (ref.decoder's residual steps 3-5; scale 1
    but at a layer's end), then h <- rms_norm(x, next_w): the next step's input. Launched with WIDE threads."""
    red = cuda.shared.array(WIDE, float32)
    inv = _inv_rms(y, eps, red)
    for i in range(cuda.threadIdx.x, x.shape[0], cuda.blockDim.x):
        x[i] = (x[i] + y[i] * inv * y_w[i]) * scale
    inv = _inv_rms(x, eps, red)  # each thread reads back only the x it wrote
    for i in range(cuda.threadIdx.x, x.shape[0], cuda.blockDim.x):
        h[i] = x[i] * inv * next_w[i]


@cuda.jit
def _rope(x, cos, sin, out):
    """x [R, N, Dh] (R = batch x tokens), cos/sin [R, Dh] -> out = x * cos + rotate_half(x) * sin, as
    ref.layers.apply_rope: pairs (i, i + Dh/2), the first of each pair rotated by -x[i + Dh/2]. Block =
    one row r; threads stride over its N x Dh values."""
    r = cuda.blockIdx.x
    N, Dh = x.shape[1], x.shape[2]
    half = Dh // 2
    for j in range(cuda.threadIdx.x, N * Dh, cuda.blockDim.x):
        n, i = j // Dh, j % Dh
        out[r, n, i] = _rotated(x[r, n, i], x[r, n, i + half] if i < half else x[r, n, i - half], i < half,
                                cos[r, i], sin[r, i])


@cuda.jit
def _masked_softmax(s, mask, heads):
    """s [B * heads * T, S] float32 scores (rows in (b, head, t) order), in place -> probabilities; mask
    [B, T, S] bool. As ref.layers.masked_softmax: masked scores become the float32 minimum first, so a row
    that sees no key averages every value. Block = one row; threads stride over S, two block reductions."""
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    T, S = mask.shape[1], mask.shape[2]
    b, t = r // (heads * T), r % T
    red = cuda.shared.array(THREADS, float32)
    for j in range(tid, S, THREADS):
        if not mask[b, t, j]:
            s[r, j] = F32_MIN
    _, total = _exp_minus_max(s[r], red)
    for j in range(tid, S, THREADS):
        s[r, j] = s[r, j] / total


@cuda.jit
def _upcast(bits, out):
    """bits [n] uint16 (bf16) -> out [n] float32, exact: the bits moved to the high half. Grid-stride."""
    for j in range(cuda.grid(1), bits.shape[0], cuda.gridsize(1)):
        out[j] = as_f32(uint32(bits[j]) << uint32(16))


@cuda.jit
def _split_rows(x, parts):
    """x [M, K] float32 -> parts [3, M, K] uint16: x as the sum of three bf16 (`_split3`). Grid-stride."""
    K = x.shape[1]
    for j in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        _split3(x[j // K, j % K], parts, j // K, j % K)


@cuda.jit(device=True, inline=True)
def _embedding_value(table, t, i, scale, pad, image, video, audio):
    """Value i of token t's embedding: the bf16 table [V, D] row times scale, a media placeholder id's being
    pad's (ref.embedders.embed_inputs)."""
    if t == image or t == video or t == audio:
        t = pad
    return as_f32(uint32(table[t, i]) << uint32(16)) * scale


@cuda.jit
def _embed_token(nums, at, token, table, scale, pad, image, video, audio, x):
    """If nums[at] is 1: x [D] <- row token[0] of the embedding table [V, D] (bf16 bits) times scale, as
    ref.embedders.embed_inputs embeds a text token (a media placeholder id embeds as pad). Else nothing
    (x was uploaded). Grid-stride."""
    if nums[at] == 0:
        return
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] = _embedding_value(table, token[0], i, scale, pad, image, video, audio)


@cuda.jit
def _embed_rows(ids, table, scale, pad, image, video, audio, x):
    """ids [N] -> x [N, D]: rows of the embedding table [V, D] (bf16 bits) times scale, as
    ref.embedders.embed_tokens (a media placeholder id embeds as pad, as embed_inputs). Grid-stride."""
    D = x.shape[1]
    for j in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[j // D, j % D] = _embedding_value(table, ids[j // D], j % D, scale, pad, image, video, audio)


@cuda.jit(device=True, inline=True)
def _beats(v, i, best, at):
    """Whether value v at index i comes before (best, at) in np.argmax's order: NaN first (the first NaN
    wins), then the larger value, then the lower index."""
    if best != best:
        return v != v and i < at
    return v != v or v > best or (v == best and i < at)


@cuda.jit(device=True)
def _argmax_block(v, i, red_v, red_i):
    """Each thread's (value, index) -> the block's first in `_beats` order, to every thread. red_v, red_i:
    shared [>= threads] scratch."""
    tid = cuda.threadIdx.x
    red_v[tid], red_i[tid] = v, i
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step and _beats(red_v[tid + step], red_i[tid + step], red_v[tid], red_i[tid]):
            red_v[tid], red_i[tid] = red_v[tid + step], red_i[tid + step]
        cuda.syncthreads()
        step //= 2
    return red_v[0], red_i[0]


@cuda.jit
def _argmax_parts(logits, suppress, part_v, part_i):
    """Greedy selection's first half, as ref.generate.select with temperature 0: logits [V] with the ids
    where suppress [V] is 1 taken as -inf -> each block's first maximum (`_beats`) over its grid-stride
    share -> part_v, part_i [blocks]."""
    best, at = float32(-math.inf), int64(logits.shape[0])
    for j in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        v = float32(-math.inf) if suppress[j] else logits[j]
        if _beats(v, j, best, at):
            best, at = v, int64(j)
    red_v = cuda.shared.array(THREADS, float32)  # (on lines of their own: the simulator tells shared arrays
    red_i = cuda.shared.array(THREADS, int64)  # apart by the line that makes them)
    best, at = _argmax_block(best, at, red_v, red_i)
    if cuda.threadIdx.x == 0:
        part_v[cuda.blockIdx.x], part_i[cuda.blockIdx.x] = best, at


@cuda.jit
def _argmax_final(part_v, part_i, token):
    """`_argmax_parts`'s blocks -> token [1] int32: the first maximum over all. One block."""
    best, at = float32(-math.inf), int64(1 << 62)
    for j in range(cuda.threadIdx.x, part_v.shape[0], cuda.blockDim.x):
        if _beats(part_v[j], part_i[j], best, at):
            best, at = part_v[j], part_i[j]
    red_v = cuda.shared.array(THREADS, float32)  # (on lines of their own: the simulator tells shared arrays
    red_i = cuda.shared.array(THREADS, int64)  # apart by the line that makes them)
    best, at = _argmax_block(best, at, red_v, red_i)
    if cuda.threadIdx.x == 0:
        token[0] = int32(at)


@cuda.jit(device=True, inline=True)
def _sum3(y, t, j):
    """The product y[:, t, j] from `split_product`'s three summands: (y[0] + y[1]) + y[2]."""
    return (y[0, t, j] + y[1, t, j]) + y[2, t, j]


@cuda.jit
def _sum_parts(parts, out):
    """parts [3, M, N] -> out [M, N]: each value's three summands added (`_sum3`). Grid-stride."""
    N = out.shape[1]
    for j in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[j // N, j % N] = _sum3(parts, j // N, j % N)


@cuda.jit(device=True, inline=True)
def _gelu_tanh(x):
    """ref.layers.gelu_tanh's formula, float32."""
    c = float32(math.sqrt(2.0 / math.pi))
    return float32(0.5) * x * (float32(1.0) + math.tanh(c * (x + float32(0.044715) * x * x * x)))


@cuda.jit
def _gelu_mul(g, u, out):
    """g, u, out [n] -> out = gelu_tanh(g) * u. Grid-stride."""
    for j in range(cuda.grid(1), g.shape[0], cuda.gridsize(1)):
        out[j] = _gelu_tanh(g[j]) * u[j]


# ---- a prompt's fused kernels (fast/gpu_prefill.py): products come as three summands [3, T, N] ----------

@cuda.jit
def _norm_split_rows(x, w, eps, parts):
    """x [T, N] -> parts [3, T, N]: rms_norm(x, w) of each row, as three bf16 summands (`_split3`), the
    next product's input. Block = one row."""
    r = cuda.blockIdx.x
    red = cuda.shared.array(WIDE, float32)
    inv = _inv_rms(x[r], eps, red)
    for i in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        _split3(x[r, i] * inv * w[i], parts, r, i)


@cuda.jit
def _residual_rows(x, y, y_w, scale, next_w, eps, parts):
    """x [T, N], y [3, T, N] (a product's summands) -> x <- (x + rms_norm(y, y_w)) * scale[0], then parts
    [3, T, N] <- rms_norm(x, next_w) as three bf16 summands: `_residual_norm` for every row of a prompt
    (scale [1] on the device: the layer scalar as loaded, read without a copy to the host). Block = one row."""
    r, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    red = cuda.shared.array(WIDE, float32)
    acc = float32(0.0)
    for i in range(tid, x.shape[1], nt):
        v = _sum3(y, r, i)
        acc += v * v
    red[tid] = acc
    inv = float32(1.0) / math.sqrt(_block_reduce(red, False) / float32(x.shape[1]) + eps)
    for i in range(tid, x.shape[1], nt):
        x[r, i] = (x[r, i] + _sum3(y, r, i) * inv * y_w[i]) * scale[0]
    inv = _inv_rms(x[r], eps, red)  # each thread reads back only the x it wrote
    for i in range(tid, x.shape[1], nt):
        _split3(x[r, i] * inv * next_w[i], parts, r, i)


@cuda.jit
def _head_prep_rows(proj, q_w, k_w, cos, sin, heads, kv_heads, v_at, eps, q, k, v):
    """A prompt's q, k, v from its projections proj [3, T, P] (summands; per token q's heads, then k's,
    then v's from column v_at; a k_eq_v layer's v_at is k's), as ref.decoder.qkv: q [T, heads, Dh] =
    RoPE(rms_norm(q, q_w)), k [T, kv_heads, Dh] likewise with k_w, v = rms_norm(v) unscaled. cos/sin
    [T, Dh]. Block = (token, head): T x (heads + 2 kv_heads) blocks (T x heads for a KV-shared layer)."""
    per = cuda.gridDim.x // proj.shape[1]
    t, b = cuda.blockIdx.x // per, cuda.blockIdx.x % per
    Dh = q.shape[2]
    half = Dh // 2
    is_k, is_v = heads <= b < heads + kv_heads, b >= heads + kv_heads
    at = v_at + (b - heads - kv_heads) * Dh if is_v else b * Dh
    red = cuda.shared.array(THREADS, float32)
    acc = float32(0.0)
    for i in range(cuda.threadIdx.x, Dh, cuda.blockDim.x):
        s = _sum3(proj, t, at + i)
        acc += s * s
    red[cuda.threadIdx.x] = acc
    inv = float32(1.0) / math.sqrt(_block_reduce(red, False) / float32(Dh) + eps)
    w = k_w if is_k else q_w
    for i in range(cuda.threadIdx.x, Dh, cuda.blockDim.x):
        if is_v:
            v[t, b - heads - kv_heads, i] = _sum3(proj, t, at + i) * inv
            continue
        p = i + half if i < half else i - half
        y, partner = _sum3(proj, t, at + i) * inv * w[i], _sum3(proj, t, at + p) * inv * w[p]
        y = _rotated(y, partner, i < half, cos[t, i], sin[t, i])
        if is_k:
            k[t, b - heads, i] = y
        else:
            q[t, b, i] = y


@cuda.jit
def _gelu_split(gu, parts):
    """gu [3, T, 2 I] (summands of gate then up) -> parts [3, T, I]: gelu_tanh(gate) * up as three bf16
    summands. Grid-stride."""
    I = parts.shape[2]
    for j in range(cuda.grid(1), parts.shape[1] * I, cuda.gridsize(1)):
        t, c = j // I, j % I
        _split3(_gelu_tanh(_sum3(gu, t, c)) * _sum3(gu, t, I + c), parts, t, c)


# ---- launching --------------------------------------------------------------------------------------

def _arr(dtype, ndim):
    return nt.Array(dtype, ndim, "C")


_f32 = nt.float32
# The argument types each kernel is launched with (C-contiguous arrays): what it is compiled for on a GPU,
# and for sm_90 without one by tests/gpu_ptx_check.py.
SIGNATURES = {
    "_gemv_bf16": (_arr(_f32, 2),) + (_arr(nt.uint64, 2),) * 3 + (_arr(_f32, 2),),
    "_rms_norm": (_arr(_f32, 2), _arr(_f32, 1), _f32, _arr(_f32, 2)),
    "_attention": (_arr(_f32, 4), _arr(_f32, 4), _arr(_f32, 4), _arr(nt.int64, 1), _arr(nt.int64, 1),
                   _arr(nt.boolean, 2), _arr(nt.int64, 2), _arr(nt.int64, 2), nt.int64, nt.int64, _arr(_f32, 4)),
    "_block_attention": (_arr(_f32, 4), _arr(_f32, 4), _arr(_f32, 4), _arr(nt.boolean, 3), _arr(_f32, 2),
                         _arr(_f32, 4)),
    "_rope": (_arr(_f32, 3), _arr(_f32, 2), _arr(_f32, 2), _arr(_f32, 3)),
    "_gelu_mul": (_arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 1)),
    "_upcast": (_arr(nt.uint16, 1), _arr(_f32, 1)),
    "_masked_softmax": (_arr(_f32, 2), _arr(nt.boolean, 3), nt.int64),
    "_step_attention": (_arr(_f32, 2), _arr(_f32, 3), _arr(_f32, 3), _arr(nt.int32, 1), _arr(nt.int32, 1), nt.int64,
                        _arr(_f32, 2), _arr(_f32, 2), _arr(_f32, 2), _arr(_f32, 3)),
    "_merge_splits": (_arr(_f32, 2), _arr(_f32, 2), _arr(_f32, 3), _arr(_f32, 3), _arr(nt.int32, 1), nt.int64,
                      _arr(_f32, 2)),
    "_head_prep": (_arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 1), nt.int64, nt.int64,
                   nt.int64, _arr(nt.int32, 1), nt.int64, _f32, _arr(_f32, 2), _arr(_f32, 3), _arr(_f32, 3)),
    "_split_rows": (_arr(_f32, 2), _arr(nt.uint16, 3)),
    "_sum_parts": (_arr(_f32, 3), _arr(_f32, 2)),
    "_norm_split_rows": (_arr(_f32, 2), _arr(_f32, 1), _f32, _arr(nt.uint16, 3)),
    "_residual_rows": (_arr(_f32, 2), _arr(_f32, 3), _arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 1), _f32,
                       _arr(nt.uint16, 3)),
    "_head_prep_rows": (_arr(_f32, 3), _arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 2), _arr(_f32, 2), nt.int64, nt.int64,
                        nt.int64, _f32, _arr(_f32, 3), _arr(_f32, 3), _arr(_f32, 3)),
    "_gelu_split": (_arr(_f32, 3), _arr(nt.uint16, 3)),
    "_embed_rows": (_arr(nt.int64, 1), _arr(nt.uint16, 2), _f32) + (nt.int64,) * 4 + (_arr(_f32, 2),),
    "_embed_token": (_arr(nt.int32, 1), nt.int64, _arr(nt.int32, 1), _arr(nt.uint16, 2), _f32) + (nt.int64,) * 4
                    + (_arr(_f32, 1),),
    "_argmax_parts": (_arr(_f32, 1), _arr(nt.int32, 1), _arr(_f32, 1), _arr(nt.int64, 1)),
    "_argmax_final": (_arr(_f32, 1), _arr(nt.int64, 1), _arr(nt.int32, 1)),
    "_residual_norm": (_arr(_f32, 1), _arr(_f32, 1), _arr(_f32, 1), _f32, _arr(_f32, 1), _f32, _arr(_f32, 1)),
}


def _pointer(a) -> int:
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


_PLANS: dict = {}


def _plan(signature) -> tuple:
    """Per argument, made once per signature: (ndim, dtype) of an array, or (None, scalar type)."""
    if signature not in _PLANS:
        _PLANS[signature] = tuple((ty.ndim, np.dtype(str(ty.dtype))) if isinstance(ty, nt.Array)
                                  else (None, np.dtype(str(ty)).type) for ty in signature)
    return _PLANS[signature]


def kernel_args(signature, args) -> list:
    """A kernel's arguments -> the flat parameter list of its Numba-compiled PTX, as NumPy scalars (Numba's
    kernel ABI: an array is meminfo, parent, size, itemsize, data pointer, then its shape and its strides in
    bytes, every one 64 bits; a scalar is passed as its own type)."""
    flat = []
    for (ndim, kind), a in zip(_plan(signature), args, strict=True):
        if ndim is None:
            flat.append(kind(a))
            continue
        if a.ndim != ndim or a.dtype != kind or not a.flags.c_contiguous:
            raise TypeError(f"kernel argument {a.dtype}{list(a.shape)} is not a C-contiguous {ndim}-d {kind}")
        flat += [np.uint64(0), np.uint64(0), np.int64(a.size), np.int64(a.itemsize), np.uint64(_pointer(a))]
        flat += [np.int64(n) for n in a.shape] + [np.int64(n) for n in a.strides]
    return flat


class _Kernel:
    """`kernel[grid, block](*args)` as with a Numba CUDA kernel. On a GPU the kernel is compiled by Numba
    to PTX for its SIGNATURES entry at the first call, loaded by CuPy and launched by CuPy with the
    arguments laid out as Numba's ABI lays them (kernel_args); under the simulator, or with
    FAST_GPU_LAUNCH=numba, Numba launches it."""

    def __init__(self, dispatcher):
        self.numba = dispatcher
        self.signature = SIGNATURES[dispatcher.py_func.__name__]
        self._function = None

    def __getitem__(self, config):
        if LAUNCH == "numba":
            return self.numba[config]
        grid, block = config
        return lambda *args: self.function()((grid,), (block,), tuple(kernel_args(self.signature, args)))

    def function(self):
        if self._function is None:
            ptx, _ = cuda.compile_ptx_for_current_device(self.numba.py_func, self.signature)
            self._module = xp.cuda.function.Module()
            self._module.load(ptx.encode() + b"\0")
            self._function = self._module.get_function(re.search(r"\.entry\s+([^\s(]+)", ptx).group(1))
        return self._function


(gemv_bf16, rms_norm_kernel, query_attention_kernel, block_attention_kernel, rope_kernel, gelu_mul_kernel,
 upcast_kernel, softmax_kernel, step_attention_kernel, merge_splits_kernel, head_prep_kernel, residual_norm_kernel,
 split_rows_kernel, sum_parts_kernel, embed_token_kernel, argmax_parts_kernel, argmax_final_kernel,
 norm_split_rows_kernel, residual_rows_kernel, head_prep_rows_kernel, gelu_split_kernel, embed_rows_kernel) = _ALL = [
    _Kernel(k) for k in (_gemv_bf16, _rms_norm, _attention, _block_attention, _rope, _gelu_mul, _upcast,
                         _masked_softmax, _step_attention, _merge_splits, _head_prep, _residual_norm, _split_rows, _sum_parts,
                         _embed_token, _argmax_parts, _argmax_final, _norm_split_rows, _residual_rows,
                         _head_prep_rows, _gelu_split, _embed_rows)]


def compile_all() -> None:
    """Compile every kernel for this device now, through CuPy's launcher (Numba's own compiles each at its
    first launch)."""
    if LAUNCH == "cupy":
        for kernel in _ALL:
            kernel.function()


_UPLOADS: dict = {}


def _upload(a):
    """A host array -> a device copy, kept while that same host object is passed again (the rope tables and
    masks ref's decoder makes once per forward and hands to every layer): one upload per forward, not
    per layer. Only for arrays nobody writes to after making them. Device arrays pass through."""
    if hasattr(a, "__cuda_array_interface__"):
        return a
    hit = _UPLOADS.get(id(a))  # the entry keeps `a` alive, so no other object can take its id meanwhile
    if hit is None:
        if len(_UPLOADS) >= 16:
            _UPLOADS.clear()
        hit = _UPLOADS[id(a)] = (a, _dev(a))
    return hit[1]


# ---- the Kernels bundle -------------------------------------------------------------------------

def _dev(a, dtype=None):
    return xp.ascontiguousarray(xp.asarray(a, dtype=dtype))


def matmul(x2, w):
    """x2 [M, In] f32 (device), w [Out, In] (Bf16 or float, device) -> [M, Out] f32. Up to GEMV_MAX_M rows:
    the GEMV kernel; more, with GEMM = "split": x2 as three bf16 summands through one tensor-core GEMM
    (`split_product`), the three products summed by one kernel; with GEMM = "f32": w upcast, cuBLAS sgemm."""
    M = x2.shape[0]
    if not isinstance(w, Bf16):
        return x2 @ w.astype(xp.float32).T
    Out, In = w.bits.shape
    if M <= GEMV_MAX_M and In % 4 == 0:
        out = xp.empty((M, Out), xp.float32)
        gemv(x2, [w], out)
        return out
    out = xp.empty((M, Out), xp.float32)
    if GEMM == "split":
        rows = max(1, UPCAST_FLOATS // (3 * Out))  # the three products' floats per block of x's rows
        for lo in range(0, M, rows):
            part = xp.empty((3, min(rows, M - lo), Out), xp.float32)
            split_product(split_rows(x2[lo:lo + rows]), w, part)
            sum_parts_kernel[min(-(-part[0].size // THREADS), 8192), THREADS](part, out[lo:lo + rows])
        return out
    rows = max(1, UPCAST_FLOATS // In)  # every matrix of the 12B model but its output table: one block
    if rows >= Out:
        return x2 @ upcast(w.bits).T  # two launches: the upcast, the product
    for lo in range(0, Out, rows):
        out[:, lo:lo + rows] = x2 @ upcast(w.bits[lo:lo + rows]).T
    return out


def gemv(x2, ws, out):
    """x2 [M, In] f32, ws: 1-3 Bf16 matrices [Out_i, In] (In a multiple of 4), out [M, sum Out_i] <- x2 @ w^T
    of each, side by side: one launch when all but the last Out_i are multiples of GEMV_ROWS, else (M = 1)
    one launch per matrix."""
    if any(w.bits.shape[0] % GEMV_ROWS for w in ws[:-1]):
        at = 0
        for w in ws:
            gemv(x2, [w], out[0, at:at + w.bits.shape[0]].reshape(1, -1))
            at += w.bits.shape[0]
        return
    words = [w.bits.view(xp.uint64) for w in ws]
    words += words[-1:] * (3 - len(words))
    gemv_bf16[-(-out.shape[1] // GEMV_ROWS), THREADS](x2, *words, out)


def split_rows(x2):
    """x2 [M, K] float32 (device) -> [3, M, K] uint16: each value as the sum of three bf16, in one launch."""
    parts = xp.empty((3,) + x2.shape, xp.uint16)
    split_rows_kernel[min(-(-x2.size // THREADS), 8192), THREADS](x2, parts)
    return parts


_CUBLAS = {}


def split_product(parts, w, out, col: int = 0):
    """parts [3, M, In] uint16 (x as three bf16 summands, `split_rows`), w Bf16 [Out, In] -> columns col to
    col + Out of out [3, M, W] float32 <- parts[i] @ w^T for each i, as one bf16 GEMM with float32 accumulation (cuBLAS gemmEx on the
    tensor cores). A bf16 times a bf16 is exact in float32, so out[0] + out[1] + out[2] is x @ w^T to
    float32 accumulation, the product ref computes in float32. Under the simulator: NumPy's float32 product of
    the same upcast values."""
    M3, In = parts.shape[0] * parts.shape[1], parts.shape[2]
    Out, W = w.bits.shape[0], out.shape[-1]
    if xp is np:
        a = (parts.reshape(M3, In).astype(np.uint32) << 16).view(np.float32)
        out.reshape(M3, W)[:, col:col + Out] = a @ to_f32(w).T
        return out
    from cupy_backends.cuda.libs import cublas

    if not _CUBLAS:
        _CUBLAS.update(one=np.ones(1, np.float32), zero=np.zeros(1, np.float32),
                       bf16=getattr(xp.cuda.runtime, "CUDA_R_16BF", 14), f32=getattr(xp.cuda.runtime, "CUDA_R_32F", 0))
    c = _CUBLAS
    handle = xp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, xp.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    # row-major out[:, col:col + Out] = parts [M3, In] @ w^T is, column-major, an [Out, M3] block with leading
    # dimension W: w^T^T parts^T, w's rows being column-major columns of length In (op T), parts' too (op N)
    cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, Out, M3, In, c["one"].ctypes.data,
                  w.bits.data.ptr, c["bf16"], In, parts.data.ptr, c["bf16"], In, c["zero"].ctypes.data,
                  out.data.ptr + 4 * col, c["f32"], W, cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    return out


def embedding_ids(cfg) -> list[int]:
    """The ids the embedding kernels take after the table's scale: pad, and the image, video and audio
    placeholders that embed as pad (-1 where the config has none)."""
    return [cfg.pad_token_id] + [-1 if t is None else t for t in (cfg.image_token_id, cfg.video_token_id,
                                                                    cfg.audio_token_id)]


def embed_tokens(ids, table, cfg):
    """ids [B, T] (host) -> [B, T, D] float32 on the device: ref.embedders.embed_inputs of text-only ids
    (rows of the bf16 table times sqrt(D); placeholder ids as pad), gathered where the table is."""
    ids = np.asarray(ids, np.int64)
    D = table.bits.shape[1]
    x = xp.empty((ids.size, D), xp.float32)
    embed_rows_kernel[min(-(-x.size // THREADS), 8192), THREADS](_dev(ids.reshape(-1)), table.bits, np.float32(D ** 0.5),
                                                                 *embedding_ids(cfg), x)
    return x.reshape(ids.shape + (D,))


def upcast(bits):
    """bf16 bits [R, In] uint16 (device, C-contiguous) -> float32 [R, In], exactly, in one launch."""
    out = xp.empty(bits.shape, xp.float32)
    n = bits.size
    upcast_kernel[min((n + THREADS - 1) // THREADS, 8192), THREADS](bits.reshape(-1), out.reshape(-1))
    return out


def linear(x, w, b=None):
    y = matmul(_dev(x.reshape(-1, x.shape[-1]), xp.float32), w).reshape(x.shape[:-1] + (-1,))
    return y if b is None else y + to_f32(b)


_ONES: dict = {}


def _ones(n: int):
    """float32 ones [n] on the device, made once per n (the scale of a norm without weights)."""
    if n not in _ONES:
        _ONES[n] = xp.ones(n, xp.float32)
    return _ONES[n]


def vector(w, n: int):
    """A norm weight or layer scalar on the device (float32 since to_device, or Bf16), or None for ones ->
    float32 [n], C-contiguous, as the fused kernels take it (no copy for the float32 ones)."""
    return _ones(n) if w is None else _dev(to_f32(w), xp.float32).reshape(n)


def rms_norm(x, w=None, eps: float = 1e-6):
    N = x.shape[-1]
    x2 = _dev(x.reshape(-1, N), xp.float32)
    out = xp.empty_like(x2)
    rms_norm_kernel[x2.shape[0], THREADS](x2, vector(w, N), np.float32(eps), out)
    return out.reshape(x.shape)


def apply_rope(x, cos, sin):
    B, T, N, Dh = x.shape
    x3 = _dev(x.reshape(B * T, N, Dh), xp.float32)
    cos, sin = (_upload(t).reshape(B * T, Dh) for t in (cos, sin))
    out = xp.empty_like(x3)
    rope_kernel[B * T, THREADS](x3, cos, sin, out)
    return out.reshape(x.shape)


def query_attention(q, k, v, spec):
    """One thread per (b, h, t) query over every key: prompts too long for block_attention's scratch."""
    out = xp.empty(q.shape, xp.float32)
    n = q.shape[0] * q.shape[1] * q.shape[2]
    query_attention_kernel[(n + THREADS - 1) // THREADS, THREADS](
        _dev(q), _dev(k), _dev(v), _dev(spec.q_idx, xp.int64), _dev(spec.k_idx, xp.int64),
        _dev(spec.key_ok, xp.bool_), _dev(spec.q_block, xp.int64), _dev(spec.k_block, xp.int64),
        mode_of(spec.cfg, spec.kind), spec.cfg.window, out)
    return out


def block_attention(q, k, v, spec):
    """One block per (b, h, t) query, its threads splitting the keys. The mask is ref's, [B, T, S] bool,
    built on the host and uploaded; the scores take B x H x T x S floats of device scratch."""
    B, T, H, _ = q.shape
    out = xp.empty(q.shape, xp.float32)
    scratch = xp.empty((B * H * T, k.shape[1]), xp.float32)
    block_attention_kernel[B * H * T, THREADS](_dev(q), _dev(k), _dev(v), _upload(spec.dense()), scratch, out)
    return out


BLOCK_ATTENTION_MAX = 1 << 26  # score floats (256 MB) up to which attention keeps a score tensor


def dense_attention(q, k, v, spec):
    """ref.layers.attention itself on device arrays (NumPy's functions dispatch to CuPy): its two
    products batched through cuBLAS (the scores in float64 and rounded once, as ref's; the values in
    float32), its masked softmax one kernel (masked_softmax), the mask uploaded once per forward. Its score
    tensor takes B x H x T x S floats (twice that in float64 while the scores are summed)."""
    return dense_masked_attention(q, k, v, _upload(spec.dense()), softmax=masked_softmax)


def masked_softmax(scores, mask):
    """ref.layers.masked_softmax's contract: scores [B, K, G, T, S] (device), mask [B, T, S] -> probabilities,
    in place, one launch."""
    B, K, G, T, S = scores.shape
    scores = xp.ascontiguousarray(scores)
    softmax_kernel[B * K * G * T, THREADS](scores.reshape(-1, S), mask, np.int64(K * G))
    return scores


def attention(q, k, v, spec):
    """q [B, T, H, Dh], k/v [B, S, K, Dh], MaskSpec -> [B, T, H, Dh]. One token per sequence (decode): a
    block per query, one launch. A prompt whose scores fit BLOCK_ATTENTION_MAX: ref's attention through
    cuBLAS (on an H200, 512 tokens: the block kernel took ~1.4 ms a layer, its loops latency-bound).
    Longer prompts: a thread per query, no score tensor."""
    B, T, H, _ = q.shape
    if B * H * T * k.shape[1] > BLOCK_ATTENTION_MAX:
        return query_attention(q, k, v, spec)
    return block_attention(q, k, v, spec) if T == 1 else dense_attention(q, k, v, spec)


def linears(x, ws, bs):
    """As ref.decoder.linears: one product each (the GPU GEMV kernel takes one matrix)."""
    return [linear(x, w, b) for w, b in zip(ws, bs)]


def mlp(h, p):
    h2 = _dev(h.reshape(-1, h.shape[-1]), xp.float32)
    g, u = matmul(h2, p.gate_proj.weight), matmul(h2, p.up_proj.weight)
    n = g.size
    gelu_mul_kernel[min((n + THREADS - 1) // THREADS, 4096), THREADS](g.reshape(-1), u.reshape(-1), g.reshape(-1))
    return matmul(g, p.down_proj.weight).reshape(h.shape)


def lm_head(h, table, cap):
    """-> logits [B, T, V] as a host (NumPy) array: sampling runs on the host."""
    logits = linear(h, table)
    if cap is not None:
        logits = np.float32(cap) * xp.tanh(logits / np.float32(cap))
    return logits if xp is np else xp.asnumpy(logits)


KERNELS = Kernels(linear=linear, linears=linears, rms_norm=rms_norm, apply_rope=apply_rope, attention=attention,
                  mlp=mlp, lm_head=lm_head)


def to_device(tree):
    """A params tree (Params / lists / arrays / Bf16) -> the same tree with device arrays: matrices stay bf16,
    vectors (norm weights, layer scalars) are upcast once here rather than at every call."""
    if isinstance(tree, Bf16):
        return Bf16(xp.array(tree.bits)) if tree.bits.ndim > 1 else xp.array(to_f32(tree))  # a copy, also simulated
    if isinstance(tree, dict):
        return type(tree)((k, to_device(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [to_device(v) for v in tree]
    return xp.array(tree, dtype=xp.float32)
