"""fast (Numba CPU) against ref: every kernel on random shapes, then whole models (hypothesis).

Tolerance: 1e-5 relative to the largest magnitude, the same bound as ref against HF; kernels sum in a
different order than BLAS, nothing else differs.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

import numba as nb  # noqa: E402

import fast  # noqa: E402
import ref  # noqa: E402
from fast import cpu, maskrule  # noqa: E402
from ref.config import FULL, SLIDING, from_hf_dict, tiny_hf_dict  # noqa: E402
from ref.decoder import REF, KVCache  # noqa: E402
from ref.masks import MaskSpec, layer_mask  # noqa: E402
from ref.safetensors_io import Bf16, bf16_to_f32, f32_to_bf16  # noqa: E402
from ref.tiny import random_tensors, write_checkpoint  # noqa: E402

from helpers import attention_case, attention_strategies, needs_mkl  # noqa: E402

SETTINGS = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-5


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    assert err <= tol, f"relative error {err:.2e}"


@SETTINGS
@given(m=st.integers(1, 40), n_in=st.integers(1, 300), n_out=st.integers(1, 300), bf16=st.booleans(),
       seed=st.integers(0, 999))
def test_matmul_matches_ref_linear(m, n_in, n_out, bf16, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, n_in)).astype(np.float32)
    w = rng.normal(size=(n_out, n_in)).astype(np.float32)
    w = Bf16(f32_to_bf16(w)) if bf16 else w
    close(cpu.linear(x, w), REF.linear(x, w))


@settings(deadline=None, max_examples=40)
@given(rows=st.integers(1, 41), cols=st.integers(1, 41), seed=st.integers(0, 999))
def test_transpose_is_exact(rows, cols, seed):
    """OpenBLAS's somatcopy and the compiled 8 x 8 tiles (partial tiles on both edges), bit for bit, with
    signed zeros, infinities and NaN among the values."""
    a = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    a.flat[:4] = [-0.0, np.inf, -np.inf, np.nan][: a.size]
    for blas in (True, False):
        got = cpu.transpose(a, blas=blas)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.uint32), a.T.view(np.uint32))


@settings(deadline=None, max_examples=60)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), lo=st.integers(0, 3), offset=st.integers(0, 17),
       seed=st.integers(0, 999))
def test_upcast_rows_is_exact_at_any_alignment(rows, cols, lo, offset, seed):
    """The prefill's upcast, bit for bit (every bf16 pattern: NaN payloads, infinities, subnormals, signed
    zeros) into an output that starts `offset` floats past a cache line: the values before the first
    whole line and after the last one take ordinary stores, the lines between streamed ones. Nothing
    outside the output is written."""
    w = np.random.default_rng(seed).integers(0, 1 << 16, size=(lo + rows + 2, cols)).astype(np.uint16)
    w[lo, :4] = [0x7FC1, 0xFF80, 0x0001, 0x8000][:cols]
    w.flags.writeable = False  # as a checkpoint's memory map
    line = cpu._scratch(rows * cols + offset + 64)  # starts on a cache line
    line[:] = np.nan
    out = line[offset:offset + rows * cols].reshape(rows, cols)
    cpu._upcast_rows(w, lo, lo + rows, out)
    np.testing.assert_array_equal(out.view(np.uint32), w[lo:lo + rows].astype(np.uint32) << 16)
    assert np.isnan(line[:offset]).all() and np.isnan(line[offset + rows * cols:]).all()
    assert cpu._SCRATCH[0].ctypes.data % 64 == 0


def test_numpys_openblas_offers_its_transposing_copy():
    """Where fast finds numpy's OpenBLAS (its thread shutdown), it also finds somatcopy: else every
    token-minor product would fall back to the 3x slower compiled transpose without a word."""
    if cpu._BLAS_SHUTDOWN is not None:
        assert cpu._OMATCOPY is not None


@pytest.mark.parametrize("m", [1, cpu.GEMV_MAX_M, cpu.GEMV_MAX_M + 1, cpu.TOKEN_MINOR_MAX_M,
                               cpu.TOKEN_MINOR_MAX_M + 1])
@pytest.mark.parametrize("block_rows", [None, 3])
def test_matmul_on_each_side_of_its_thresholds(m, block_rows, monkeypatch):
    """GEMV, token-minor product and plain product, with the weights upcast whole or (block_rows) three
    rows at a time into the scratch buffer, leaving a shorter last block."""
    rng = np.random.default_rng(m)
    n_in, n_out = 37, 22
    if block_rows:
        monkeypatch.setattr(cpu, "SCRATCH_FLOATS", block_rows * n_in)
    x = rng.normal(size=(m, n_in)).astype(np.float32)
    w = Bf16(f32_to_bf16(rng.normal(size=(n_out, n_in)).astype(np.float32)))
    close(cpu.matmul(x, w), REF.linear(x, w))
    close(cpu.matmul_t(w, np.ascontiguousarray(x.T)), REF.linear(x, w).T)


@pytest.mark.parametrize("case", ["stacked", "too-big", "a-float-matrix"])
def test_stacked_token_minor_products_are_each_matrixs_product(case, monkeypatch):
    """matmuls_t (q, k, v in one product): each output is its matrix's product (ref's linear, transposed),
    from one BLAS product where every matrix is bf16 and all fit the scratch at once, else one each."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(cpu.GEMV_MAX_M + 5, 37)).astype(np.float32)
    ws = [Bf16(f32_to_bf16(rng.normal(size=(n, 37)).astype(np.float32))) for n in (22, 9, 9)]
    if case == "too-big":
        monkeypatch.setattr(cpu, "SCRATCH_FLOATS", 39 * 37)
    if case == "a-float-matrix":
        ws[1] = rng.normal(size=(9, 37)).astype(np.float32)
    products = []
    real = cpu.f32_product
    monkeypatch.setattr(cpu, "f32_product", lambda a, *rest, **kw: (products.append(a.shape), real(a, *rest, **kw))[1])
    got = cpu.matmuls_t(ws, np.ascontiguousarray(x.T))
    for w, y in zip(ws, got):
        close(y, REF.linear(x, w).T)
    assert products == ([(40, 37)] if case == "stacked" else [(22, 37), (9, 37)] if case == "a-float-matrix"
                        else [(22, 37), (9, 37), (9, 37)])


def test_token_minor_products_are_used_between_the_gemv_and_the_plain_product(monkeypatch):
    """Which rows counts take `matmul_t` (a speed choice, measured; the tests above check each path's
    numbers): none at GEMV_MAX_M or above TOKEN_MINOR_MAX_M, one in between."""
    calls = []
    real = cpu.matmul_t
    monkeypatch.setattr(cpu, "matmul_t", lambda w, xT: (calls.append(xT.shape[1]), real(w, xT))[1])
    w = Bf16(f32_to_bf16(np.ones((5, 7), np.float32)))
    for m in (cpu.GEMV_MAX_M, cpu.GEMV_MAX_M + 1, cpu.TOKEN_MINOR_MAX_M, cpu.TOKEN_MINOR_MAX_M + 1):
        cpu.matmul(np.ones((m, 7), np.float32), w)
    assert calls == [cpu.GEMV_MAX_M + 1, cpu.TOKEN_MINOR_MAX_M]


def _weight(rng, rows, cols, kind):
    """A random [rows, cols] matrix stored as `kind`: bf16 read-only (as a checkpoint's memory map), bf16
    writable, or float32."""
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    if kind == "f32":
        return w
    bits = f32_to_bf16(w)
    bits.flags.writeable = kind == "bf16-writable"
    return Bf16(bits)


@SETTINGS
@given(m=st.integers(1, 12), n_in=st.integers(1, 200), outs=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       kinds=st.lists(st.sampled_from(["bf16", "bf16-writable", "f32"]), min_size=3, max_size=3),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_linears_match_ref(m, n_in, outs, kinds, bias, seed):
    """The projections of one input (q, k, v): matrices of different heights side by side in one GEMV
    pass (m <= GEMV_MAX_M, all bf16), or one product each; writable and read-only bits mixed; biases."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, m, n_in)).astype(np.float32)
    ws = [_weight(rng, n, n_in, kind) for n, kind in zip(outs, kinds)]
    bs = [rng.normal(size=n).astype(np.float32) if bias else None for n in outs]
    got, want = cpu.linears(x, ws, bs), REF.linears(x, ws, bs)
    assert len(got) == len(want) == len(ws)
    for g, w in zip(got, want):
        close(g, w)


def test_linears_of_bf16_matrices_stream_in_one_pass(monkeypatch):
    """q, k and v for one token: one GEMV launch over all three, each output in its own columns."""
    rng = np.random.default_rng(5)
    ws = [_weight(rng, n, 48, "bf16") for n in (32, 8, 16)]
    x = rng.normal(size=(1, 1, 48)).astype(np.float32)
    calls = []
    gemv = cpu._gemv_bf16
    monkeypatch.setattr(cpu, "_gemv_bf16", lambda x2, bits, out: (calls.append(len(bits)), gemv(x2, bits, out)))
    got = cpu.linears(x, ws, [None] * 3)
    assert calls == [3]
    for g, w in zip(got, REF.linears(x, ws, [None] * 3)):
        close(g, w)


@SETTINGS
@given(n_in=st.integers(1, 90), outs=st.lists(st.integers(1, 40), min_size=1, max_size=3), m=st.integers(1, 3),
       shifts=st.lists(st.booleans(), min_size=3, max_size=3), seed=st.integers(0, 999))
def test_gemv_reads_bf16_pairs_where_it_can(n_in, outs, m, shifts, seed):
    """One row of x and an even width: the GEMV reads each weight row as 32-bit words of two bf16 (x's even
    and odd elements split once per call); an odd width, more rows of x, or a matrix that starts 2 bytes
    past a 4-byte boundary (as a tensor can in a checkpoint's memory map) take the 16-bit path. Each
    against the float64 product of the exact float32 values of the bits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, n_in)).astype(np.float32)
    ws = []
    for n, shift in zip(outs, shifts):
        raw = f32_to_bf16(rng.normal(size=n * n_in + 1).astype(np.float32))
        w = raw[int(shift):int(shift) + n * n_in].reshape(n, n_in)
        w.flags.writeable = False
        assert (w.ctypes.data % 4 != 0) == shift
        ws.append(w)
    first, col, pairs = cpu._gemv_layout(x, tuple(ws), len(ws))
    half = n_in // 2 if m == 1 and n_in % 2 == 0 else 0
    assert pairs.shape[0] == 2 and (pairs.shape[1] >= half if half else pairs.shape[1] == 0)
    np.testing.assert_array_equal(pairs[:, :half], x[0, :2 * half].reshape(half, 2).T)
    if half:  # x's even elements start X_PHASE bytes past a 32-byte boundary, its odd ones ODD_SHIFT further
        even, odd = pairs[0].ctypes.data, pairs[1].ctypes.data
        assert even % 32 == cpu.X_PHASE and (odd - even) % 4096 == cpu.ODD_SHIFT
    out = np.full((m, sum(outs)), np.nan, np.float32)
    cpu._gemv_bf16(x, tuple(ws), out)
    want = np.concatenate([x.astype(np.float64) @ bf16_to_f32(w).T for w in ws], 1)
    close(out, want)


@pytest.mark.parametrize("out_rows", [3, 22, 37])
@pytest.mark.parametrize("n_in", [15360, 8201])
def test_gemv_with_a_row_of_x_wider_than_l1(out_rows, n_in):
    """One token through a matrix whose row of x (60 KB at the 12B model's down_proj width, 15360) no longer
    fits in L1: the pairs path with cpu.STREAMS rows per load of x and the rows a block has left over (with
    cpu.ROWS = 32, 3 rows: none shared; 22: five per stream and two alone; 37: a full block, then one per
    stream and one alone), and an odd width's 16-bit path."""
    rng = np.random.default_rng(out_rows)
    x = rng.normal(size=(1, n_in)).astype(np.float32)
    w = Bf16(f32_to_bf16(rng.normal(size=(out_rows, n_in)).astype(np.float32)))
    close(cpu.linear(x, w), REF.linear(x, w))


@SETTINGS
@given(rows=st.integers(1, 30), n=st.integers(1, 200), scale=st.sampled_from([None, "f32", "bf16"]),
       seed=st.integers(0, 999))
def test_rms_norm_matches_ref(rows, n, scale, seed):
    """No weight, a float32 weight, and a bf16 weight (its bits upcast inside the kernel)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, (rows, n)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, n).astype(np.float32) if scale else None
    w = Bf16(f32_to_bf16(w)) if scale == "bf16" else w
    close(cpu.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))


@SETTINGS
@given(t=st.integers(1, 12), d=st.integers(1, 40), inter=st.integers(1, 70), up_bf16=st.booleans(),
       seed=st.integers(0, 999))
def test_mlp_matches_ref(t, d, inter, up_bf16, seed):
    """GEMV (2t <= GEMV_MAX_M rows) and token-minor products, bf16 and f32 weights mixed in one MLP."""
    _check_mlp(np.random.default_rng(seed), 2, t, d, inter, up_bf16)


def _check_mlp(rng, batch, t, d, inter, up_bf16):
    """fast's MLP against ref's on random h [batch, t, d], bf16 gate and down, up bf16 or float32."""
    up = rng.normal(size=(inter, d)).astype(np.float32)
    p = ref.weights.Params(gate_proj=ref.weights.Params(weight=Bf16(f32_to_bf16(rng.normal(size=(inter, d))))),
                           up_proj=ref.weights.Params(weight=Bf16(f32_to_bf16(up)) if up_bf16 else up),
                           down_proj=ref.weights.Params(weight=Bf16(f32_to_bf16(rng.normal(size=(d, inter))))))
    h = rng.normal(size=(batch, t, d)).astype(np.float32)
    close(cpu.mlp(h, p), REF.mlp(h, p))


@pytest.mark.parametrize("rows", [cpu.GEMV_MAX_M, cpu.GEMV_MAX_M + 1, cpu.TOKEN_MINOR_MAX_M,
                                  cpu.TOKEN_MINOR_MAX_M + 1])
@pytest.mark.parametrize("up_bf16", [True, False])
def test_mlp_on_each_side_of_its_thresholds(rows, up_bf16):
    """GEMV, token-minor and plain MLP; a float32 up_proj beside bf16 gate and down."""
    _check_mlp(np.random.default_rng(rows), 1, rows, 13, 29, up_bf16)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.sampled_from([1, 2, 5, 6, 34])),
       seed=st.integers(0, 999))
def test_rope_equals_ref_bit_for_bit(shape, seed):
    """RoPE keeps ref's operation order and no fused multiply-add: equal, not close."""
    from ref.layers import apply_rope

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, shape).astype(np.float32)
    angles = rng.uniform(-50, 50, shape[:2] + shape[3:]).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    np.testing.assert_array_equal(cpu.apply_rope(x, cos, sin), apply_rope(x, cos, sin))


def _tanh32(a: np.ndarray) -> np.ndarray:
    from numba import njit

    @njit(error_model="numpy")
    def apply(a, out):
        for i in range(a.size):
            out[i] = cpu.tanh32(a[i])

    out = np.empty_like(a)
    apply(a, out)
    return out


def test_tanh32_is_within_7_ulps_of_tanh_relative():
    """Bound derived from its parts, u = 2^-24 (6.0e-8). t = -m / (2 + m) with m = e^x - 1, x = -2|a|,
    moves by 2 / (2 + m) times m's relative error, and 2 + m and the division round by u each. Near 0
    (k = 0, m in [-0.29, 0]): m = p r with r = x exactly, Horner's p to ~1.2u, the product u: 2.2u, times
    <= 1.17, plus 2u: 4.6u. k = -1 (m in [-0.71, -0.29]): r rounds by u |r|, so e^r - 1 to ~3.4u, which
    2^k (e^r - 1) <= 0.21 carries into m >= 0.29 as 2.4u, plus m's own rounding u: 3.4u, times <= 1.55,
    plus 2u: 7.3u = 4.4e-7. k <= -2: m's error <= 1.6u, times <= 2, plus 2u: 5.1u. So relative to
    |tanh| <= 4.4e-7 everywhere, and absolute <= 5.1u = 3.0e-7 (near 0 and at the bend |tanh| < 0.5
    shrinks the other two). Checked against float64 on a grid through every regime (0 and a geometric run
    down to 1e-30, the bend, saturation) with both signs and the extremes (measured: 2.8u, 1.5e-7)."""
    tiny = np.geomspace(1e-30, 1.0, 200_001).astype(np.float32)
    a = np.concatenate([np.linspace(-50, 50, 2_000_001, dtype=np.float32), tiny, -tiny,
                        np.float32([0.0, -0.0, 1e-7, 3.4e38, -3.4e38, np.inf, -np.inf])])
    got = _tanh32(a)
    want = np.tanh(a.astype(np.float64))
    assert np.all(np.abs(got - want) <= 4.4e-7 * np.abs(want))
    assert np.abs(got - want).max() <= 3.0e-7
    np.testing.assert_array_equal(got[a >= 43.5], 1.0)
    np.testing.assert_array_equal(got[a <= -43.5], -1.0)
    assert np.all(got * np.sign(a) >= 0)  # never the wrong sign
    assert np.isnan(_tanh32(np.float32([np.nan]))[0])


@SETTINGS
@given(n=st.integers(1, 300), scale=st.sampled_from([1e-6, 0.1, 3.0, 30.0, 1e4]), cap=st.sampled_from([3.0, 30.0]),
       seed=st.integers(0, 999))
def test_softcap_is_refs_within_what_tanh_allows(n, scale, cap, seed):
    """fast's soft-capping (in place, by tanh32) against ref's cap * tanh(x / cap) with numpy's tanh: both
    round x / cap the same way; the tanhs differ by at most ours, 4.4e-7 relative (test above), plus
    numpy's, allowed 2 ulp (measured 1.1e-7 relative); the product by cap rounds by u on each side: all
    in all 4.4e-7 + 1.2e-7 + 1.2e-7 = 6.8e-7 of |ref|. Infinities go to +-cap, NaN stays NaN."""
    from ref.layers import softcap

    x = np.random.default_rng(seed).normal(0, scale, n).astype(np.float32)
    x[: min(3, n)] = [np.inf, -np.inf, np.nan][: min(3, n)]
    want = softcap(x, cap)
    got = cpu.softcap(x.copy(), cap)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.all(np.abs(got[ok] - want[ok]) <= 6.8e-7 * np.abs(want[ok]))
    same = x.copy()
    assert cpu.softcap(same, None) is same


@SETTINGS
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 70)), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 999))
def test_gelu_is_refs_within_the_derived_bound(shape, scale, seed):
    """ref: 0.5 g (1 + tanh(y)) u; ours: g sigmoid(2y) u, the same function, as g u (1 or E) / (1 + E) with
    E = e^(-2|y|). Off the exact sigmoid (each term absolute, sigmoid <= 1): E's error, 7.7e-8 relative
    (exp32's test), moves 1 / (1 + E) by <= 0.5 x 7.7e-8 and E / (1 + E) (<= 0.5) by <= 0.5 x 7.7e-8: 0.39e-7;
    the rounding of 1 + E, 0.6e-7; the division's, 0.6e-7; our y a few ulp from ref's (fused multiply-adds),
    which moves sigmoid(2y) = (1 + tanh y) / 2 by |y| (1 - tanh^2 y) / 2 x 3 ulp <= 0.5 x 0.45 x 1.8e-7 = 0.4e-7.
    ref off the exact: 0.5 x (numpy's tanh, allowed 2 ulp of 1 = 1.2e-7, measured 6e-8, + the rounding of
    1 + tanh, 1.2e-7) = 1.2e-7. So |ours - ref| <= |g u| 3.2e-7 + 4 ulp of |ref| (the products' roundings;
    measured 2.6e-7 |g u| over 2M values at scale 3; tanh32's form reached 3.3e-7). Non-finite g: ref's
    infinity or NaN."""
    from ref.layers import gelu_tanh

    rng = np.random.default_rng(seed)
    g, u = rng.normal(0, scale, (2,) + shape).astype(np.float32)
    g.flat[: min(5, g.size)] = [np.inf, -np.inf, np.nan, 0.0, -0.0][: min(5, g.size)]
    with np.errstate(invalid="ignore"):  # -inf (1 + tanh) = -inf * 0
        want = gelu_tanh(g) * u
    got = g.copy()
    cpu.gelu_tanh_mul(got, u)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    bound = np.abs(g * u)[finite] * 3.2e-7 + 4 * np.spacing(np.abs(want[finite]))
    assert np.all(np.abs(got[finite] - want[finite]) <= bound)


@pytest.mark.parametrize("threads", [2, 3])
def test_gelu_splits_large_arrays_over_threads_with_the_same_numbers(monkeypatch, threads):
    """From SPLIT_MIN values the rows are split over the threads (`on_every_core`): every row exactly once,
    in as many parts as threads, and the values those of one pass over the whole array."""
    rng = np.random.default_rng(threads)
    rows = cpu.SPLIT_MIN // 64 + 7  # just above the threshold, not a multiple of the parts
    g, u = rng.normal(0, 3, (2, rows, 64)).astype(np.float32)
    want = g.copy()
    cpu._gelu_mul(want, u)
    real, parts = cpu._gelu_mul, []

    def spy(x, y):
        parts.append(x.shape[0])
        real(x, y)

    monkeypatch.setattr(cpu, "_gelu_mul", spy)
    monkeypatch.setattr(cpu.nb, "get_num_threads", lambda: threads)  # the helpers a new crew starts
    monkeypatch.setattr(cpu, "thread_count", lambda: threads)  # the parts
    got = g.copy()
    cpu.gelu_tanh_mul(got, u)
    np.testing.assert_array_equal(got, want)
    assert sorted(parts) == sorted(rows * (i + 1) // threads - rows * i // threads for i in range(threads))
    parts.clear()
    small = g[: rows // 2].copy()  # below the threshold: one pass on this thread
    cpu.gelu_tanh_mul(small, u[: rows // 2])
    assert parts == [rows // 2]


@SETTINGS
@given(group=st.sampled_from([4, 5, 8]), kv=st.sampled_from([1, 2]), dh=st.sampled_from([17, 32, 40, 64]),
       t=st.integers(1, 3), past=st.integers(0, 150), window=st.integers(1, 120), kind=st.sampled_from([FULL, SLIDING]),
       pad=st.integers(0, 4), key_tile=st.integers(1, 160), seed=st.integers(0, 999))
def test_decode_attention_in_two_passes_matches_ref(group, kv, dh, t, past, window, kind, pad, key_tile, seed):
    """Where a kv head serves TWO_PASS_GROUP or more query heads, a decode program takes two passes
    (cpu._decode_two_pass). Called directly and through decode_attention: value sums held over VALUE_COLUMNS
    columns and a ragged rest, key blocks of VALUE_KEYS and a partial one, odd counts of visible keys, odd
    groups (one head per pass), chunks that see no key."""
    assert group >= cpu.TWO_PASS_GROUP
    q, k, v, spec = attention_case(2, t, past, (group * kv, kv), dh, window, kind, None, pad, seed)
    want = REF.attention(q, k, v, spec)
    for parallel in (False, True):
        close(cpu.decode_attention(q, k, v, spec, key_tile, parallel), want)
    S, H = k.shape[1], group * kv
    C = -(-S // key_tile)
    parts = (np.empty((2, C, t, H), np.float32), np.empty((2, C, t, H), np.float32),
             np.empty((2, C, t, H, dh), np.float32))
    for pid in range(2 * C):
        cpu._decode_two_pass(q, k, v, np.ascontiguousarray(spec.dense()), key_tile, *parts, pid)
    got = np.empty_like(q)
    cpu._combine(v, *parts, got)
    close(got, want)


@SETTINGS
@given(**attention_strategies())
def test_attention_matches_ref_for_every_mask(t, past, heads, dh, window, kind, bidir, pad, tile, key_tile, seed):
    q, k, v, spec = attention_case(2, t, past, heads, dh, window, kind, bidir, pad, seed)
    want = REF.attention(q, k, v, spec)
    close(cpu.attention(q, k, v, spec), want)
    # the decode kernels with key chunks small enough that chunks are merged (some see no key), on one
    # thread and on several
    for parallel in (False, True):
        close(cpu.decode_attention(q, k, v, spec, key_chunk=key_tile, parallel=parallel), want)
    # the prefill kernel with tiles small enough that every path runs: several query and key tiles,
    # the online softmax across them, key tiles skipped or fully open, whole tiles that see no key
    close(cpu.tiled_attention(q, k, v, spec, tile=tile, key_tile=key_tile), want)


@pytest.mark.parametrize("kernel", ["tiled_attention", "attention_tiles_t",
                                    pytest.param("attention_heads_t", marks=needs_mkl())])
@pytest.mark.parametrize("dh", [cpu.EXACT_SCORES_DH + 1, 512])
@pytest.mark.parametrize("t", [40, 300])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_heads_prefill_scores_are_refs_exact_ones(kernel, dh, t, seed):
    """Heads wider than EXACT_SCORES_DH: every prefill kernel (ref's layout; token-minor in numpy; token-minor
    heads with MKL) sums its scores in float64 as ref does, so on sharp softmaxes (q and k at twice unit
    scale: a score's rounding moves the winner's weight) their outputs are ref's to rounding: measured at
    most 2.3e-7 relative over 80 such draws; with float32 scores at least 1.4e-6."""
    from fast import prefill

    q, k, v, spec = attention_case(1, t, 0, (2, 1), dh, 8, FULL, None, 0, seed)
    q, k = 2 * q, 2 * k
    want = REF.attention(q, k, v, spec)
    if kernel == "tiled_attention":
        got = cpu.tiled_attention(q, k, v, spec)
    else:
        qT, maskT = np.ascontiguousarray(q[0].reshape(t, 2 * dh).T), np.ascontiguousarray(spec.dense()[0].T)
        got = getattr(prefill, kernel)(qT, k[0], v[0], maskT).T.reshape(want.shape)
    close(got, want, tol=7e-7)


@SETTINGS
@given(rows=st.integers(1, 6), keys=st.integers(1, 40), groups=st.sampled_from([1, 2, 3]), seed=st.integers(0, 999))
def test_softmax_tiles_running_max_is_the_max_of_the_visible_scores(rows, keys, groups, seed):
    """The online softmax takes each row's max on integer order keys of the floats: the running max after a
    tile is exactly numpy's max over the visible scores and the previous max (signed zeros, infinities,
    subnormals and rows that see nothing included)."""
    rng = np.random.default_rng(seed)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, 1e-42, -1e-42, 3.4e38, -3.4e38])
    p = rng.normal(0, 30, (2, rows * groups, keys)).astype(np.float32)
    p[:, ::2] = -np.abs(p[:, ::2])  # rows of negative scores only: their floats order against their bits
    pick = rng.random(p.shape) < 0.15
    p[pick] = rng.choice(special, int(pick.sum()))
    mask = rng.random((rows, keys)) < 0.6
    mask[0] = False  # a row that sees nothing
    m0 = rng.choice(np.float32([-np.inf, -np.inf, -100.0, 40.0]), (2, rows * groups)).astype(np.float32)
    m, den, scale = m0.copy(), np.ones((2, rows * groups), np.float32), np.empty((2, rows * groups), np.float32)
    q = p.copy()
    cpu._softmax_tile(q, mask, groups, m, den, scale)
    for h in range(2):
        for r in range(rows * groups):
            seen = p[h, r][mask[r // groups]]
            want = max(m0[h, r], seen.max()) if seen.size else m0[h, r]
            assert m[h, r] == want, (h, r, m[h, r], want)


@nb.njit(cache=False)
def _visible_all(mode, q_idx, k_idx, window, q_block, k_block, key_ok):
    """maskrule.visible compiled (as fast.step and the GPU kernels use it), over every pair -> [B, T, S]."""
    out = np.zeros((key_ok.shape[0], q_idx.size, k_idx.size), np.bool_)
    for b in range(out.shape[0]):
        for t in range(q_idx.size):
            for s in range(k_idx.size):
                out[b, t, s] = key_ok[b, s] and maskrule.visible(mode, q_idx[t] - k_idx[s], window, q_block[b, t],
                                                                 k_block[b, s])
    return out


@settings(deadline=None, max_examples=200)  # cheap: enough draws that every mode meets its window's edge
@given(t=st.integers(1, 12), past=st.integers(0, 12), window=st.integers(1, 12), kind=st.sampled_from([FULL, SLIDING]),
       bidir=st.sampled_from(["vision", None, "all"]), pad=st.integers(0, 4), seed=st.integers(0, 999))
def test_maskrule_pair_rule_is_refs_layer_mask(t, past, window, kind, bidir, pad, seed):
    """fast.maskrule.visible (the decoding step's and the GPU's mask rule), compiled, over every query-key
    pair, with the key's padding flag: ref.masks.layer_mask exactly, for every layer kind and
    bidirectional mode, windows, padding, and vision blocks that straddle queries and keys (ids drawn at
    random, so that blocks of several ids meet)."""
    rng = np.random.default_rng(seed)
    cfg = from_hf_dict(tiny_hf_dict(sliding_window=window, use_bidirectional_attention=bidir))
    S = past + t
    key_ok = rng.random((2, S)) > 0.2
    key_ok[1, :pad] = False
    block = rng.integers(-1, 2, (2, S))
    q_idx, k_idx = np.arange(past, S), rng.permutation(S)  # keys in any order, as a ring cache holds them
    want = layer_mask(cfg, kind, q_idx, k_idx, key_ok[:, k_idx], block[:, past:], block[:, k_idx])
    got = _visible_all(maskrule.mode_of(cfg, kind), q_idx, k_idx, cfg.window, block[:, past:], block[:, k_idx],
                       key_ok[:, k_idx])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("keep_mask", [True, False])
@pytest.mark.parametrize("kind", [FULL, SLIDING])
def test_tiled_attention_default_tiles_across_the_window(kind, keep_mask, monkeypatch):
    """The prefill kernel at its real tile sizes: 700 queries (6 query tiles, 2 key tiles), a window of
    200 (tiles partly and wholly outside it), an image block straddling tile edges, left padding; with
    the dense mask kept for the layer kind, and built a tile at a time as for prompts too long to keep it.
    The decode kernel then, too, with a mask too large to keep."""
    if not keep_mask:
        monkeypatch.setattr(cpu, "MASK_CACHE_MAX", 0)
    rng = np.random.default_rng(1)
    cfg = from_hf_dict(tiny_hf_dict(sliding_window=200))
    B, T, H, K, Dh = 2, 700, 4, 2, 16
    q = rng.normal(size=(B, T, H, Dh)).astype(np.float32)
    k = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
    v = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
    key_ok = np.ones((B, T), bool)
    key_ok[1, :150] = False
    block = np.full((B, T), -1)
    block[:, 100:400] = 0
    spec = MaskSpec(cfg, kind, np.arange(T), np.arange(T), key_ok, block, block)
    close(cpu.tiled_attention(q, k, v, spec), REF.attention(q, k, v, spec))
    last = MaskSpec(cfg, kind, np.arange(T - 3, T), np.arange(T), key_ok, block[:, -3:], block)
    close(cpu.decode_attention(q[:, -3:], k, v, last), REF.attention(q[:, -3:], k, v, last))


@pytest.mark.parametrize("shape", [(1, 3, 2, 4), (1, 1024, 4, 128), (2, 700, 3, 130)])
def test_huge_empty_is_usable_and_large_ones_start_on_a_2mb_page(shape):
    """Float32 of the shape, writeable and C-contiguous; from 1 MB up, 2 MB aligned (the kernel can back
    such a start with a huge page), and a cache's K/V arrays are made this way."""
    a = cpu.huge_empty(shape)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    a[...] = 1  # the whole array is usable memory
    if a.nbytes >= cpu.HUGE_PAGE // 2:
        assert a.ctypes.data % cpu.HUGE_PAGE == 0
    cache = cpu.RingKVCache(1, shape[1])
    k = np.ones((1, 2) + shape[2:], np.float32)
    cache.extend(0, k, k, np.arange(2), FULL, 4)
    assert cache.keys[0].shape == (1,) + shape[1:] and (cache.keys[0].nbytes < cpu.HUGE_PAGE // 2
                                                       or cache.keys[0].ctypes.data % cpu.HUGE_PAGE == 0)


@pytest.mark.parametrize("kind, prompt", [(FULL, 5), (FULL, 1), (SLIDING, 3), (SLIDING, 9)])
def test_a_new_cache_holds_zeros_where_its_first_tokens_did_not_land(monkeypatch, kind, prompt):
    """The cache's arrays start uninitialised (here: NaN, as reused memory may hold) and only the slots the
    first call leaves free are zeroed: after it, the prompt's rows hold its keys and values and every other
    slot 0, for a full cache (capacity 12), a ring (window 4) the prompt fits or wraps, and a 1-token call."""
    monkeypatch.setattr(cpu, "huge_empty", lambda shape: np.full(shape, np.nan, np.float32))
    rng = np.random.default_rng(3)
    cache = cpu.RingKVCache(1, 12)
    cache.append_tokens(np.ones((1, prompt), bool), np.full((1, prompt), -1))
    k, v = rng.normal(size=(2, 1, prompt, 2, 4)).astype(np.float32) + 2  # never 0
    cache.extend(0, k, v, np.arange(prompt), kind, 4)
    held = cache.slots[0] >= 0
    assert held.sum() == min(prompt, 4 if kind == SLIDING else 12)
    for got, want in ((cache.keys[0], k), (cache.values[0], v)):
        np.testing.assert_array_equal(got[:, held], want[:, cache.slots[0][held]])
        assert not got[:, ~held].any() and not np.isnan(got).any()


@pytest.mark.parametrize("window, max_len", [(10, 6), (6, 6), (4, 6)])
def test_a_ring_holds_no_more_slots_than_the_cache_holds_tokens(window, max_len):
    """A sliding layer's ring has min(window, max_len) slots: where the whole sequence fits the window it
    never wraps, and a prompt then leaves only the slots of the tokens still to come free."""
    cache = cpu.RingKVCache(1, max_len)
    cache.append_tokens(np.ones((1, 3), bool), np.full((1, 3), -1))
    k = np.ones((1, 3, 1, 2), np.float32)
    cache.extend(0, k, k, np.arange(3), SLIDING, window)
    assert cache.keys[0].shape[1] == cache.values[0].shape[1] == cache.slots[0].size == min(window, max_len)


def test_ring_cache_matches_list_cache():
    rng = np.random.default_rng(0)
    ring, plain = cpu.RingKVCache(1, 40), KVCache()
    for step, T in enumerate([7, 1, 1, 1, 3, 1]):
        idx = np.arange(ring.length, ring.length + T)
        for c in (ring, plain):
            c.append_tokens(np.ones((1, T), bool), np.full((1, T), -1))
        k, v = rng.normal(size=(2, 1, T, 2, 4)).astype(np.float32)
        for kind in (SLIDING, FULL):
            i = 0 if kind == SLIDING else 1
            got = ring.extend(i, k, v, idx, kind, 4)
            want = plain.extend(i, k, v, idx, kind, 4)
            # same keys, possibly in another order: compare as index -> row maps, within the window
            for (kg, vg, ig), (kw, vw, iw) in [(got, want)]:
                live = iw > idx[-1] - 4 if kind == SLIDING else np.ones(len(iw), bool)
                for j in iw[live]:
                    np.testing.assert_array_equal(kg[:, list(ig).index(j)], kw[:, list(iw).index(j)])
                    np.testing.assert_array_equal(vg[:, list(ig).index(j)], vw[:, list(iw).index(j)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_gelu_split_runs_in_a_forked_child(monkeypatch):
    """A child forked after the helper threads exist gets none of them; its split must not wait for them
    (a pool inherited as it was would queue the work forever)."""
    monkeypatch.setattr(cpu.nb, "get_num_threads", lambda: 2)  # a helper, on a 1-core machine too
    monkeypatch.setattr(cpu, "thread_count", lambda: 2)
    rng = np.random.default_rng(1)
    g, u = rng.normal(0, 3, (2, cpu.SPLIT_MIN // 64 + 1, 64)).astype(np.float32)
    want = g.copy()
    cpu.gelu_tanh_mul(want, u)  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its split gave the parent's numbers
        ok = False
        try:
            got = g.copy()
            cpu.gelu_tanh_mul(got, u)
            ok = bool(np.array_equal(got, want))
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's GELU did not finish in 60 s")


def test_rows_ascending_by_one_become_a_slice_and_nothing_else_does():
    """The cache copies a prompt's rows with a slice only where the index array selects the same rows."""
    assert cpu._as_slice(np.arange(3, 9)) == slice(3, 9)
    assert cpu._as_slice(np.array([5])) == slice(5, 6)
    for idx in ([], [3, 0, 1, 2], [0, 2, 1, 3], [0, 1, 3], [4, 3, 2], [1, 1]):
        assert cpu._as_slice(np.array(idx, np.int64)) is None


def test_ring_cache_uploads_a_call_s_indices_once_for_all_layers():
    """With K/V on a device (here a stand-in array module that counts uploads), a prompt's slot indices go
    up once per decoder call, whatever the number of layers (each upload from pageable memory waits for
    the device's queue); the keys, values and indices are those of the plain NumPy ring."""
    import types

    uploads = []
    counting = types.SimpleNamespace(empty=np.empty, concatenate=np.concatenate,
                                     asarray=lambda a: (uploads.append(a), np.array(a))[1])

    def run(layers_per_kind, xp):
        ring = type("Ring", (cpu.RingKVCache,), {"xp": xp})(1, 40)
        uploads.clear()
        rng, out = np.random.default_rng(0), []
        for T in (7, 3):  # a prompt into the empty ring, then a chunk that attends over what it holds
            idx = np.arange(ring.length, ring.length + T)
            ring.append_tokens(np.ones((1, T), bool), np.full((1, T), -1))
            k, v = rng.normal(size=(2, 1, T, 2, 4)).astype(np.float32)
            for i in range(2 * layers_per_kind):
                out.append(ring.extend(i, k, v, idx, SLIDING if i % 2 else FULL, 4))
        return len(uploads), out

    one, _ = run(1, counting)
    three, got = run(3, counting)
    _, want = run(3, np)
    assert 0 < one == three
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)


@settings(deadline=None)  # the first draw compiles claim_slot where Numba's cache is cold (a fresh clone)
@given(window=st.integers(1, 9), prompt=st.integers(1, 20), steps=st.integers(0, 25), kind=st.sampled_from([SLIDING, FULL]))
def test_ring_slots_claimed_after_a_prefill_count_the_held_keys(window, prompt, steps, kind):
    """After a prefill of `prompt` tokens, each decoded token q takes slot q % cap and the count of held
    slots `claim` returns (found by bisecting the held prefix) is what counting every slot gives, the
    slot table holding exactly the last min(q + 1, cap) tokens."""
    ring = cpu.RingKVCache(1, prompt + steps)
    kv = np.zeros((1, prompt, 1, 2), np.float32)
    ring.extend(0, kv, kv, np.arange(prompt), kind, window)
    cap = ring.slots[0].size
    for q in range(prompt, prompt + steps):
        slot, n = ring.claim(0, q)
        slots = ring.slots[0]
        assert slot == q % cap and n == np.count_nonzero(slots >= 0) == min(q + 1, cap)
        np.testing.assert_array_equal(np.sort(slots[:n]), np.arange(q + 1 - n, q + 1))


configs = st.fixed_dictionaries({
    "num_hidden_layers": st.integers(2, 6), "sliding_window": st.integers(2, 9),
    "attention_k_eq_v": st.booleans(), "num_key_value_heads": st.sampled_from([1, 2, 4]),
    "head_dim": st.sampled_from([8, 12, 16]), "use_bidirectional_attention": st.sampled_from(["vision", None, "all"]),
})


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(c=configs, bf16=st.booleans(), length=st.integers(5, 30), seed=st.integers(0, 999))
def test_models_match_ref(tmp_path_factory, c, bf16, length, seed):
    hf = tiny_hf_dict(**c)
    d = write_checkpoint(tmp_path_factory.mktemp("m"), hf, random_tensors(hf, seed, "BF16" if bf16 else "F32"))
    a, b = ref.load_model(d), fast.load_model(d)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 400, (2, length))
    ids[:, 1:4] = [a.config.boi_token_id, a.config.image_token_id, a.config.eoi_token_id]
    types = (ids == a.config.image_token_id).astype(int)
    pv = np.zeros((2, 70, 6912), np.float32)
    pv[:, 0] = rng.random((2, 6912))
    pos = np.full((2, 70, 2), -1)
    pos[:, 0] = 0
    mask = np.ones_like(ids)
    mask[1, :1] = 0
    kw = dict(pixel_values=pv, image_position_ids=pos, mm_token_type_ids=types, attention_mask=mask)
    close(b.forward(ids, **kw)[mask.astype(bool)], a.forward(ids, **kw)[mask.astype(bool)])
    ga, gb = a.generate(ids, max_new_tokens=8, **kw), b.generate(ids, max_new_tokens=8, **kw)
    if not np.array_equal(ga, gb):  # only a genuine near-tie may split them
        step = int(np.argmax((ga != gb).any(axis=0)))
        seq = np.concatenate([ids, ga[:, :step]], axis=1)
        m2 = np.concatenate([mask, np.ones((2, step), int)], axis=1)
        pos_ids = np.where(m2.astype(bool), np.cumsum(m2, 1) - 1, 0)
        logits = a.forward(seq, attention_mask=m2, position_ids=pos_ids, pixel_values=pv, image_position_ids=pos,
                           mm_token_type_ids=np.pad(types, ((0, 0), (0, step))))[:, -1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() < 1e-4, "fast and ref disagree on a clear greedy choice"


def test_unknown_device_is_refused(tmp_path):
    hf = tiny_hf_dict()
    d = write_checkpoint(tmp_path / "m", hf, random_tensors(hf))
    with pytest.raises(ValueError, match="device 'tpu'"):
        fast.load_model(d, device="tpu")


def test_resident_weights_are_the_files_bits_and_give_the_same_logits(tmp_path):
    """fast copies a checkpoint that fits in memory off its memory map: every tensor keeps its dtype and bits,
    read-only, in anonymous memory; the model's logits equal those of the mapped model bit for bit."""
    hf = tiny_hf_dict()
    d = write_checkpoint(tmp_path / "m", hf, random_tensors(hf, 3, "BF16"))
    mapped, copied = fast.load_model(d, resident=False), fast.load_model(d, resident=True)
    assert mapped.tensors.keys() == copied.tensors.keys()
    for name, t in mapped.tensors.items():
        a, b = (t.bits, copied.tensors[name].bits) if isinstance(t, Bf16) else (t, copied.tensors[name])
        assert isinstance(a, np.memmap) and type(b) is np.ndarray, name
        assert b.dtype == a.dtype and not b.flags.writeable and b.ctypes.data % 64 == 0, name
        np.testing.assert_array_equal(b, a)
    ids = np.arange(3, 40)[None]
    np.testing.assert_array_equal(copied.forward(ids), mapped.forward(ids))


def test_resident_copy_of_odd_tensors(tmp_path):
    """Empty, scalar-sized, float16 and odd-length tensors keep shape, dtype and bits, each non-empty one
    64-byte aligned."""
    from ref.safetensors_io import open_tensors, save_file

    want = {"empty": np.zeros((0, 5), np.float32), "one": np.full((1,), 3.5, np.float32),
            "half": np.arange(7, dtype=np.float16), "bits": Bf16(np.arange(9, dtype=np.uint16).reshape(3, 3))}
    save_file(want, tmp_path / "t.safetensors")
    got = cpu.resident_copy(open_tensors(tmp_path / "t.safetensors"))
    for name, w in want.items():
        a, b = (w.bits, got[name].bits) if isinstance(w, Bf16) else (w, got[name])
        assert b.shape == a.shape and b.dtype == a.dtype and not b.flags.writeable
        assert b.nbytes == 0 or b.ctypes.data % 64 == 0  # an empty array's address is numpy's choice
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("free, copied", [(None, False), (10_000, False), (1 << 40, True)])
def test_weights_are_copied_only_when_they_fit(tmp_path, monkeypatch, free, copied):
    """By default the copy is made only when the weights take at most half the memory available now (a
    checkpoint larger than that stays mapped, so the kernel can page it); where that is unknown, never."""
    hf = tiny_hf_dict()
    d = write_checkpoint(tmp_path / "m", hf, random_tensors(hf, dtype="BF16"))
    monkeypatch.setattr(cpu, "available_memory", lambda: free)
    bits = fast.load_model(d).params.language_model.layers[0].mlp.up_proj.weight.bits
    assert isinstance(bits, np.memmap) is not copied


@pytest.mark.parametrize("large", [True, False])
def test_large_weight_copy_shows_progress_and_is_not_read_again(tmp_path, monkeypatch, capsys, large):
    """python -m ref.run on a large checkpoint with --backend fast: the copy shows a bar that counts every
    byte, and the page-cache warm-up (a second read of the files, with its own bar) has nothing to do; a
    small checkpoint shows neither. A mapped model still gets the warm-up."""
    import ref.run

    monkeypatch.setattr(ref.run, "WARM_UP_BYTES", 0 if large else 1 << 40)
    session = ref.run.Session.open(ref.run.DEMO_MODEL, progress=True, backend="fast")
    err = capsys.readouterr().err
    assert ("copying weights into memory" in err and "100%" in err) is large
    assert "loading weights" not in err
    assert not isinstance(session.model.params.language_model.embed_tokens.weight.bits, np.memmap)
    ref.run.warm_up(fast.load_model(ref.run.DEMO_MODEL, resident=False), progress=True)
    assert ("loading weights" in capsys.readouterr().err) is large


def _fake_system(tmp_path, cgroup_line: str, files: dict) -> tuple[str, str]:
    """A /proc with 10 GB MemAvailable and this process's cgroup line, and a cgroup tree with `files`
    ({relative path: text}) -> (proc, cgroups) roots for cpu.available_memory."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemAvailable:   10000000 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    for rel, text in files.items():
        (cgroups / rel).parent.mkdir(parents=True, exist_ok=True)
        (cgroups / rel).write_text(text)
    return str(proc), str(cgroups)


GB = 1_000_000_000


@pytest.mark.parametrize("cgroup_line, files, want", [
    ("0::/", {}, 10_240_000_000),  # no limit anywhere: MemAvailable (kB are KiB)
    # v2, the parent's limit binds: 4 GB limit, 3 GB used of which 1 GB inactive page cache -> 2 GB left
    ("0::/box/app", {"box/app/memory.max": "max\n", "box/app/memory.current": "5\n", "box/app/memory.stat": "",
                     "box/memory.max": f"{4 * GB}\n", "box/memory.current": f"{3 * GB}\n",
                     "box/memory.stat": f"anon 5\ninactive_file {GB}\n"}, 2 * GB),
    # v1: the job's own limit is v1's "unlimited" (~2^63), the root's is 6 GB with 1 GB in use
    ("4:memory:/job", {"memory/job/memory.limit_in_bytes": "9223372036854771712\n",
                       "memory/job/memory.usage_in_bytes": "7\n", "memory/job/memory.stat": "",
                       "memory/memory.limit_in_bytes": f"{6 * GB}\n", "memory/memory.usage_in_bytes": f"{GB}\n",
                       "memory/memory.stat": "total_inactive_file 0\n"}, 5 * GB),
    ("4:memory:/gone", {}, 10_240_000_000),  # the cgroup's files are not visible here: MemAvailable
])
def test_available_memory_respects_cgroup_limits(tmp_path, cgroup_line, files, want):
    """A container's memory limit caps what fast may fill with a weight copy, not only the host's free memory."""
    assert cpu.available_memory(*_fake_system(tmp_path, cgroup_line, files)) == want


def test_available_memory_is_unknown_without_meminfo(tmp_path):
    assert cpu.available_memory(str(tmp_path / "nowhere"), str(tmp_path)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_applies_on_glibc():
    """fast's CPU model asks glibc to keep freed activation blocks (no page faults per layer)."""
    assert cpu.keep_freed_memory() is True


def test_compile_kernels_leaves_nothing_to_compile_for_a_bf16_model(tmp_path):
    """After `model.compile()`, prefill (token-minor and the layer code) and decode (the compiled step and the
    layer code) of a bf16 checkpoint add no Numba specialisation (so `python -m ref.run --backend fast` times
    the model, not the compiler). A fresh process: in this one, earlier tests have compiled specialisations already."""
    import ast
    import subprocess

    hf = tiny_hf_dict()
    path = write_checkpoint(tmp_path / "ckpt", hf, random_tensors(hf, dtype="BF16"))
    script = f"""
import numpy as np, fast
from fast import cpu, prefill, step
model = fast.load_model({str(path)!r})
model.compile()
names = ["_gemv_bf16", "_upcast_rows", "_rms_norm", "_decode_serial", "_decode_parallel", "_combine", "_gelu_mul",
         "_rope", "_softmax_tile", "split_keys", "claim_slot"]
kernels = {{n: getattr(cpu, n) for n in names}} | {{n: getattr(step, n) for n in ["_layers", "_bookkeeping",
                                                                                "_embed_token", "_choose"]}}
kernels |= {{n: getattr(prefill, n) for n in ["_inv_rms", "norm_t", "_norm_t", "head_norm_rope_t", "residual_t",
                                              "softmax_t"]}}
before = {{n: set(k.signatures) for n, k in kernels.items()}}
for rows in (1, 2):  # one sequence: token-minor prompt, compiled step; two: the layer code
    model.generate(np.arange(3, 43)[None].repeat(rows, axis=0), max_new_tokens=3)
print({{n: len(set(k.signatures) - before[n]) for n, k in kernels.items()}})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    added = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert added and not any(added.values()), f"compiled on first use: {added}"


def test_exp32_is_as_accurate_as_numpy():
    """The vectorisable exp of the prefill softmax, against float64 over its whole domain [-87, 0] and at
    its edges: within 1.5e-7 relative (numpy's float32 exp measures 2e-7 here), e^0 = 1 exactly, and 0
    for -inf and anything below -87 (e^-87 < 2^-125)."""
    import numba as nb

    @nb.njit
    def exps(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = cpu.exp32(x[i])
        return out

    x = np.concatenate([np.linspace(-87, 0, 1_000_001, dtype=np.float32),
                        -np.random.default_rng(0).exponential(3, 100_000).astype(np.float32)])
    x = x[x >= -87]
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(exps(x) - want) / want) < 1.5e-7
    edges = exps(np.array([0, -np.inf, -87.01, -1000], np.float32))
    assert edges[0] == 1 and not edges[1:].any()


def test_blas_threads_parked_at_the_first_gemv_after_a_prefill(monkeypatch):
    """After BLAS work the next GEMV lets OpenBLAS's spinning worker threads exit (they took cores from the
    GEMV's threads), and BLAS products after that start them again and still compute the same numbers.
    The products in OpenBLAS (MKL's run on fast's own threads, which park OpenBLAS's first)."""
    import os

    monkeypatch.setattr(cpu, "BLAS", ["openblas"])

    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    if "openblas" not in blas.lower() or not sys.platform.startswith("linux"):
        pytest.skip(f"numpy here is built on {blas!r} ({sys.platform}): parking drives numpy's OpenBLAS, found "
                    f"through /proc; elsewhere it is a no-op")
    assert cpu._BLAS_SHUTDOWN is not None, "numpy's OpenBLAS is loaded but its blas_thread_shutdown_ was not found"
    workers = (os.cpu_count() or 1) > 1  # on one core OpenBLAS starts no worker thread to park
    rng = np.random.default_rng(0)
    w = Bf16(f32_to_bf16(rng.normal(size=(1024, 1024)).astype(np.float32)))
    x = rng.normal(size=(256, 1024)).astype(np.float32)
    want, want_1 = REF.linear(x, w), REF.linear(x[:1], w)  # numpy products: computed before counting
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    cpu.matmul(x[:1], w)  # the GEMV's own threads exist from here on
    for _ in range(2):
        got = cpu.matmul(x, w)  # BLAS, its workers running
        assert cpu._BLAS_RAN[0]
        running = threads()
        got_1 = cpu.matmul(x[:1], w)  # parks them first
        assert not cpu._BLAS_RAN[0] and (threads() < running if workers else threads() <= running)
        close(got, want)
        close(got_1, want_1)
