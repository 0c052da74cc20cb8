"""Where fast's GPU time goes, for a session with a device machine (run by tools/gpu_check.sh after the
benchmark). Not a benchmark of record: each part prints what it measured and against which peer.

0. A prompt's GEMM: float32 (weights upcast, sgemm), split (three bf16 tensor-core products), torch bf16.
1. One launch of a one-element operation: CuPy's, torch's, our kernel through CuPy and through Numba.
2. The decode GEMV kernel alone, at the bench's and the 12B model's matrix shapes: GB/s of bf16 weights
   read, launched alone and ten in a CUDA graph, next to torch's bf16 GEMV (what HF runs) and the card's
   read bandwidth measured here.
3. The bench's sliding-layer attention for a 512-token prompt and for one decode token: the block kernel
   against ref's attention through cuBLAS (how gpu.attention chooses).
4. The bench model, then a 12B-wide one (fast.bench.wide_config, 2 layers): a 64-token prompt's logits
   with split and with float32 products against ref's; prompt and decode through ref's layer code, then
   the fused prompt with the captured step, then with the step speculated, A/B in one process; the step's graph alone (device time against
   the weights' bytes) and each of its launches alone in a graph; a 512-token prefill with every Kernels call timed between two device
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
import ref
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


def gemm_part() -> None:
    """A prompt's product [512, In] x [Out, In]^T three ways: gpu.matmul (the weights upcast, cuBLAS sgemm),
    x split into three bf16 summands and one bf16 tensor-core GEMM over the three (gpu.split_rows +
    gpu.split_product, then the sum), torch's bf16 linear (HF's; x rounded to bf16). Error: the largest
    |difference| from a float64 product of the same values over the largest |value|."""
    import torch

    print("== GEMM [512, In] x [Out, In]^T, bf16 weights: device time; error against float64")
    rng = np.random.default_rng(0)
    for out_f, in_f, what in ((4096, 1024, "bench gate/up"), (1024, 4096, "bench down"), (4096, 3840, "12B q"),
                              (15360, 3840, "12B gate/up"), (3840, 15360, "12B down")):
        bits = cp.asarray((rng.normal(size=(out_f, in_f)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
        w = Bf16(bits)
        x = cp.asarray(rng.normal(size=(512, in_f)).astype(np.float32))
        exact = x.astype(cp.float64) @ gpu.upcast(bits).astype(cp.float64).T
        scale = float(cp.abs(exact).max())
        parts, out = gpu.split_rows(x), cp.empty((3, 512, out_f), cp.float32)

        def split():
            gpu.split_product(gpu.split_rows(x), w, out)
            return (out[0] + out[1]) + out[2]
        def f32():
            gpu.GEMM = "f32"
            try:
                return gpu.matmul(x, w)
            finally:
                gpu.GEMM = "split"
        wt = torch.as_tensor(bits.view(cp.int16), device="cuda").view(torch.bfloat16)
        xt = torch.as_tensor(x, device="cuda").to(torch.bfloat16)
        errs = {"f32": float(cp.abs(f32() - exact).max()) / scale,
                "split": float(cp.abs(split() - exact).max()) / scale,
                "torch": float(cp.abs(cp.asarray(torch.nn.functional.linear(xt, wt).float()) - exact).max()) / scale}
        times = {"f32 (upcast + sgemm)": device_seconds(f32),
                 "split (all)": device_seconds(split),
                 "its GEMM": device_seconds(lambda: gpu.split_product(parts, w, out)),
                 "torch bf16": device_seconds(lambda: torch.nn.functional.linear(xt, wt))}
        print(f"{what:14} [{out_f:6}, {in_f:5}]  " + "  ".join(f"{n} {t * 1e6:7.1f} us" for n, t in times.items())
              + "   error " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))


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


def step_graphed(step, bound) -> None:
    """Each launch of one step captured ten times in a graph of its own and replayed: its device time with
    no launch gap (the step's state changes; only the times matter)."""
    names = [n for n, k in vars(gpu).items() if isinstance(k, gpu._Kernel)]
    saved = {n: getattr(gpu, n) for n in names}
    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, config):
            launch = self.kernel[config]
            return lambda *args: launches.append((self.name, lambda: launch(*args)))
    for n in names:
        setattr(gpu, n, Recorder(n, saved[n]))
    try:
        with step.stream:
            step._launch(bound)
    finally:
        for n in names:
            setattr(gpu, n, saved[n])
    per: dict = defaultdict(list)
    for name, f in launches:
        per[name].append(graph_seconds(f, repeats=5))
    print(f"   each launch alone in a graph: {sum(map(sum, per.values())) * 1e3:.3f} ms in {len(launches)} launches")
    for name, ts in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"      {name:22} {len(ts):4} launches {sum(ts) * 1e6:8.1f} us  (each {', '.join(f'{t * 1e6:.1f}' for t in ts[:6])})")


def prompt_profile(model, ids) -> None:
    """Where a fused prefill's host time goes: generate(max_new_tokens=1) (embed, prompt, head, the
    first token's selection) under cProfile, then the wait for the device; the functions with the most
    time of their own."""
    import cProfile
    import io
    import pstats

    model.whole_step = model.fused_prompt = True
    model.generate(ids, max_new_tokens=1)
    cp.cuda.Device().synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    model.generate(ids, max_new_tokens=1)
    prof.disable()
    t1 = time.perf_counter()
    cp.cuda.Device().synchronize()
    t2 = time.perf_counter()
    print(f"-- fused prefill ({ids.shape[1]} tokens) under cProfile: {(t1 - t0) * 1e3:.2f} ms of host time "
          f"(cProfile slows Python), then {(t2 - t1) * 1e3:.2f} ms until the device was done")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(16)
    for line in out.getvalue().splitlines():
        if line.strip() and not line.startswith(("   Ordered", "         ")) and "function calls" not in line:
            print("   " + line.strip()[:150])


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
        short = ids[:, :64]
        want = ref.load_model(path).forward(short)[0, -1]
        for mode in ("split", "f32"):  # a prompt's products either way, against ref's float32 on the host
            gpu.GEMM = mode
            got = model.forward(short)[0, -1]
            print(f"== {name}, prompt of 64 with {mode} products: last logits within "
                  f"{np.abs(got - want).max() / np.abs(want).max():.1e} of ref's (relative to the largest)")
        gpu.GEMM = "split"
        for whole, speculate in ((False, False), (True, False), (True, True), (False, False), (True, False), (True, True)):
            model.whole_step, model.fused_prompt, model.speculate = whole, whole, speculate
            model.generate(ids, max_new_tokens=2)
            if model._step is not None:
                model._step.guesses = [0, 0]
            stamps: list[float] = []
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=17, on_token=lambda _: stamps.append(time.perf_counter()))
            dec = float(np.median(np.diff(stamps)))
            what = ("fused prompt, graph step, speculated" if speculate else "fused prompt, graph step" if whole
                    else "layer code")
            print(f"== {name}, {what}: prefill {(stamps[0] - t0) * 1e3:.2f} ms, "
                  f"decode {dec * 1e3:.3f} ms/token ({2 * weights / dec / 1e9 / bw:.0%} of {bw:.0f} GB/s; median "
                  f"of 16 gaps, unsynchronised)" + (f"; guesses right, wrong: {model._step.guesses}" if speculate else ""))
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
        step_graphed(step, step._bound[cache])
        prompt_profile(model, ids)
        log: dict = defaultdict(list)
        model.kernels = timed_kernels(log)
        model.fused_prompt = False  # ref's layer code, whose Kernels calls are what this times
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
    for part in (gemm_part, launch_part, lambda: gemv_part(bw), lambda: attention_part(args.layers),
                 lambda: step_part(bench_config(args.layers), f"bench model ({args.layers} layers)", bw),
                 lambda: step_part(wide_config(2), "12B-wide model (2 layers)", bw)):
        try:
            part()
        except Exception as e:  # one failing part must not hide the others' figures
            print(f"!! {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
