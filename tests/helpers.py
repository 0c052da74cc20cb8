"""Test support: prompt builders and synthetic media in HF's layouts."""

from __future__ import annotations

import numpy as np

from ref.tiny import random_tensors, write_checkpoint  # noqa: F401  (re-exported for tests)


def needs_mkl():
    """A pytest mark: skip, saying why, where MKL (fast/mkl.py) is not installed. CI installs it (the fast
    extra, on x86-64 Linux), so there these tests run."""
    import pytest

    from fast import mkl

    return pytest.mark.skipif(mkl.LIB is None, reason="MKL is not installed here (the fast extra installs it on "
                                                        "x86-64 Linux: pip install mkl)")


def multimodal_prompt(cfg, rng, n_text=5, image_tokens=(), video_frames=(), audio_tokens=()):
    """A token sequence with text, image blocks, video frames and audio, and its mm_token_type_ids.

    image_tokens: soft-token count per image; video_frames: soft-token count per frame (one video);
    audio_tokens: frame count per clip. Text ids avoid the special range.
    """
    def text(n):
        return list(rng.integers(3, min(cfg.vocab_size, cfg.image_token_id) - 1, n))

    ids, types = [cfg.bos_token_id] + text(n_text), [0] * (n_text + 1)

    def add(seq, kind):
        ids.extend(seq)
        types.extend(kind)

    for n in image_tokens:
        add([cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id], [0] + [1] * n + [0])
        add(text(2), [0, 0])
    for n in audio_tokens:
        add([cfg.boa_token_id] + [cfg.audio_token_id] * n + [cfg.eoa_token_id], [0] + [3] * n + [0])
        add(text(2), [0, 0])
    for n in video_frames:
        add(text(2), [0, 0])  # stands for the "mm:ss" timestamp
        add([cfg.boi_token_id] + [cfg.video_token_id] * n + [cfg.eoi_token_id], [0] + [2] * n + [0])
    add(text(n_text), [0] * n_text)
    return np.array([ids], np.int64), np.array([types], np.int64)


def synthetic_patches(rng, n_images, budget, grids, patch_dim=6912):
    """Random pixel patches in HF's layout: [N, budget, patch_dim] and (x, y) positions with -1 padding.
    grids: (rows, cols) of real patches per image; patch_dim: a merged patch's values (48 * 48 * 3 for
    the real model's 16 px patches merged 3 x 3)."""
    pv = np.zeros((n_images, budget, patch_dim), np.float32)
    pos = np.full((n_images, budget, 2), -1, np.int64)
    for i, (r, c) in enumerate(grids):
        n = r * c
        pv[i, :n] = rng.uniform(0, 1, (n, patch_dim))
        y, x = np.divmod(np.arange(n), c)
        pos[i, :n, 0], pos[i, :n, 1] = x, y
    return pv, pos


def count_step_calls(monkeypatch, name: str = "_layers") -> list:
    """Wrap fast.step's function `name` (default `_layers`, the compiled decoding step; `_choose`, the greedy
    loop's choice) so each call appends to the returned list: a test can assert that it ran, and how often."""
    from fast import step

    calls, real = [], getattr(step, name)

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(step, name, counted)
    return calls


# What the attention tests draw: any query/key counts, GQA groupings, odd head dims, windows, mask kinds and
# bidirectional modes, left padding, and query/key tile sizes small enough that every tiling path runs.
def attention_strategies():
    from hypothesis import strategies as st

    from ref.config import FULL, SLIDING

    return dict(t=st.integers(1, 20), past=st.integers(0, 20), heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3)]),
                dh=st.sampled_from([1, 3, 8, 17]), window=st.integers(1, 12), kind=st.sampled_from([FULL, SLIDING]),
                bidir=st.sampled_from(["vision", None, "all"]), pad=st.integers(0, 4), tile=st.integers(1, 7),
                key_tile=st.integers(1, 9), seed=st.integers(0, 999))


def attention_case(batch, t, past, heads, dh, window, kind, bidir, pad, seed):
    """Random q [batch, t, H, Dh], k, v [batch, past + t, K, Dh] and the MaskSpec of t queries after `past`
    keys: the last sequence left-padded by `pad` (query rows that see nothing at all), a vision block
    straddling queries and past keys."""
    from ref.config import from_hf_dict, tiny_hf_dict
    from ref.masks import MaskSpec

    rng = np.random.default_rng(seed)
    H, K = heads
    S = past + t
    cfg = from_hf_dict(tiny_hf_dict(sliding_window=window, use_bidirectional_attention=bidir))
    q = rng.normal(size=(batch, t, H, dh)).astype(np.float32)
    k = rng.normal(size=(batch, S, K, dh)).astype(np.float32)
    v = rng.normal(size=(batch, S, K, dh)).astype(np.float32)
    key_ok = np.ones((batch, S), bool)
    key_ok[-1, :pad] = False
    block = np.full((batch, S), -1)
    block[:, S // 3: S // 3 + 4] = 0
    return q, k, v, MaskSpec(cfg, kind, np.arange(past, S), np.arange(S), key_ok, block[:, past:], block)


def cached_steps(model, run, ids, key_ok, block, new_ids, split=None, each=None):
    """Prefill ids [1, T] (key_ok, block [1, T]) through `run` (a run_decoder), in two chunks at `split` if
    given, then one cached step per id of new_ids -> (`each` of the hidden states [1, 1, D] after the prompt
    (its last position) and after every step, the cache). `each` runs right after each call (default: keep
    the array), for outputs that the next step overwrites."""
    each = each or (lambda h: h)
    T = ids.shape[1]
    cache = model.new_cache(1, T + len(new_ids))
    positions = np.where(key_ok, np.cumsum(key_ok, axis=1) - 1, 0)
    for part in [slice(0, T)] if split is None else [slice(0, split), slice(split, T)]:
        h = run(model.embed(ids[:, part]), positions[:, part], key_ok[:, part], block[:, part], cache)
    out = [each(h[:, -1:])]
    for j, t in enumerate(new_ids):
        out.append(each(run(model.embed(np.array([[t]])), positions[:, -1:] + 1 + j, np.ones((1, 1), bool),
                            np.full((1, 1), -1), cache)))
    return out, cache
