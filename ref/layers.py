"""The numeric building blocks: linear, norms, gelu, RoPE, attention. All float32 (attention's scores: see `attention`).

Weights arrive as stored (float32, float16 or Bf16 memory maps) and are upcast exactly at the
point of use, one matrix (for a decoded token, one block of its rows) at a time. Dimension letters:
see `ref/__init__.py`.
"""

from __future__ import annotations

import numpy as np

from .config import Rope
from .safetensors_io import to_f32

F32_MIN = np.finfo(np.float32).min


FEW_ROWS = 16  # rows of x (tokens) up to which a stored bf16/f16 matrix is upcast a block at a time
UPCAST_BYTES = 1 << 19  # that block's float32 size: 512 KB (the fastest of 128 KB-2 MB at five shapes)


def matmul_t(x: np.ndarray, w, block: int | None = None) -> np.ndarray:
    """x [..., In] @ to_f32(w [Out, In])^T -> [..., Out] float32, w upcast `block` rows at a time (None: whole).

    The float32 copy of a bf16 matrix is twice its size: upcast whole, it is written to memory and read
    back for the product, three times the bytes of the weights it comes from. For a prompt that is a
    small part of the work; for a decoded token, the whole of it: a block at a time stays in the cache
    (a 15360 x 3840 matrix times one token, 2-core Xeon: 102 -> 24 ms; each output is the same dot product,
    which BLAS may round differently for a few rows, within float32's rounding).
    """
    if block is None:
        return x @ to_f32(w).T
    out = np.empty(x.shape[:-1] + (w.shape[0],), np.float32)
    for lo in range(0, w.shape[0], block):
        out[..., lo:lo + block] = x @ to_f32(w[lo:lo + block]).T
    return out


def upcast_block(x: np.ndarray, w) -> int | None:
    """The `block` for matmul_t: the rows of w that make UPCAST_BYTES of float32, where x has FEW_ROWS rows
    or fewer and w is not stored in float32 (nothing to upcast then); else None."""
    stored_f32 = getattr(w, "dtype", None) == np.float32
    few = x.size <= FEW_ROWS * x.shape[-1]
    return max(1, UPCAST_BYTES // (4 * x.shape[-1])) if few and not stored_f32 else None


def linear(x: np.ndarray, w, b=None) -> np.ndarray:
    """[..., In] @ [Out, In]^T (+ [Out]) -> [..., Out]. nn.Linear."""
    y = matmul_t(x, w, upcast_block(x, w))
    return y if b is None else y + to_f32(b)


def rms_norm(x: np.ndarray, w=None, eps: float = 1e-6) -> np.ndarray:
    """[..., N] -> [..., N]. Gemma4UnifiedRMSNorm: x * (mean(x^2) + eps)^-0.5 * w (w, not 1 + w; None = no scale).
    The -0.5 power is 1 / sqrt, rounded twice, as torch computes HF's pow(., -0.5) (numpy's float32 power
    rounds differently in about a third of its values)."""
    y = x * (np.float32(1.0) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))
    return y if w is None else y * to_f32(w)


def layer_norm(x: np.ndarray, w, b, eps: float = 1e-5) -> np.ndarray:
    """[..., N] -> [..., N]. nn.LayerNorm: biased variance, eps inside the square root."""
    mu = np.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc / np.sqrt(var + np.float32(eps)) * to_f32(w) + to_f32(b)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """[...] -> [...]. GELU, tanh approximation (HF "gelu_pytorch_tanh")."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """[...] -> [...]. cap * tanh(x / cap); identity when cap is None."""
    if cap is None:
        return x
    cap = np.float32(cap)
    return cap * np.tanh(x / cap)


# ---- rotary position embedding ----------------------------------------------------------------

def rope_inv_freq(rope: Rope, head_dim: int) -> np.ndarray:
    """-> [Dh/2] float32 angular frequencies.

    Default RoPE: theta^(-2i/Dh) for every pair. Proportional RoPE (global layers): only the first
    int(fraction * Dh // 2) pairs rotate, still with exponent 2i/Dh over the full head_dim; the rest have
    frequency 0 (cos 1, sin 0: unrotated). Mirrors `_compute_proportional_rope_parameters`.
    The exponent is float32's 2i/Dh and theta^exponent is rounded once to float32 (computed in float64),
    then inverted in float32, as HF does. numpy's float32 power is up to an ulp off in about a fifth of
    the entries, and an angle is position x frequency: at position 900 such an ulp turns into ~5e-5 rad.
    """
    rotated = int(rope.rotated_fraction * head_dim // 2)
    exponents = np.arange(0, 2 * rotated, 2, dtype=np.float32) / np.float32(head_dim)
    power = np.power(np.float64(np.float32(rope.theta)), exponents.astype(np.float64)).astype(np.float32)
    inv = np.float32(1.0) / power
    inv = np.concatenate([inv, np.zeros(head_dim // 2 - rotated, np.float32)])
    return (inv / np.float32(rope.factor)).astype(np.float32)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """positions [B, T] int, inv_freq [Dh/2] -> cos, sin [B, T, Dh] (each frequency used for both halves)."""
    angles = positions[..., None].astype(np.float32) * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [B, T, N, Dh], cos/sin [B, T, Dh] -> [B, T, N, Dh]. Half-split rotation: pairs (i, i + Dh/2)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---- attention --------------------------------------------------------------------------------

def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scores [B, K, G, T, S], mask [B, T, S] bool -> probabilities over S. Masked scores are set to the
    float32 minimum, as HF's eager/sdpa masks do, so a row with no visible key (a left-padding query)
    averages all values instead of producing NaN."""
    scores = np.where(mask[:, None, None], scores, F32_MIN)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, softmax=masked_softmax) -> np.ndarray:
    """Grouped-query attention with scale 1 (q_norm/k_norm replace 1/sqrt(Dh)).

    q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] bool (True = may attend) -> [B, T, H, Dh].
    `softmax(scores, mask)` is masked_softmax (fast/'s GPU passes a kernel with its contract).

    Each score is the exact dot product of q and k rounded once to float32 (summed in float64, where every
    product of two float32 is exact). Summed in float32, a 512-wide dot product (the global layers') loses
    more than HF's does: OpenBLAS adds each one up in a single chain, and the logits of such models then lay
    a median 1.28x as far from float64 as HF's float32 ones (tests/test_parity_hf.py), 0.93x with this.
    The price is memory: the float64 product holds B x H x T x S x 8 bytes while it is summed, twice the
    float32 scores (512 MB for 2000 tokens over the real model's 16 heads); fast/ tiles it instead.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    kt = k.transpose(0, 2, 3, 1)[:, :, None]  # [B, K, 1, Dh, S]
    scores = (qg.astype(np.float64) @ kt.astype(np.float64)).astype(np.float32)  # [B, K, G, T, S]
    probs = softmax(scores, mask)
    out = probs @ v.transpose(0, 2, 1, 3)[:, :, None]  # [B, K, G, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
