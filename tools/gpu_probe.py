"""Where fast's GPU time goes, for a session with a device machine (run by tools/gpu_check.sh after the
benchmark). Not a benchmark of record: each part prints what it measured and against which peer.

1. One launch of a one-element operation: CuPy's, torch's, our kernel through CuPy and through Numba.
2. The decode GEMV kernel alone, at the bench's and the 12B model's matrix shapes: GB/s of bf16 weights
   read, launched alone and ten in a CUDA graph, next to torch's bf16 GEMV (what HF runs) and the card's
   read bandwidth measured here.
3. The bench's sliding-layer attention for a 512-token prompt and for one decode token: the block kernel
   against ref's attention through cuBLAS (how gpu.attention chooses).
4. The bench model, then a 12B-wide one (fast.bench.wide_config, 2 layers): decode through the captured
   step and through ref's layer code, A/B in one process; the step's graph alone (device time against
   the weights' bytes); a 512-token prefill with every Kernels call timed between two device
   synchronisations (so the sum runs above an unsynchronised prefill).

usage: python3 tools/gpu_probe.py [--layers 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cupy as cp
import numpy as np

import fast
from fast import gpu
from fast.bench import bench_config, bench_prompt, gpu_read_bandwidth, wide_config, write_bench_checkpoint
from ref.config import SLIDING, from_hf_dict
from ref.decoder import Kernels
from ref.masks import MaskSpec
from ref.safetensors_io import Bf16


def device_seconds(f, repeats: int = 20) -> float:
    """Median seconds of f() on the device, between CUDA events, after two warm-up calls."""
    f(), f()
    times = []
    for _ in range(repeats):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(times))


def graph_seconds(f, copies: int = 10, repeats: int = 20) -> float:
    """Median device seconds of one f() among `copies` captured into one CUDA graph (no launch cost)."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        f()
        stream.begin_capture()
        for _ in range(copies):
            f()
        graph = stream.end_capture()
    times = []
    for _ in range(repeats + 2):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        graph.launch(stream)
        b.record(stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3 / copies)
    return float(np.median(times[2:]))


def gemv_part(bw: float) -> None:
    import torch

    print(f"== GEMV [1, In] x [Out, In]^T, bf16 weights (card read bandwidth {bw:.0f} GB/s, torch sum)")
    rng = np.random.default_rng(0)
    for out_f, in_f, what in ((4096, 1024, "bench gate/up"), (1024, 4096, "bench down"),
                              (32768, 1024, "bench head"), (4096, 3840, "12B q"), (15360, 3840, "12B gate/up"),
                              (3840, 15360, "12B down"), (262144, 3840, "12B head")):
        bits = (cp.random.random((out_f, in_f), dtype=cp.float32) * 0x380 + 0x3C00).astype(cp.uint16)  # bf16 in [2^-7, 1)
        x = cp.asarray(rng.normal(size=(1, in_f)).astype(np.float32))
        out = cp.empty((1, out_f), cp.float32)
        w = Bf16(bits)
        ours = device_seconds(lambda: gpu.gemv(x, [w], out))
        graphed = graph_seconds(lambda: gpu.gemv(x, [w], out))
        wt = torch.as_tensor(bits.view(cp.int16), device="cuda").view(torch.bfloat16)
        xt = torch.as_tensor(x, device="cuda").to(torch.bfloat16)
        theirs = device_seconds(lambda: torch.nn.functional.linear(xt, wt))
        nbytes = out_f * in_f * 2
        print(f"{what:14} [{out_f:6}, {in_f:5}]  ours {ours * 1e6:7.1f} us {nbytes / ours / 1e9:5.0f} GB/s "
              f"{nbytes / ours / 1e9 / bw:4.0%}; in a graph of 10 {graphed * 1e6:7.1f} us "
              f"{nbytes / graphed / 1e9 / bw:4.0%}   torch bf16 {theirs * 1e6:7.1f} us {nbytes / theirs / 1e9:5.0f} GB/s")


def launch_part() -> None:
    import torch

    print("== one launch of a one-element operation (event to event: the host's launch time included)")
    a, t = cp.ones(1, cp.float32), torch.ones(1, device="cuda")
    for name, f in (("CuPy elementwise a + 1", lambda: a + 1), ("torch t + 1", lambda: t + 1),
                    ("our kernel, CuPy's launcher", lambda: gpu.gelu_mul_kernel[1, gpu.THREADS](a, a, a)),
                    ("our kernel, Numba's launcher", lambda: gpu.gelu_mul_kernel.numba[1, gpu.THREADS](a, a, a))):
        print(f"   {name:30} {device_seconds(f) * 1e6:7.1f} us")


def attention_part(layers: int) -> None:
    """The bench model's sliding-layer attention, prompt (512 x 512) and decode (1 x 513): the block kernel
    against ref's attention through cuBLAS (dense_attention)."""
    cfg = from_hf_dict(bench_config(layers))
    rng = np.random.default_rng(0)
    print("== attention, 8 query heads / 4 kv heads of 128 (bench model, sliding layer)")
    for t, past in ((512, 0), (1, 512)):
        q = cp.asarray(rng.normal(size=(1, t, 8, 128)).astype(np.float32))
        k, v = (cp.asarray(rng.normal(size=(1, past + t, 4, 128)).astype(np.float32)) for _ in range(2))
        seen = np.arange(past + t)
        spec = MaskSpec.from_seen(cfg, SLIDING, seen[past:], seen, np.ones((1, past + t), bool),
                                  np.full((1, past + t), -1))
        times = {name: device_seconds(lambda: f(q, k, v, spec), repeats=10)
                 for name, f in (("block kernel", gpu.block_attention), ("cuBLAS (ref's)", gpu.dense_attention))}
        print(f"   T={t:3} S={past + t:3}  " + "  ".join(f"{n} {s * 1e6:8.1f} us" for n, s in times.items()))


def timed_kernels(log: dict) -> Kernels:
    """gpu.KERNELS with every call timed between two device synchronisations: log[name] gets (end, seconds)."""
    def wrap(name, f):
        def call(*args, **kwargs):
            cp.cuda.Device().synchronize()
            t = time.perf_counter()
            y = f(*args, **kwargs)
            cp.cuda.Device().synchronize()
            end = time.perf_counter()
            log[name].append((end, end - t))
            return y
        return call
    k = gpu.KERNELS
    return Kernels(**{n: wrap(n, getattr(k, n)) for n in
                      ("linear", "linears", "rms_norm", "apply_rope", "attention", "mlp", "lm_head")})


class _Timed:
    """A gpu._Kernel whose launches are bracketed by two CUDA events on the current stream (into log)."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, config):
        launch = self.kernel[config]

        def call(*args):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            launch(*args)
            b.record()
            self.log[self.name].append((a, b))
        return call


def step_profile(step, bound) -> None:
    """One step launch by launch (not replayed), each kernel's device time between events: where the
    graph's time goes (the softcap's three CuPy operations are not counted)."""
    names = [n for n, k in vars(gpu).items() if isinstance(k, gpu._Kernel)]
    saved = {n: getattr(gpu, n) for n in names}
    log: dict = defaultdict(list)
    for n in names:
        setattr(gpu, n, _Timed(n, saved[n], log))
    try:
        with step.stream:
            step._launch(bound)  # recomputes a step's values in place: only its time is of interest here
        step.stream.synchronize()
    finally:
        for n in names:
            setattr(gpu, n, saved[n])
    total = sum(cp.cuda.get_elapsed_time(a, b) for pairs in log.values() for a, b in pairs) / 1e3
    print(f"   one step launch by launch: kernels' device time {total * 1e3:.3f} ms in "
          f"{sum(map(len, log.values()))} launches")
    for n, pairs in sorted(log.items(), key=lambda kv: -sum(cp.cuda.get_elapsed_time(a, b) for a, b in kv[1])):
        t = sum(cp.cuda.get_elapsed_time(a, b) for a, b in pairs)
        print(f"      {n:22} {len(pairs):4} launches {t * 1e3:8.1f} us")


def step_part(hf: dict, name: str, bw: float, prompt: int = 512) -> None:
    """A model through the captured step and through ref's layer code (whole_step off), A/B in one process,
    unsynchronised as fast.bench times them; then the step's graph replayed alone (device time, between
    events) against the bytes a token reads; then the prefill with every Kernels call synchronised."""
    from fast.bench import decoder_weight_counts

    weights, _ = decoder_weight_counts(hf)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bench_checkpoint(Path(tmp), hf)
        model = fast.load_model(path, device="gpu")
        model.compile()
        ids = bench_prompt(prompt)
        for whole in (False, True, False, True):
            model.whole_step = whole
            model.generate(ids, max_new_tokens=2)
            stamps: list[float] = []
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=17, on_token=lambda _: stamps.append(time.perf_counter()))
            dec = float(np.median(np.diff(stamps)))
            print(f"== {name}, {'graph step' if whole else 'layer code'}: prefill {(stamps[0] - t0) * 1e3:.2f} ms, "
                  f"decode {dec * 1e3:.3f} ms/token ({2 * weights / dec / 1e9 / bw:.0%} of {bw:.0f} GB/s; median "
                  f"of 16 gaps, unsynchronised)")
        cache = model.new_cache(1, prompt + 8)
        x = model.embed(ids)
        ok, blk = np.ones((1, prompt), bool), np.full((1, prompt), -1)
        model.run_decoder(x, np.arange(prompt)[None], ok, blk, cache)
        step = model._step
        step(model.embed(np.array([[5]])), np.array([[prompt]]), ok[:, :1], blk[:, :1], cache)
        graph = step._bound[cache].graph
        seconds = []
        for _ in range(22):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(step.stream)
            graph.launch(step.stream)
            b.record(step.stream)
            b.synchronize()
            seconds.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
        rep = float(np.median(seconds[2:]))
        print(f"   the step's graph alone: {rep * 1e3:.3f} ms device time = {2 * weights / rep / 1e9:.0f} GB/s, "
              f"{2 * weights / rep / 1e9 / bw:.0%} of the card's read bandwidth (its weights: {2 * weights / 1e9:.2f} GB)")
        step_profile(step, step._bound[cache])
        log: dict = defaultdict(list)
        model.kernels = timed_kernels(log)
        t0 = time.perf_counter()
        stamps = []
        model.generate(ids, max_new_tokens=1, on_token=lambda _: stamps.append(time.perf_counter()))
        wall = stamps[0] - t0
        print(f"-- prefill ({prompt} tokens): {wall * 1e3:.2f} ms with a sync around each kernel call")
        total = 0.0
        for kname, times in log.items():
            total += sum(d for _, d in times)
            print(f"   {kname:10} {len(times):4} calls {sum(d for _, d in times) * 1e3:8.2f} ms")
        print(f"   {'between':10} {'':4}       {(wall - total) * 1e3:8.2f} ms (host: masks, cache, Python)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_probe.py")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    bw = gpu_read_bandwidth()
    for part in (launch_part, lambda: gemv_part(bw), lambda: attention_part(args.layers),
                 lambda: step_part(bench_config(args.layers), f"bench model ({args.layers} layers)", bw),
                 lambda: step_part(wide_config(2), "12B-wide model (2 layers)", bw)):
        try:
            part()
        except Exception as e:  # one failing part must not hide the others' figures
            print(f"!! {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
