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
# # 2. The vision embedder
#
# Notebook 1 turned a picture into rows of 6,912 raw pixel values, one row per 48 px patch. This
# notebook turns each row into one vector of the decoder's width. In a model with an encoder, a vision
# transformer of several hundred million parameters does this. Here it is seven small steps, applied
# to each patch on its own. The numbering is that of `ref/embedders.py`, which mirrors HF's
# `Gemma4UnifiedVisionEmbedder` and `Gemma4UnifiedMultimodalEmbedder`:
#
# 1. LayerNorm over the 6,912 values (eps 1e-5, PyTorch's default, not the text model's 1e-6)
# 2. Dense with bias, 6,912 -> E (`mm_embed_dim`, 3,840 in the real model)
# 3. LayerNorm
# 4. add the factorized 2D position embedding `pos_embedding[x, 0] + pos_embedding[y, 1]`
# 5. LayerNorm
# 6. RMSNorm without a scale
# 7. Linear without bias, E -> D (the decoder's hidden size, 3,840)
#
# **The weights in this notebook are random.** `ref.tiny` writes a small model with every feature of
# the real one (E = 48, D = 64 here). The values mean nothing, but the operations, the shapes and the
# structure of the position embedding are those of the real model.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cbook
from PIL import Image

from ref import Model, from_hf_dict, from_name, preprocess_images
from ref.config import tiny_hf_dict
from ref.embedders import position_embedding, vision_embed
from ref.image import patch_positions
from ref.layers import layer_norm
from ref.tiny import random_tensors
from ref.weights import expected_shapes

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

# %% [markdown]
# ## How small is "encoder-free"?
#
# Counting the real checkpoint's tensors (from the 12B preset's shapes, no download needed) shows how
# little sits between the pixels and the decoder:

# %%
shapes = expected_shapes(from_name("gemma-4-12b"))
vision = {k: v for k, v in shapes.items() if k.startswith(("model.vision_embedder", "model.embed_vision"))}
for name, shape in vision.items():
    print(f"{name:58} {str(list(shape)):18} {np.prod(shape) / 1e6:6.2f} M")
total = sum(np.prod(s) for s in shapes.values())
print(f"vision embedder: {sum(np.prod(s) for s in vision.values()) / 1e6:.1f} M of {total / 1e9:.2f} B parameters")

# %% [markdown]
# ## The tiny model and the picture
#
# We use the same portrait and the 70-token budget from notebook 1. `vision_embed` runs the seven
# steps, and its `trace` callback receives the array after each step.

# %%
hf = tiny_hf_dict()
cfg = from_hf_dict(hf)
model = Model(cfg, random_tensors(hf, seed=0))  # random weights, in memory
p, proj = model.params.vision_embedder, model.params.embed_vision

photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
pixel_values, positions, n = preprocess_images([photo], max_soft_tokens=70)  # [1, 70, 6912], [1, 70, 2], [1]
n = int(n[0])
steps = {"pixel_values": pixel_values}
soft = vision_embed(pixel_values, positions, p, proj, cfg, trace=lambda name, a: steps.setdefault(name, a.copy()))
for name, a in steps.items():
    print(f"{name:20} {list(a.shape)}")

# %% [markdown]
# ## Step 1: LayerNorm, and why no mean/std normalisation is needed
#
# The first LayerNorm subtracts each patch's mean and divides by its standard deviation, over all
# 6,912 values. It then applies a learned weight and bias. The consequence is that any preprocessing
# of the form `a * x + b`, with one `a` and one `b` for every channel, disappears: brightness, contrast,
# or SigLIP's mapping of [0, 1] to [-1, 1]. The only trace it leaves is through `eps`, on very flat
# patches whose variance is close to `eps`. This is also why a wrong eps (1e-6 instead of 1e-5) shows on
# flat patches first.
#
# A per-channel normalisation, such as ImageNet's mean and std for R, G and B, is *not* removed. It
# changes the mix of colours inside a patch, and the model was trained without it. That is why
# Gemma 4 Unified's processor has no `image_mean` or `image_std`: the pixels go in as `k / 255`.

# %%
x = pixel_values[0, :n]  # [n, 6912] real patches
ones, zeros = np.ones(x.shape[-1], np.float32), np.zeros(x.shape[-1], np.float32)
ln = lambda v: layer_norm(v.astype(np.float32), ones, zeros, cfg.vision.layer_norm_eps)  # step 1 without its affine
imagenet_mean, imagenet_std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
variants = {
    "brighter, lower contrast: 0.5 x + 0.4": 0.5 * x + 0.4,
    "SigLIP-style [-1, 1]: (x - 0.5) / 0.5": (x - 0.5) / 0.5,
    "ImageNet per-channel mean/std": ((x.reshape(n, -1, 3) - imagenet_mean) / imagenet_std).reshape(n, -1),
}
fig, ax = plt.subplots(figsize=(8, 3.5))
for label, v in variants.items():
    change = np.abs(ln(v) - ln(x)).max(-1)  # [n] largest change of a LayerNorm output, per patch
    ax.scatter(x.var(-1), change, s=12, label=label)
ax.axvline(cfg.vision.layer_norm_eps, color="k", ls=":", lw=1)
ax.text(cfg.vision.layer_norm_eps * 1.1, 2e-6, "eps", fontsize=8)
ax.set(xscale="log", yscale="log", xlabel="variance of the patch's 6,912 values",
       ylabel="max |change| after step 1", title="What a preprocessing normalisation changes after the first LayerNorm")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Steps 2 and 3: Dense and LayerNorm
#
# One matrix, 6,912 -> E, is the whole "patch encoder". It is a linear map of raw pixels, like the
# first layer of a ViT with 48 px patches, but with nothing after it. A second LayerNorm brings every
# patch vector back to a common scale before the position is added.
#
# ## Step 4: the factorized 2D position embedding
#
# `pos_embedding` has shape `[mm_posemb_size, 2, E]`, which is `[1120, 2, 3840]` in the real model. Slot
# 0 is a table of x embeddings, slot 1 a table of y embeddings. A patch at (x, y) gets
# `table[x, 0] + table[y, 1]`, and a padding patch at (-1, -1) gets nothing. Two tables of 1,120 rows
# cover every grid up to 1,120 patches on a side, with 2 x 1,120 vectors instead of 1,120^2.

# %%
table = p.pos_embedding  # [64, 2, 48] in the tiny model
rows, cols = positions[0, :n, 1].max() + 1, positions[0, :n, 0].max() + 1
fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
for ax, (slot, what, k) in zip(axes, ((0, "x", cols), (1, "y", rows))):
    ax.imshow(table[:16, slot, :], cmap="RdBu_r", vmin=-1.5, vmax=1.5, aspect="auto")
    ax.axhline(k - 0.5, color="k", lw=1)
    ax.set(xlabel="embedding dimension (E)", ylabel=what)
    ax.set_title(f"pos_embedding[:16, {slot}]: the {what} table\n"
                 f"(rows above the line: this picture's {k} {what} values)", fontsize=10)
plt.tight_layout()
plt.show()
print("padding adds nothing:", np.abs(position_embedding(np.array([[[-1, -1]]]), table)).max())

# %% [markdown]
# What does the sum look like over a grid? Take a 24 x 24 grid and compare every patch's position
# vector with that of one reference patch (cosine similarity). Patches in the same column share the x
# term and patches in the same row share the y term, so a cross appears through the reference.
# Everything else shares nothing. With random tables that is all there is. A trained table also makes
# neighbouring rows similar, so the cross widens into a blob, but the factorized form stays the same.
# (A port that swaps x and y turns the cross on its side, which notebook 6 catches.)

# %%
grid = patch_positions(24, 24)[None]  # [1, 576, 2]: (x, y) in raster order
pe = position_embedding(grid, table)[0]  # [576, E]: table[x, 0] + table[y, 1]
pe = pe / np.linalg.norm(pe, axis=-1, keepdims=True)
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, (x0, y0) in zip(axes, ((5, 8), (17, 15))):
    sim = (pe @ pe[y0 * 24 + x0]).reshape(24, 24)
    im = ax.imshow(sim, cmap="viridis", vmin=-0.2, vmax=1)
    ax.plot(x0, y0, "r+", ms=12)
    ax.set(title=f"cosine similarity to (x={x0}, y={y0})", xlabel="x", ylabel="y")
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

# %% [markdown]
# ## Steps 5 to 7: LayerNorm, RMSNorm, Linear
#
# After the position is added, a third LayerNorm (`pos_norm`) normalises again. Then comes the
# `Gemma4UnifiedMultimodalEmbedder` that vision and audio share: an RMSNorm *without* a learned scale,
# which gives every vector a root mean square of exactly 1, and a Linear without bias into the
# decoder's width. Following the root mean square of each patch through the seven steps shows the
# norms doing their job. The padding patches (red) are all-zero inputs. They still produce a vector
# (a LayerNorm of zeros returns its bias), but those rows are dropped before the prompt.

# %%
order = ["pixel_values", "vision.ln1", "vision.dense", "vision.ln2", "vision.pos_embed", "vision.pos_norm",
         "vision.rms_norm", "vision.projection"]
rms = np.array([np.sqrt(np.mean(steps[s][0] ** 2, axis=-1)) for s in order])  # [8 steps, 70 patches]
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.plot(rms[:, :n], color="0.5", lw=0.7)
ax.plot(rms[:, n:], color="r", lw=1.5)
ax.set_xticks(range(len(order)), ["pixels"] + [f"{i}. {s.split('.')[1]}" for i, s in enumerate(order[1:], 1)],
              rotation=20)
ax.set(ylabel="root mean square of the vector", title="Each patch through the seven steps (grey: real, red: padding)")
plt.show()

# %% [markdown]
# ## Into the prompt
#
# The projected rows replace the `<|image|>` placeholders of the prompt, in order, with the padding
# rows dropped first. Text tokens are looked up in the embedding table and multiplied by sqrt(D). Soft
# tokens are written *after* that scaling and are not scaled. `Model.embed` does all of this. Here is
# a five-token "question" after the picture:

# %%
question = [11, 12, 13, 14, 15]  # arbitrary ids: the tiny vocabulary has no words
ids = np.array([[cfg.bos_token_id, cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id] + question])
trace = {}
embeds = model.embed(ids, pixel_values=pixel_values, image_position_ids=positions,
                     trace=lambda name, a: trace.setdefault(name, a.copy()))  # [1, T, D]
at = ids[0] == cfg.image_token_id
assert np.array_equal(embeds[0, at], soft[0, :n])  # the soft tokens, unscaled, padding dropped
fig, ax = plt.subplots(figsize=(9, 3))
ax.imshow(embeds[0].T, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
ax.set(title=f"inputs_embeds [T={ids.shape[1]}, D={cfg.hidden_size}]: text, <|image>, {n} soft tokens, <image|>, text",
       xlabel="token", ylabel="hidden dimension")
plt.show()
root_mean_square = lambda a: np.sqrt(np.mean(a**2))
print(f"RMS of text rows {root_mean_square(embeds[0, ~at]):.2f}, "
      f"of soft-token rows {root_mean_square(embeds[0, at]):.2f}")

# %% [markdown]
# **Takeaway:** the whole vision front end is three LayerNorms, one Dense, one position lookup and
# one RMSNorm + Linear, about 50 M parameters for a 12 B model. Because each patch is embedded on its
# own, the image tokens only learn about each other inside the decoder. That is why the decoder lets
# the tokens of one image attend to each other in both directions (notebook 4).
