"""The prefill's float32 products in either BLAS library (fast.cpu.f32_product: numpy's OpenBLAS, or Intel's
MKL through fast/mkl.py), and the choice between them (fast.cpu.choose_blas)."""

from __future__ import annotations

import time

import numba as nb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

import fast  # noqa: E402
import ref  # noqa: E402
from fast import bench, cpu, mkl, prefill  # noqa: E402
from ref.config import tiny_hf_dict  # noqa: E402
from ref.tiny import random_tensors, write_checkpoint  # noqa: E402

from helpers import needs_mkl  # noqa: E402

NEEDS_MKL = needs_mkl()
LIBRARIES = [pytest.param(name, marks=[NEEDS_MKL] if name == "mkl" else []) for name in cpu.BLAS_LIBRARIES]
U = 2.0**-24  # float32's unit roundoff


def _within_gemm_bound(got: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """got = a @ b in float32, in any order of the sums: |got - exact| <= gamma_K (|a| @ |b|) elementwise,
    gamma_K = K u / (1 - K u) (each of a dot product's K products and K - 1 additions rounds once; fused
    multiply-adds only round less). exact in float64, whose own error is far below this."""
    K = a.shape[1]
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = K * U / (1 - K * U) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    excess = np.abs(got - exact) - bound
    assert excess.max(initial=0) <= 0, f"off by {excess.max():.3g} beyond the bound"


@pytest.mark.parametrize("library", LIBRARIES)
@settings(deadline=None, max_examples=30)
@given(m=st.integers(1, 70), k=st.integers(0, 70), n=st.integers(1, 70), transposed=st.booleans(),
       pad=st.integers(0, 5), seed=st.integers(0, 999))
def test_f32_product_is_a_float32_product_in_each_library(library, m, k, n, transposed, pad, seed):
    """Every shape, the weights' side given as is or transposed (x @ w^T), the output a slice of a wider
    array (rows `pad` floats longer, as `_upcast_product` writes blocks of columns): within the float32
    bound of the exact product, and nothing outside the slice written. MKL splits the rows over threads."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, k)).astype(np.float32)
    b = rng.normal(size=(k, n)).astype(np.float32)
    wide = np.full((m, n + pad), 7.0, np.float32)
    cpu.f32_product(a, np.ascontiguousarray(b.T) if transposed else b, wide[:, :n], transposed, library=library)
    _within_gemm_bound(wide[:, :n], a, b)
    assert (wide[:, n:] == 7.0).all()


@nb.njit
def _gemm_compiled(fn, trans_a, a, b, c, alpha, beta):
    """mkl.gemm_at on numpy arrays with contiguous rows (any row stride): c <- alpha op(a) b + beta c."""
    M, N = c.shape
    K = b.shape[0]
    mkl.gemm_at(fn, trans_a, M, N, K, alpha, a.ctypes.data, a.strides[0] // a.itemsize, b.ctypes.data,
                b.strides[0] // b.itemsize, beta, c.ctypes.data, c.strides[0] // c.itemsize)


@NEEDS_MKL
@settings(deadline=None, max_examples=40)
@given(m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40), trans=st.booleans(),
       double=st.booleans(), beta=st.sampled_from([0.0, 1.0]), pads=st.tuples(*[st.integers(0, 3)] * 3),
       seed=st.integers(0, 999))
def test_gemm_at_runs_mkls_gemm_from_compiled_code(m, k, n, trans, double, beta, pads, seed):
    """mkl.gemm_at with SGEMM (float32) or DGEMM (float64), A as it is or transposed, beta 0 or 1, each
    matrix a block of a wider array (its rows `pads` longer, each its own): c = op(a) b + beta c within the
    gemm's rounding bound, and nothing outside c's block written (the row strides are the ones passed)."""
    rng = np.random.default_rng(seed)
    dt = np.float64 if double else np.float32
    a_rows, a_cols = (k, m) if trans else (m, k)
    a, b, c_wide = (rng.normal(size=(r, c + pad)).astype(dt)
                    for (r, c), pad in zip([(a_rows, a_cols), (k, n), (m, n)], pads))
    a, b = a[:, :a_cols], b[:, :n]
    before = c_wide.copy()
    c0 = before[:, :n].astype(np.float64)
    _gemm_compiled(mkl.DGEMM if double else mkl.SGEMM, mkl.TRANS if trans else mkl.NO_TRANS, a, b, c_wide[:, :n],
                   dt(1.0), dt(beta))
    op_a, b64 = (a.T if trans else a).astype(np.float64), b.astype(np.float64)
    u = np.finfo(dt).eps / 2
    bound = (k + 1) * u / (1 - (k + 1) * u) * (np.abs(op_a) @ np.abs(b64) + beta * np.abs(c0))
    assert (np.abs(c_wide[:, :n] - (op_a @ b64 + beta * c0)) <= bound).all()
    np.testing.assert_array_equal(c_wide[:, n:], before[:, n:])


@NEEDS_MKL
@pytest.mark.parametrize("bad", ["float64", "columns", "shape"])
def test_mkl_sgemm_refuses_what_it_cannot_read(bad):
    """A float64 matrix, one whose columns are not contiguous, or mismatched sizes: a ValueError, before
    MKL reads any memory."""
    a, b, out = np.ones((4, 3), np.float32), np.ones((3, 5), np.float32), np.empty((4, 5), np.float32)
    if bad == "float64":
        a = a.astype(np.float64)
    elif bad == "columns":
        b = np.ones((5, 3), np.float32).T
    else:
        out = np.empty((4, 6), np.float32)
    with pytest.raises(ValueError, match="sgemm"):
        mkl.sgemm(a, b, out)


def _model_pair(tmp_path):
    hf = tiny_hf_dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    d = write_checkpoint(tmp_path / "m", hf, random_tensors(hf, 3, "BF16"))
    return fast.load_model(d), ref.load_model(d)


@pytest.mark.parametrize("library", LIBRARIES)
def test_prompts_give_refs_logits_with_either_library(tmp_path, monkeypatch, library):
    """Prompts of 40 tokens (token-minor products) and TOKEN_MINOR_MAX_M + 20 (the plain x @ w^T) with the
    library forced: ref's logits within 1e-5, the products ran in that library, and the token-minor
    prompt's attention ran in prefill.attention_heads_t exactly where MKL did."""
    monkeypatch.setattr(cpu, "BLAS", [library])
    calls, heads = [], []
    real, real_heads = mkl.sgemm, prefill.attention_heads_t
    monkeypatch.setattr(mkl, "sgemm", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    monkeypatch.setattr(prefill, "attention_heads_t", lambda *a: (heads.append(a[0].shape), real_heads(*a))[1])
    model, peer = _model_pair(tmp_path)
    for t in (40, cpu.TOKEN_MINOR_MAX_M + 20):
        ids = (np.arange(t)[None] * 7) % 390 + 3
        got, want = model.forward(ids)[0], peer.forward(ids)[0]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= 1e-5, f"{t} tokens: relative error {err:.2e}"
    assert bool(calls) == bool(heads) == (library == "mkl")


def test_fast_blas_forces_a_library_without_timing(monkeypatch):
    monkeypatch.setattr(cpu, "BLAS", [None])
    monkeypatch.setattr(cpu, "_faster_blas", lambda: pytest.fail("timed although FAST_BLAS chose"))
    monkeypatch.setenv("FAST_BLAS", "openblas")
    assert cpu.choose_blas() == "openblas" and cpu.BLAS == ["openblas"]


@pytest.mark.parametrize("value, says", [("OpenBLAS", "expected one of openblas, mkl"),
                                         ("acml", "expected one of openblas, mkl"),
                                         ("mkl", "not installed here")])
def test_a_bad_fast_blas_is_refused_with_its_reason(monkeypatch, capsys, value, says):
    """A name fast does not know (names are lower case), or mkl where MKL is absent: ValueError from the
    choice, and fast.bench refuses its command line in one line before it measures anything."""
    monkeypatch.setattr(mkl, "LIB", None)
    monkeypatch.setattr(cpu, "BLAS", [None])
    monkeypatch.setenv("FAST_BLAS", value)
    with pytest.raises(ValueError, match=says):
        cpu.choose_blas()
    assert bench.main(["--repeats", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and says in err


def test_without_mkl_the_products_stay_in_openblas(monkeypatch):
    monkeypatch.delenv("FAST_BLAS", raising=False)
    monkeypatch.setattr(mkl, "LIB", None)
    monkeypatch.setattr(cpu, "BLAS", [None])
    monkeypatch.setattr(cpu, "_faster_blas", lambda: pytest.fail("timed without MKL"))
    assert cpu.choose_blas() == "openblas"


def _choice_timed_here(monkeypatch) -> None:
    """choose_blas as on a machine with MKL and no FAST_BLAS, not chosen yet, timing a tiny product."""
    monkeypatch.delenv("FAST_BLAS", raising=False)
    monkeypatch.setattr(mkl, "LIB", object())
    monkeypatch.setattr(cpu, "BLAS", [None])
    monkeypatch.setattr(cpu, "BLAS_SPEEDS", {})
    monkeypatch.setattr(cpu, "BLAS_ROUNDS_WON", {})
    monkeypatch.setattr(cpu, "CHOICE_SHAPE", (8, 8, 8))


@pytest.mark.parametrize("slow", ["openblas", "mkl"])
def test_the_choice_takes_the_library_that_ran_faster(monkeypatch, slow):
    """With MKL present and no FAST_BLAS, each library is timed (a stand-in that sleeps 5 ms in `slow`):
    the other one is chosen, both speeds are kept, and the choice holds for the process (no second timing)."""
    _choice_timed_here(monkeypatch)
    timed = []

    def product(a, b, out, b_transposed=False, library=None):
        timed.append(library)
        time.sleep(0.005 if library == slow else 0.0)

    monkeypatch.setattr(cpu, "f32_product", product)
    other = next(n for n in cpu.BLAS_LIBRARIES if n != slow)
    assert cpu.choose_blas() == other
    assert set(cpu.BLAS_SPEEDS) == set(cpu.BLAS_LIBRARIES) and cpu.BLAS_SPEEDS[other] > cpu.BLAS_SPEEDS[slow]
    assert sorted(timed) == sorted(list(cpu.BLAS_LIBRARIES) * (cpu.CHOICE_ROUNDS + 1))
    assert cpu.BLAS_ROUNDS_WON == {other: cpu.CHOICE_ROUNDS, slow: 0}
    cpu.choose_blas()
    assert len(timed) == 2 * (cpu.CHOICE_ROUNDS + 1)


@pytest.mark.parametrize("openblas_won", [0, 5, 6, 8, 9, 11])
def test_openblas_is_chosen_only_where_it_wins_most_rounds_clearly(monkeypatch, openblas_won):
    """OpenBLAS faster in `openblas_won` of the 11 rounds (stand-ins: the round's loser sleeps 4 ms): chosen
    from OPENBLAS_ROUNDS of them (9 of 11), else MKL, which also runs attention by heads."""
    _choice_timed_here(monkeypatch)
    monkeypatch.setattr(cpu, "CHOICE_ROUNDS", 11)
    calls = {n: 0 for n in cpu.BLAS_LIBRARIES}

    def product(a, b, out, b_transposed=False, library=None):
        r = calls[library]  # this call's round; round 0 warms up
        calls[library] += 1
        openblas_wins = 1 <= r <= openblas_won
        loses = (library == "openblas") != openblas_wins
        time.sleep(0.004 if loses else 0.0)

    monkeypatch.setattr(cpu, "f32_product", product)
    assert cpu.choose_blas() == ("openblas" if openblas_won >= 9 else "mkl")
    assert cpu.BLAS_ROUNDS_WON == {"openblas": openblas_won, "mkl": 11 - openblas_won}


@pytest.mark.parametrize("steady", ["openblas", "mkl"])
def test_the_choice_goes_by_rounds_won_not_by_one_lucky_call(monkeypatch, steady):
    """The library faster in (nearly) every round is chosen, though the other's one undisturbed call was the
    fastest of all: on a host whose speed moves, a best-of-each pick followed whichever library met a quiet moment
    (the thirty-first session's second bench run took OpenBLAS so, 114 against 93 GFLOP/s, where MKL was
    faster in 28 of 30 choices timed afterwards). Stand-ins: `steady` takes 3 ms a call, the other 6 ms in
    every round but one (the second timed round), where it takes none."""
    _choice_timed_here(monkeypatch)
    other = next(n for n in cpu.BLAS_LIBRARIES if n != steady)
    calls = {n: 0 for n in cpu.BLAS_LIBRARIES}

    def product(a, b, out, b_transposed=False, library=None):
        calls[library] += 1
        lucky = library == other and calls[library] == 3  # round 0 warms up; this is the second timed round
        time.sleep(0.003 if library == steady else 0.0 if lucky else 0.006)

    monkeypatch.setattr(cpu, "f32_product", product)
    assert cpu.choose_blas() == steady
    assert cpu.BLAS_SPEEDS[other] > cpu.BLAS_SPEEDS[steady]  # its one quiet call, kept as its best speed
    assert cpu.BLAS_ROUNDS_WON == {steady: cpu.CHOICE_ROUNDS - 1, other: 1}
