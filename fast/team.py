"""A team of threads that stays together through a whole decoding step: atomics and a spin barrier.

The compiled decoding step (fast/step.py) once ran every stage of a layer (q/k/v, attention, o, gate/up,
down) as its own parallel loop: ~40 loops a token on the bench model. Starting and joining a loop costs
~1.5 us with warm caches, but the step starts each one just after its threads streamed megabytes of
weights through the caches, and then the same empty two-thread loop costs 10-11 us (measured on the 2-core
Zen 1: after a 16 MB read, against 1.5 us after a 16 KB one), ~0.4 ms a token. So the step's threads
now enter one parallel loop per token, one iteration each (a member), and meet between stages at a
barrier here: an atomic add and a spin on one counter, ~1 us after the same 16 MB read.

A barrier is only safe if every member really runs at the same time. OpenMP's team guarantees that; a
task-based threading layer (TBB) or a nested call may run the iterations one after another. So the first
meeting (`meet`) waits a bounded time: a member that meets nobody takes the whole step alone (SOLO) and
the late ones do nothing (OUT), and the numbers are the same either way.

`counter` is an int64 array of at least one element, zero at the start of a step, shared by the members.
"""

from __future__ import annotations

import sys

import numba as nb
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

OUT, TEAM, SOLO = 0, 1, 2  # what `meet` tells a member: do nothing, work your share, work everything
LONE = 1 << 40  # the counter from the moment a member goes solo (above any count of arrivals)
# A waiting member spins SPINS loads of the counter (~30-70 us), then gives up its core at every further
# look (`yield_core`): where the team has more threads than the process has cores (NUMBA_NUM_THREADS
# above a container's CPU quota), a member spinning on a core the others need would hold the barrier up.
SPINS = 1 << 16
PATIENCE = 1 << 12  # the yielding looks after SPINS at which the first meeting stops waiting (`meet`)


def _slot(context, builder, sig, args):
    """Pointer to element args[1] of the int64 array args[0]."""
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])


@intrinsic
def fetch_add(typingctx, a, i, v):
    """a[i] += v atomically (sequentially consistent) -> the value before."""
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), args[2], "seq_cst")
    return types.int64(types.int64[::1], types.intp, types.int64), codegen


@intrinsic
def load(typingctx, a, i):
    """a[i], read atomically with acquire order (so a spin sees other threads' updates)."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "acquire", 8)
    return types.int64(types.int64[::1], types.intp), codegen


@intrinsic
def store(typingctx, a, i, v):
    """a[i] = v atomically with release order: what this thread wrote before is seen by a thread whose
    acquire `load` sees v."""
    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _slot(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()
    return types.void(types.int64[::1], types.intp, types.int64), codegen


@nb.njit(nogil=True, cache=True)
def publish(a, i, v):
    """`store` for Python's callers: a[i] = v, after every write this thread made before it."""
    store(a, i, v)


@intrinsic
def compare_exchange(typingctx, a, i, expected, new):
    """a[i] = new if a[i] == expected, atomically -> the value a[i] held (== expected: it was swapped)."""
    def codegen(context, builder, sig, args):
        pair = builder.cmpxchg(_slot(context, builder, sig, args), args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)
    return types.int64(types.int64[::1], types.intp, types.int64, types.int64), codegen


@intrinsic
def yield_core(typingctx):
    """Let another runnable thread have this core (POSIX sched_yield; nothing on Windows)."""
    def codegen(context, builder, sig, args):
        if not sys.platform.startswith("win"):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@nb.njit(cache=True)
def meet(counter, members, patience):
    """The first meeting of `members` members -> TEAM (all came: work your share), SOLO (nobody else came
    within SPINS loads and `patience` yielding ones: work everything) or OUT (someone went solo before you
    came: do nothing)."""
    if fetch_add(counter, 0, 1) >= LONE:
        return OUT
    for look in range(SPINS + patience):
        c = load(counter, 0)
        if c >= LONE:
            return OUT
        if c >= members:
            return TEAM
        if look >= SPINS:
            yield_core()
    c = load(counter, 0)
    while c < members:  # go solo, unless the others arrive first
        seen = compare_exchange(counter, 0, c, LONE)
        if seen == c:
            return SOLO
        c = seen
    return OUT if c >= LONE else TEAM


@nb.njit(cache=True)
def wait(counter, members, gen):
    """Barrier number gen (1, 2, ... after `meet`): return once all `members` have arrived -> gen + 1.
    The counter only grows: barrier gen is passed when it reaches members * (gen + 1), and after a solo
    start (counter >= LONE) at once."""
    fetch_add(counter, 0, 1)
    target = members * (gen + 1)
    look = 0
    while load(counter, 0) < target:
        look += 1
        if look > SPINS:
            yield_core()
    return gen + 1


@nb.njit(nogil=True, cache=True)
def wait_change(flag, i, seen, yields):
    """Wait, without the GIL, for flag[i] to differ from `seen`: SPINS loads, then one yield of the core at
    each further look, at most `yields` of them -> flag[i] (`seen` if it had not changed by then). The
    prefill's helper threads wait for work and for each other this way (fast.cpu's `_Crew`)."""
    for look in range(SPINS + yields):
        v = load(flag, i)
        if v != seen:
            return v
        if look >= SPINS:
            yield_core()
    return seen


@nb.njit(cache=True)
def share(n, tid, members):
    """Member tid's part of n programs -> (lo, hi): n split into `members` runs of consecutive programs."""
    return n * tid // members, n * (tid + 1) // members
