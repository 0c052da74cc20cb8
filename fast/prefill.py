"""A prompt of one sequence through the decoder with the tokens along the columns (token-minor).

fast's products of 9-512 tokens run token-minor (w @ x^T, `fast.cpu.matmul_t`: OpenBLAS is faster that
way on this project's machine), so ref's layer code, which keeps the tokens along the rows, transposes into
and out of every product: 62 transposes in a 512-token prefill of the bench model (~11 ms of ~390). Here
the hidden states stay transposed, x^T [D, T], through every layer: each product's output is the next
step's input as it is, norms reduce down the columns (vectorised along the tokens), attention works on
transposed score tiles (keys along the rows), and each residual add is fused with its norm and the next
norm. What is left to transpose: the embeddings once, each layer's K and V once (the KV cache holds them
token-major), and the final hidden states once.

It computes ref.decoder's steps 1-5 in their order, on the same values (`fast.cpu`'s products and GELU);
only the sums' order differs (norms over columns), so it matches the layer code to float32 rounding
(tested against ref, and against fast's layer code). It serves one sequence of GEMV_MAX_M < T <=
TOKEN_MINOR_MAX_M tokens without a trace; batches, single tokens, longer prompts and traced runs take
ref's layer code with fast's kernels.

Numba's on-disk cache checks only this file's date: after editing fast/cpu.py, delete
fast/__pycache__/prefill.*.nb[ic] (the inlined exp32 and bf16 reads would otherwise stay as compiled).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ref.layers import rope_cos_sin, rope_inv_freq
from ref.masks import MaskSpec
from ref.safetensors_io import to_f32

from . import cpu, mkl
from .cpu import FM, as_f32, exp32

NEG_INF = np.float32(-np.inf)
# Queries x keys x heads x head dim from which `attention_heads_t` splits the heads over the cores: below it,
# waking the other core's helper costs more than its half saves. One query (the last layer of a prefill for
# generation) of 8 heads on the Ice Lake, each call after a 32 MB pass, one core against both: over 512 keys
# 361 against 525 us at head dim 128 and 618 against 919 at 256; over 2048 keys of 256, 2360 against 2149;
# over 4096 of 128, 3111 against 2005 (medians of 55 alternated calls).
CREW_ATTENTION_WORK = 1 << 22
QUERY_TILE = 128  # queries per attention tile (as fast.cpu.tiled_attention: 96-128 measured best)
KEY_TILE = 512  # keys per score tile


# ---- kernels: tokens along the columns -----------------------------------------------------------

@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _inv_rms(x, r0, r1, eps, inv):
    """x [R, T] -> inv [T] = (mean of x[r0:r1, t]^2 + eps)^-0.5 for every column t."""
    T = x.shape[1]
    inv[:] = 0.0
    for r in range(r0, r1):
        for t in range(T):
            inv[t] += x[r, t] * x[r, t]
    n = np.float32(r1 - r0)
    for t in range(T):
        inv[t] = np.float32(1.0) / np.sqrt(inv[t] / n + eps)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def norm_t(x, w, eps, out):
    """x [N, T] -> out [N, T]: each column RMS-normed, times w [N] (float or bf16 bits); ref's rms_norm
    of x^T, transposed."""
    _norm_t(x, w, eps, out)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _norm_t(x, w, eps, out):
    """`norm_t`, under a name that tools/profile_fast.py does not wrap (compiled callers need the function)."""
    N, T = x.shape
    inv = np.empty(T, np.float32)
    _inv_rms(x, 0, N, eps, inv)
    _scale(x, 0, N, inv, w, out)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def _scale(x, r0, n, inv, w, out):
    """out[r0 + r, t] = x[r0 + r, t] * inv[t] * w[r] for r < n: a norm's second pass."""
    for r in range(n):
        wr = as_f32(w[r])
        for t in range(x.shape[1]):
            out[r0 + r, t] = x[r0 + r, t] * inv[t] * wr


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def head_norm_rope_t(x, w, dh, cos, sin, eps, rotate, out):
    """x [H * dh, T] (head h in rows h*dh..) -> out: each head's column RMS-normed, times w [dh], then, if
    `rotate`, RoPE with cos/sin [dh, T] in ref's order (x cos + rotate_half(x) sin, pairs (i, i + dh/2))."""
    R, T = x.shape
    half = dh // 2
    inv = np.empty(T, np.float32)
    for b in range(0, R, dh):
        _inv_rms(x, b, b + dh, eps, inv)
        if not rotate:
            _scale(x, b, dh, inv, w, out)
            continue
        for r in range(half):
            w1, w2 = as_f32(w[r]), as_f32(w[r + half])
            for t in range(T):
                y1 = x[b + r, t] * inv[t] * w1
                y2 = x[b + r + half, t] * inv[t] * w2
                out[b + r, t] = y1 * cos[r, t] + (-y2) * sin[r, t]
                out[b + r + half, t] = y2 * cos[r + half, t] + y1 * sin[r + half, t]


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def residual_t(x, a, w, eps, scalar, w_next, h):
    """ref.decoder steps 3-5 on columns: x [D, T] <- (x + rms_norm(a) w) * scalar, a [D, T]; then
    h [D, T] <- rms_norm(x) w_next, the next step's input (the pre-feedforward norm, the next layer's input
    norm, or the final norm)."""
    D, T = x.shape
    inv = np.empty(T, np.float32)
    _inv_rms(a, 0, D, eps, inv)
    for r in range(D):
        wr = as_f32(w[r])
        for t in range(T):
            x[r, t] = (x[r, t] + a[r, t] * inv[t] * wr) * scalar
    _norm_t(x, w_next, eps, h)


def mask_bias(maskT: np.ndarray) -> np.ndarray:
    """maskT [S, T] bool -> [S, T] float32: 0 where the key may be seen, -inf where not; the mask as
    `softmax_t` adds it to the scores. Built once per layer kind (`forward`)."""
    return np.where(maskT, np.float32(0.0), NEG_INF)


@nb.njit(fastmath=FM, error_model="numpy", cache=True)
def softmax_t(p, bias, s0, t0, m, den, scale):
    """One key tile of the online softmax on transposed scores, in place. p [R, s, n]: scores of key s0 + j
    (rows) and query t0 + t (columns) for R heads; bias [S, T], keys x queries, the mask as 0 or -inf
    (`mask_bias`); m, den [R, n] running max and denominator, updated; scale [R, n] <- e^(old max - new max)
    for the running sum of values. Masked scores -> 0. The max and sums run down the columns, vectorised
    along the queries. A masked score becomes -inf (or NaN from +inf), which neither sets the max nor
    survives exp32 (0 below -87, and for NaN); adding the bias costs one add where selecting on a bool mask
    took a load, a widening and a blend: 3.9 -> 2.7 ns a score on the 2-core Zen 1, the same numbers."""
    R, S, n = p.shape
    top = np.empty(n, np.float32)
    total = np.empty(n, np.float32)
    for h in range(R):
        top[:] = m[h]
        total[:] = 0.0
        for j in range(S):
            row = bias[s0 + j, t0:t0 + n]  # a view: indexing the 2D bias inside the loop stops vectorising
            for t in range(n):
                v = p[h, j, t] + row[t]
                top[t] = v if v > top[t] else top[t]
        for j in range(S):
            row = bias[s0 + j, t0:t0 + n]
            for t in range(n):
                e = exp32(p[h, j, t] + row[t] - top[t])
                p[h, j, t] = e
                total[t] += e
        for t in range(n):
            if top[t] == NEG_INF:  # nothing visible yet
                scale[h, t] = 1.0
            else:
                scale[h, t] = exp32(m[h, t] - top[t])
                den[h, t] = den[h, t] * scale[h, t] + total[t]
                m[h, t] = top[t]


def attention_t(qT: np.ndarray, k: np.ndarray, v: np.ndarray, maskT: np.ndarray, tile: int = QUERY_TILE,
                key_tile: int = KEY_TILE, bias: np.ndarray | None = None, seen: tuple | None = None) -> np.ndarray:
    """Grouped-query attention on columns: qT [H * Dh, T] (head h in rows h*Dh..), k, v [S, K, Dh], maskT
    [S, T] bool (keys x queries) -> [H * Dh, T]. As fast.cpu.tiled_attention, transposed: per tile of
    `tile` queries, scores K_h Q_h^T [s, n] for `key_tile` keys at a time through BLAS (visiting only the
    keys the tile can see), the online softmax down the columns, values V_h^T P [Dh, n]. A query that
    sees no key gets the mean of all values, as ref and HF. Scores of heads wider than cpu.EXACT_SCORES_DH
    are exact, rounded once (ref's). bias: `mask_bias(maskT)`, seen: `_seen_keys(maskT, tile)`, where the
    caller keeps them (one per mask, for every layer of its kind).

    Two implementations of the same steps: with MKL running the prefill's products (`cpu.choose_blas`),
    `attention_heads_t`, whole heads per core in compiled code; else `attention_tiles_t`, numpy's
    batched products per tile."""
    if bias is None:
        bias = mask_bias(maskT)
    if seen is None:
        seen = _seen_keys(np.ascontiguousarray(maskT), tile)
    attend = attention_heads_t if cpu.choose_blas() == "mkl" else attention_tiles_t
    return attend(qT, k, v, maskT, tile, key_tile, bias, seen)


def attention_tiles_t(qT: np.ndarray, k: np.ndarray, v: np.ndarray, maskT: np.ndarray, tile: int = QUERY_TILE,
                      key_tile: int = KEY_TILE, bias: np.ndarray | None = None,
                      seen: tuple | None = None) -> np.ndarray:
    """`attention_t` through numpy: per query tile, every head's scores and values in one batched product
    each (numpy's OpenBLAS), the softmax on one core."""
    S, K, Dh = k.shape
    T = qT.shape[1]
    G = qT.shape[0] // (K * Dh)
    if bias is None:
        bias = mask_bias(maskT)
    seen_lo, seen_hi, _ = _seen_keys(np.ascontiguousarray(maskT), tile) if seen is None else seen
    out = np.empty_like(qT)
    q4 = qT.reshape(K, G, Dh, T)
    dt = cpu.score_dtype(Dh)
    kh = k.transpose(1, 0, 2)[:, None].astype(dt, copy=False)  # [K, 1, S, Dh]; float32: a strided view
    vh = v.transpose(1, 2, 0)[:, None]  # [K, 1, Dh, S]
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        n = t1 - t0
        lo, hi = seen_lo[t0 // tile], seen_hi[t0 // tile]
        qt = q4[..., t0:t1].astype(dt, copy=False)
        m = np.full((K * G, n), NEG_INF, np.float32)
        den, scale = np.zeros((K * G, n), np.float32), np.empty((K * G, n), np.float32)
        acc = None  # exp-weighted values [K, G, Dh, n]
        for s0 in range(lo, hi, key_tile):
            s1 = min(hi, s0 + key_tile)
            p = np.matmul(kh[:, :, s0:s1], qt).astype(np.float32, copy=False)  # [K, G, s, n]
            softmax_t(p.reshape(K * G, s1 - s0, n), bias, s0, t0, m, den, scale)
            pv = np.matmul(vh[..., s0:s1], p)
            if acc is None:
                acc = pv
            else:
                acc *= scale.reshape(K, G, 1, n)
                acc += pv
        if acc is None:  # the whole tile sees no key
            acc = np.zeros((K, G, Dh, n), np.float32)
        blind = den == 0
        if blind.any():
            heads, cols = np.nonzero(blind)
            acc.reshape(K * G, Dh, n)[heads, :, cols] = v.mean(axis=0)[heads // G]
            den[blind] = 1
        acc /= den.reshape(K, G, 1, n)
        out[:, t0:t1] = acc.reshape(K * G * Dh, n)
    return out


def attention_heads_t(qT: np.ndarray, k: np.ndarray, v: np.ndarray, maskT: np.ndarray, tile: int = QUERY_TILE,
                      key_tile: int = KEY_TILE, bias: np.ndarray | None = None,
                      seen: tuple | None = None) -> np.ndarray:
    """`attention_t` with MKL (fast/mkl.py; MKL must be installed): each core takes whole query heads
    (`cpu.on_every_core`) in one compiled call, `_heads_t`, which runs each tile's two products through
    MKL's sequential gemm itself and the softmax between them, with no Python and no BLAS pool between
    tiles. The same steps on the same values as `attention_tiles_t` (its sums may run in another order).
    On the 2-core Ice Lake, bench model: a sliding layer's attention 9.6 ms against 18.6 alone (medians of
    20 alternated calls, in a slow phase of the host), a 512-token prefill 78 ms shorter (median of 16
    alternated pairs, 15 shorter; fast/PERFORMANCE.md)."""
    if mkl.LIB is None:
        raise RuntimeError("attention_heads_t runs MKL's gemm, and MKL is not installed here (pip install mkl)")
    _, K, Dh = k.shape
    if bias is None:
        bias = mask_bias(maskT)
    qT, k, v, bias = (np.ascontiguousarray(a, np.float32) for a in (qT, k, v, bias))
    lo, hi, blind = _seen_keys(np.ascontiguousarray(maskT), tile) if seen is None else seen
    vmean = v.mean(axis=0) if blind else np.zeros((K, Dh), np.float32)  # ref's output for a query that sees nothing
    exact = cpu.score_dtype(Dh) == np.float64
    k64 = k.astype(np.float64) if exact else np.zeros((0, 0, 0))
    out = np.empty_like(qT)
    H = qT.shape[0] // Dh

    def heads(h0, h1):
        _heads_t(mkl.SGEMM, mkl.DGEMM, h0, h1, qT, k, k64, v, bias, lo, hi, vmean, out, tile, key_tile, exact)

    if qT.shape[1] * k.shape[0] * H * Dh < CREW_ATTENTION_WORK:
        heads(0, H)
    else:
        cpu.on_every_core(H, heads)
    return out


@nb.njit(cache=True)
def _seen_keys(maskT, tile):
    """maskT [S, T] bool -> (lo, hi [tiles]: the keys lo..hi-1 span what query tile i (queries i*tile..)
    sees, (0, 0) where it sees none; whether some query sees no key at all)."""
    S, T = maskT.shape
    tiles = (T + tile - 1) // tile
    lo, hi = np.zeros(tiles, np.int64), np.zeros(tiles, np.int64)
    seen = np.zeros(T, np.bool_)
    for s in range(S):
        row = maskT[s]
        for t in range(T):
            seen[t] |= row[t]
        for i in range(tiles):
            if row[i * tile:(i + 1) * tile].any():
                if hi[i] == 0:
                    lo[i] = s
                hi[i] = s + 1
    return lo, hi, not seen.all()


@nb.njit(nogil=True, error_model="numpy", cache=True)
def _heads_t(sgemm, dgemm, h0, h1, qT, k, k64, v, bias, lo, hi, vmean, out, tile, key_tile, exact):
    """Query heads h0..h1-1 of `attention_heads_t`, out [H * Dh, T] <- their rows. sgemm, dgemm: MKL's
    functions' addresses (`mkl.gemm_at`); qT, k, v, bias, out C-contiguous as `attention_t` takes them; k64:
    k in float64 where `exact` (scores summed in float64, each q tile converted here), else unused; lo, hi,
    vmean: `_seen_keys`' ranges and the mean of each kv head's values [K, Dh] (for a query that sees no
    key). Each tile's values accumulate in place in out: scaled by the softmax's correction, then the next
    key tile's V^T P added by the gemm (beta 1); divided by the denominators at the end."""
    S, K, Dh = k.shape
    T = qT.shape[1]
    G = qT.shape[0] // (K * Dh)
    one, zero = np.float32(1.0), np.float32(0.0)
    p = np.empty(key_tile * tile, np.float32)
    p64 = np.empty(key_tile * tile if exact else 0)
    q64 = np.empty(Dh * tile if exact else 0)
    for h in range(h0, h1):
        kv = h // G
        for i in range(lo.size):
            t0 = i * tile
            n = min(tile, T - t0)
            acc = out[h * Dh:(h + 1) * Dh, t0:t0 + n]  # [Dh, n], rows T apart
            m, den = np.full((1, n), NEG_INF, np.float32), np.zeros((1, n), np.float32)
            scale = np.empty((1, n), np.float32)
            if exact and hi[i] > lo[i]:
                for d in range(Dh):
                    for t in range(n):
                        q64[d * n + t] = qT[h * Dh + d, t0 + t]
            for s0 in range(lo[i], hi[i], key_tile):
                s = min(hi[i], s0 + key_tile) - s0
                if exact:
                    mkl.gemm_at(dgemm, mkl.NO_TRANS, s, n, Dh, 1.0, k64[s0:, kv].ctypes.data, K * Dh, q64.ctypes.data,
                                n, 0.0, p64.ctypes.data, n)
                    for j in range(s * n):
                        p[j] = np.float32(p64[j])
                else:
                    mkl.gemm_at(sgemm, mkl.NO_TRANS, s, n, Dh, one, k[s0:, kv].ctypes.data, K * Dh,
                                qT[h * Dh:, t0:].ctypes.data, T, zero, p.ctypes.data, n)
                softmax_t(p[:s * n].reshape(1, s, n), bias, s0, t0, m, den, scale)
                if s0 > lo[i]:
                    for d in range(Dh):
                        for t in range(n):
                            acc[d, t] *= scale[0, t]
                mkl.gemm_at(sgemm, mkl.TRANS, Dh, n, s, one, v[s0:, kv].ctypes.data, K * Dh, p.ctypes.data, n,
                            one if s0 > lo[i] else zero, acc.ctypes.data, T)
            if hi[i] == lo[i]:  # the tile sees no key
                acc[:] = 0.0
            for t in range(n):
                if den[0, t] == 0:
                    acc[:, t] = vmean[kv]
                    den[0, t] = 1.0
            for d in range(Dh):
                for t in range(n):
                    acc[d, t] /= den[0, t]


# ---- the pass ------------------------------------------------------------------------------------

def usable(x: np.ndarray, trace) -> bool:
    """Whether `forward` serves this call: one sequence of GEMV_MAX_M < T <= TOKEN_MINOR_MAX_M tokens,
    untraced (a trace wants every layer's token-major output; ref's layer code gives it)."""
    return trace is None and x.shape[0] == 1 and cpu.GEMV_MAX_M < x.shape[1] <= cpu.TOKEN_MINOR_MAX_M


def _column(w, xT: np.ndarray) -> np.ndarray:
    """w [Out, In], xT [In, 1] (one token) -> w @ xT [Out, 1], through fast's GEMV (no upcast)."""
    return cpu.matmuls(np.ascontiguousarray(xT).reshape(1, -1), [w])[0].reshape(-1, 1)


def forward(x: np.ndarray, params, cfg, positions: np.ndarray, key_ok: np.ndarray, block: np.ndarray,
            cache=None, last_only: bool = False) -> np.ndarray:
    """ref.decoder.decoder_forward for one sequence (see `usable`), token-minor: inputs_embeds [1, T, D],
    positions [1, T], key_ok [1, T], block [1, T] -> final-normed hidden states [1, T, D], or with
    `last_only` those of the last token, [1, 1, D]. With a cache, the T tokens follow the cache's tokens
    and are added to it.

    last_only: nothing reads the last layer's output at the other tokens (a prefill for generation wants
    one logit row), so that layer computes K and V for every token (the cache keeps them) and the rest
    (q, attention, o, the MLP, the final norm) for the last token alone, through the GEMV; the earlier
    layers run whole, as their outputs feed the next layer's K and V. (llama.cpp keeps only the output
    tokens' rows after its last layer's attention, for the feed-forward; this starts at q.) On the bench
    model (8 layers) that is 13 % of a 512-token prefill's FLOPs; on Gemma 4 12B's 48 layers 2 %."""
    _, T, D = x.shape
    eps = np.float32(cfg.rms_norm_eps)
    start = 0
    if cache is not None:
        start = cache.append_tokens(key_ok, block)
        key_ok, block = cache.key_ok, cache.block
    q_idx = start + np.arange(T)
    xT = cpu.transpose(x[0])  # [D, T], the residual stream from here on
    h = np.empty_like(xT)
    norm_t(xT, cpu.norm_weight(params.layers[0].input_layernorm.weight, D), eps, h)  # 1
    rope_tables, masks, kv = {}, {}, {}
    for i, spec in enumerate(cfg.layers):
        p, a = params.layers[i], params.layers[i].self_attn
        Dh = spec.head_dim
        key = (spec.rope, Dh)
        if key not in rope_tables:
            cos, sin = rope_cos_sin(positions, rope_inv_freq(spec.rope, Dh))
            rope_tables[key] = np.ascontiguousarray(cos[0].T), np.ascontiguousarray(sin[0].T)  # [Dh, T]
        cosT, sinT = rope_tables[key]
        shared = cfg.kv_shared(i)
        last = i + 1 == len(cfg.layers)
        narrow = last_only and last  # the query side on the last token only (see above)
        names = ["q_proj"] if shared else ["q_proj", "k_proj"] if spec.k_eq_v else ["q_proj", "k_proj", "v_proj"]
        if narrow:  # 2, each [Out, T] (q [Out, 1]). K and V first: after the GEMV its pool (Numba's) spins for a
            # while against the product's helper thread (the bench model's k, Ice Lake: 4994 us after q, where a
            # 1024 x 1024 product took ~5.1 ms; 1281 us first, where it took ~3.8; medians of 8 prefills)
            kv_proj = [cpu.matmul_t(a[n].weight, h) for n in names[1:]]
            proj = [_column(a.q_proj.weight, h[:, -1:])] + kv_proj
        else:  # 2, in one product where it can: 8 ms a prefill (bench model, Ice Lake; 51 of 84 rounds faster)
            proj = cpu.matmuls_t([a[n].weight for n in names], h)
        if cfg.attention_bias:
            proj = [y + to_f32(a[n].bias)[:, None] for y, n in zip(proj, names)]
        qT = np.empty_like(proj[0])
        qcos, qsin = (np.ascontiguousarray(cosT[:, -1:]), np.ascontiguousarray(sinT[:, -1:])) if narrow else (cosT, sinT)
        head_norm_rope_t(proj[0], cpu.norm_weight(a.q_norm.weight, Dh), Dh, qcos, qsin, eps, True, qT)
        if shared:
            kv[i] = kv[spec.kv_source]
        else:  # k_eq_v: v is k's projection, taken before k_norm and RoPE
            kT, vT = np.empty_like(proj[1]), np.empty_like(proj[-1])
            head_norm_rope_t(proj[1], cpu.norm_weight(a.k_norm.weight, Dh), Dh, cosT, sinT, eps, True, kT)
            head_norm_rope_t(proj[-1], cpu.norm_weight(None, Dh), Dh, cosT, sinT, eps, False, vT)
            k, v = (cpu.transpose(y).reshape(1, T, -1, Dh) for y in (kT, vT))  # token-major, as the cache holds
            kv[i] = (k, v, q_idx) if cache is None else cache.extend(i, k, v, q_idx, spec.kind, cfg.window)
        k_all, v_all, k_idx = kv[i]
        if spec.kind not in masks:  # one mask per kind, keys x queries
            spec_mask = MaskSpec.from_seen(cfg, spec.kind, q_idx, k_idx, key_ok, block)
            maskT = np.ascontiguousarray(spec_mask.dense()[0].T)
            masks[spec.kind] = maskT, mask_bias(maskT), _seen_keys(maskT, QUERY_TILE)
        maskT, bias, seen = masks[spec.kind]
        if narrow:  # from here on the last token's column only
            maskT, bias = np.ascontiguousarray(maskT[:, -1:]), np.ascontiguousarray(bias[:, -1:])
            seen = _seen_keys(maskT, QUERY_TILE)
            xT, h = np.ascontiguousarray(xT[:, -1:]), np.empty((D, 1), np.float32)
        product = _column if narrow else cpu.matmul_t
        o = product(a.o_proj.weight, attention_t(qT, k_all[0], v_all[0], maskT, bias=bias, seen=seen))
        if cfg.attention_bias:
            o += to_f32(a.o_proj.bias)[:, None]
        residual_t(xT, o, cpu.norm_weight(p.post_attention_layernorm.weight, D), eps, np.float32(1.0),  # 3
                   cpu.norm_weight(p.pre_feedforward_layernorm.weight, D), h)
        g, u = product(p.mlp.gate_proj.weight, h), product(p.mlp.up_proj.weight, h)  # 4
        cpu.gelu_tanh_mul(g, u)
        after = params.norm.weight if last else params.layers[i + 1].input_layernorm.weight
        residual_t(xT, product(p.mlp.down_proj.weight, g), cpu.norm_weight(p.post_feedforward_layernorm.weight, D),
                   eps, np.float32(to_f32(p.layer_scalar).reshape(())), cpu.norm_weight(after, D), h)  # 4, 5, next 1
    return cpu.transpose(h)[None]


def compile_prefill() -> None:
    """Compile the kernels above (or load them from Numba's cache) with the types a model passes, on tiny
    arrays: norm weights as read-only bf16 bits (a checkpoint's) or float32 (ones, or a float checkpoint's)."""
    x, eps = np.ones((4, 3), np.float32), np.float32(1e-6)
    bits = np.full(4, 0x3F80, np.uint16)
    bits.flags.writeable = False
    for w in (bits, np.ones(4, np.float32)):
        norm_t(x, w, eps, np.empty_like(x))
        head_norm_rope_t(x, w, 4, x, x, eps, True, np.empty_like(x))
        residual_t(x.copy(), x, w, eps, np.float32(1.0), w, np.empty_like(x))
    softmax_t(np.ones((1, 2, 3), np.float32), np.zeros((2, 3), np.float32), 0, 0, np.full((1, 3), NEG_INF),
              np.zeros((1, 3), np.float32), np.empty((1, 3), np.float32))
    lo, hi, _ = _seen_keys(np.ones((3, 3), np.bool_), 2)
    k = np.ones((3, 1, 1), np.float32)  # heads 0..0 below: compiled, nothing run (no gemm is called)
    _heads_t(mkl.SGEMM, mkl.DGEMM, 0, 0, x, k, k.astype(np.float64), k, x, lo, hi, x, x.copy(), 2, 2, False)
