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
# # 1. Image to patches
#
# Gemma 4 12B Unified has no vision tower. There is no ViT, no SigLIP and no convolution. A picture is
# cut into square tiles of raw pixels, and each tile becomes one "soft token" that the decoder reads the
# way it reads a word. This notebook follows one photograph through the image processor
# (`ref/image.py`, which mirrors HF's `Gemma4UnifiedImageProcessor`). The steps keep the numbering of
# that file:
#
# 1. RGB, then an aspect-preserving resize to the largest size whose sides are multiples of 48 and that fits the budget
# 2. scale to [0, 1], with no mean/std normalisation
# 3. patchify into 16 px patches, in raster order, HWC inside a patch
# 4. merge each 3x3 group of 16 px patches into one 48 px patch. This equals a direct 48 px patchify
# 5. the (x, y) position of every 48 px patch
# 6. pad to the budget with zero patches at position (-1, -1)
#
# No weights are involved yet: everything here is exact integer and array bookkeeping.

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display
from matplotlib import cbook
from PIL import Image

from ref.config import SOFT_TOKEN_BUDGETS
from ref.image import KERNEL, PATCH, budget_size, merge_patches, patch_positions, patchify, preprocess_images, resize

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})
SIDE = PATCH * KERNEL  # 48 px: one model patch, one soft token

# %% [markdown]
# ## The soft-token budget
#
# An image costs a fixed number of soft tokens. You choose the budget from five values, and 280 is
# the default. Each soft token is a 48x48 patch, which is 3x3 patches of 16 px "before pooling". So a
# budget of `S` tokens covers `9 S` small patches and `9 S x 16^2` pixels. The model's documentation
# prints this table. Below we compute it from `ref`'s constants and check it against the documented
# numbers.

# %%
documented = {70: (630, "~161K"), 140: (1260, "~323K"), 280: (2520, "~645K"), 560: (5040, "~1.3M"),
              1120: (10080, "~2.6M")}


def approx(pixels):  # the documentation's rounding: 161K, 1.3M
    return f"~{pixels / 1e3:.0f}K" if pixels < 1e6 else f"~{pixels / 1e6:.1f}M"


rows = ["| soft tokens | patches (before pooling) | image area | a square picture becomes | tokens used |",
        "|---:|---:|---:|---:|---:|"]
for budget in SOFT_TOKEN_BUDGETS:
    patches16 = budget * KERNEL**2
    area = patches16 * PATCH**2
    assert (patches16, approx(area)) == documented[budget]  # the documentation's table, reproduced
    h, w = budget_size(1000, 1000, budget)
    rows.append(f"| {budget} | {patches16:,} | {area:,} px ({approx(area)}) | {h} x {w} | {h * w // SIDE**2} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# The last column already shows something. A square picture never uses its whole budget, because both
# sides must be whole multiples of 48 px. At 70 tokens the largest square that fits is 8 x 8 = 64 patches
# (9 x 9 = 81 would be too many). How much of the budget a picture uses depends on its aspect ratio:

# %%
ratios = np.geomspace(1 / 20, 20, 400)  # width / height
fig, ax = plt.subplots(figsize=(8, 3))
for budget in SOFT_TOKEN_BUDGETS:
    used = []
    for r in ratios:
        h, w = budget_size(1000, int(round(1000 * r)), budget)
        used.append(h * w / SIDE**2 / budget)
    ax.plot(ratios, used, label=f"{budget}")
ax.set(xscale="log", xlabel="aspect ratio (width / height)", ylabel="share of the budget used",
       title="Soft tokens used / budget, by aspect ratio", ylim=(0.5, 1.02))
ax.legend(title="budget", ncol=5, fontsize=8)
plt.show()

# %% [markdown]
# ## Step 1: aspect-preserving resize to multiples of 48
#
# `budget_size` mirrors HF's `get_aspect_ratio_preserving_size`. It scales the picture so that its area
# equals the budget's area, then rounds each side *down* to a multiple of 48. If a very thin picture
# rounds one side to 0, that side becomes one patch. The resize can go up as well as down: a small
# picture is enlarged to fill the budget. The resize itself is bicubic with antialiasing. `ref` uses
# Pillow and HF uses torchvision, and the two agree within 2/255.
#
# Our picture is the portrait of Grace Hopper that ships with matplotlib (600 x 512 px).

# %%
photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))  # [600, 512, 3] uint8
H0, W0 = photo.shape[:2]
for budget in SOFT_TOKEN_BUDGETS:
    h, w = budget_size(H0, W0, budget)
    print(f"budget {budget:4}: {H0}x{W0} -> {h}x{w} px = {h // SIDE} x {w // SIDE} = {h * w // SIDE**2} soft tokens")

# %%
BUDGET = 70  # the smallest budget keeps the pictures readable
h, w = budget_size(H0, W0, BUDGET)
small = resize(photo, h, w)  # [h, w, 3] uint8
fig, axes = plt.subplots(1, 2, figsize=(9, 5), gridspec_kw={"width_ratios": [W0, w]})
axes[0].imshow(photo)
axes[0].set_title(f"original {H0} x {W0}")
axes[1].imshow(small)
axes[1].set_title(f"resized for {BUDGET} tokens: {h} x {w}")
for ax in axes:
    ax.set_xlim(0, W0)
    ax.set_ylim(H0, 0)  # same pixel scale on both panels
plt.show()

# %% [markdown]
# ## Step 2: scale to [0, 1]
#
# The pixels are multiplied by 1/255 and that is all. There is no ImageNet mean/std, because the first
# thing the embedder does is a LayerNorm over each patch (notebook 2 shows why that makes the
# normalisation unnecessary).
#
# ## Step 3: the 16 px grid
#
# The resized picture is cut into 16 x 16 px patches. Thin lines mark them below, and thick lines mark
# the 48 px model patches they are merged into.

# %%
pixels = small.astype(np.float32) * np.float32(1 / 255)  # [h, w, 3] in [0, 1], as ref.image does it
fig, ax = plt.subplots(figsize=(6, 7.5))
ax.imshow(pixels)
for x in range(0, w + 1, PATCH):
    ax.axvline(x - 0.5, color="w", lw=2 if x % SIDE == 0 else 0.4)
for y in range(0, h + 1, PATCH):
    ax.axhline(y - 0.5, color="w", lw=2 if y % SIDE == 0 else 0.4)
ax.set_title(f"{h // PATCH} x {w // PATCH} patches of 16 px -> {h // SIDE} x {w // SIDE} model patches of 48 px")
plt.show()

# %% [markdown]
# ## Step 4: the 3x3 merge, which is a 48 px patchify
#
# `patchify(pixels, 16)` lists the small patches in raster order (left to right, then top to bottom).
# Each one is flattened in HWC order: pixel (0, 0)'s R, G, B, then pixel (0, 1)'s, and so on.
# `merge_patches` regroups every 3x3 block of small patches into one vector of 48 x 48 x 3 = 6,912
# values, again in HWC order over the 48 x 48 pixels. The result is exactly what you get by cutting
# 48 px patches directly, and the equality below is exact:

# %%
small16 = patchify(pixels, PATCH)  # [(h/16) * (w/16), 768]
rows16, cols16 = h // PATCH, w // PATCH
merged = merge_patches(small16, rows16, cols16)  # [(h/48) * (w/48), 6912]
direct = patchify(pixels, SIDE)  # [(h/48) * (w/48), 6912]
print("16 px patches:", small16.shape, " merged:", merged.shape, " direct 48 px:", direct.shape)
print("merge(patchify16) == patchify48 exactly:", np.array_equal(merged, direct))

# %% [markdown]
# The same thing as a picture. Here are the nine small patches of one model patch, the merged 48 px
# patch, and the start of its 6,912-value vector. The vector runs R, G, B of the first pixel, then of
# the second pixel, along the top row of the patch, so the three colour channels interleave.

# %%
px, py = 3, 2  # the model patch at column 3, row 2
rows48, cols48 = h // SIDE, w // SIDE
fig = plt.figure(figsize=(11, 3.2))
grid = fig.add_gridspec(3, 8)
for a in range(KERNEL):
    for b in range(KERNEL):
        ax = fig.add_subplot(grid[a, b])
        ax.imshow(small16[(KERNEL * py + a) * cols16 + KERNEL * px + b].reshape(PATCH, PATCH, 3))
        ax.set_xticks([]), ax.set_yticks([])
fig.axes[1].set_title("nine 16 px patches")
ax = fig.add_subplot(grid[:, 3:5])
ax.imshow(merged[py * cols48 + px].reshape(SIDE, SIDE, 3))
ax.set_title(f"model patch (x={px}, y={py})")
ax.set_xticks([]), ax.set_yticks([])
ax = fig.add_subplot(grid[:, 5:])
v = merged[py * cols48 + px][: 3 * 16]
for c, color in enumerate("rgb"):
    ax.plot(np.arange(c, len(v), 3), v[c::3], "o-", color=color, ms=3, lw=1)
ax.set(title="first 48 of 6,912 values (HWC)", xlabel="index in the patch vector", ylabel="value")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Steps 5 and 6: positions and padding
#
# Every model patch keeps its (x, y) = (column, row) on the 48 px grid, in the same raster order. The
# embedder adds a learned x embedding and a learned y embedding to each patch (notebook 2), so this is
# the only place where the picture's 2D layout survives. Finally the list is padded to the budget with
# all-zero patches at position (-1, -1). Padding lets images of different shapes share one
# `[N, S, 6912]` array. Padding patches are dropped before the soft tokens enter the prompt, so the
# prompt holds exactly `n` image tokens.
#
# `preprocess_images` runs all six steps and returns what HF's processor returns.

# %%
pixel_values, image_position_ids, n = preprocess_images([photo], max_soft_tokens=BUDGET)
print("pixel_values", pixel_values.shape, pixel_values.dtype, "| image_position_ids", image_position_ids.shape,
      "| real patches", n)
assert np.array_equal(pixel_values[0, : n[0]], direct)
assert np.array_equal(image_position_ids[0, : n[0]], patch_positions(rows48, cols48))
print("first positions:", image_position_ids[0, :4].tolist(), "... last:", image_position_ids[0, -3:].tolist())

# %%
fig, ax = plt.subplots(figsize=(6, 7.5))
ax.imshow(pixels)
for i, (x, y) in enumerate(image_position_ids[0, : n[0]]):
    ax.add_patch(plt.Rectangle((x * SIDE - 0.5, y * SIDE - 0.5), SIDE, SIDE, fill=False, ec="w", lw=1))
    ax.text(x * SIDE + SIDE / 2, y * SIDE + SIDE / 2, f"{i}\n({x},{y})", ha="center", va="center", fontsize=7,
            color="w", bbox=dict(fc="k", alpha=0.4, lw=0, pad=1))
ax.set_title("soft token index and its (x, y)")
plt.show()

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 2]})
axes[0].imshow(pixel_values[0], aspect="auto", cmap="gray", interpolation="antialiased")
axes[0].axhline(n[0] - 0.5, color="r", lw=1)
axes[0].set(title=f"pixel_values[0]: {BUDGET} rows of 6,912 values (rows {n[0]}.. are padding)",
            xlabel="value index (HWC)", ylabel="soft token")
axes[1].plot(image_position_ids[0, :, 0], ".-", label="x (column)")
axes[1].plot(image_position_ids[0, :, 1], ".-", label="y (row)")
axes[1].axvspan(n[0] - 0.5, BUDGET - 0.5, color="0.85", label="padding: (-1, -1)")
axes[1].set(title="image_position_ids[0]", xlabel="soft token")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **What the model receives:** `pixel_values` `[N, S, 6912]` in [0, 1], `image_position_ids` `[N, S, 2]`,
# and the count `n` of real patches. The prompt gets `<|image>`, then `n` copies of `<|image|>`, then
# `<image|>`. Notebook 2 turns each 6,912-value row into a vector of the decoder's width.
