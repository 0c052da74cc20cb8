"""fast.cpu's `_Crew`: the prefill's helper threads, which wait for work spinning, then yielding, then
asleep; `on_every_core` hands them their shares of the rows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

from fast import cpu, mkl, team  # noqa: E402
from helpers import needs_mkl  # noqa: E402


def _within(seconds, f):
    """f() in a thread -> its result, or its exception raised here; fails instead of hanging the suite if
    it has not returned in time."""
    box = {}

    def call():
        try:
            box["out"] = f()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no return within {seconds} s: a lost wake-up"
    if "error" in box:
        raise box["error"]
    return box["out"]


def _cover(crew, cut):
    """Run a crew over `cut` -> (how often each row was written, the thread that wrote each part, with the
    calling thread as "caller")."""
    hits = np.zeros(cut[-1], np.int64)
    who = {}
    caller = threading.current_thread().name

    def work(a, b):
        hits[a:b] += 1
        name = threading.current_thread().name
        who[a, b] = "caller" if name == caller else name

    crew.run(cut, work)
    return hits, who


@pytest.mark.parametrize("helpers, parts", [(1, 2), (1, 3), (2, 3), (3, 2), (2, 5)])
def test_every_row_once_and_each_helper_its_part(helpers, parts):
    """Part 0 on the calling thread, part i + 1 on helper i, the parts beyond the helpers on the caller;
    over many calls in a row (helpers still spinning) every row is written exactly once each time."""
    crew = cpu._Crew(helpers)
    rows = 97
    cut = [rows * i // parts for i in range(parts + 1)]
    for _ in range(50):
        hits, who = _within(10, lambda: _cover(crew, cut))
        assert np.all(hits == 1)
        for k in range(parts):
            assert who[cut[k], cut[k + 1]] == (f"fast-rows-{k - 1}" if 1 <= k <= helpers else "caller")


def test_helpers_work_at_the_same_time_as_the_caller():
    """The caller's part waits, without the GIL, for the helper's part to start: both run at once."""
    crew = cpu._Crew(1)
    flag = np.zeros(1, np.int64)

    def work(a, b):
        if a == 0:  # the caller: wait for the helper's mark
            assert team.wait_change(flag, 0, 0, 1 << 24) == 1
        else:
            flag[0] = 1

    _within(10, lambda: crew.run([0, 1, 2], work))


def test_a_helper_asleep_wakes_for_the_next_call(monkeypatch):
    """With no yielding looks an idle helper goes to sleep after its spin; each next call still runs its
    part (no lost wake-up), also right as it falls asleep."""
    monkeypatch.setattr(cpu, "HELPER_YIELDS", 0)
    crew = cpu._Crew(1)
    for pause in (0.05, 0.0, 0.001, 0.02, 0.0):
        time.sleep(pause)
        hits, who = _within(10, lambda: _cover(crew, [0, 5, 9]))
        assert np.all(hits == 1) and who[5, 9] == "fast-rows-0"


def test_a_helpers_error_reaches_the_caller_and_the_crew_goes_on():
    crew = cpu._Crew(2)

    def work(a, b):
        if a == 4:
            raise ValueError("part two failed")

    with pytest.raises(ValueError, match="part two failed"):
        _within(10, lambda: crew.run([0, 2, 4, 6], work))
    hits, _ = _within(10, lambda: _cover(crew, [0, 2, 4, 6]))
    assert np.all(hits == 1)


def test_on_every_core_splits_over_numbas_threads(monkeypatch):
    """As many parts as Numba's threads (at most one a row), cut evenly; one part runs on the caller alone."""
    for threads, rows in ((2, 10), (3, 10), (4, 3), (2, 1)):
        monkeypatch.setattr(cpu, "thread_count", lambda: threads)
        parts = []
        cpu.on_every_core(rows, lambda a, b: parts.append((a, b)))
        n = min(threads, rows)
        assert sorted(parts) == [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


def test_thread_count_is_numbas_thread_count():
    """`thread_count` (Numba's count without its pool check) follows nb.set_num_threads, as
    nb.get_num_threads does, before and after the pool started."""
    import numba as nb

    start = nb.get_num_threads()
    assert cpu.thread_count() == start

    class OneKey:  # the mask of one query over one key (decode_attention reads its dense form only)
        def dense(self):
            return np.ones((1, 1, 1), bool)

    q = np.ones((1, 1, 2, 4), np.float32)
    cpu.decode_attention(q, q, q, OneKey(), parallel=True)  # a parallel kernel: its first run starts the pool
    assert getattr(cpu.nb_parallel, "_get_num_threads", None) is not None
    try:
        for n in sorted({1, start}):
            nb.set_num_threads(n)
            assert cpu.thread_count() == nb.get_num_threads() == n
    finally:
        nb.set_num_threads(start)


def test_the_callers_error_waits_for_the_helpers_parts():
    """A part of the caller's own that raises still returns only after the helpers' parts are done (they
    write into the caller's arrays), and the next call runs whole."""
    crew = cpu._Crew(1)
    finished = []

    def work(a, b):
        if a == 0:
            raise KeyError("own part")
        time.sleep(0.05)
        finished.append(a)

    with pytest.raises(KeyError, match="own part"):
        _within(10, lambda: crew.run([0, 1, 2], work))
    assert finished == [1]
    hits, _ = _within(10, lambda: _cover(crew, [0, 3, 6]))
    assert np.all(hits == 1)


def test_a_split_inside_a_part_runs_there_whole():
    """on_every_core's work calling it again (from the caller's part or a helper's) runs the inner parts
    on that thread instead of waiting for a helper that is busy with the outer call."""
    crew = cpu._Crew(1)
    hits = np.zeros((2, 8), np.int64)

    def inner(row):
        def work(a, b):
            hits[row, a:b] += 1
        return work

    def outer(a, b):
        crew.run([0, 4, 8], inner(a))

    _within(10, lambda: crew.run([0, 1, 2], outer))
    assert np.all(hits == 1)


# ---- products handed to the helpers as words (`_Crew.product`): MKL's gemm from compiled code ----------

def _parts_alone(a, b, parts):
    """a @ b with each of `parts` runs of a's rows (`on_every_core`'s cut) in its own single-threaded MKL
    call on this thread: what a crew's product must give bit for bit (each part is the same call)."""
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    rows = a.shape[0]
    for k in range(parts):
        lo, hi = rows * k // parts, rows * (k + 1) // parts
        mkl.sgemm(a[lo:hi], b, out[lo:hi])
    return out


@needs_mkl()
@pytest.mark.parametrize("helpers, parts, rows", [(1, 2, 37), (1, 3, 37), (2, 3, 64), (3, 2, 9), (2, 5, 3)])
def test_a_product_is_each_parts_own_product(helpers, parts, rows):
    """Every row of out = a @ b is what MKL gives for its part alone, bit for bit, out a slice of a wider
    array (nothing beside it written), over many calls in a row; with fewer rows than parts, some parts
    are empty."""
    rng = np.random.default_rng(helpers * 100 + parts)
    crew = cpu._Crew(helpers)
    for call in range(20):
        a = rng.normal(size=(rows, 19)).astype(np.float32)
        b = rng.normal(size=(19, 23)).astype(np.float32)
        wide = np.full((rows, 30), 7.0, np.float32)
        _within(10, lambda: crew.product(a, b, wide[:, :23], parts))
        np.testing.assert_array_equal(wide[:, :23], _parts_alone(a, b, parts))
        assert (wide[:, 23:] == 7.0).all()


@needs_mkl()
def test_products_and_python_parts_take_turns():
    """A product's words do not outlive it: a Python call after a product runs its helper's part in Python,
    on the helper (and a product after it computes again)."""
    crew = cpu._Crew(1)
    rng = np.random.default_rng(5)
    for _ in range(10):
        a, b = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
        out = np.zeros((8, 3), np.float32)
        _within(10, lambda: crew.product(a, b, out, 2))
        np.testing.assert_array_equal(out, _parts_alone(a, b, 2))
        hits, who = _within(10, lambda: _cover(crew, [0, 4, 9]))
        assert np.all(hits == 1) and who[4, 9] == "fast-rows-0"


@needs_mkl()
def test_a_helper_asleep_wakes_for_a_product(monkeypatch):
    """With no yielding looks the helper sleeps between calls; a product still gets its part done."""
    monkeypatch.setattr(cpu, "HELPER_YIELDS", 0)
    crew = cpu._Crew(1)
    a, b = np.arange(12, dtype=np.float32).reshape(6, 2), np.ones((2, 5), np.float32)
    for pause in (0.05, 0.0, 0.001, 0.02, 0.0):
        time.sleep(pause)
        out = np.zeros((6, 5), np.float32)
        _within(10, lambda: crew.product(a, b, out, 2))
        np.testing.assert_array_equal(out, a @ b)


@needs_mkl()
def test_a_product_inside_a_part_runs_there_whole():
    """A product asked for from a part (the caller's or a helper's) runs on that thread, not waiting for
    a helper busy with the outer call."""
    crew = cpu._Crew(1)
    a, b = np.ones((4, 3), np.float32), np.full((3, 2), 2.0, np.float32)
    outs = np.zeros((2, 4, 2), np.float32)

    def outer(lo, hi):
        crew.product(a, b, outs[lo], 2)

    _within(10, lambda: crew.run([0, 1, 2], outer))
    assert (outs == 6.0).all()


@needs_mkl()
def test_a_bad_product_raises_before_any_part_runs():
    """Matrices that MKL cannot take raise ValueError in the caller, and the crew goes on."""
    crew = cpu._Crew(1)
    out = np.full((4, 2), 7.0, np.float32)
    with pytest.raises(ValueError, match="contiguous rows"):
        crew.product(np.ones((4, 3)), np.ones((3, 2), np.float32), out, 2)  # float64
    with pytest.raises(ValueError, match="shapes"):
        crew.product(np.ones((4, 3), np.float32), np.ones((2, 2), np.float32), out, 2)
    assert (out == 7.0).all()
    _within(10, lambda: crew.product(np.ones((4, 3), np.float32), np.ones((3, 2), np.float32), out, 2))
    assert (out == 3.0).all()
