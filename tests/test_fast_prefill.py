"""fast/prefill.py: a prompt of one sequence with the tokens along the columns must give ref's numbers
within float32 rounding, kernel by kernel and as a whole model, and whatever it does not cover must fall
back to ref's layer code.

Tolerance: 1e-5 relative to the largest magnitude, as tests/test_fast.py (its kernels sum the norms'
squares and the products in another order than ref, nothing else differs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

import fast  # noqa: E402
import ref  # noqa: E402
from fast import cpu, prefill  # noqa: E402
from ref.config import tiny_hf_dict  # noqa: E402
from ref.decoder import REF  # noqa: E402
from ref.layers import apply_rope, rms_norm, rope_cos_sin  # noqa: E402
from ref.model import Model  # noqa: E402
from ref.safetensors_io import Bf16, f32_to_bf16  # noqa: E402
from ref.tiny import random_tensors, write_checkpoint  # noqa: E402

from helpers import attention_case, attention_strategies, needs_mkl  # noqa: E402

SETTINGS = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-5


def close(a, b, tol=TOL, scale=None):
    """|a - b| <= tol times the largest |b| (or `scale`: that of the array b was cut from)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max() / max(np.abs(b).max() if scale is None else scale, 1e-30))
    assert err <= tol, f"relative error {err:.2e}"


def _norm_weight(rng, n, kind):
    """-> (the weight as ref takes it, as the kernels take it): None (ones), float32, or bf16."""
    if kind is None:
        return None, np.ones(n, np.float32)
    w = rng.normal(1.0, 0.5, n).astype(np.float32)
    if kind == "bf16":
        b = Bf16(f32_to_bf16(w))
        return b, b.bits
    return w, w


@SETTINGS
@given(n=st.integers(1, 70), t=st.integers(1, 40), kind=st.sampled_from([None, "f32", "bf16"]),
       seed=st.integers(0, 999))
def test_column_norm_is_refs_rms_norm_transposed(n, t, kind, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, (t, n)).astype(np.float32)
    w_ref, w = _norm_weight(rng, n, kind)
    out = np.empty((n, t), np.float32)
    prefill.norm_t(np.ascontiguousarray(x.T), w, np.float32(1e-6), out)
    close(out.T, rms_norm(x, w_ref, 1e-6))


@SETTINGS
@given(heads=st.integers(1, 4), half=st.integers(1, 12), t=st.integers(1, 30), kind=st.sampled_from(["f32", "bf16"]),
       partial=st.booleans(), seed=st.integers(0, 999))
def test_head_norm_and_rope_on_columns_are_refs(heads, half, t, kind, partial, seed):
    """Each head's norm, then RoPE (pairs (i, i + dh/2); with `partial`, frequencies of zero past a quarter,
    as the proportional RoPE of global layers leaves dimensions unrotated), and the norm alone (v's)."""
    rng = np.random.default_rng(seed)
    dh = 2 * half
    x = rng.normal(0, 2, (1, t, heads, dh)).astype(np.float32)
    w_ref, w = _norm_weight(rng, dh, kind)
    inv_freq = (1.0 / 10000 ** (np.arange(half) / half)).astype(np.float32)
    if partial:
        inv_freq[max(1, half // 4):] = 0
    cos, sin = rope_cos_sin(rng.integers(0, 500, (1, t)), inv_freq)
    xT = np.ascontiguousarray(x[0].reshape(t, heads * dh).T)
    cosT, sinT = np.ascontiguousarray(cos[0].T), np.ascontiguousarray(sin[0].T)
    out = np.empty_like(xT)
    prefill.head_norm_rope_t(xT, w, dh, cosT, sinT, np.float32(1e-6), True, out)
    close(out.T.reshape(1, t, heads, dh), apply_rope(rms_norm(x, w_ref, 1e-6), cos, sin))
    prefill.head_norm_rope_t(xT, w, dh, cosT, sinT, np.float32(1e-6), False, out)
    close(out.T.reshape(1, t, heads, dh), rms_norm(x, w_ref, 1e-6))


@SETTINGS
@given(d=st.integers(1, 70), t=st.integers(1, 30), kind=st.sampled_from(["f32", "bf16"]),
       scalar=st.sampled_from([1.0, 0.37, 0.005]), seed=st.integers(0, 999))
def test_residual_on_columns_is_refs_steps_3_to_5(d, t, kind, scalar, seed):
    """x <- (x + rms_norm(a) w) * scalar, then h <- rms_norm(x) w_next: ref.decoder's residual steps and the
    norm that follows them."""
    rng = np.random.default_rng(seed)
    x, a = (rng.normal(0, s, (t, d)).astype(np.float32) for s in (5, 1))
    (w_ref, w), (wn_ref, wn) = _norm_weight(rng, d, kind), _norm_weight(rng, d, kind)
    want_x = (x + rms_norm(a, w_ref, 1e-6)) * np.float32(scalar)
    xT, h = np.ascontiguousarray(x.T), np.empty((d, t), np.float32)
    prefill.residual_t(xT, np.ascontiguousarray(a.T), w, np.float32(1e-6), np.float32(scalar), wn, h)
    close(xT.T, want_x)
    close(h.T, rms_norm(want_x, wn_ref, 1e-6))


ATTENTION = [pytest.param("tiles", id="tiles"), pytest.param("heads", id="heads-mkl", marks=needs_mkl()),
             pytest.param("heads-split", id="heads-mkl-split", marks=needs_mkl())]


@pytest.mark.parametrize("way", ATTENTION)
@SETTINGS
@given(**attention_strategies())
def test_attention_on_columns_matches_ref_for_every_mask(way, t, past, heads, dh, window, kind, bidir, pad, tile,
                                                         key_tile, seed):
    """Both implementations (numpy's batched tiles; whole heads in compiled code with MKL, on this thread or,
    `-split`, per core), tiles small enough that every path runs: several query and key tiles, the online
    softmax across them, key tiles skipped, queries (left padding) and whole tiles that see no key."""
    q, k, v, spec = attention_case(1, t, past, heads, dh, window, kind, bidir, pad, seed)
    H = heads[0]
    qT = np.ascontiguousarray(q[0].reshape(t, H * dh).T)
    maskT = np.ascontiguousarray(spec.dense()[0].T)
    attend = prefill.attention_tiles_t if way == "tiles" else prefill.attention_heads_t
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefill, "CREW_ATTENTION_WORK", 0 if way == "heads-split" else 1 << 62)
        got = attend(qT, k[0], v[0], maskT, tile=tile, key_tile=key_tile)
    close(got.T.reshape(1, t, H, dh), REF.attention(q, k, v, spec))


@SETTINGS
@given(s=st.integers(1, 30), t=st.integers(1, 30), tile=st.integers(1, 9), p=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       seed=st.integers(0, 999))
def test_seen_keys_spans_each_query_tiles_visible_keys(s, t, tile, p, seed):
    """_seen_keys on random masks (empty ones included): each tile's range is from its first to past its
    last visible key, (0, 0) where it sees none, and `blind` says whether some query sees nothing."""
    mask = np.random.default_rng(seed).random((s, t)) < p
    lo, hi, blind = prefill._seen_keys(mask, tile)
    for i in range(-(-t // tile)):
        rows = np.flatnonzero(mask[:, i * tile:(i + 1) * tile].any(axis=1))
        assert (lo[i], hi[i]) == ((rows[0], rows[-1] + 1) if rows.size else (0, 0))
    assert blind == (not mask.any(axis=0).all())


@pytest.mark.parametrize("library, way", [("openblas", "attention_tiles_t"),
                                          pytest.param("mkl", "attention_heads_t", marks=needs_mkl())])
def test_attention_runs_where_the_products_run(monkeypatch, library, way):
    """attention_t takes whole heads per core with MKL (the prefill's products in MKL), numpy's batched
    tiles with OpenBLAS."""
    monkeypatch.setattr(cpu, "BLAS", [library])
    ran = []
    for name in ("attention_tiles_t", "attention_heads_t"):
        monkeypatch.setattr(prefill, name, lambda *a, name=name: ran.append(name))
    prefill.attention_t(np.ones((4, 3), np.float32), np.ones((3, 1, 4), np.float32), np.ones((3, 1, 4), np.float32),
                        np.ones((3, 3), bool))
    assert ran == [way]


@needs_mkl()
def test_heads_split_over_the_cores_from_enough_work(monkeypatch):
    """attention_heads_t hands its heads to every core from CREW_ATTENTION_WORK query-key pairs x heads x
    head dim (one query of 8 heads of 16 over 32 keys: 4096), and runs them on this thread below it; the
    same numbers either way."""
    rng = np.random.default_rng(3)
    qT, k, v = (rng.normal(size=s).astype(np.float32) for s in ((8 * 16, 1), (32, 2, 16), (32, 2, 16)))
    mask = np.ones((32, 1), bool)
    split = []
    real = cpu.on_every_core
    monkeypatch.setattr(cpu, "on_every_core", lambda rows, work: (split.append(rows), real(rows, work))[1])
    outs = []
    for limit, splits in ((4097, []), (4096, [8])):
        monkeypatch.setattr(prefill, "CREW_ATTENTION_WORK", limit)
        split.clear()
        outs.append(prefill.attention_heads_t(qT, k, v, mask))
        assert split == splits
    np.testing.assert_array_equal(outs[0], outs[1])


def test_heads_need_mkl(monkeypatch):
    """Without MKL, attention_heads_t says so (it would call a function at address 0)."""
    monkeypatch.setattr(prefill.mkl, "LIB", None)
    with pytest.raises(RuntimeError, match="MKL is not installed"):
        prefill.attention_heads_t(np.ones((4, 3), np.float32), np.ones((3, 1, 4), np.float32),
                                  np.ones((3, 1, 4), np.float32), np.ones((3, 3), bool))


def test_softmax_on_columns_takes_the_max_of_the_visible_scores_only():
    """A masked score larger than every visible one must not set the max (it would underflow the visible
    exps to zero), a masked +inf (-inf + inf = NaN with the additive mask) must come out 0 and not reach
    the max or the sum, and a column that sees nothing keeps its running state."""
    p = np.float32([[[1.0, 0.0], [500.0, -3.0], [2.0, 5.0], [np.inf, 7.0]]])  # [1 head, 4 keys, 2 queries]
    mask = np.array([[True, False], [False, False], [True, False], [False, False]])  # query 1 sees nothing
    m, den = np.full((1, 2), -np.inf, np.float32), np.zeros((1, 2), np.float32)
    scale = np.empty((1, 2), np.float32)
    prefill.softmax_t(p, prefill.mask_bias(mask), 0, 0, m, den, scale)
    assert m[0, 0] == 2.0 and m[0, 1] == -np.inf and den[0, 1] == 0 and scale[0, 1] == 1
    np.testing.assert_allclose(p[0, :, 0], [np.exp(-1.0), 0.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(den[0, 0], 1 + np.exp(-1.0), rtol=1e-6)
    assert not p[0, :, 1].any()


def test_mask_bias_is_zero_where_seen_and_minus_infinity_elsewhere():
    mask = np.array([[True, False, True], [False, False, True]])
    bias = prefill.mask_bias(mask)
    assert bias.dtype == np.float32 and bias.shape == mask.shape
    np.testing.assert_array_equal(bias, np.where(mask, 0.0, -np.inf))


configs = st.fixed_dictionaries({
    "num_hidden_layers": st.integers(2, 6), "sliding_window": st.integers(2, 40),
    "attention_k_eq_v": st.booleans(), "num_key_value_heads": st.sampled_from([1, 2, 4]),
    "head_dim": st.sampled_from([8, 12, 16]), "use_bidirectional_attention": st.sampled_from(["vision", None]),
    "num_kv_shared_layers": st.integers(0, 2), "attention_bias": st.booleans(),
})


def _count_passes(monkeypatch) -> list:
    calls = []
    real = prefill.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill, "forward", counted)
    return calls


def _hidden(model, run, chunks, key_ok, block, cache: bool) -> list[np.ndarray]:
    """The prompt ids [1, T] in `chunks` (lengths) through `run`, one after another on one cache (or each
    alone without one) -> each chunk's final-normed hidden states."""
    T = key_ok.shape[1]
    c = model.new_cache(1, T) if cache else None
    positions = np.where(key_ok, np.cumsum(key_ok, axis=1) - 1, 0)
    out, lo = [], 0
    for n in chunks:
        sl = slice(lo, lo + n)
        ids = np.arange(3, 3 + n)[None] * 7 % 397 + 3
        out.append(run(model.embed(ids), positions[:, sl], key_ok[:, sl], block[:, sl], c))
        lo += n
    return out


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(c=configs, first=st.integers(9, 60), second=st.integers(0, 30), pad=st.integers(0, 3), image=st.booleans(),
       bf16=st.booleans(), seed=st.integers(0, 999))
def test_prompts_run_token_minor_and_match_ref(tmp_path_factory, monkeypatch, c, first, second, pad, image, bf16,
                                               seed):
    """A prompt, then (on the same cache) a second prompt of 9+ tokens, which attends over the first's held
    keys, sliding windows that the prompts outgrow, KV-shared and k_eq_v layers, attention biases, left
    padding and a vision block: the token-minor pass runs, and its hidden states are ref's within 1e-5
    (and fast's layer code's). With `last_only` (the last layer on the last token alone) the last token's
    states are ref's too, and so are the second prompt's, which read the keys and values the first left
    in the cache."""
    n = c["num_hidden_layers"]  # a full layer early, so that a shared last (full) layer has a source
    c["layer_types"] = (["sliding_attention", "full_attention"] + ["sliding_attention"] * (n - 3) +
                        ["full_attention"])[:n]
    c["num_kv_shared_layers"] = min(c["num_kv_shared_layers"], n - 2)
    hf = tiny_hf_dict(**c)
    d = write_checkpoint(tmp_path_factory.mktemp("m"), hf, random_tensors(hf, seed, "BF16" if bf16 else "F32"))
    model, peer = fast.load_model(d), ref.load_model(d)
    chunks = [first] + ([second] if second > cpu.GEMV_MAX_M else [])
    T = sum(chunks)
    key_ok = np.arange(T)[None] >= pad
    block = np.full((1, T), -1)
    if image:
        block[0, pad + 2:pad + 6] = 0
    calls = _count_passes(monkeypatch)
    for cache in (True, False):
        del calls[:]
        got = _hidden(model, model.run_decoder, chunks if cache else [T], key_ok, block, cache)
        assert len(calls) == (len(chunks) if cache else 1), "the token-minor pass did not run"
        plain = _hidden(model, lambda *a: Model.run_decoder(model, *a), chunks if cache else [T], key_ok, block,
                        cache)
        want = _hidden(peer, peer.run_decoder, chunks if cache else [T], key_ok, block, cache)
        for g, p, w in zip(got, plain, want):
            close(g, w)
            close(g, p)
        del calls[:]
        last = _hidden(model, lambda *a: model.run_decoder(*a, last_only=True), chunks if cache else [T], key_ok,
                       block, cache)
        assert len(calls) == (len(chunks) if cache else 1), "the token-minor pass did not run"
        for g, w in zip(last, want):  # relative to all the prompt's states, as above: one row's max can be
            close(g, w[:, -1:], scale=np.abs(w).max())  # half of theirs (seen: the same 2.9e-5 off both ways)


def _checkpoint(tmp_path, **overrides):
    hf = tiny_hf_dict(**overrides)
    return write_checkpoint(tmp_path / "m", hf, random_tensors(hf, 5, "BF16"))


def test_generate_after_a_token_minor_prompt_gives_refs_tokens(tmp_path, monkeypatch):
    """generate's prompt runs the token-minor pass with the last layer on the last token alone (it asks
    run_decoder for the last token's states only), and the tokens are ref's."""
    d = _checkpoint(tmp_path)
    calls = _count_passes(monkeypatch)
    outputs, real = [], prefill.forward

    def shapes(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out.shape)
        return out

    monkeypatch.setattr(prefill, "forward", shapes)
    ids = (np.arange(40)[None] * 13) % 390 + 3
    got = fast.load_model(d).generate(ids, max_new_tokens=8)
    assert calls == [(1, 40, 64)] and outputs == [(1, 1, 64)]
    np.testing.assert_array_equal(got, ref.load_model(d).generate(ids, max_new_tokens=8))


@pytest.mark.parametrize("case", ["batch", "short", "long", "trace", "off"])
def test_what_the_token_minor_pass_does_not_cover_takes_the_layer_code(tmp_path, monkeypatch, case):
    """Two sequences, up to GEMV_MAX_M tokens, more than TOKEN_MINOR_MAX_M, a traced run, or the pass
    switched off: ref's layer code with fast's kernels, and ref's logits."""
    d = _checkpoint(tmp_path, max_position_embeddings=2048)
    model, peer = fast.load_model(d), ref.load_model(d)
    model.token_minor = case != "off"
    T = {"short": cpu.GEMV_MAX_M, "long": cpu.TOKEN_MINOR_MAX_M + 1}.get(case, 20)
    ids = (np.arange(T)[None] * 11) % 390 + 3
    if case == "batch":
        ids = np.concatenate([ids, ids[:, ::-1]])
    calls = _count_passes(monkeypatch)
    trace = (lambda name, a: None) if case == "trace" else None
    close(model.forward(ids, trace=trace), peer.forward(ids))
    assert not calls
