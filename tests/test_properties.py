"""Property tests: the identities the pipeline must satisfy for any input (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ref
from ref.audio import FRAME, num_frames
from ref.config import FULL, SLIDING, SOFT_TOKEN_BUDGETS, Rope, tiny_hf_dict
from ref.image import budget_size, merge_patches, patchify
from ref.layers import apply_rope, rope_cos_sin, rope_inv_freq
from ref.tiny import random_tensors, write_checkpoint

SETTINGS = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_merge_of_16px_patches_is_a_direct_48px_patchify(rows, cols, seed):
    img = np.random.default_rng(seed).random((48 * rows, 48 * cols, 3), dtype=np.float32)
    merged = merge_patches(patchify(img, 16), 3 * rows, 3 * cols)
    np.testing.assert_array_equal(merged, patchify(img, 48))
    # and a 48 px patch is the HWC pixels of its square, in raster order
    r, c = rows - 1, cols - 1
    np.testing.assert_array_equal(merged[r * cols + c], img[48 * r:48 * r + 48, 48 * c:48 * c + 48].reshape(-1))


@SETTINGS
@given(h=st.integers(1, 400), w=st.integers(1, 400), budget=st.sampled_from(SOFT_TOKEN_BUDGETS))
def test_positions_are_a_raster_of_the_merged_grid(h, w, budget):
    image = np.zeros((h, w, 3), np.uint8)
    _, pos, n = ref.preprocess_images([image], max_soft_tokens=budget)
    H, W = budget_size(h, w, budget)
    rows, cols = H // 48, W // 48
    assert n[0] == rows * cols <= budget
    i = np.arange(n[0])
    np.testing.assert_array_equal(pos[0, : n[0]], np.stack([i % cols, i // cols], axis=-1))
    assert (pos[0, n[0]:] == -1).all()


@SETTINGS
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), budget=st.sampled_from(SOFT_TOKEN_BUDGETS))
def test_budget_size_fills_but_never_exceeds_the_budget(h, w, budget):
    H, W = budget_size(h, w, budget)
    assert H % 48 == 0 and W % 48 == 0 and H > 0 and W > 0
    assert (H // 48) * (W // 48) <= budget
    if H > 48 and W > 48:  # away from the rounds-to-zero edge, one more row or column would not fit
        f = math.sqrt(budget * 48 * 48 / (h * w))
        assert H == int(f * h // 48) * 48 and W == int(f * w // 48) * 48


@SETTINGS
@given(n=st.integers(0, 100_000))
def test_audio_frame_count_is_ceil_n_over_640(n):
    wave = np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
    feats, mask = ref.preprocess_audio([wave, np.zeros(1, np.float32)])
    assert mask[0].sum() == num_frames(n) == -(-n // FRAME)
    assert feats.shape == (2, max(num_frames(n), 1), FRAME)
    np.testing.assert_array_equal(feats[0].reshape(-1)[:n], wave)
    assert not feats[0].reshape(-1)[n:].any()


@SETTINGS
@given(m=st.integers(0, 1500), n=st.integers(0, 1500), shift=st.integers(-500, 1500),
       proportional=st.booleans(), seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, proportional, seed):
    assume(min(m, n) + shift >= 0)
    dh = 32
    rope = Rope(1e6, 0.25) if proportional else Rope(1e4)
    inv = rope_inv_freq(rope, dh)
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(1, 1, 1, dh)).astype(np.float32), rng.normal(size=(1, 1, 1, dh)).astype(np.float32)

    def score(a, b):
        ca, sa = rope_cos_sin(np.array([[a]]), inv)
        cb, sb = rope_cos_sin(np.array([[b]]), inv)
        return float((apply_rope(q, ca, sa) * apply_rope(k, cb, sb)).sum())

    scale = float(np.linalg.norm(q) * np.linalg.norm(k))
    # float32 angles at positions up to 3000 carry ~3e-4 rad of rounding: allow 1e-3 of |q||k|.
    assert abs(score(m, n) - score(m + shift, n + shift)) <= 1e-3 * scale


@pytest.mark.parametrize("theta, dh, fraction", [(1e4, 256, 1.0), (1e6, 512, 0.25), (1e4, 128, 1.0),
                                                (1e6, 256, 1.0), (1e4, 96, 1.0), (100.0, 10, 1.0)])
def test_rope_frequencies_are_correctly_rounded(theta, dh, fraction):
    """Each frequency is 1 / theta^(2i/dh), the power correctly rounded to float32 before the division
    (as HF computes it, whose float32 pow rounds correctly in all but a few entries), here worked out
    with 40 significant digits. A power off by one unit in the last place moves a RoPE angle by
    position x 6e-8 rad: numpy's float32 power was off in 9-50 of these entries, and ref's logits for
    a 900-token prompt sat 3x further from float64 than HF's float32 ones."""
    from decimal import Decimal, localcontext

    inv = rope_inv_freq(Rope(theta, fraction), dh)
    rotated = int(fraction * dh // 2)
    with localcontext() as ctx:
        ctx.prec = 40
        for i in range(rotated):
            e = np.float32(2 * i) / np.float32(dh)  # the exponent as float32 computes it
            power = np.float32(float(Decimal(float(np.float32(theta))) ** Decimal(float(e))))
            assert inv[i] == np.float32(1.0) / power, (i, inv[i], np.float32(1.0) / power)
    assert not inv[rotated:].any()


def test_proportional_rope_leaves_the_unrotated_dimensions_alone():
    inv = rope_inv_freq(Rope(1e6, 0.25), 512)
    assert (inv[:64] > 0).all() and (inv[64:] == 0).all()  # 0.25 * 512 / 2 = 64 rotated pairs
    x = np.random.default_rng(0).normal(size=(1, 1, 1, 512)).astype(np.float32)
    c, s = rope_cos_sin(np.array([[777]]), inv)
    y = apply_rope(x, c, s)
    keep = np.r_[64:256, 320:512]  # pairs (i, i + 256) with i >= 64
    np.testing.assert_array_equal(y[..., keep], x[..., keep])
    assert not np.allclose(y[..., :64], x[..., :64])


configs = st.fixed_dictionaries({
    "num_hidden_layers": st.integers(2, 7),
    "sliding_window": st.integers(2, 9),
    "attention_k_eq_v": st.booleans(),
    "num_key_value_heads": st.sampled_from([1, 2, 4]),
    "use_bidirectional_attention": st.sampled_from(["vision", None]),
    "final_logit_softcapping": st.sampled_from([None, 30.0]),
    "shared": st.integers(0, 2),
    "double": st.booleans(),
})



def test_a_mask_spec_builds_its_dense_mask_once():
    """Every layer of a kind shares one MaskSpec per forward pass, so its [B, T, S] mask is built on the
    first call and the same array is returned after; it equals layer_mask computed afresh."""
    from ref.config import from_hf_dict
    from ref.masks import MaskSpec, layer_mask

    cfg = from_hf_dict(tiny_hf_dict(sliding_window=3))
    key_ok = np.array([[False, True, True, True, True, True]])
    block = np.array([[-1, -1, 0, 0, 0, -1]])
    args = (cfg, SLIDING, np.arange(2, 6), np.arange(6), key_ok, block[:, 2:], block)
    spec = MaskSpec(*args)
    first = spec.dense()
    assert spec.dense() is first
    np.testing.assert_array_equal(first, layer_mask(*args))

@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(c=configs, prompt_len=st.integers(2, 24), image=st.booleans(), pad=st.integers(0, 5), seed=st.integers(0, 999))
def test_cached_generation_equals_recomputation(tmp_path_factory, c, prompt_len, image, pad, seed):
    n = c.pop("num_hidden_layers")
    shared, double = c.pop("shared"), c.pop("double")
    types = [SLIDING] * n
    types[-1] = FULL
    if shared:  # a full and a sliding producer before the shared tail
        types = [SLIDING, FULL] + types
        n += 2
    hf = tiny_hf_dict(num_hidden_layers=n, layer_types=types, num_kv_shared_layers=min(shared, n - 2),
                      use_double_wide_mlp=double, **c)
    model = ref.load_model(write_checkpoint(tmp_path_factory.mktemp("m"), hf, random_tensors(hf, seed)))
    cfg = model.config
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(3, 400, prompt_len))
    media = {}
    if image:
        ids[1:1] = [cfg.boi_token_id] + [cfg.image_token_id] * 6 + [cfg.eoi_token_id]
        pv = np.zeros((1, 70, 6912), np.float32)
        pv[0, :6] = rng.random((6, 6912))
        pos = np.full((1, 70, 2), -1)
        pos[0, :6] = np.stack([np.arange(6) % 3, np.arange(6) // 3], -1)
        media = dict(pixel_values=pv, image_position_ids=pos)
    row = [0] * pad + ids
    batch = np.array([row, [0] * len(row)])
    batch[1, : len(ids)] = ids[::-1] if not image else ids  # a second, unpadded row
    mask = np.ones_like(batch)
    mask[0, :pad] = 0
    types_ = np.isin(batch, [cfg.image_token_id]).astype(int)
    if image:
        media = dict(pixel_values=np.concatenate([pv, pv]), image_position_ids=np.concatenate([pos, pos]))
    kw = dict(attention_mask=mask, mm_token_type_ids=types_, max_new_tokens=6, **media)
    cached = model.generate(batch, **kw)
    recomputed = model.generate(batch, use_cache=False, **kw)
    if not np.array_equal(cached, recomputed):
        # Only a genuine near-tie may split them: find the first differing step and check its margin.
        step = int(np.argmax((cached != recomputed).any(axis=0)))
        seq = np.concatenate([batch, recomputed[:, :step]], axis=1)
        positions = np.where(np.concatenate([mask, np.ones((2, step), int)], 1).astype(bool),
                             np.cumsum(np.concatenate([mask, np.ones((2, step), int)], 1), 1) - 1, 0)
        logits = model.forward(seq, attention_mask=np.concatenate([mask, np.ones((2, step), int)], 1),
                               mm_token_type_ids=np.pad(types_, ((0, 0), (0, step))), position_ids=positions,
                               **media)[:, -1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() < 1e-4, "cache and recomputation disagree on a clear choice"


def test_media_token_ids_follow_the_vocabulary():
    """A test config's seven media ids lie at the top of its vocabulary, whatever its size, clear of the
    text ids tests draw from its bottom; the tiny vocabulary keeps golden/'s ids 500-506 (golden/README)."""
    from ref.config import MEDIA_TOKENS, media_token_ids

    assert media_token_ids(512) == dict(zip(MEDIA_TOKENS, range(500, 507)))
    for vocab in (64, 512, 4096, 32768):
        cfg = ref.from_hf_dict(tiny_hf_dict(vocab_size=vocab))
        ids = [cfg.image_token_id, cfg.audio_token_id, cfg.video_token_id, cfg.boi_token_id, cfg.eoi_token_id,
               cfg.boa_token_id, cfg.eoa_token_id]
        assert len(set(ids)) == 7 and vocab - 12 <= min(ids) and max(ids) < vocab


@SETTINGS
@given(rows=st.integers(1, 20), n_in=st.integers(1, 70), n_out=st.integers(1, 300),
       stored=st.sampled_from(["bf16", "float16", "float32"]), seed=st.integers(0, 2**16))
def test_linear_and_head_equal_the_whole_float32_product(rows, n_in, n_out, stored, seed):
    """linear and lm_head give x @ to_f32(w)^T (+ b) for any stored dtype and any number of rows of x,
    whether they upcast the matrix whole or a block of rows at a time (decoding): within float32
    rounding of the float64 product of the same values."""
    from ref.decoder import lm_head
    from ref.layers import linear
    from ref.safetensors_io import Bf16, f32_to_bf16, to_f32

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, rows, n_in)).astype(np.float32)
    w32, b = rng.standard_normal((n_out, n_in)).astype(np.float32), rng.standard_normal(n_out).astype(np.float32)
    w = {"bf16": Bf16(f32_to_bf16(w32)), "float16": w32.astype(np.float16), "float32": w32}[stored]
    exact = x.astype(np.float64) @ to_f32(w).astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(to_f32(w)).astype(np.float64).T  # bounds the rounding
    got = linear(x, w, b)
    assert got.shape == (1, rows, n_out) and got.dtype == np.float32
    assert (np.abs(got - (exact + b)) <= 1e-6 * (scale + np.abs(b)) + 1e-30).all()
    logits = lm_head(x, w, None, chunk=64)
    assert (np.abs(logits - exact) <= 1e-6 * scale + 1e-30).all()


def test_decoding_upcasts_a_bf16_matrix_in_blocks():
    """One token through linear or lm_head (decoding) never holds its bf16 matrix in float32 as a whole:
    numpy's allocations (traced by tracemalloc) peak below a tenth of the float32 matrix's 16 MB. A whole
    upcast writes it to memory and reads it back (the real model's decode ~25 s a token on 2 cores)."""
    import tracemalloc

    from ref.decoder import lm_head
    from ref.layers import linear
    from ref.safetensors_io import Bf16, f32_to_bf16

    rng = np.random.default_rng(0)
    w = Bf16(f32_to_bf16(rng.standard_normal((4096, 1024)).astype(np.float32)))
    x = rng.standard_normal((1, 1, 1024)).astype(np.float32)
    for product in (lambda: linear(x, w), lambda: lm_head(x, w, 30.0)):
        tracemalloc.start()
        product()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4096 * 1024 * 4 // 10, peak
