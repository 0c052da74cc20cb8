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
# # 6. Checking another implementation
#
# Porting this model to another framework (vLLM, llama.cpp, MLX, your own) goes wrong in a handful of
# known ways: x and y swapped in the position lookup, a LayerNorm eps of 1e-6, a dropped `layer_scalar`,
# the wrong masks... When only the final logits are compared, a bug like that shows up as "the answer is
# a bit worse", and the search for it takes days. The golden cases in `golden/` store **every
# intermediate stage** of `ref` on tiny checkpoints. `ref.verify` compares a port stage by stage, in
# pipeline order, and names the first stage that is wrong. It often also names the bug.
#
# In this notebook we check three implementations against one case:
#
# 1. HF transformers 5.23, the peer implementation (`--impl transformers`)
# 2. a deliberately broken port, namely `ref` with x and y swapped in the position embedding, written as a dump of tensors (`--tensors`)
# 3. HF transformers' plain `forward`, whose attention masks differ from SPEC.md's (`--impl transformers --hf-plain-masks`)

# %%
import importlib.util
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display
from safetensors.numpy import save_file

import ref.embedders
from ref import load_model, verify
from ref.golden import load_case, run_ref

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformers, without ipywidgets

# %% [markdown]
# ## A golden case
#
# Each case is a directory holding a tiny HF-format checkpoint (random weights), the prompt and its raw
# media, the stages, and a manifest that says which bugs the case is built to catch. We take
# `wide_image`: one 96 x 1680 noise picture, which is 2 rows x 35 columns of 48 px patches and a
# 70-token image block, nine times longer than the tiny model's sliding window of 8.

# %%
case_dir = verify.resolve_case("wide_image")
manifest, inputs, golden, golden_plain = load_case(case_dir)
print(manifest["about"])
display(Markdown("| bug this case catches | stages where it shows |\n|---|---|\n"
                 + "\n".join(f"| {c['bug']} | `{c['stages']}` |" for c in manifest["catches"])))
print(f"{len(golden)} stages:", ", ".join(golden))

# %%
image = inputs["image.0"]  # [96, 1680, 3] uint8
fig, ax = plt.subplots(figsize=(14, 1.6))
ax.imshow(image)
for x in range(0, image.shape[1] + 1, 48):
    ax.axvline(x - 0.5, color="w", lw=0.6)
ax.axhline(47.5, color="w", lw=0.6)
rows, cols = image.shape[0] // 48, image.shape[1] // 48
ax.set(title=f"wide_image: image.0 {list(image.shape)}, {rows} x {cols} patches of 48 px", yticks=[])
plt.show()

# %% [markdown]
# ## 1. HF transformers
#
# `--impl transformers` loads the case's checkpoint with `Gemma4UnifiedForConditionalGeneration`, hooks
# every module that corresponds to a stage, builds SPEC.md's masks with `create_masks_for_generate(...,
# mm_token_type_ids=...)`, and generates greedy tokens by full recomputation. HF's image processor needs
# torchvision, so `pixel_values` and `image_position_ids` are *fed* from the golden files rather than
# compared. Tolerances are relative (`max |got - golden| / max |golden|`): 1e-5 for the embedders and
# 1e-4 in the decoder, and integers and masks must match exactly.
#
# (torch and transformers come from the `interop` extra. Without them this cell checks `ref` itself, and
# says so.)

# %%
have_hf = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None
impl = "transformers" if have_hf else "ref"
got_hf, fed = verify.run_impl(impl, case_dir, manifest, inputs, golden)
verdict_hf = verify.check(case_dir, got_hf, "spec", fed)
print(verify.render(verdict_hf, f"--impl {impl}"))

# %% [markdown]
# ## 2. A broken port, as a dump
#
# Your own port does not run inside Python's `ref`. It writes its stages to a safetensors file under
# the names in `golden/README.md`, and `python -m ref.verify CASE --tensors DUMP` reads that file. To
# make such a dump with a known bug, we wrap `ref`: for the duration of one run, the position lookup gets
# (y, x) instead of (x, y). This is the bug SPEC.md lists as "x/y swapped in the factorized position
# embedding". Nothing crashes and every shape is right, so only a comparison of values finds it.

# %%
@contextmanager
def x_and_y_swapped():
    """Within the block, ref's vision embedder looks up pos_embedding[y, 0] + pos_embedding[x, 1]."""
    original = ref.embedders.position_embedding
    ref.embedders.position_embedding = lambda positions, table: original(positions[..., ::-1], table)
    try:
        yield
    finally:
        ref.embedders.position_embedding = original


with x_and_y_swapped():
    broken = run_ref(load_model(case_dir / "checkpoint"), inputs, manifest["inputs"]["new_tokens"])
with tempfile.TemporaryDirectory() as tmp:
    dump = Path(tmp) / "broken_port.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in broken.items()}, str(dump))
    status = verify.main(["wide_image", "--tensors", str(dump)])  # the same as the command line
print("exit status:", status)

# %% [markdown]
# The table shows that everything up to `vision.ln2` passes, and `vision.pos_embed` is the first stage
# that fails. Verify tried the known wrong answers on that stage and found the one that matches:
# *x and y look swapped*. Every stage after it fails too, which is why the *first* failure is the one to
# read. Drawn on the patch grid, the error is zero exactly where x = y, the two patches (0, 0) and
# (1, 1), because there swapping changes nothing:

# %%
err = np.abs(broken["vision.pos_embed"] - golden["vision.pos_embed"]).max(-1)[0]  # [70] per patch
pos = golden["image_position_ids"][0]  # [70, 2] (x, y)
grid = np.full((pos[:, 1].max() + 1, pos[:, 0].max() + 1), np.nan)
grid[pos[:, 1], pos[:, 0]] = err
fig, ax = plt.subplots(figsize=(14, 1.8))
im = ax.imshow(grid, cmap="magma")
ax.set(title="broken port: max |vision.pos_embed - golden| per patch, on the 2 x 35 grid", xlabel="x", ylabel="y")
fig.colorbar(im, ax=ax, fraction=0.02)
plt.show()

# %% [markdown]
# ## 3. HF's plain forward: the other mask semantics
#
# HF's plain `forward`, and its `generate` with the default cache, ORs the image block onto *every* layer
# type, after the window. So image tokens see each other on global layers too, and on sliding layers
# they see their whole block however far back it reaches. SPEC.md (and Google's code) does not. Ports
# split along this line. A case with an image block therefore carries a second set of stages,
# `stages_plain.safetensors`, and verify reports which semantics an implementation follows. By
# default (`--masks spec`) a port with the plain masks fails at `mask.full`. With `--masks plain` or
# `--masks any` it passes.

# %%
if have_hf:
    got_plain, fed_plain = verify.run_impl("transformers", case_dir, manifest, inputs, golden, hf_plain=True)
    verdict_plain = verify.check(case_dir, got_plain, "spec", fed_plain)
    print(verify.render(verdict_plain, "--impl transformers (HF plain-forward masks)"))
    print("\nwith --masks any:", "PASS" if verify.check(case_dir, got_plain, "any", fed_plain).ok else "FAIL")
else:
    got_plain = None
    print("transformers is not installed: skipped (pip install '.[interop]')")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4.3))
axes[0].imshow(golden["mask.sliding"][0])
axes[0].set_title("golden mask.sliding (SPEC.md)")
axes[1].imshow(golden_plain["mask.sliding"][0])
axes[1].set_title("mask.sliding under HF's plain forward")
axes[2].imshow(golden_plain["mask.full"][0].astype(int) - golden["mask.full"][0].astype(int), cmap="Reds")
axes[2].set_title("mask.full: what the plain forward adds")
for ax in axes:
    ax.set(xlabel="key", ylabel="query")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The three runs side by side
#
# The relative error of every float stage, in pipeline order. HF transformers stays 10 to 100 times
# under the tolerance everywhere: that is float32 rounding. The broken port is exact (0) up to
# `vision.ln2`, then jumps to an error of order 1 at `vision.pos_embed`, five orders of magnitude above
# the tolerance. The plain-mask run lies on top of HF's up to the masks (compared exactly, not
# plotted), and its decoder layers differ from the first one on. No real bug hides in float32 rounding:
# each one gives an error of 1e-3 or far more.

# %%
runs = {f"--impl {impl}": verdict_hf.spec, "broken port (x/y swapped)": verify.check(case_dir, broken).spec}
if got_plain is not None:
    runs["HF plain-forward masks"] = verdict_plain.spec
stages = [r.stage for r in verdict_hf.spec.rows if r.rel_err is not None]
fig, ax = plt.subplots(figsize=(12, 4))
for (label, report), marker in zip(runs.items(), "os^"):
    by_stage = {r.stage: r for r in report.rows}
    ax.semilogy([max(by_stage[s].rel_err, 1e-12) if s in by_stage else np.nan for s in stages], marker + "-",
                ms=5, lw=1, label=label)
ax.semilogy([by_stage[s].tol for s in stages], "k:", lw=1.5, label="tolerance")
ax.set_xticks(range(len(stages)), stages, rotation=60, ha="right", fontsize=8)
ax.set(ylabel="max |got - golden| / max |golden|", title="wide_image, stage by stage (0 shown as 1e-12)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checking your own port
#
# 1. Run your implementation on a case's `inputs.safetensors` (the prompt ids, `mm_token_type_ids` and the
#    raw media). If your processors are not written yet, feed it the `pixel_values` from `stages.safetensors`.
# 2. Collect `{stage name: array}` for whatever stages you can reach and save them with
#    `safetensors.numpy.save_file`. Stages you leave out are listed as skipped. HF-shaped masks
#    `[B, 1, T, S]`, additive masks and bf16 tensors are accepted.
# 3. Run `python -m ref.verify CASE --tensors DUMP` for every case in `golden/` (`python -m ref.golden list`
#    lists them). The exit status is 0 when everything passes, 1 when a stage fails and 2 when the dump
#    cannot be read.
#
# Each case targets a different family of bugs: `tall_image` (y collapsed, LayerNorm eps),
# `audio_batch` (mel features, padding frames), `k_eq_v_global` (V and proportional RoPE),
# `layer_scalar_extreme`, `folded_eoi_eoa` (`suppress_tokens` and soft-capping), `bf16_checkpoint`
# and others. `ref/verify.py`'s `run_transformers` shows which HF module produces each stage.
