"""A prompt of one sequence through the decoder on the GPU with fused kernels and split products.

Through ref's layer code a prompt launched ~46 kernels and CuPy operations a layer (each product three:
split, GEMM, sum; norms, RoPE, adds and the layer scalar one each), ~15-40 us of host time apiece, which
on an H200 made a 512-token prefill of the bench model mostly host time (fast/PERFORMANCE.md, "On a GPU").
Here each product's input arrives already split into three bf16 summands, written by the kernel before it,
and its three partial products go to the kernel after it unsummed: rms_norm with the split
(`_norm_split_rows`); q/k/v's products side by side into one buffer; their norms and RoPE from the
summands (`_head_prep_rows`); the cache (RingKVCache.extend) and attention as in ref's layer code
(gpu.attention); the o product; the residual add with its norm and the next norm, split
(`_residual_rows`); gate and up side by side; GELU x up, split (`_gelu_split`); down; the residual add with
the next layer's norm. About 13 launches a layer plus attention's.

The values are ref.decoder's steps 1-5 in their order (each product as gpu.matmul's split path computes
it); only sums' order differs, so the result equals ref's layer code to float32 rounding (tested under the
CUDA simulator against ref). It serves one sequence of more than GEMV_MAX_M tokens without a trace, whose
matrices are bf16 and layers have no attention bias; anything else takes ref's layer code.
"""

from __future__ import annotations

import numpy as np

from ref.layers import rope_cos_sin, rope_inv_freq
from ref.masks import MaskSpec
from ref.safetensors_io import Bf16

from . import gpu

xp = gpu.xp


def usable(x, cfg, trace) -> bool:
    """One sequence of more than GEMV_MAX_M tokens, no trace, no attention bias, even head dims (the
    weights: `weights_ok`)."""
    return (trace is None and x.shape[0] == 1 and x.shape[1] > gpu.GEMV_MAX_M and not cfg.attention_bias
            and all(s.head_dim % 2 == 0 for s in cfg.layers))


def _qkv_names(cfg, i: int) -> list[str]:
    """Layer i's projections from its normed input: q only (KV-shared), q and k (k_eq_v), q, k and v."""
    return ["q_proj"] if cfg.kv_shared(i) else ["q_proj", "k_proj"] if cfg.layers[i].k_eq_v else ["q_proj", "k_proj", "v_proj"]


def weights_ok(params, cfg) -> bool:
    """Every matrix a prompt multiplies by is bf16 (the split products' operand)."""
    return all(isinstance(m.weight, Bf16) for i, p in enumerate(params.layers)
               for m in [p.self_attn[n] for n in _qkv_names(cfg, i)] + [p.self_attn.o_proj, p.mlp.gate_proj,
                                                                       p.mlp.up_proj, p.mlp.down_proj])


def _products(parts, ws, T: int):
    """parts [3, T, In] (summands), ws: bf16 matrices [Out_i, In] -> [3, T, sum Out_i]: each product's three
    partial results, the matrices' side by side."""
    out = xp.empty((3, T, sum(w.bits.shape[0] for w in ws)), xp.float32)
    col = 0
    for w in ws:
        gpu.split_product(parts, w, out, col)
        col += w.bits.shape[0]
    return out


def forward(x, params, cfg, positions, key_ok, block, cache=None):
    """ref.decoder.decoder_forward for one sequence (see `usable`): inputs_embeds [1, T, D] (host or device),
    positions, key_ok, block [1, T] -> final-normed hidden states [1, T, D] on the device. With a cache,
    the T tokens follow the cache's tokens and are added to it."""
    _, T, D = x.shape
    eps, threads = np.float32(cfg.rms_norm_eps), gpu.THREADS
    start = 0
    if cache is not None:
        start = cache.append_tokens(key_ok, block)
        key_ok, block = cache.key_ok, cache.block
    q_idx = start + np.arange(T)
    x = gpu._dev(x.reshape(T, D), xp.float32).copy()  # the residual stream, updated in place
    h = xp.empty((3, T, D), xp.uint16)  # the next product's input, as summands
    gpu.norm_split_rows_kernel[T, threads](x, gpu.vector(params.layers[0].input_layernorm.weight, D), eps, h)  # 1
    ropes, masks, kv = {}, {}, {}
    for i, spec in enumerate(cfg.layers):
        p, a = params.layers[i], params.layers[i].self_attn
        Dh, H, K = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        if (spec.rope, Dh) not in ropes:
            cos, sin = rope_cos_sin(positions, rope_inv_freq(spec.rope, Dh))
            ropes[spec.rope, Dh] = gpu._dev(cos[0], xp.float32), gpu._dev(sin[0], xp.float32)
        cos, sin = ropes[spec.rope, Dh]
        shared = cfg.kv_shared(i)
        proj = _products(h, [a[n].weight for n in _qkv_names(cfg, i)], T)  # 2
        q = xp.empty((T, H, Dh), xp.float32)
        rows = 1 if shared else T  # a KV-shared layer writes no k, v: stand-ins (not q: the simulator copies
        k, v = (xp.empty((rows, K, Dh), xp.float32) for _ in range(2))  # each argument back in turn)
        heads = H + (0 if shared else 2 * K)
        v_at = (H + (0 if spec.k_eq_v else K)) * Dh  # k_eq_v: v is k's projection, before k_norm and RoPE
        gpu.head_prep_rows_kernel[T * heads, threads](proj, gpu.vector(a.q_norm.weight, Dh),
                                                      gpu.vector(None if shared else a.k_norm.weight, Dh), cos, sin,
                                                      H, K, v_at, eps, q, k, v)
        if shared:
            kv[i] = kv[spec.kv_source]
        else:
            kv[i] = (k[None], v[None], q_idx) if cache is None else cache.extend(i, k[None], v[None], q_idx,
                                                                                spec.kind, cfg.window)
        k_all, v_all, k_idx = kv[i]
        if spec.kind not in masks:
            masks[spec.kind] = MaskSpec.from_seen(cfg, spec.kind, q_idx, k_idx, key_ok, block)
        att = gpu.attention(q[None], k_all, v_all, masks[spec.kind])  # [1, T, H, Dh]
        o = _products(gpu.split_rows(xp.ascontiguousarray(att.reshape(T, H * Dh))), [a.o_proj.weight], T)
        gpu.residual_rows_kernel[T, threads](x, o, gpu.vector(p.post_attention_layernorm.weight, D), gpu._ones(1),  # 3
                                             gpu.vector(p.pre_feedforward_layernorm.weight, D), eps, h)
        gu = _products(h, [p.mlp.gate_proj.weight, p.mlp.up_proj.weight], T)  # 4
        g = xp.empty((3, T, spec.intermediate_size), xp.uint16)
        gpu.gelu_split_kernel[min(-(-T * spec.intermediate_size // threads), 8192), threads](gu, g)
        last = i + 1 == len(cfg.layers)
        after = params.norm.weight if last else params.layers[i + 1].input_layernorm.weight
        gpu.residual_rows_kernel[T, threads](x, _products(g, [p.mlp.down_proj.weight], T),  # 4, 5, next 1
                                             gpu.vector(p.post_feedforward_layernorm.weight, D),
                                             gpu.vector(p.layer_scalar, 1),
                                             gpu.vector(after, D), eps, h)
    out = xp.empty((T, D), xp.float32)
    gpu.rms_norm_kernel[T, threads](x, gpu.vector(params.norm.weight, D), eps, out)
    return out[None]
