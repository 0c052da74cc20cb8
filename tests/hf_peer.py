"""The peer: HF transformers' Gemma4Unified built live from a config dict, with every weight randomised
(norms near 1, layer_scalar far from 1, biases non-zero), saved with `save_pretrained`. Tests import
this only when torch and transformers are installed (the `interop` extra)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import transformers.models.gemma4_unified.modeling_gemma4_unified as hf_gemma
from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration


# q_norm / k_norm weights: with attention scale 1 and unit-RMS q, k, scores grow like Dh * w^2. Weights
# near 1 make random attention nearly one-hot, which amplifies float32 rounding chaotically: measured on
# the tiny config, logits differ from HF by 1.7e-4 relative with w in (0.5, 1.5) and by 2e-6 with w in
# (0.2, 0.6), while every single op agrees to 2e-7. The smaller range keeps the test sensitive to bugs.
QK_LOW, QK_SPAN = 0.2, 0.4


torch.set_num_threads(1)  # tiny models: threads only add OpenMP wake-ups (4 s vs 0.1 s per run on a busy machine)


def build(hf_config: dict, seed: int = 0) -> Gemma4UnifiedForConditionalGeneration:
    torch.manual_seed(seed)
    config = Gemma4UnifiedConfig(**hf_config)
    config._attn_implementation = "eager"
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("layer_scalar"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.95 + 0.05)
            elif "inv_freq" in name or "embed_scale" in name:
                continue
            elif ("q_norm" in name or "k_norm" in name) and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * QK_SPAN + QK_LOW)
            elif ("norm" in name or "_ln" in name) and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif name.endswith("pos_embedding"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.ndim == 2:
                scale = 0.5 if "embed_tokens" in name else 1.0
                t.copy_(torch.randn(t.shape, generator=g) * scale / np.sqrt(t.shape[-1]))
    return model


def save(model, path, dtype=torch.float32, **kwargs):
    model.to(dtype).save_pretrained(path, **kwargs)
    model.to(torch.float32)
    return path


def load(path, dtype=torch.float32):
    return Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def _t(a, dtype=None):
    return None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype)


def masks(model, ids, mm_token_type_ids, attention_mask=None):
    """SPEC.md's masks, built by HF itself: `create_masks_for_generate` with the vision-model overlay."""
    B, T = ids.shape
    embeds = torch.zeros(B, T, model.config.text_config.hidden_size)
    position_ids = torch.arange(T)[None].expand(B, T)
    return model.create_masks_for_generate(
        model.config, embeds, _t(attention_mask, torch.long), None, position_ids,
        mm_token_type_ids=_t(mm_token_type_ids, torch.long))


def forward(model, ids, mm_token_type_ids=None, attention_mask=None, plain_masks=False, **media) -> np.ndarray:
    """HF logits [B, T, V] for the same arrays ref takes. plain_masks=True uses HF's own forward masks."""
    real = next(model.parameters()).dtype  # the model's float type, for its media inputs
    kwargs = {k: _t(v, torch.long if ("position" in k or "num_frames" in k) else
                    torch.bool if k == "input_features_mask" else real)
              for k, v in media.items() if v is not None}
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    if plain_masks:
        mask = _t(attention_mask, torch.long)
        kwargs["mm_token_type_ids"] = _t(mm_token_type_ids, torch.long)
    else:
        mask = masks(model, ids, mm_token_type_ids, attention_mask)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask, **kwargs).logits.float().numpy()


def _norm64(self, x):
    """Gemma4UnifiedRMSNorm.forward in x's own dtype (HF's casts x and the weight to float32)."""
    y = self._norm(x)
    return y * self.weight.to(x.dtype) if self.with_scale else y


def _rope64(self, x, position_ids, layer_type):
    """The rotary embedding's cos and sin in float64 of HF's float32 angles (position x inv_freq, both
    float32: that product is part of the model as HF defines it), where HF takes them in float32."""
    angles = (position_ids[..., None].float() * getattr(self, f"{layer_type}_inv_freq").float()).double()
    angles = torch.cat((angles, angles), dim=-1)
    scale = getattr(self, f"{layer_type}_attention_scaling")
    return (angles.cos() * scale).to(x.dtype), (angles.sin() * scale).to(x.dtype)


def _attention64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """eager attention with the softmax in the scores' dtype (HF's takes it in float32)."""
    key, value = (t.repeat_interleave(module.num_key_value_groups, dim=1) for t in (key, value))
    scores = query @ key.transpose(2, 3) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


# (owner, attribute, float64 version): what `_all_in_float64` swaps in.
_FLOAT64_SWAPS = ((hf_gemma.Gemma4UnifiedRMSNorm, "forward", _norm64),
                  (hf_gemma.Gemma4UnifiedTextRotaryEmbedding, "forward", _rope64),
                  (hf_gemma, "eager_attention_forward", _attention64))


@contextmanager
def _all_in_float64():
    """HF's Gemma4Unified computes its RMSNorms, RoPE's cos/sin and attention's softmax in float32 whatever
    the model's dtype, so `model.to(float64)` alone leaves float32 rounding in every layer, the same
    rounding as HF's float32 run: a yardstick biased towards HF. Inside this block those three follow the
    model's dtype (`_FLOAT64_SWAPS`)."""
    saved = [getattr(owner, name) for owner, name, _ in _FLOAT64_SWAPS]
    for owner, name, swap in _FLOAT64_SWAPS:
        setattr(owner, name, swap)
    try:
        yield
    finally:
        for (owner, name, _), original in zip(_FLOAT64_SWAPS, saved):
            setattr(owner, name, original)


def forward_float64(model, ids, mm_token_type_ids=None, **media) -> np.ndarray:
    """`forward` with the model's weights (float32, or bf16 values held as float32) in float64 and every step
    computed in float64 (`_all_in_float64`): the same function with far smaller rounding, to measure how far
    float32 arithmetic moves the logits."""
    model.to(torch.float64)
    try:
        with _all_in_float64():
            return forward(model, ids, mm_token_type_ids, **media)
    finally:
        model.to(torch.float32)


def greedy(model, ids, mm_token_type_ids, max_new_tokens, suppress=(), eos=(), **media) -> np.ndarray:
    """HF greedy decoding by full recomputation under SPEC.md's masks: each step runs the whole sequence.
    Stops when every row has produced an eos id, or any row a media placeholder id: recomputing past one
    gives HF more placeholders than features, which it rejects (the tokens up to it are still HF's)."""
    placeholders = {getattr(model.config, n) for n in ("image_token_id", "audio_token_id", "video_token_id")}
    out = []
    seq = np.asarray(ids)
    types = np.asarray(mm_token_type_ids) if mm_token_type_ids is not None else None
    for _ in range(max_new_tokens):
        t = None if types is None else np.pad(types, ((0, 0), (0, seq.shape[1] - types.shape[1])))
        logits = forward(model, seq, t, **media)[:, -1]
        logits[:, list(suppress)] = -np.inf
        nxt = logits.argmax(-1)
        out.append(nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        if all(int(n) in eos for n in nxt) or any(int(n) in placeholders for n in nxt):
            break
    return np.stack(out, axis=1)
