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

from dataclasses import dataclass, field

import numpy as np

from .config import FULL, SLIDING, Config, LayerSpec
from .layers import apply_rope, attention, gelu_tanh, linear, rms_norm, rope_cos_sin, rope_inv_freq, softcap
from .masks import layer_mask
from .safetensors_io import to_f32


@dataclass
class KVCache:
    """What decoding needs of the tokens seen so far.

    keys/values[i]: [B, S_i, K, Dh] for every layer that computes its own K/V (KV-shared layers store none);
    index[i]: [S_i] absolute index of each kept key. Sliding layers keep only the last window - 1 keys,
    all a later query can see. key_ok / block: [B, seen] padding flags and vision-block ids of all tokens.
    """

    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)
    key_ok: np.ndarray | None = None
    block: np.ndarray | None = None
    length: int = 0


def qkv(h: np.ndarray, p, spec: LayerSpec, cfg: Config, cos, sin, shared: bool):
    """Step 2. h [B, T, D] -> q [B, T, H, Dh] and, unless KV-shared, k, v [B, T, K, Dh]."""
    B, T, _ = h.shape
    bias = (lambda name: p[name].bias) if cfg.attention_bias else (lambda name: None)
    q = linear(h, p.q_proj.weight, bias("q_proj")).reshape(B, T, -1, spec.head_dim)
    q = apply_rope(rms_norm(q, p.q_norm.weight, cfg.rms_norm_eps), cos, sin)
    if shared:
        return q, None, None
    k = linear(h, p.k_proj.weight, bias("k_proj")).reshape(B, T, -1, spec.head_dim)
    v = k if spec.k_eq_v else linear(h, p.v_proj.weight, bias("v_proj")).reshape(B, T, -1, spec.head_dim)
    k = apply_rope(rms_norm(k, p.k_norm.weight, cfg.rms_norm_eps), cos, sin)
    v = rms_norm(v, None, cfg.rms_norm_eps)
    return q, k, v


def mlp(h: np.ndarray, p) -> np.ndarray:
    """[B, T, D] -> [B, T, D]: down(gelu(gate h) * up h)."""
    return linear(gelu_tanh(linear(h, p.gate_proj.weight)) * linear(h, p.up_proj.weight), p.down_proj.weight)


def decoder_layer(x: np.ndarray, p, cfg: Config, q: np.ndarray, kv: tuple, mask: np.ndarray) -> np.ndarray:
    """Steps 3-5. x [B, T, D], q [B, T, H, Dh], kv = (k, v) [B, S, K, Dh], mask [B, T, S] -> [B, T, D]."""
    k, v = kv
    a = attention(q, k, v, mask)
    a = linear(a.reshape(a.shape[0], a.shape[1], -1), p.self_attn.o_proj.weight,
               p.self_attn.o_proj.bias if cfg.attention_bias else None)
    x = x + rms_norm(a, p.post_attention_layernorm.weight, cfg.rms_norm_eps)  # 3
    h = rms_norm(x, p.pre_feedforward_layernorm.weight, cfg.rms_norm_eps)
    x = x + rms_norm(mlp(h, p.mlp), p.post_feedforward_layernorm.weight, cfg.rms_norm_eps)  # 4
    return x * to_f32(p.layer_scalar)  # 5


def _extend(cache: KVCache | None, i: int, k, v, q_idx: np.ndarray, spec: LayerSpec, cfg: Config):
    """Append this step's k, v to layer i's cache -> the keys, values and indices to attend over now."""
    if cache is None:
        return k, v, q_idx
    if i in cache.keys:
        k = np.concatenate([cache.keys[i], k], axis=1)
        v = np.concatenate([cache.values[i], v], axis=1)
        q_idx = np.concatenate([cache.index[i], q_idx])
    keep = slice(None)
    if spec.kind == SLIDING:  # the next query (index q_idx[-1] + 1) sees keys > q_idx[-1] + 1 - window
        keep = q_idx > q_idx[-1] + 1 - cfg.window
    cache.keys[i], cache.values[i], cache.index[i] = k[:, keep], v[:, keep], q_idx[keep]
    return k, v, q_idx


def decoder_forward(x: np.ndarray, params, cfg: Config, positions: np.ndarray, key_ok: np.ndarray,
                    block: np.ndarray, cache: KVCache | None = None, trace=None) -> np.ndarray:
    """inputs_embeds [B, T, D], RoPE positions [B, T], key_ok [B, T] (False = padding), block [B, T]
    (vision block ids) -> final-normed hidden states [B, T, D]. With a cache, the T tokens follow
    the cache's tokens and are added to it."""
    B, T, _ = x.shape
    start = cache.length if cache is not None else 0
    q_idx = start + np.arange(T)
    if cache is not None:
        cache.key_ok = key_ok if cache.key_ok is None else np.concatenate([cache.key_ok, key_ok], axis=1)
        cache.block = block if cache.block is None else np.concatenate([cache.block, block], axis=1)
        cache.length += T
        key_ok, block = cache.key_ok, cache.block
    emit = trace or (lambda name, a: None)
    rope_tables, masks, kv = {}, {}, {}
    for i, spec in enumerate(cfg.layers):
        p = params.layers[i]
        rope_key = (spec.rope, spec.head_dim)
        if rope_key not in rope_tables:
            rope_tables[rope_key] = rope_cos_sin(positions, rope_inv_freq(spec.rope, spec.head_dim))
        cos, sin = rope_tables[rope_key]
        shared = cfg.kv_shared(i)
        h = rms_norm(x, p.input_layernorm.weight, cfg.rms_norm_eps)  # 1
        q, k, v = qkv(h, p.self_attn, spec, cfg, cos, sin, shared)  # 2
        kv[i] = kv[spec.kv_source] if shared else _extend(cache, i, k, v, q_idx, spec, cfg)
        k_all, v_all, k_idx = kv[i]
        if spec.kind not in masks:  # every layer of a kind keeps the same keys, so one mask per kind
            masks[spec.kind] = layer_mask(cfg, spec.kind, q_idx, k_idx, key_ok[:, k_idx], block[:, start:start + T],
                                          block[:, k_idx])
            emit(f"mask.{'full' if spec.kind == FULL else 'sliding'}", masks[spec.kind])
        x = decoder_layer(x, p, cfg, q, (k_all, v_all), masks[spec.kind])
        emit(f"layers.{i}", x)
    x = rms_norm(x, params.norm.weight, cfg.rms_norm_eps)
    emit("final_norm", x)
    return x


def lm_head(h: np.ndarray, table, cap: float | None, chunk: int = 16384) -> np.ndarray:
    """h [B, T, D], table [V, D] -> soft-capped logits [B, T, V] float32. The (tied) table is upcast
    `chunk` rows at a time so a bf16 vocabulary never exists in float32 as a whole."""
    V = table.shape[0]
    out = np.empty(h.shape[:-1] + (V,), np.float32)
    for lo in range(0, V, chunk):
        out[..., lo:lo + chunk] = h @ to_f32(table[lo:lo + chunk]).T
    return softcap(out, cap)
