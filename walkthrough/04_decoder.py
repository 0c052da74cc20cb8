# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. The decoder
#
# Once text, image and audio tokens are one sequence of vectors (notebooks 1 to 3), everything else is a
# Gemma decoder. It has a handful of details that differ from a textbook transformer, and each of them
# is a bug some port has shipped. One layer, with the numbering of `ref/decoder.py` (HF's
# `Gemma4UnifiedTextDecoderLayer`):
#
# 1. `h = input_layernorm(x)`
# 2. `q = rope(q_norm(q_proj h))`, `k = rope(k_norm(k_proj h))`, `v = v_norm(v_proj h)`. On global layers with
#    `k_eq_v` there is no `v_proj` and `v = v_norm(k_proj h)`, taken before `k_norm` and RoPE
# 3. `x = x + post_attention_layernorm(o_proj(attention(q, k, v)))`, with attention scale 1
# 4. `x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`, where the MLP is `down(gelu_tanh(gate h) * up h)`
# 5. `x = x * layer_scalar`
#
# After the last layer come a final RMSNorm, the tied embedding as the output head, and the logit
# soft-cap. The structure shown here is the real 12B configuration, from `ref.config`'s preset. The
# numbers come from `ref.tiny`'s small model, whose **weights are random**.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cbook
from matplotlib.colors import ListedColormap
from PIL import Image

from ref import Model, from_hf_dict, from_name, preprocess_audio, preprocess_images
from ref.config import FULL, SLIDING, tiny_hf_dict
from ref.decoder import decoder_layer, qkv
from ref.layers import apply_rope, linear, rms_norm, rope_cos_sin, rope_inv_freq, softcap
from ref.masks import MaskSpec, block_ids
from ref.tiny import random_tensors
from ref.weights import Params

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})
real = from_name("gemma-4-12b")  # the real configuration (no weights)
hf = tiny_hf_dict()
cfg = from_hf_dict(hf)
model = Model(cfg, random_tensors(hf, seed=0))  # random weights: every feature, tiny sizes

# %% [markdown]
# ## The layer plan
#
# The 48 layers repeat a pattern of five *sliding-window* layers and one *global* (full-attention) layer.
# The last layer is always global. The two kinds differ in more than their mask:

# %%
for kind in (SLIDING, FULL):
    spec = next(s for s in real.layers if s.kind == kind)
    count = sum(s.kind == kind for s in real.layers)
    print(f"{count:2} x {kind:17}: head_dim {spec.head_dim}, {real.num_attention_heads} query heads, "
          f"{spec.num_kv_heads} kv heads, k_eq_v {spec.k_eq_v}, RoPE theta {spec.rope.theta:g} "
          f"rotating {spec.rope.rotated_fraction:.0%} of the pairs, "
          f"window {real.window if kind == SLIDING else 'none'}")
fig, ax = plt.subplots(figsize=(10, 1.2))
ax.imshow([[s.kind == FULL for s in real.layers]], cmap=ListedColormap(["#9ecae1", "#e6550d"]), aspect="auto")
ax.set_yticks([])
ax.set_xticks(range(0, 48, 6), [str(i) for i in range(0, 48, 6)])
ax.set_title("layer index: blue = sliding window (1024), orange = global")
plt.show()

# %% [markdown]
# ## A prompt to work with
#
# The tiny model gets the layout of a real multimodal prompt: a user turn with a picture (notebook 1's
# portrait, 70-token budget), a short sound, a question, and the start of the model's turn. The text ids
# are arbitrary, since the tiny vocabulary has no real words. `Model.forward(..., trace=...)` hands us
# every intermediate stage.

# %%
photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
pixel_values, image_position_ids, n_img = preprocess_images([photo], max_soft_tokens=70)
tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(4800) / 16000)).astype(np.float32)  # 0.3 s
input_features, input_features_mask = preprocess_audio([tone])
n_img, n_aud = int(n_img[0]), int(input_features_mask.sum())
segments = [("text", [cfg.bos_token_id, 105, 31, 32]), ("text", [cfg.boi_token_id]),
            ("image", [cfg.image_token_id] * n_img),
            ("text", [cfg.eoi_token_id, cfg.boa_token_id]), ("audio", [cfg.audio_token_id] * n_aud),
            ("text", [cfg.eoa_token_id, 41, 42, 43, 44, 106, 105, 51])]
ids = np.array([[i for _, seg in segments for i in seg]])
types = np.array([[{"text": 0, "image": 1, "audio": 3}[kind] for kind, seg in segments for _ in seg]])
trace = {}
logits = model.forward(ids, pixel_values=pixel_values, image_position_ids=image_position_ids,
                       input_features=input_features, input_features_mask=input_features_mask,
                       mm_token_type_ids=types, trace=lambda name, a: trace.setdefault(name, np.array(a)))
T = ids.shape[1]
print(f"{T} tokens: {n_img} image, {n_aud} audio, {T - n_img - n_aud} text; stages traced: {len(trace)}")

# %% [markdown]
# ## RMSNorm: times `weight`, not `1 + weight`
#
# Every norm in the decoder is `x * (mean(x^2) + eps)^-0.5 * weight`, computed in float32. Gemma 1 to 3
# stored the weight as an offset and multiplied by `1 + weight`. Gemma 4 stores the scale itself. A port
# that carries the old `1 + w` over scales every normalised vector by `1 + w` instead of `w`, and every
# golden case fails at its first decoder stage. `q_norm` and `k_norm` apply the same RMSNorm over each head's `head_dim`.
# `v_norm` has no weight at all.

# %%
w = model.params.language_model.layers[0].input_layernorm.weight
x = trace["inputs_embeds"][0]  # [T, D]
right, wrong = rms_norm(x, w), rms_norm(x, 1 + w)
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.hist(right.ravel(), bins=80, alpha=0.7, label="x_hat * w (Gemma 4)")
ax.hist(wrong.ravel(), bins=80, alpha=0.5, label="x_hat * (1 + w) (Gemma 1-3 convention)")
ax.set(title="layer 0 input_layernorm output, all tokens", xlabel="value")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## q/k norms instead of 1/sqrt(head_dim)
#
# Attention scores are `q . k` with scale **1**. The usual `1/sqrt(head_dim)` is gone because
# `q_norm` and `k_norm` already fix the length of every query and key. Each head vector is RMS-normalised
# and multiplied by a learned weight, so the size of the scores is set by those weights and by nothing
# else. A classic transformer's scores grow with the size of its `q_proj` and `k_proj` weights, and its
# softmax can collapse onto one key. Here the weights can grow as they like. Scaling both projections by
# `s` shows the difference on the tiny model's layer 0 (a sliding layer):

# %%
def attention_entropy(q, k, mask):
    """q [1, T, H, Dh], k [1, T, K, Dh], mask [T, T] -> mean entropy (nats) of the attention rows."""
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)  # GQA: query head j reads kv head j // G
    s = np.einsum("bthd,bshd->bhts", q, k)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1).mean())


layer0, spec0 = model.params.language_model.layers[0], cfg.layers[0]
h = rms_norm(trace["inputs_embeds"], layer0.input_layernorm.weight, cfg.rms_norm_eps)  # step 1
cos, sin = rope_cos_sin(np.arange(T)[None], rope_inv_freq(spec0.rope, spec0.head_dim))
mask = trace["mask.sliding"][0]
scales = np.geomspace(0.25, 16, 13)
with_norms, classic = [], []
for s in scales:
    attn = Params(layer0.self_attn)
    attn["q_proj"] = Params(weight=s * layer0.self_attn.q_proj.weight)
    attn["k_proj"] = Params(weight=s * layer0.self_attn.k_proj.weight)
    q, k, _ = qkv(h, attn, spec0, cfg, cos, sin, shared=False)  # ref's step 2, with the scaled projections
    with_norms.append(attention_entropy(q, k, mask))
    q_raw = apply_rope(linear(h, attn.q_proj.weight).reshape(1, T, -1, spec0.head_dim), cos, sin)  # no q_norm
    k_raw = apply_rope(linear(h, attn.k_proj.weight).reshape(1, T, -1, spec0.head_dim), cos, sin)
    classic.append(attention_entropy(q_raw / np.sqrt(spec0.head_dim), k_raw, mask))
fig, ax = plt.subplots(figsize=(7, 3))
ax.semilogx(scales, with_norms, "o-", label="Gemma 4: q_norm, k_norm, scale 1")
ax.semilogx(scales, classic, "s-", label="classic: no q/k norm, scale 1/sqrt(head_dim)")
ax.set(xlabel="s (q_proj and k_proj weights multiplied by s)", ylabel="mean attention entropy (nats)",
       title="Growing projections: the softmax stays put with q/k norms")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## RoPE, and proportional RoPE on global layers
#
# Queries and keys are rotated by their position: pair `(i, i + head_dim/2)` turns by `position * f_i`,
# in the half-split ("rotate_half") layout. Sliding layers use the default frequencies
# `f_i = 10000^(-2i/256)` for all 128 pairs. Global layers use "proportional" RoPE with theta 1e6 and
# `partial_rotary_factor` 0.25. Only the first `0.25 * 512 / 2 = 64` of their 256 pairs rotate, and
# their exponent is still taken over the full head_dim (`2i/512`). The other 192 pairs have frequency 0:
# they are never rotated and carry pure content, which long-range attention can match at any
# distance. Porting this as "RoPE over the first quarter of the dimensions" with the exponent over that
# quarter gives the wrong frequencies. The golden case `k_eq_v_global` catches it.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [2, 3]})
for kind, marker in ((SLIDING, "."), (FULL, "x")):
    spec = next(s for s in real.layers if s.kind == kind)
    f = rope_inv_freq(spec.rope, spec.head_dim)  # [head_dim / 2]
    axes[0].semilogy(np.arange(len(f)), np.where(f > 0, 2 * np.pi / np.where(f > 0, f, 1), np.nan), marker,
                     ms=4, label=f"{kind}: {int((f > 0).sum())} of {len(f)} pairs rotate")
axes[0].axhline(real.window, color="k", ls=":", lw=1)
axes[0].text(2, real.window * 1.3, "sliding window 1024", fontsize=8)
axes[0].set(xlabel="pair i", ylabel="wavelength 2 pi / f_i (tokens)",
            title="RoPE wavelengths (global: pairs >= 64 never turn)")
axes[0].legend(fontsize=8)
spec = next(s for s in real.layers if s.kind == FULL)
cos_g, _ = rope_cos_sin(np.arange(512)[None], rope_inv_freq(spec.rope, spec.head_dim))  # [1, 512 positions, 512]
axes[1].imshow(cos_g[0].T, aspect="auto", cmap="gray", vmin=-1, vmax=1)
axes[1].set(xlabel="position", ylabel="dimension of the 512-d head",
            title="global layer: cos(position * f) per dimension (white = 1, never rotated)")
plt.tight_layout()
plt.show()

# %% [markdown]
# RoPE makes a score depend on *relative* position only: shifting a query and a key by the same amount
# leaves `q . k` unchanged, also with proportional frequencies.

# %%
rng = np.random.default_rng(0)
qv, kv = rng.normal(size=(2, 1, 1, 1, spec.head_dim)).astype(np.float32)
inv = rope_inv_freq(spec.rope, spec.head_dim)
def rotated_score(m, n):
    (cq, sq), (ck, sk) = rope_cos_sin(np.array([[m]]), inv), rope_cos_sin(np.array([[n]]), inv)
    return float(np.sum(apply_rope(qv, cq, sq) * apply_rope(kv, ck, sk)))
print([round(rotated_score(m, n), 3) for m, n in ((10, 3), (1010, 1003), (50010, 50003))])  # float32 angles: last digit

# %% [markdown]
# ## Grouped-query attention and k_eq_v
#
# Sliding layers have 16 query heads and 8 key/value heads. Each pair of query heads reads one kv head
# (GQA with G = 2). Global layers go further: 16 query heads read **one** kv head of width 512, and that
# head has no `v_proj`. With `attention_k_eq_v` the values are the keys' projection, `v = v_norm(k_proj h)`,
# taken before `k_norm` and before RoPE. So V is unrotated and scale-free while K is normalised and
# rotated. The cost of a long context sits in the global layers' cache, because sliding layers keep only
# their last 1023 keys. The plot counts the KV cache in bf16 from the real configuration.

# %%
def cache_bytes(context, cfg, bytes_per_value=2):
    total = 0
    for s in cfg.layers:
        kept = min(context, cfg.window - 1) if s.kind == SLIDING else context
        total += 2 * kept * s.num_kv_heads * s.head_dim * bytes_per_value  # K and V
    return total


contexts = np.geomspace(256, 131072, 40).astype(int)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.3), gridspec_kw={"width_ratios": [1, 2]})
groups = np.array([[j // (real.num_attention_heads // s.num_kv_heads) for j in range(real.num_attention_heads)]
                   for s in (next(x for x in real.layers if x.kind == kind) for kind in (SLIDING, FULL))])
axes[0].imshow(groups, cmap="tab10", aspect="auto", vmin=0, vmax=9)
for (r, c), g in np.ndenumerate(groups):
    axes[0].text(c, r, g, ha="center", va="center", fontsize=8)
axes[0].set(yticks=[0, 1], yticklabels=["sliding: 8 kv heads", "global: 1 kv head"],
            xlabel="query head (number = the kv head it reads)", title="GQA groups")
axes[1].loglog(contexts, [cache_bytes(c, real) / 2**30 for c in contexts],
               label="Gemma 4 12B (5 sliding : 1 global, k_eq_v)")
axes[1].loglog(contexts, [2 * c * 48 * 8 * 256 * 2 / 2**30 for c in contexts], "--",
               label="if all 48 layers were global with 8 kv heads of 256")
axes[1].set(xlabel="context (tokens)", ylabel="KV cache, GiB (bf16)", title="KV cache for one sequence")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# In the tiny model, layer 5 is global with k_eq_v. Its V is the normalised output of `k_proj`:

# %%
i_glob = next(i for i, s in enumerate(cfg.layers) if s.kind == FULL)
spec_g, layer_g = cfg.layers[i_glob], model.params.language_model.layers[i_glob]
print("global layer", i_glob, "has v_proj:", "v_proj" in layer_g.self_attn)
h_g = rms_norm(trace[f"layers.{i_glob - 1}"], layer_g.input_layernorm.weight, cfg.rms_norm_eps)
cos_g, sin_g = rope_cos_sin(np.arange(T)[None], rope_inv_freq(spec_g.rope, spec_g.head_dim))
q, k, v = qkv(h_g, layer_g.self_attn, spec_g, cfg, cos_g, sin_g, shared=False)
k_proj = linear(h_g, layer_g.self_attn.k_proj.weight).reshape(1, T, -1, spec_g.head_dim)
print("q", q.shape, "k", k.shape, "v", v.shape, "| v == v_norm(k_proj h):", np.allclose(v, rms_norm(k_proj, None)))

# %% [markdown]
# ## The masks: sliding versus global layers, for this prompt
#
# Image tokens are embedded patch by patch (notebook 2), so the decoder is where they see each other.
# The tokens of one image form a *block*. On sliding layers a query may also attend **forward** to every
# later token of its own block. The window limits only how far *back* a query looks (keys with
# `q - k < window`), so above the diagonal the whole block is visible, while below it the mask stays a
# band as wide as the window. Global layers stay purely causal. This is SPEC.md's choice, the same as
# Google's JAX code and HF's `create_masks_for_vision_model`. HF's plain `forward` instead ORs the block
# onto both layer types, after the window. Audio tokens never get a block.
#
# The tiny model's window is 8 tokens, so the band is visible at this prompt length. The real window is
# 1024. The row is the query and the column is the key. Yellow means "may attend".

# %%
colours = np.array(["#bbbbbb", "#e6550d", "#31a354", "#3182bd"])  # text, image, video, audio
fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
for ax, name in zip(axes, ("mask.full", "mask.sliding")):
    ax.imshow(trace[name][0], cmap="viridis")
    ax.scatter(np.arange(T), np.full(T, -2), c=colours[types[0]], s=6, marker="s", clip_on=False)
    ax.scatter(np.full(T, -2), np.arange(T), c=colours[types[0]], s=6, marker="s", clip_on=False)
    what = "global layers, causal" if name == "mask.full" else "sliding layers, window AND (causal OR same block)"
    ax.set(title=f"{name}: {what}", xlabel="key", ylabel="query")
fig.text(0.5, 0.02, "edge colours: grey text, orange image block, blue audio", ha="center")
plt.show()
blocks = block_ids(types, types.shape)
print("vision block ids present:", sorted(set(blocks[0].tolist()) - {-1}), "| image tokens:", int((types == 1).sum()))

# %% [markdown]
# ## One layer by hand, from ref's pieces
#
# `decoder_forward` is a loop over the layers. Calling its parts for layer 0 reproduces the traced
# `layers.0` exactly:

# %%
mask0 = MaskSpec(cfg, SLIDING, np.arange(T), np.arange(T), np.ones((1, T), bool), blocks, blocks)
q, k, v = qkv(h, layer0.self_attn, spec0, cfg, cos, sin, shared=False)  # steps 1, 2 (h from above)
x1 = decoder_layer(trace["inputs_embeds"], layer0, cfg, q, (k, v), mask0)  # steps 3-5
print("matches the traced layers.0:", np.array_equal(x1, trace["layers.0"]))

# %% [markdown]
# ## layer_scalar
#
# Each layer ends by multiplying its *whole* output, residual stream included, by a learned scalar. In
# the real checkpoint these range from about 0.005 to 0.92. A loader that silently drops them runs
# every layer at the wrong scale and produces NaNs. Here the tiny model's scalars (random, 0.05 to 1) are
# plotted next to the size of the hidden state after each layer:

# %%
scalars = [float(model.params.language_model.layers[i].layer_scalar[0]) for i in range(cfg.num_layers)]
rms_after = [float(np.sqrt(np.mean(trace[f"layers.{i}"] ** 2))) for i in range(cfg.num_layers)]
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.bar(np.arange(cfg.num_layers) - 0.2, scalars, 0.4, label="layer_scalar")
ax.bar(np.arange(cfg.num_layers) + 0.2, rms_after, 0.4, label="RMS of the hidden state after the layer")
ax.set(xlabel="layer", title="The residual stream is rescaled at every layer")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Logit soft-capping
#
# The output head is the tied embedding table. Its logits pass through `cap * tanh(logits / cap)` with
# cap 30, so no logit exceeds +-30. This matters in the real checkpoint: the embedding rows of `<image|>`
# and `<audio|>` were folded at conversion and give huge raw logits. `generation_config.json` lists
# them in `suppress_tokens`, so they are never sampled. The golden case `folded_eoi_eoa` catches both
# omissions. The tiny random model's logits are small, so for it the cap is almost the identity.

# %%
z = np.linspace(-100, 100, 401, dtype=np.float32)
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
axes[0].plot(z, z, ":", label="no cap")
axes[0].plot(z, softcap(z, 30.0), label="30 tanh(x / 30)")
axes[0].set(ylim=(-45, 45), xlabel="raw logit", ylabel="output", title="soft-capping")
axes[0].legend(fontsize=8)
axes[1].hist(logits[0, -1], bins=60)
axes[1].set(title="tiny model: logits of the last token (random weights)", xlabel="logit")
plt.tight_layout()
plt.show()
