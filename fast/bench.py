"""`python -m fast.bench`: prefill and decode speed of HF transformers, ref and fast on one machine, in one run.

A synthetic bf16 checkpoint (~160M parameters, Gemma 4 Unified layout, real layer pattern, vocabulary
32768) is written to a temp dir; every backend loads the same file. Prefill is the time to the first new
token for a 512-token prompt, as tokens/s; decode is the time between two of the following 32 greedy
tokens, as ms/token. Both come from the arrival times of the tokens within a `generate` call, after a
warm-up call: prefill is the best of `--repeats` calls, decode the median gap over all of them. The
backends' calls are interleaved, one call of each per round (`measure`), so a phase of a shared host
reaches all of them alike; each round's prefill ratios are printed under the table. fast's compile time
(Numba compiling, or loading its cache: `model.compile()`) is reported on its own line and never counted.
The machine's limits are measured in the same run, right before the first round and after the last:
float32 GEMM peak (the bound for prefill) and memory read bandwidth (decode must stream every weight once
per token): the best of probes over fresh 1 GB buffers and a read of each CPU backend's own weight
buffers, the memory its decode streams. Every backend is set against the run's best readings.

For numpy's OpenBLAS to use its best kernels, run it as
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fast.bench` where those are set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ref.config import SLIDING, from_hf_dict, gemma4_12b_hf_dict, media_token_ids, tiny_hf_dict
from ref.errors import OneLineParser, UsageError, positive_int
from ref.tiny import write_large_bf16_checkpoint
from ref.weights import expected_shapes


def layer_pattern(layers: int) -> list[str]:
    """The real model's pattern (five sliding layers, then a global one), cut to `layers`, ending global."""
    return ((["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
            + ["sliding_attention"] * (layers % 6 - 1) + ["full_attention"] * (layers % 6 > 0))


BENCH_POSITIONS = 4096  # the bench models' max_position_embeddings: prompt and decoded tokens fit in it
BENCH_VOCAB = 32768  # its top id is the bench's eos (suppressed); its media ids lie just below (media_token_ids)


def bench_config(layers: int = 8) -> dict:
    """~160M parameters with the real model's shapes scaled down: 4:1 MLP, GQA 8/4, k_eq_v global layers."""
    hf = tiny_hf_dict(vocab_size=BENCH_VOCAB, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
                      num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=BENCH_POSITIONS,
                      layer_types=layer_pattern(layers))
    hf["vision_config"].update(mm_embed_dim=1024, output_proj_dims=1024, mm_posemb_size=64)
    return hf


def wide_config(layers: int = 2) -> dict:
    """Gemma 4 12B's own sizes (width 3840, MLP 15360, 16/8 heads of 256, global heads of 512, the 262144 x
    3840 output table) with `layers` layers instead of 48: for a GPU, whose decode the bench model's 342 MB
    cannot load (a step's launches, not its bytes, bound it there). The image/audio token ids of the bench."""
    hf = gemma4_12b_hf_dict()
    hf["text_config"].update(num_hidden_layers=layers, layer_types=layer_pattern(layers),
                             max_position_embeddings=BENCH_POSITIONS)
    hf.update(media_token_ids(BENCH_VOCAB))
    return hf


def write_bench_checkpoint(directory: Path, hf: dict) -> Path:
    """The bench checkpoint (random bf16 weights of `hf`, e.g. bench_config()) in directory/bench -> its path.
    Its eos id is also suppressed, so every run generates exactly the tokens asked for."""
    path = write_large_bf16_checkpoint(Path(directory) / "bench", hf)
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [BENCH_VOCAB - 1], "suppress_tokens": [BENCH_VOCAB - 1], "pad_token_id": 0}))
    return path


def bench_prompt(tokens: int) -> np.ndarray:
    """-> ids [1, tokens]: bos, then random text ids (the same every run)."""
    return np.concatenate([[2], np.random.default_rng(0).integers(3, 30000, tokens - 1)])[None]


HEAD = "model.language_model.embed_tokens.weight"  # the bench model's output head (tied to the embedding)


def decode_weight_shapes(hf: dict) -> dict:
    """{name: shape} of the weights a decoded token reads: the decoder's matrices and the tied head."""
    shapes = expected_shapes(from_hf_dict(hf))
    return {n: s for n, s in shapes.items() if ("language_model.layers" in n and len(s) == 2) or n == HEAD}


def decoder_weight_counts(hf: dict) -> tuple[int, int]:
    """(parameters in the decoder's matrices incl. the tied head, of which the head) for FLOP/byte counts."""
    shapes = decode_weight_shapes(hf)
    return sum(int(np.prod(s)) for s in shapes.values()), int(np.prod(shapes[HEAD]))


# The last layer's query side: a prefill for generation needs its output at the last token only (the one
# logit row it samples from), so it runs on that token alone, while the layer's K and V (for the cache)
# and every earlier layer (whose outputs feed the next layer's K and V) run on every token.
QUERY_SIDE = ("self_attn.q_proj.", "self_attn.o_proj.", "mlp.")


def prefill_rows(name: str, hf: dict, tokens: int, last_only: bool = True) -> int:
    """Tokens that a `tokens`-token prefill for generation must run decoder matrix `name` on: every one,
    but the head and (`last_only`) the last layer's query side (QUERY_SIDE) the last alone. This is the
    work counted, for every backend: fast's prompt pass skips the rest (`fast.prefill.forward`,
    last_only); HF computes it, and is not credited for it."""
    last = f"language_model.layers.{from_hf_dict(hf).num_layers - 1}."
    narrow = last_only and last in name and any(q in name for q in QUERY_SIDE)
    return 1 if name == HEAD or narrow else tokens


def attention_flops(hf: dict, tokens: int, last_only: bool = True) -> int:
    """FLOPs a causal prefill of `tokens` text tokens spends in attention's two matrix products (scores
    q.k and the weighted sum of values, 2 x head_dim multiply-adds per visible query-key pair and query
    head), counting only the pairs the mask lets a query see (up to `window` keys on sliding layers), and in
    the last layer (`last_only`) only the last token's query (`prefill_rows`)."""
    cfg = from_hf_dict(hf)
    total = 0
    for i, spec in enumerate(cfg.layers):
        queries = range(tokens - 1, tokens) if last_only and i == cfg.num_layers - 1 else range(tokens)
        seen = sum(t + 1 if spec.kind != SLIDING else min(t + 1, cfg.window) for t in queries)
        total += 2 * 2 * spec.head_dim * cfg.num_attention_heads * seen
    return total


def prefill_flops(hf: dict, tokens: int, last_only: bool = True) -> int:
    """FLOPs of a `tokens`-token prefill for generation: each decoder matrix on the tokens it must see
    (`prefill_rows`: every one, the head and, with `last_only`, the last layer's query side the last alone)
    and attention's products over the visible pairs (`attention_flops`)."""
    return sum(2 * int(np.prod(shape)) * prefill_rows(name, hf, tokens, last_only)
               for name, shape in decode_weight_shapes(hf).items()) + attention_flops(hf, tokens, last_only)


# ---- machine limits -----------------------------------------------------------------------------

def _best_product_seconds(a: np.ndarray, b: np.ndarray, repeats: int, layouts: bool = False) -> float:
    """Seconds of the fastest a @ b (float32, every core) over the BLAS libraries here
    (fast.cpu.blas_libraries) and, with `layouts`, also the token-minor layout (b^T @ a^T, transposes made
    beforehand, not timed). The CPU limits are the best of them."""
    from fast.cpu import blas_libraries, f32_product

    calls = [(a, b, False)] + ([(np.ascontiguousarray(b.T), np.ascontiguousarray(a.T), False)] if layouts else [])
    best = float("inf")
    for x, y, t in calls:
        out = np.empty((x.shape[0], y.shape[1]), np.float32)
        for lib in blas_libraries():
            f32_product(x, y, out, t, library=lib)
            best = min(best, min(_timed(lambda: f32_product(x, y, out, t, library=lib)) for _ in range(repeats)))
    return best


def sgemm_peak(n: int = 2048, repeats: int = 3) -> float:
    """float32 GEMM GFLOP/s, all cores: the best of the BLAS libraries here (`_best_product_seconds`)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    return 2 * n**3 / _best_product_seconds(a, a, repeats) / 1e9


def gemm_bound(hf: dict, tokens: int, repeats: int = 3) -> float:
    """Seconds the BLAS libraries here (fast.cpu.blas_libraries) need for the prefill's own GEMMs (every decoder
    matrix [Out, In] on the [rows, In] that `prefill_rows` gives it, weights already float32), each the fastest
    of its two layouts, x @ w^T and the token-minor w @ x^T that fast.cpu.matmul_t uses, in either library:
    the limit a float32 prefill can reach at these shapes, which are smaller than the square sgemm above and
    run below its peak."""
    shapes = expected_shapes(from_hf_dict(hf))
    rng = np.random.default_rng(0)
    per_shape, total = {}, 0.0
    for name, shape in shapes.items():
        if "language_model.layers" not in name or len(shape) != 2:
            continue
        rows = prefill_rows(name, hf, tokens)
        if (shape, rows) not in per_shape:
            w = rng.random(shape, dtype=np.float32)
            x = rng.random((rows, shape[1]), dtype=np.float32)
            per_shape[shape, rows] = _best_product_seconds(x, np.ascontiguousarray(w.T), repeats, layouts=True)
        total += per_shape[shape, rows]
    return total


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s reading a buffer far larger than the caches, the best of three ways: a parallel Numba sum
    (every core), numpy's sum (one core) and fast's bf16 GEMV over an nbytes matrix (the decode's own
    access pattern). Each is a lower bound on what the memory delivers; a probe slower than the memory
    would make a decode look closer to the limit than it is, so the best of them is the limit."""
    from fast.cpu import _gemv_bf16, read_all

    a = np.ones((nbytes // 4096, 1024), np.float32)
    read_all(a[:64])
    probes = [min(_timed(lambda: read_all(a)) for _ in range(repeats)),
              min(_timed(lambda: a.sum()) for _ in range(repeats))]
    a = None  # free the gigabyte before allocating the next
    w = np.full((nbytes // 2048, 1024), 0x3F80, np.uint16)
    x, y = np.ones((1, 1024), np.float32), np.empty((1, w.shape[0]), np.float32)
    _gemv_bf16(x, (w[:64],), y[:, :64])
    probes.append(min(_timed(lambda: _gemv_bf16(x, (w,), y)) for _ in range(repeats)))
    return nbytes / min(probes) / 1e9


def aligned_words(a: np.ndarray) -> np.ndarray:
    """A C-contiguous buffer -> the 8-byte words that lie wholly inside it, as a uint64 view (at most 7
    bytes left out at each end)."""
    b = a.reshape(-1).view(np.uint8)
    lead = -b.ctypes.data % 8
    n = max(0, b.size - lead) // 8
    return b[lead:lead + 8 * n].view(np.uint64)


def own_weight_buffers(model, hf: dict) -> list[np.ndarray]:
    """The memory a decoded token of `model` streams (`decode_weight_shapes`), as numpy arrays over that
    same memory: ref's or fast's loaded matrices (bf16 bits), or an HF model's parameters."""
    names = decode_weight_shapes(hf)
    if hasattr(model, "named_parameters"):  # HF transformers: torch tensors, float32 or bf16
        import torch

        params = dict(model.named_parameters())
        return [params[n].detach().view(torch.uint8).numpy() for n in names]
    return [np.asarray(getattr(model.tensors[n], "bits", model.tensors[n])) for n in names]


def own_read_bandwidth(buffers: list, repeats: int = 5) -> float:
    """GB/s summing the words of these buffers with every core (fast.cpu.read_words): how fast this
    memory reads. On a host that places buffers in memory of different speed (the 2-core Zen 4's did:
    one buffer read 35 GB/s while another read 60, and the reverse a minute later), a fresh probe
    buffer alone can read slower than the weights a decode streams."""
    from numba.typed import List

    from fast.cpu import read_words

    words = List([aligned_words(b) for b in buffers])
    read_words(List([words[0][:1]]))  # compiled (or loaded from Numba's cache) before the timed reads
    return sum(w.nbytes for w in words) / min(_timed(lambda: read_words(words)) for _ in range(repeats)) / 1e9


def gpu_read_bandwidth(nbytes: int = 1 << 31, repeats: int = 5) -> float:
    """GB/s the GPU reads (a float32 sum over 2 GB, through torch), the bound for GPU decode."""
    import torch

    a = torch.ones(nbytes // 4, device="cuda")
    a.sum()
    torch.cuda.synchronize()

    def run():
        a.sum()
        torch.cuda.synchronize()

    return nbytes / min(_timed(run) for _ in range(repeats)) / 1e9


def blas_choice() -> str:
    """What fast.cpu.choose_blas picked and why, in words."""
    from fast import cpu

    name = {"openblas": "numpy's OpenBLAS", "mkl": "Intel's MKL"}[cpu.choose_blas()]
    if "mkl" not in cpu.blas_libraries():
        return f"{name} (MKL is not installed)"
    speeds = cpu.BLAS_SPEEDS
    if not speeds:
        return f"{name} (FAST_BLAS={os.environ.get('FAST_BLAS')})"
    won = cpu.BLAS_ROUNDS_WON.get(cpu.choose_blas(), 0)
    return (f"{name}: faster in {won} of {sum(cpu.BLAS_ROUNDS_WON.values())} rounds at {cpu.CHOICE_SHAPE} here "
            f"(the best call of each: {', '.join(f'{k} {v:.0f}' for k, v in speeds.items())} GFLOP/s)")


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ---- backends -----------------------------------------------------------------------------------

def read_limits(buffers: list) -> tuple[float, float]:
    """(GB/s of the best 1 GB probe, GB/s reading `buffers`, a backend's own weights) now."""
    own = own_read_bandwidth(buffers)
    return read_bandwidth(), own


def cpu_limits(buffers: list) -> tuple[float, float, float]:
    """(sgemm GFLOP/s, read GB/s: the better of `read_limits`, GB/s reading `buffers`) now."""
    probe, own = read_limits(buffers)
    return sgemm_peak(), max(probe, own), own


SETTLE_S = 0.2  # seconds left idle before each timed call (`measure`)


@dataclass
class Runner:
    """One backend, loaded and warmed up: `once()` runs one timed `generate` call and returns (its start, the
    arrival time of each new token); `buffers`, for a CPU backend, the weights its decode streams (its
    own-memory limit), None on a GPU."""
    name: str
    once: Callable[[], tuple[float, list[float]]]
    bytes_per_weight: int
    buffers: list | None = None


def round_order(runners: list, k: int) -> list:
    """The order of round k: as given in even rounds, reversed in odd ones, so no backend always runs right
    after the same one (and pairs given side by side stay side by side)."""
    return list(runners) if k % 2 == 0 else list(reversed(runners))


def measure(runners: list, repeats: int, limits=cpu_limits, settle: float = SETTLE_S) -> dict:
    """Time the backends in `repeats` interleaved rounds, each a call of every backend (`round_order`), so
    that all of them meet the same phases of a shared host: on the Ice Lake host the same product took
    13.8-20.0 ms within one minute, and five runs of the same code, backends timed one after another (as
    before the twenty-ninth session), put fast's prefill at 0.96-1.21x HF float32. `settle`
    seconds pass before each call, untimed, so the thread pools of the backend before it (OpenBLAS's,
    torch's, Numba's) stop spinning first. The CPU limits are read before the first round and after the
    last (`limits(buffers)` per CPU backend -> peak, bandwidth, own buffers' speed), and every CPU backend is
    set against the best peak and the best bandwidth of all of them: with the calls interleaved, no
    backend's readings are nearer its calls than another's, and readings a minute apart moved by up to 30 %
    (thirty-third session, Ice Lake), which set each row against its own readings had let into the rows.
    -> {name: (per-round prefill seconds, decode gaps over every round, (peak, bw, own) or None)}."""
    before = {r.name: limits(r.buffers) for r in runners if r.buffers is not None}
    prefill = {r.name: [] for r in runners}
    gaps = {r.name: [] for r in runners}
    for k in range(repeats):
        for r in round_order(runners, k):
            time.sleep(settle)
            t0, stamps = r.once()
            if len(stamps) < 2:
                raise RuntimeError(f"{r.name}: the run produced {len(stamps)} tokens; decode needs at least 2")
            prefill[r.name].append(stamps[0] - t0)
            gaps[r.name] += list(np.diff(stamps))
    after = {r.name: limits(r.buffers) for r in runners if r.buffers is not None}
    readings = list(before.values()) + list(after.values())
    peak, bw = (max(r[0] for r in readings), max(r[1] for r in readings)) if readings else (None, None)
    return {r.name: (prefill[r.name], gaps[r.name],
                     (peak, bw, max(before[r.name][2], after[r.name][2])) if r.buffers is not None else None)
            for r in runners}


def ours(name, model, ids, n_decode, buffers=None) -> Runner:
    def once():
        stamps: list[float] = []
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1 + n_decode, on_token=lambda _: stamps.append(time.perf_counter()))
        return t0, stamps

    model.generate(ids, max_new_tokens=2)  # warm-up
    return Runner(name, once, 2, buffers)


def hf_runner(name, path, dtype, device, ids, n_decode, hf_cfg, attn="sdpa") -> Runner:
    import torch
    from transformers import Gemma4UnifiedForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn).to(device).eval()
    x = torch.as_tensor(ids, device=device)

    class Stamps(BaseStreamer):
        """generate() hands the streamer the prompt first, then each new token (moved to the host, so on
        CUDA every stamp follows a synchronisation)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            value.cpu()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def once():
        st = Stamps()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=1 + n_decode, min_new_tokens=1 + n_decode, do_sample=False,
                           streamer=st)
        return t0, st.times[1:]  # times[0] is the prompt

    with torch.no_grad():
        model.generate(x, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    return Runner(name, once, 4 if dtype == torch.float32 else 2,
                  own_weight_buffers(model, hf_cfg) if device == "cpu" else None)


BACKENDS = ("hf-f32", "hf-bf16", "ref", "fast", "fast-gpu")  # the names --skip takes
ROW_ORDER = ("HF transformers f32 (cpu)", "HF transformers bf16 (cpu)", "ref (numpy)", "fast (numba, cpu)",
             "HF transformers bf16 (cuda, eager)", "fast (cupy + numba-cuda, gpu)")  # the table's rows


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before a minute of benchmarking is spent: counts at least 1, backends
    by name, the prompt and decoded tokens within the model's positions, --json's folder there, and fast's
    $FAST_BLAS (fast.cpu.requested_blas). A bad one raises ref.errors.UsageError."""
    ap = OneLineParser(prog="python -m fast.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=positive_int, default=512, metavar="N", help="prompt tokens (default 512)")
    ap.add_argument("--decode", type=positive_int, default=32, metavar="N",
                    help="decoded tokens timed after the first (default 32)")
    ap.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                    help="rounds, each one timed call per backend; prefill is the best, decode the median gap "
                         "(default 5)")
    ap.add_argument("--layers", type=positive_int, metavar="N",
                    help="decoder layers (default: 8 for the bench model, 2 for --wide)")
    ap.add_argument("--wide", action="store_true",
                    help="Gemma 4 12B's own layer and table sizes (fast.bench.wide_config) instead of the bench model")
    ap.add_argument("--skip", default="", help=f"comma-separated backends to leave out ({','.join(BACKENDS)})")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    unknown = sorted(args.skip - set(BACKENDS))
    if unknown:
        raise UsageError(f"--skip: no backend named {', '.join(unknown)} (the names: {', '.join(BACKENDS)})")
    if args.prompt + args.decode + 1 > BENCH_POSITIONS:
        raise UsageError(f"--prompt {args.prompt} and --decode {args.decode} need {args.prompt + args.decode + 1} "
                         f"positions; the bench model has {BENCH_POSITIONS}")
    if args.json is not None and not (args.json.parent.is_dir() and os.access(args.json.parent, os.W_OK)):
        raise UsageError(f"--json: {args.json.parent} is not a folder this process can write {args.json.name} in")
    if "fast" not in args.skip:
        from fast.cpu import requested_blas

        try:
            requested_blas()
        except ValueError as e:
            raise UsageError(str(e)) from None
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skip = args.skip

    hf_cfg = wide_config(args.layers or 2) if args.wide else bench_config(args.layers or 8)
    weights, head = decoder_weight_counts(hf_cfg)
    ids = bench_prompt(args.prompt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bench_checkpoint(Path(tmp), hf_cfg)
        size = (path / "model.safetensors").stat().st_size
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
        print(f"checkpoint: {size / 1e6:.0f} MB bf16, {weights / 1e6:.0f}M parameters in matrices; "
              f"prompt {args.prompt} tokens, {args.decode} decode tokens, best of {args.repeats} rounds")
        try:
            import torch

            have_torch = True
            # torch's thread pool must start before Numba's: with Numba's OpenMP threads started first,
            # HF's bf16 prefill ran 2.4x and its decode 4.8x slower (measured), float32 ~5 %
            for dtype in (torch.bfloat16, torch.float32):
                (torch.ones(64, 64, dtype=dtype) @ torch.ones(64, 64, dtype=dtype)).sum()
        except ImportError:
            have_torch = False
            print("HF transformers: not installed (pip install '.[interop]'); its rows are missing")
        bound = gemm_bound(hf_cfg, args.prompt)
        flops = prefill_flops(hf_cfg, args.prompt)

        runners, gpu_bw = [], None  # in round order: the pairs compared side by side (see `measure`)
        if "ref" not in skip:
            import ref

            model = ref.load_model(path)
            runners.append(ours("ref (numpy)", model, ids, args.decode, own_weight_buffers(model, hf_cfg)))
        if have_torch:
            for key, name, dtype in (("hf-bf16", "HF transformers bf16 (cpu)", torch.bfloat16),
                                     ("hf-f32", "HF transformers f32 (cpu)", torch.float32)):
                if key not in skip:
                    runners.append(hf_runner(name, path, dtype, "cpu", ids, args.decode, hf_cfg))
        if "fast" not in skip:
            import fast

            model = fast.load_model(path)
            print(f"fast: kernels compiled (or loaded from Numba's cache) in {model.compile():.1f} s, not counted")
            print(f"fast: prefill products in {blas_choice()}")
            vectors = "512-bit (AVX-512, fast/vectors.py)" if fast.WIDE_VECTORS else "as LLVM chose for this CPU"
            print(f"fast: vectors {vectors}")
            runners.append(ours("fast (numba, cpu)", model, ids, args.decode, own_weight_buffers(model, hf_cfg)))
        if have_torch and torch.cuda.is_available():
            gpu_bw = gpu_read_bandwidth()
            print(f"GPU: {torch.cuda.get_device_name()}, read bandwidth {gpu_bw:.0f} GB/s (GPU rows' 'of bw')")
            try:  # a peer that fails on this machine's transformers must not cost fast's own row
                runners.append(hf_runner("HF transformers bf16 (cuda, eager)", path, torch.bfloat16, "cuda", ids,
                                         args.decode, hf_cfg, attn="eager"))
            except Exception as e:
                print(f"HF transformers bf16 (cuda): failed, its row is missing: {type(e).__name__}: {e}")
            if "fast-gpu" not in skip:
                import fast

                model = fast.load_model(path, device="gpu")
                print(f"fast gpu: kernels compiled in {model.compile():.1f} s, not counted")
                runners.append(ours("fast (cupy + numba-cuda, gpu)", model, ids, args.decode))

        timed = measure(runners, args.repeats)
        for r in sorted(runners, key=lambda r: ROW_ORDER.index(r.name)):
            prefill_rounds, gaps, limits = timed[r.name]
            peak, bw, own = limits if limits else (float("nan"), gpu_bw, float("nan"))
            prefill, decode = min(prefill_rounds), float(np.median(gaps))
            rows.append({"backend": r.name, "cpu": limits is not None, "prefill_tok_s": args.prompt / prefill,
                         "decode_ms": decode * 1e3, "peak_gflops": peak, "read_gbs": bw, "own_read_gbs": own,
                         "prefill_of_peak": flops / prefill / 1e9 / peak, "prefill_s": prefill,
                         "prefill_rounds_s": prefill_rounds,
                         "decode_of_bw": weights * r.bytes_per_weight / decode / 1e9 / bw})

        bound = min(bound, gemm_bound(hf_cfg, args.prompt))  # again after the runs: the faster reading
        from fast.cpu import blas_libraries
        for r in rows:
            r["prefill_of_gemm"] = bound / r.pop("prefill_s") if r["cpu"] else float("nan")
        print(f"the prefill's own GEMMs alone take {bound * 1e3:.0f} ms in float32 BLAS "
              f"(the fastest of {', '.join(blas_libraries())}) "
              f"({2 * (weights - head) * args.prompt / bound / 1e9:.0f} GFLOP/s at these shapes; the faster of a "
              f"reading before and after the runs)")

    hf_rows = [r for r in rows if r["backend"].startswith("HF")]
    best_pre = max((r["prefill_tok_s"] for r in hf_rows), default=None)
    best_dec = min((r["decode_ms"] for r in hf_rows), default=None)
    print(f"\n{'backend':34} {'prefill tok/s':>13} {'x best HF':>9} {'of peak':>8} {'of GEMMs':>8} "
          f"{'decode ms/tok':>13} {'x best HF':>9} {'of bw':>6} {'peak':>6} {'bw':>5} {'own':>5}")
    for r in rows:
        rp = f"{r['prefill_tok_s'] / best_pre:.2f}" if best_pre else "-"
        rd = f"{best_dec / r['decode_ms']:.2f}" if best_dec else "-"
        print(f"{r['backend']:34} {r['prefill_tok_s']:13.0f} {rp:>9} {r['prefill_of_peak']:8.0%} "
              f"{r['prefill_of_gemm']:8.0%} {r['decode_ms']:13.1f} {rd:>9} {r['decode_of_bw']:6.0%} "
              f"{r['peak_gflops']:6.0f} {r['read_gbs']:5.1f} {r['own_read_gbs']:5.1f}")
    best_hf = max(hf_rows, key=lambda r: r["prefill_tok_s"], default=None)
    if best_hf is not None and len(rows) > len(hf_rows):
        print(f"\nprefill against {best_hf['backend']}, round by round (its time over the backend's, each round "
              f"its own calls; the table takes every backend's best round):")
        for r in rows:
            if r not in hf_rows:
                ratios = [h / t for h, t in zip(best_hf["prefill_rounds_s"], r["prefill_rounds_s"])]
                print(f"  {r['backend']:32} {' '.join(f'{x:.2f}' for x in ratios)}")
    print("x best HF: speed relative to the fastest HF mode in this run (>1 is faster); of peak: prefill FLOP/s "
          "(the work a prefill for generation needs: decoder matrices and attention over the visible pairs, "
          "the head and the last layer's query side, which only the last token's logits read, on that token "
          "alone) over the 2048^3 sgemm peak (the best BLAS here); of GEMMs: the float32 BLAS time of those "
          "GEMMs over the prefill time; "
          "of bw: weight bytes per token over the read bandwidth; peak (GFLOP/s), bw (GB/s): the best of the "
          "limits read before the first round and after the last, for every backend alike, bw the best of 1 GB "
          "probes and reads of the backends' own weight buffers; own (GB/s): this backend's own buffers, which "
          "a host may place in faster or slower memory than a probe's")
    if args.json:  # whole or not at all: a file written beside it, then renamed over the destination
        part = args.json.with_name(args.json.name + ".part")
        part.write_text(json.dumps({"rows": rows, "gemm_bound_s": bound}, indent=1))
        os.replace(part, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
