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
# # 5. End to end: a picture, a sound, a question, an answer
#
# Notebooks 1 to 4 took the model apart. Here it runs whole, with **trained** weights. `ref` ships a
# small demo model in `ref/assets/demo_model`. It has exactly Gemma 4 Unified's architecture at a tiny
# size (sliding and global layers, k_eq_v, proportional RoPE; the next cell prints its sizes) and was
# trained by `tools/train_demo_model.py` on generated pictures of coloured shapes and generated beeps.
# It knows nothing else, but on that task its answers are real, and it uses both encoder-free paths.
# It is a normal HF-format checkpoint (`config.json`, bf16 `model.safetensors`, `tokenizer.json`,
# `chat_template.jinja`), loaded the way `python -m ref.run` loads the real 12B.
#
# We will:
#
# 1. ask it questions the way `python -m ref.run` does (`ref.run.Session`)
# 2. build the same prompt by hand with `ref.prompt`: chat template, placeholder expansion, token types
# 3. look at where the answer's words attend on the picture
# 4. see what the KV cache stores and why cached decoding equals recomputation

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from ref import media, preprocess_audio, preprocess_images
from ref import prompt as P
from ref.config import FULL
from ref.decoder import KVCache, decoder_forward, lm_head, qkv
from ref.image import budget_size, resize
from ref.layers import attention, rms_norm, rope_cos_sin, rope_inv_freq
from ref.run import DEMO_MODEL, DEMO_PICTURE, DEMO_QUESTIONS, DEMO_SOUND, Session

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

# %% [markdown]
# ## The model, the picture and the sound

# %%
session = Session.open(DEMO_MODEL)
model, cfg, tok = session.model, session.model.config, session.tokenizer
n_params = sum(int(np.prod(t.shape)) for t in model.tensors.values())
print(f"{DEMO_MODEL.name}: {n_params / 1e6:.1f} M parameters, {cfg.num_layers} layers "
      f"({', '.join('global' if s.kind == FULL else 'sliding' for s in cfg.layers)}), hidden {cfg.hidden_size}, "
      f"window {cfg.window}, vocabulary {cfg.vocab_size}, image budget {session.budget}")

picture = media.load_image(DEMO_PICTURE)  # [H, W, 3] uint8
sound = media.load_audio(DEMO_SOUND)  # 16 kHz mono
fig, axes = plt.subplots(1, 2, figsize=(11, 3), gridspec_kw={"width_ratios": [1, 3]})
axes[0].imshow(picture)
axes[0].set_title(f"{DEMO_PICTURE.name} {picture.shape[1]}x{picture.shape[0]}")
axes[1].plot(np.arange(len(sound.wave)) / 16000, sound.wave, lw=0.4)
axes[1].set(title=f"{DEMO_SOUND.name}: {sound.seconds:.2f} s (from {sound.source_rate} Hz)", xlabel="time (s)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 1. Questions and answers
#
# `Session.ask` runs the whole pipeline: it preprocesses the media (notebooks 1 and 3), builds the prompt,
# and generates greedily with a KV cache. These are the built-in demo's questions, with the answers the
# model was trained to give.

# %%
for use_picture, use_sound, question, expected in DEMO_QUESTIONS:
    a = session.ask(question, images=[picture] if use_picture else [], audios=[sound.wave] if use_sound else [])
    inputs = " + ".join(w for w, used in (("picture", use_picture), ("sound", use_sound)) if used)
    print(f"[{inputs}] {question}\n   -> {a.answer!r}  (expected {expected!r})   {a.prompt_tokens} prompt tokens, "
          f"{a.new_tokens} new, {a.prefill_s + a.decode_s:.2f} s")

# %% [markdown]
# ## 2. The prompt, built by hand
#
# `ref.prompt` does what HF's `Gemma4UnifiedProcessor` does:
#
# 1. render the checkpoint's `chat_template.jinja`, with one `<|image|>` / `<|audio|>` placeholder per item
# 2. expand each placeholder into `<|image>` + n x `<|image|>` + `<image|>` (or the audio equivalent),
#    where n is the soft-token count the processors produced
# 3. tokenize, with each special string as one token
# 4. derive `mm_token_type_ids` (0 text, 1 image, 3 audio), which give the image its bidirectional block
#
# In the printout, long runs of placeholders are shortened.

# %%
question = "Describe the picture and the sound."
pixel_values, image_position_ids, n_img = preprocess_images([picture], session.budget)
input_features, input_features_mask = preprocess_audio([sound.wave])
prompt = P.build_prompt(tok, session.template, question, image_tokens=[int(n_img[0])],
                        audio_tokens=[int(input_features_mask.sum())])
shown = prompt.text
for s, k in ((P.IMAGE, int(n_img[0])), (P.AUDIO, int(input_features_mask.sum()))):
    shown = shown.replace(s * k, f"{s} x {k} ")
print(shown)
print(f"{len(prompt.ids)} tokens: {prompt.count(P.IMAGE_TYPE)} image, {prompt.count(P.AUDIO_TYPE)} audio, "
      f"{prompt.count(P.TEXT_TYPE)} text")

# %%
media_kw = dict(pixel_values=pixel_values, image_position_ids=image_position_ids, input_features=input_features,
                input_features_mask=input_features_mask)
new = model.generate(prompt.ids[None], mm_token_type_ids=prompt.types[None], max_new_tokens=24, **media_kw)[0]
answer = tok.decode(new.tolist(), skip_special_tokens=True)
print("answer:", repr(answer), "| tokens:", [tok.id_to_token(int(t)) for t in new])

# %% [markdown]
# ## 3. Where the answer looks on the picture
#
# To see attention weights we recompute them from a traced forward pass. We run the prompt plus the
# answer once ("teacher forcing"), with `trace` collecting the hidden state after every layer. For one
# layer we then call ref's own steps 1 and 2 (`input_layernorm`, then `qkv` for the normalised, rotated
# queries and keys) and take the softmax of `q . k` under the traced mask. The helper is checked
# against `ref.layers.attention`, so it is the model's attention and not an imitation.
#
# Every layer gets a panel. On the global layers the answer can reach every image token. On the sliding
# layers a query sees only the last `window` positions, so only the image tokens within that distance,
# which are the last patches in raster order, can receive any attention. The image block's forward attention
# does not help here: the answer is not in the block.

# %%
seq = np.concatenate([prompt.ids, new])[None]  # [1, T]: prompt + answer
types = np.concatenate([prompt.types, np.zeros(len(new), np.int64)])[None]
trace = {}
logits_full = model.forward(seq, mm_token_type_ids=types, trace=lambda name, a: trace.setdefault(name, np.array(a)),
                            **media_kw)
T, lm = seq.shape[1], model.params.language_model


def attention_weights(i: int) -> np.ndarray:
    """Layer i's attention probabilities [H, T, T] on the traced pass, from ref's pieces."""
    spec, p = cfg.layers[i], lm.layers[i]
    assert not cfg.kv_shared(i)
    x = trace["inputs_embeds"] if i == 0 else trace[f"layers.{i - 1}"]
    h = rms_norm(x, p.input_layernorm.weight, cfg.rms_norm_eps)  # step 1
    cos, sin = rope_cos_sin(np.arange(T)[None], rope_inv_freq(spec.rope, spec.head_dim))
    q, k, v = qkv(h, p.self_attn, spec, cfg, cos, sin, shared=False)  # step 2
    mask = trace["mask.full" if spec.kind == FULL else "mask.sliding"]  # [1, T, T]
    kk = np.repeat(k, q.shape[2] // k.shape[2], axis=2)  # GQA: query head j reads kv head j // G
    scores = np.where(mask[:, None], np.einsum("bthd,bshd->bhts", q, kk), -np.inf)  # scale 1
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ours = np.einsum("bhts,bshd->bthd", probs, np.repeat(v, q.shape[2] // v.shape[2], axis=2))
    assert np.allclose(ours, attention(q, k, v, mask), atol=1e-5)  # the model's own attention, recomputed
    return probs[0]


image_at = np.flatnonzero(types[0] == P.IMAGE_TYPE)  # sequence positions of the image tokens
xy = image_position_ids[0, : len(image_at)]  # their (x, y) on the 48 px grid
rows, cols = xy[:, 1].max() + 1, xy[:, 0].max() + 1
h48, w48 = budget_size(picture.shape[0], picture.shape[1], session.budget)
seen = resize(picture, h48, w48)  # the pixels the model saw
queries = np.arange(len(prompt.ids) - 1, T - 1)  # the positions whose outputs are the answer's tokens
words = [tok.id_to_token(int(t)) for t in new]


def on_picture(ax, weights, title):
    """The picture the model saw, faded, with the attention on each 48 px patch as a heat overlay."""
    grid = np.zeros((rows, cols))
    grid[xy[:, 1], xy[:, 0]] = weights / max(weights.max(), 1e-12)
    heat = plt.cm.inferno(np.kron(grid, np.ones((48, 48))))
    heat[..., 3] = 0.9 * np.kron(grid, np.ones((48, 48)))  # transparent where there is no attention
    ax.imshow(seen // 2 + 127)
    ax.imshow(heat, extent=(0, w48, h48, 0))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])


first = len(prompt.ids) - 1
print(f"image tokens at positions {image_at[0]}..{image_at[-1]}; the answer's queries at {first}..{T - 2}; "
      f"a sliding layer's query q sees keys k > q - {cfg.window}")
fig, axes = plt.subplots(2, (cfg.num_layers + 1) // 2, figsize=(12, 8.5))
for ax, i in zip(axes.ravel(), range(cfg.num_layers)):
    probs = attention_weights(i)[:, queries][:, :, image_at]  # [H, answer, image tokens]
    kind = "global" if cfg.layers[i].kind == FULL else "sliding"
    on_picture(ax, probs.mean((0, 1)), f"layer {i} ({kind}): {probs.sum(-1).mean():.0%} of the answer's\n"
               f"attention on the image")
plt.tight_layout()
plt.show()

# %% [markdown]
# Word by word, at the last global layer. Each panel is the query that *produced* the word, averaged over
# heads. The image share in each title says how much that query looked at the picture at all. The words
# about the sound have little reason to look there.

# %%
last = max(i for i, s in enumerate(cfg.layers) if s.kind == FULL)
probs = attention_weights(last)
shown_words = [j for j, w in enumerate(words) if w.strip("▁.,").isalpha()][:8]
fig, axes = plt.subplots(1, len(shown_words), figsize=(2.6 * len(shown_words), 3))
for ax, j in zip(np.atleast_1d(axes), shown_words):
    row = probs[:, queries[j]]  # [H, T]
    on_picture(ax, row[:, image_at].mean(0), f"{words[j]!r}: {row[:, image_at].sum(-1).mean():.0%} on image")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The KV cache, and why cached decoding equals recomputation
#
# Generating token t+1 needs every layer's keys and values for tokens 0..t. Recomputing them at each step
# costs a forward pass over the whole sequence per new token. The cache keeps them instead, so each step
# runs only the new token. This is exact, not an approximation, for two reasons:
#
# - **causality:** a token's keys and values depend only on tokens at or before it, so a later token can
#   never change them. The one exception, the image block's forward attention, is entirely inside the
#   prompt, which is computed in one piece (the prefill). New tokens are text and never join a block.
# - **windows:** a sliding layer's query sees only the last `window` keys, so the cache can drop
#   older ones. Global layers keep everything.
#
# (A model with `use_bidirectional_attention="all"` breaks the first point: there every token sees later
# ones, so `ref` recomputes instead of caching.) Below, the prompt is prefilled into a `KVCache`, the answer
# is fed one token at a time through `decoder_forward`, and each step's logits are compared with the
# single forward pass over prompt + answer from section 3:

# %%
cache = KVCache()
key_ok = np.ones((1, len(prompt.ids)), bool)
x = model.embed(prompt.ids[None], **media_kw)
block = model.blocks(prompt.types[None], (1, len(prompt.ids)))  # the image block's ids
h = decoder_forward(x, lm, cfg, np.arange(len(prompt.ids))[None], key_ok, block, cache)  # prefill: [1, T0, D]
steps_logits = [lm_head(h[:, -1:], model.head, cfg.final_logit_softcapping)[0, 0]]
kept = [[cache.keys[i].shape[1] for i in range(cfg.num_layers)]]
for j, t in enumerate(new[:-1]):  # one token at a time, at position T0 + j
    h = decoder_forward(model.embed(np.array([[t]])), lm, cfg, np.array([[len(prompt.ids) + j]]), np.ones((1, 1), bool),
                        np.full((1, 1), -1), cache)
    steps_logits.append(lm_head(h, model.head, cfg.final_logit_softcapping)[0, 0])
    kept.append([cache.keys[i].shape[1] for i in range(cfg.num_layers)])
diff = np.abs(np.array(steps_logits) - logits_full[0, queries]).max(-1)  # per generated token
print(f"max |cached - recomputed| logit over {len(diff)} steps: {diff.max():.2e}; "
      f"same greedy tokens: {np.array_equal(np.array(steps_logits).argmax(-1), new)}")

# %%
kept = np.array(kept)  # [steps, layers]: keys held after each step
fig, axes = plt.subplots(1, 2, figsize=(12, 3.3))
for i in range(cfg.num_layers):
    axes[0].plot(len(prompt.ids) + np.arange(len(kept)), kept[:, i], "-" if cfg.layers[i].kind == FULL else "--",
                 label=f"layer {i} ({'global' if cfg.layers[i].kind == FULL else 'sliding'})")
axes[0].set(xlabel="tokens so far", ylabel="keys in the cache", ylim=(0, None),
            title=f"global layers keep every key, sliding layers the last window - 1 = {cfg.window - 1}")
axes[0].legend(fontsize=7, ncol=2)
axes[1].semilogy(np.maximum(diff, 1e-9), "o-")
axes[1].set(xlabel="generated token", ylabel="max |logit difference|", ylim=(1e-9, 1),
            title="cached decoding vs one forward pass: float32 rounding")
plt.tight_layout()
plt.show()

# %% [markdown]
# And `generate` itself, with and without the cache: the same tokens, at a different cost. The gap grows
# with the length of the answer, since each uncached step recomputes the whole sequence. `fast/` runs the
# same model with compiled kernels and a preallocated ring-buffer cache when speed matters.

# %%
timings, outputs = {}, {}
for use_cache in (True, False):
    t0 = time.perf_counter()
    outputs[use_cache] = model.generate(prompt.ids[None], mm_token_type_ids=prompt.types[None], max_new_tokens=24,
                                        use_cache=use_cache, **media_kw)
    timings[use_cache] = time.perf_counter() - t0
print(f"with cache {timings[True]:.2f} s, recomputing {timings[False]:.2f} s; identical tokens: "
      f"{np.array_equal(outputs[True], outputs[False])}")
