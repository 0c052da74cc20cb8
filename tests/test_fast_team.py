"""fast/team.py: the decoding step's threads meet once per token and then wait for each other at a spin
barrier; a member that meets nobody (the iterations ran one after another) does the whole step alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numba as nb
import numpy as np
import pytest

import ref
from fast import team
from fast.step import PRANGE_ONLY
from ref.config import tiny_hf_dict
from ref.tiny import random_tensors, write_checkpoint


@nb.njit(cache=False)
def _spin(loads):
    """Keep this thread busy for `loads` loads of a counter (a delay without sleeping)."""
    c = np.zeros(1, np.int64)
    total = 0
    for _ in range(loads):
        total += team.load(c, 0)
    return total


@nb.njit(parallel=PRANGE_ONLY, cache=False)
def _phases(members, phases, delay, use_barrier):
    """Every member writes its cell of a phase, waits (or not), then reads the whole phase's row: seen
    [members, phases] <- the sum of the row as each member read it. The last member starts each phase late
    (`delay` loads), so a member that does not wait reads a row without its cell."""
    counter = np.zeros(1, np.int64)
    cells = np.zeros((phases, members), np.int64)
    seen = np.zeros((members, phases), np.int64)
    roles = np.zeros(members, np.int64)
    for tid in nb.prange(members):
        roles[tid] = team.meet(counter, members, team.PATIENCE)
        gen = 1
        for p in range(phases):
            if tid == members - 1:
                _spin(delay)
            cells[p, tid] = p * 100 + tid + 1
            if use_barrier:
                gen = team.wait(counter, members, gen)
            seen[tid, p] = cells[p].sum()
            if use_barrier:
                gen = team.wait(counter, members, gen)  # nobody writes the next phase before all have read
    return seen, roles


def _want(members, phases):
    return np.array([[sum(p * 100 + t + 1 for t in range(members)) for p in range(phases)]] * members)


@pytest.mark.skipif(nb.config.NUMBA_NUM_THREADS < 2, reason="one CPU: no second thread to wait for")
def test_barrier_makes_every_write_of_a_phase_visible_to_every_member():
    seen, roles = _phases(2, 6, 200_000, True)
    assert (roles == team.TEAM).all()
    np.testing.assert_array_equal(seen, _want(2, 6))
    seen, _ = _phases(2, 6, 200_000, False)  # the check can fail: without the barrier the late cell is missed
    assert not np.array_equal(seen, _want(2, 6))


@nb.njit(cache=False)
def _one_after_another(members, patience):
    """The members of one meeting run in turn on this thread, as a task-based threading layer may run a
    loop's iterations -> each one's role."""
    counter = np.zeros(1, np.int64)
    roles = np.zeros(members, np.int64)
    for tid in range(members):
        roles[tid] = team.meet(counter, members, patience)
    return roles, counter[0]


@pytest.mark.parametrize("members", [2, 3])
def test_a_member_that_meets_nobody_goes_solo_and_the_late_ones_stay_out(members):
    roles, counter = _one_after_another(members, 1000)
    assert roles.tolist() == [team.SOLO] + [team.OUT] * (members - 1)
    assert counter >= team.LONE  # so the solo member's barriers let it through at once
    assert team.wait(np.array([counter]), 1, 5) == 6


def test_a_member_alone_is_a_team_of_one():
    roles, counter = _one_after_another(1, 1000)
    assert roles.tolist() == [team.TEAM] and counter == 1


@pytest.mark.parametrize("n,members", [(0, 2), (1, 2), (7, 2), (64, 2), (10, 3), (5, 1)])
def test_shares_cover_every_program_once_in_order(n, members):
    parts = [team.share(n, tid, members) for tid in range(members)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


@nb.njit(cache=False)
def _atomics(a):
    return (team.fetch_add(a, 1, 3), a[1], team.compare_exchange(a, 0, 4, 7), a[0],
            team.compare_exchange(a, 0, 5, 7), team.load(a, 0))


def test_atomics_return_the_value_before():
    a = np.array([5, 9], np.int64)
    # fetch_add: 9 before, 12 after; 5 != 4: not swapped; 5 == 5: swapped to 7
    assert _atomics(a) == (9, 12, 5, 5, 5, 7)


def test_a_team_larger_than_the_cores_gives_refs_tokens(tmp_path):
    """NUMBA_NUM_THREADS above the cores (as where a container's CPU quota is below the CPUs it sees): five
    members on this machine's cores, most GEMV stages and key chunks fewer programs than members, waiting
    members giving up their cores after SPINS looks. Every step runs as a team of five (or, if one member
    waited out its patience, alone) and the tokens are ref's."""
    hf = tiny_hf_dict(num_hidden_layers=3)
    d = write_checkpoint(tmp_path / "m", hf, random_tensors(hf, 5, "BF16"))
    code = (
        "import json, sys, numpy as np, numba as nb, fast\n"
        "from fast import step\n"
        "roles, real = [], step._layers\n"
        "step._layers = lambda *a: roles.append(real(*a).tolist())\n"
        "got = fast.load_model(sys.argv[1]).generate(np.arange(3, 30)[None], max_new_tokens=6)\n"
        "print(json.dumps([nb.get_num_threads(), roles, got.tolist()]))\n")
    env = dict(os.environ, NUMBA_NUM_THREADS="5")
    run = subprocess.run([sys.executable, "-c", code, str(d)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    threads, roles, got = json.loads(run.stdout.strip().splitlines()[-1])
    assert threads == 5 and len(roles) == 5  # a step for each token after the first
    assert all(r == [team.TEAM] * 5 or sorted(r) == [team.OUT] * 4 + [team.SOLO] for r in roles), roles
    assert got == ref.load_model(d).generate(np.arange(3, 30)[None], max_new_tokens=6).tolist()
