"""The mask rule both backends' attention kernels compile (Numba CPU and Numba CUDA): one source, so the
CPU and GPU kernels cannot disagree about which key a query sees. Mirrors ref.masks.layer_mask."""

from __future__ import annotations

from ref.config import FULL

CAUSAL_FULL, CAUSAL_SLIDING_BLOCKS, CAUSAL_SLIDING, BIDIR_FULL, BIDIR_SLIDING = range(5)


def mode_of(spec) -> int:
    """MaskSpec -> the mode number the kernels switch on."""
    if spec.cfg.bidirectional == "all":
        return BIDIR_FULL if spec.kind == FULL else BIDIR_SLIDING
    if spec.kind == FULL:
        return CAUSAL_FULL
    return CAUSAL_SLIDING_BLOCKS if spec.cfg.bidirectional == "vision" else CAUSAL_SLIDING


def allowed(mode, d, q_block, k_block, window):
    """May a query see a key d positions back (d < 0: ahead)? q_block/k_block: vision block ids (-1: none).
    Plain Python; compiled by each backend."""
    if mode == 0:
        return d >= 0
    if mode == 1:
        return (d >= 0 or (q_block >= 0 and q_block == k_block)) and d < window
    if mode == 2:
        return d >= 0 and d < window
    if mode == 3:
        return True
    return abs(d) <= window
