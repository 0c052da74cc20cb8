"""The mask rule of ref.masks.layer_mask for one query-key pair, and what one attention query computes,
written in plain Python so that Numba compiles them for the CPU (fast/step.py's decoding step) and for
the GPU (fast/gpu.py), and the CUDA simulator runs them in CI. The result mirrors ref.layers.attention.
(The CPU's prefill and decode kernels in fast/cpu.py take ref's dense mask of the layer kind instead,
computed once per forward pass: there one key row serves every head.)"""

from __future__ import annotations

import math

from numba import float32
from numba.extending import register_jitable

from ref.config import FULL

CAUSAL_FULL, CAUSAL_SLIDING_BLOCKS, CAUSAL_SLIDING, BIDIR_FULL, BIDIR_SLIDING = range(5)


def mode_of(cfg, kind: str) -> int:
    """A layer kind of a config -> the mode number `visible` switches on."""
    if cfg.bidirectional == "all":
        return BIDIR_FULL if kind == FULL else BIDIR_SLIDING
    if kind == FULL:
        return CAUSAL_FULL
    return CAUSAL_SLIDING_BLOCKS if cfg.bidirectional == "vision" else CAUSAL_SLIDING


@register_jitable
def visible(mode, d, window, q_block, k_block):
    """Whether a query may see a key d = q - k positions before it (padding aside; d < 0: after it), by mode:
    0 causal full, 1 causal sliding with vision blocks (q_block, k_block: block ids, -1 outside), 2 causal
    sliding, 3 bidirectional full, 4 bidirectional sliding (|d| <= window)."""
    if mode == CAUSAL_FULL:
        return d >= 0
    if mode == CAUSAL_SLIDING_BLOCKS:
        return (d >= 0 or (q_block >= 0 and q_block == k_block)) and d < window
    if mode == CAUSAL_SLIDING:
        return d >= 0 and d < window
    if mode == BIDIR_FULL:
        return True
    return abs(d) <= window


def attend_query(q, k, v, q_idx, k_idx, key_ok, q_block, k_block, mode, window, pid, acc):
    """Online-softmax attention of query pid = (b, h, t) over every key, the mask decided per key by
    `visible` (no [T, S] matrix); writes the result into acc [Dh] (zeroed by the caller).

    q [B, T, H, Dh], k/v [B, S, K, Dh], q_idx [T], k_idx [S], key_ok [B, S], q_block [B, T], k_block [B, S],
    mode: `mode_of`. A query that may see no key averages all values (masked scores are float32-min in ref
    and HF)."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    b, h, t = pid // (H * T), (pid // T) % H, pid % T
    kh = h // (H // K)
    m = float32(-math.inf)
    denom = float32(0.0)
    seen = 0
    for s in range(S):
        if not (key_ok[b, s] and visible(mode, q_idx[t] - k_idx[s], window, q_block[b, t], k_block[b, s])):
            continue
        seen += 1
        score = float32(0.0)
        for i in range(Dh):
            score += q[b, t, h, i] * k[b, s, kh, i]
        if score > m:
            scale = float32(math.exp(m - score))
            denom *= scale
            for i in range(Dh):
                acc[i] *= scale
            m = score
        p = float32(math.exp(score - m))
        denom += p
        for i in range(Dh):
            acc[i] += p * v[b, s, kh, i]
    if seen == 0:
        for s in range(S):
            for i in range(Dh):
                acc[i] += v[b, s, kh, i]
        denom = float32(S)
    for i in range(Dh):
        acc[i] /= denom
