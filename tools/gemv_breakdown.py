"""How fast the decode GEMV streams the bench model's layer weights, called four ways, beside a probe.

Over the same bytes (the bench model's layer matrices: 54, ~257 MB of bf16, with its 8 layers), one
process, in rounds that alternate the ways so that every round sees the same memory phase:

- `one_matrix`: fast's GEMV over one matrix holding all those bytes (1024 wide), one launch: the kernel's
  own speed, with no per-matrix cost;
- `compiled`: the model's matrix shapes as views of one buffer (as `fast.cpu.resident_copy` lays the
  weights out: in 2 MB pages, starting on 64 bytes), one parallel launch per matrix from compiled code,
  as `fast.step` runs a decoded token;
- `compiled_apart`: the same, each matrix allocated on its own (numpy asks for 2 MB pages from 4 MB, so
  the smaller ones lie in 4 KB pages);
- `python_calls`: the shapes of `compiled`, one call of `fast.cpu._gemv_bf16` from Python per matrix (what
  the seventeenth session measured as "one matrix per call": each call pays Python's dispatch);
- `probe`: `fast.cpu.read_all` over a fresh 1 GB buffer.

Each figure is the best of `--repeats` passes, in GB/s. At the end, medians over the rounds whose probe read
at least `--fast` GB/s and over the others (this host's memory moves between two speeds).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/gemv_breakdown.py [--rounds 60] [--layers 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba as nb
import numpy as np
from numba.typed import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast import cpu  # noqa: E402
from fast.bench import bench_config, decode_weight_shapes  # noqa: E402
from fast.step import PRANGE_ONLY  # noqa: E402


@nb.njit(parallel=PRANGE_ONLY, fastmath=cpu.FM)
def gemv_each(mats, xs, out):
    """For each matrix of mats [Out_k, In_k] (bf16 bits): out[0, :Out_k] = x @ it^T, one parallel launch each,
    x = xs[In_k // 1024 - 1] (In_k a multiple of 1024)."""
    for j in range(len(mats)):
        m = mats[j]
        ws = (m, m, m)
        x = xs[m.shape[1] // 1024 - 1]
        first, col, pairs = cpu._gemv_layout(x, ws, 1)
        for pid in nb.prange(first[1]):
            cpu._gemv_program(x, pairs, ws, first, col, pid, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--fast", type=float, default=45.0, help="probe GB/s from which a round counts as fast")
    ap.add_argument("--layers", type=int, default=8, help="layers of the bench model whose matrices are read")
    ap.add_argument("--probe-mb", type=int, default=1024, help="size of the probe's buffer")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    shapes = [s for name, s in decode_weight_shapes(bench_config(args.layers)).items() if "layers." in name]

    def bits(n):  # random bf16 bits of magnitude below 2 (no infinities or NaNs)
        return rng.integers(0, 1 << 16, n, dtype=np.uint16) & 0xBFFF

    total = sum(o * i for o, i in shapes)
    room = bits(total + 32)
    start = -room.ctypes.data % 64 // 2  # on 64 bytes, as fast.cpu.resident_copy lays the weights out
    buf = room[start:start + total]
    views, at = [], 0
    for o, i in shapes:
        views.append(buf[at:at + o * i].reshape(o, i))
        at += o * i
    apart = [bits(o * i).reshape(o, i) for o, i in shapes]
    one = buf.reshape(-1, 1024)
    xs = List([rng.standard_normal((1, 1024 * k)).astype(np.float32) for k in range(1, 5)])
    out = np.empty((1, one.shape[0]), np.float32)
    typed_views, typed_apart = List(views), List(apart)

    def python_calls():
        for v in views:
            cpu._gemv_bf16(xs[v.shape[1] // 1024 - 1], (v,), out[:, :v.shape[0]])

    ways = {"one_matrix": lambda: cpu._gemv_bf16(xs[0], (one,), out),
            "compiled": lambda: gemv_each(typed_views, xs, out),
            "compiled_apart": lambda: gemv_each(typed_apart, xs, out),
            "python_calls": python_calls}
    probe = np.ones((args.probe_mb << 8, 1024), np.float32)
    for f in ways.values():  # compile
        f()
    cpu.read_all(probe[:64])

    def best(f, nbytes):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    print(f"{len(shapes)} matrices, {2 * total / 1e6:.0f} MB; GB/s, best of {args.repeats} passes each")
    rows = []
    for r in range(args.rounds):
        names = list(ways) if r % 2 == 0 else list(ways)[::-1]
        row = {k: best(ways[k], 2 * total) for k in names}
        row["probe"] = best(lambda: cpu.read_all(probe), probe.nbytes)
        rows.append(row)
        print(" ".join(f"{k}={row[k]:.1f}" for k in list(ways) + ["probe"]), flush=True)
    for phase, sel in (("fast", [r for r in rows if r["probe"] >= args.fast]),
                       ("slow", [r for r in rows if r["probe"] < args.fast])):
        if sel:
            medians = " ".join(f"{k}={statistics.median(r[k] for r in sel):.1f}" for k in sel[0])
            print(f"medians, {len(sel)} rounds with the probe {'at or above' if phase == 'fast' else 'below'} "
                  f"{args.fast:g} GB/s: {medians}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
