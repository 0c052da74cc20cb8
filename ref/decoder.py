"""The decoder: one layer, the stack, and the KV cache (Gemma4UnifiedTextModel, Gemma4UnifiedTextDecoderLayer).

One layer:
  1. h = input_layernorm(x)
  2. q = rope(q_norm(q_proj h));  k = rope(k_norm(k_proj h));  v = v_norm(v_proj h)
     (global layers with k_eq_v: v = v_norm(k_proj h), taken before k_norm and RoPE;
      KV-shared layers take k and v from their source layer)
  3. x = x + post_attention_layernorm(o_proj(attention(q, k, v)))
  4. x = x + post_feedforward_layernorm(down_proj(gelu(gate_proj h') * up_proj h')), h' = pre_feedforward_layernorm(x)
  5. x = x * layer_scalar
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import FULL, SLIDING, Config, LayerSpec
from .layers import (apply_rope, attention, gelu_tanh, linear, matmul_t, rms_norm, rope_cos_sin, rope_inv_freq,
                     softcap, upcast_block)
from .masks import MaskSpec
from .safetensors_io import to_f32


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: MaskSpec) -> np.ndarray:
    """q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh], with the mask materialised."""
    return attention(q, k, v, mask.dense())


def linears(x: np.ndarray, ws: list, bs: list) -> list[np.ndarray]:
    """x [..., In], matrices ws[i] [Out_i, In], biases bs[i] [Out_i] | None -> [x ws[i]^T + bs[i]], each
    [..., Out_i]: the projections of one input (q, k, v), one after another here."""
    return [linear(x, w, b) for w, b in zip(ws, bs)]


def mlp(h: np.ndarray, p) -> np.ndarray:
    """[B, T, D] -> [B, T, D]: down(gelu(gate h) * up h)."""
    return linear(gelu_tanh(linear(h, p.gate_proj.weight)) * linear(h, p.up_proj.weight), p.down_proj.weight)


def lm_head(h: np.ndarray, table, cap: float | None, chunk: int = 16384) -> np.ndarray:
    """h [B, T, D], table [V, D] -> soft-capped logits [B, T, V] float32. The (tied) table is upcast
    `chunk` rows at a time so a bf16 vocabulary never exists in float32 as a whole (when decoding, as
    `linear` does, in smaller blocks still)."""
    return softcap(matmul_t(h, table, upcast_block(h, table) or chunk), cap)


@dataclass(frozen=True)
class Kernels:
    """The hot loops the decoder calls, with their contracts. `fast/` supplies faster ones; the
    layer logic below stays the single source of truth."""

    linear: Callable = linear  # x [..., In], w [Out, In], b [Out] | None -> [..., Out]
    linears: Callable = linears  # x [..., In], [w_i [Out_i, In]], [b_i [Out_i] | None] -> [[..., Out_i]]
    rms_norm: Callable = rms_norm  # x [..., N], w [N] | None, eps -> [..., N]
    apply_rope: Callable = apply_rope  # x [B, T, N, Dh], cos, sin [B, T, Dh] -> [B, T, N, Dh]
    attention: Callable = masked_attention  # q [B, T, H, Dh], k, v [B, S, K, Dh], MaskSpec -> [B, T, H, Dh]
    mlp: Callable = mlp  # h [B, T, D], p (gate/up/down) -> [B, T, D]
    lm_head: Callable = lm_head  # h [B, T, D], table [V, D], cap -> [B, T, V]


REF = Kernels()


class KVCache:
    """What decoding needs of the tokens seen so far.

    keys/values[i]: [B, S_i, K, Dh] for every layer that computes its own K/V (KV-shared layers store none);
    index[i]: [S_i] absolute index of each kept key. Sliding layers keep only the last window - 1 keys,
    all a later query can see. key_ok / block: [B, seen] padding flags and vision-block ids of all tokens.
    """

    def __init__(self):
        self.keys, self.values, self.index = {}, {}, {}
        self.key_ok = self.block = None
        self.length = 0

    def append_tokens(self, key_ok: np.ndarray, block: np.ndarray) -> int:
        """Record T new tokens' padding flags and block ids [B, T] -> the absolute index of the first."""
        start = self.length
        self.key_ok = key_ok if self.key_ok is None else np.concatenate([self.key_ok, key_ok], axis=1)
        self.block = block if self.block is None else np.concatenate([self.block, block], axis=1)
        self.length += key_ok.shape[1]
        return start

    def extend(self, i: int, k: np.ndarray, v: np.ndarray, q_idx: np.ndarray, kind: str, window: int):
        """Add this step's k, v [B, T, K, Dh] to layer i -> the keys, values [B, S, K, Dh] and indices [S]
        to attend over now."""
        if i in self.keys:
            k = np.concatenate([self.keys[i], k], axis=1)
            v = np.concatenate([self.values[i], v], axis=1)
            q_idx = np.concatenate([self.index[i], q_idx])
        keep = slice(None)
        if kind == SLIDING:  # the next query (index q_idx[-1] + 1) sees keys > q_idx[-1] + 1 - window
            keep = slice(int(np.searchsorted(q_idx, q_idx[-1] + 1 - window, side="right")), None)
        self.keys[i], self.values[i], self.index[i] = k[:, keep], v[:, keep], q_idx[keep]
        return k, v, q_idx


def qkv(h: np.ndarray, p, spec: LayerSpec, cfg: Config, cos, sin, shared: bool, kern: Kernels = REF):
    """Step 2. h [B, T, D] -> q [B, T, H, Dh] and, unless KV-shared, k, v [B, T, K, Dh]."""
    B, T, _ = h.shape
    names = ["q_proj"] if shared else ["q_proj", "k_proj"] if spec.k_eq_v else ["q_proj", "k_proj", "v_proj"]
    proj = kern.linears(h, [p[n].weight for n in names], [p[n].bias if cfg.attention_bias else None for n in names])
    proj = [y.reshape(B, T, -1, spec.head_dim) for y in proj]
    q = kern.apply_rope(kern.rms_norm(proj[0], p.q_norm.weight, cfg.rms_norm_eps), cos, sin)
    if shared:
        return q, None, None
    k, v = proj[1], proj[-1]  # k_eq_v: v is k's projection, taken before k_norm and RoPE
    k = kern.apply_rope(kern.rms_norm(k, p.k_norm.weight, cfg.rms_norm_eps), cos, sin)
    v = kern.rms_norm(v, None, cfg.rms_norm_eps)
    return q, k, v


def decoder_layer(x: np.ndarray, p, cfg: Config, q: np.ndarray, kv: tuple, mask: MaskSpec,
                  kern: Kernels = REF) -> np.ndarray:
    """Steps 3-5. x [B, T, D], q [B, T, H, Dh], kv = (k, v) [B, S, K, Dh] -> [B, T, D]."""
    k, v = kv
    a = kern.attention(q, k, v, mask)
    a = kern.linear(a.reshape(a.shape[0], a.shape[1], -1), p.self_attn.o_proj.weight,
                    p.self_attn.o_proj.bias if cfg.attention_bias else None)
    x = x + kern.rms_norm(a, p.post_attention_layernorm.weight, cfg.rms_norm_eps)  # 3
    h = kern.rms_norm(x, p.pre_feedforward_layernorm.weight, cfg.rms_norm_eps)
    x = x + kern.rms_norm(kern.mlp(h, p.mlp), p.post_feedforward_layernorm.weight, cfg.rms_norm_eps)  # 4
    return x * to_f32(p.layer_scalar)  # 5


def decoder_forward(x: np.ndarray, params, cfg: Config, positions: np.ndarray, key_ok: np.ndarray,
                    block: np.ndarray, cache: KVCache | None = None, trace=None, kern: Kernels = REF) -> np.ndarray:
    """inputs_embeds [B, T, D], RoPE positions [B, T], key_ok [B, T] (False = padding), block [B, T]
    (vision block ids) -> final-normed hidden states [B, T, D]. With a cache, the T tokens follow
    the cache's tokens and are added to it."""
    B, T, _ = x.shape
    start = 0
    if cache is not None:
        start = cache.append_tokens(key_ok, block)
        key_ok, block = cache.key_ok, cache.block
    q_idx = start + np.arange(T)
    emit = trace or (lambda name, a: None)
    rope_tables, masks, kv = {}, {}, {}
    for i, spec in enumerate(cfg.layers):
        p = params.layers[i]
        rope_key = (spec.rope, spec.head_dim)
        if rope_key not in rope_tables:
            rope_tables[rope_key] = rope_cos_sin(positions, rope_inv_freq(spec.rope, spec.head_dim))
        cos, sin = rope_tables[rope_key]
        shared = cfg.kv_shared(i)
        h = kern.rms_norm(x, p.input_layernorm.weight, cfg.rms_norm_eps)  # 1
        q, k, v = qkv(h, p.self_attn, spec, cfg, cos, sin, shared, kern)  # 2
        if shared:
            kv[i] = kv[spec.kv_source]
        else:
            kv[i] = (k, v, q_idx) if cache is None else cache.extend(i, k, v, q_idx, spec.kind, cfg.window)
        k_all, v_all, k_idx = kv[i]
        if spec.kind not in masks:  # every layer of a kind keeps the same keys, so one mask per kind
            masks[spec.kind] = MaskSpec.from_seen(cfg, spec.kind, q_idx, k_idx, key_ok, block)
            if trace is not None:
                emit(f"mask.{'full' if spec.kind == FULL else 'sliding'}", masks[spec.kind].dense())
        x = decoder_layer(x, p, cfg, q, (k_all, v_all), masks[spec.kind], kern)
        emit(f"layers.{i}", x)
    x = kern.rms_norm(x, params.norm.weight, cfg.rms_norm_eps)
    emit("final_norm", x)
    return x
