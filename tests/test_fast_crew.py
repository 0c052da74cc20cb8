"""fast.cpu's `_Crew`: the prefill's helper threads, which wait for work spinning, then yielding, then
asleep; `on_every_core` hands them their shares of the rows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

from fast import cpu, team  # noqa: E402


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
