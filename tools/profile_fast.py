"""Where fast's CPU time goes: a prefill and cached decode steps of fast.bench's model, split by function.

Each function of fast/cpu.py that a forward pass calls (the kernels' Python wrappers and the compiled
kernels) is timed by its own time: its time less that of the timed functions it calls, so the rows add
up. The `rest` row is what no timer covers: ref's layer code (residual adds, scaling, masks, the cache's
bookkeeping), the embedding and the token's selection. A timer costs about a microsecond per call, which
lands in the row it wraps (a decoded token makes ~200 calls). The figures in fast/PERFORMANCE.md's "Where the time
goes" come from this tool.

A prompt runs token-minor (fast/prefill.py: its functions' rows); `--prefill-layer-code` runs it through
ref's layer code with fast's kernels instead. A decoding step runs compiled whole (fast/step.py): its
layers are one row, `_layers`, and the Python around them (the cache's slots, the masks, RoPE tables) the
row `DecodeStep.__call__`. `--layer-code` decodes through ref's layer code with fast's kernels instead,
which splits the step kernel by kernel.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/profile_fast.py [--prompt 512] [--decode 32]
        [--layer-code] [--prefill-layer-code]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = {  # fast.cpu function -> what its own time is
    "_product": "projections of more than 512 rows: the BLAS product (and the wrapper)",
    "matmul_t": "projections of 9-512 rows, token-minor: the BLAS product (and the wrapper)",
    "_upcast_rows": "prefill projections: bf16 -> float32 upcast of the weight rows",
    "transpose": "transposes into and out of the token-minor products",
    "_gemv": "decode projections and the head: the GEMV (compiled, launched from here)",
    "linears": "projection wrapper: reshape, bias",
    "tiled_attention": "prefill attention: the BLAS tiles (and their wrapper)",
    "_softmax_tile": "prefill attention: the online softmax",
    "decode_attention": "decode attention: wrapper (buffers, the mask)",
    "_decode_parallel": "decode attention: split-key kernel",
    "_decode_serial": "decode attention: split-key kernel, one thread",
    "_combine": "decode attention: merge of the key chunks",
    "mlp": "MLP wrapper",
    "gelu_tanh_mul": "GELU times up: one compiled pass, its rows over every core (and the wrapper)",
    "rms_norm": "RMSNorm (kernel and wrapper)",
    "apply_rope": "RoPE (kernel and wrapper)",
    "lm_head": "head: soft-capping",
}
PREFILL_ROWS = {  # fast.prefill function -> what its own time is
    "norm_t": "prefill, token-minor: the first input norm",
    "head_norm_rope_t": "prefill, token-minor: q/k/v norms and RoPE",
    "residual_t": "prefill, token-minor: residual adds fused with their norms and the next norm",
    "attention_t": "prefill, token-minor: attention, the BLAS tiles (and their wrapper)",
    "softmax_t": "prefill, token-minor: attention's online softmax",
}
STEP_ROWS = {  # fast.step names -> what their own time is
    "_layers": "decode: every layer compiled whole (GEMVs, attention, norms, RoPE, GELU), the final norm, the head",
    "DecodeStep.__call__": "decode: the step's Python side (slots, masks, RoPE tables)",
}


class Timers:
    """Own time and calls of wrapped functions, while `on`."""

    def __init__(self):
        self.own, self.calls, self._stack, self.on = defaultdict(float), defaultdict(int), [], False
        self.saved = []  # (owner, attribute, original) of what `instrument` wrapped

    def wrap(self, name: str, f):
        def timed(*args, **kwargs):
            if not self.on:
                return f(*args, **kwargs)
            self._stack.append(0.0)
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t
                inner = self._stack.pop()
                self.own[name] += spent - inner
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += spent
        return timed

    def uninstrument(self):
        """Put back every function `instrument` wrapped."""
        for owner, attr, f in self.saved:
            setattr(owner, attr, f)
        self.saved.clear()

    def reset(self):
        self.own.clear()
        self.calls.clear()


def instrument(model) -> Timers:
    """Wrap ROWS in fast.cpu, PREFILL_ROWS in fast.prefill and STEP_ROWS in fast.step, and give `model`
    kernels that call the wrapped functions -> the timers (`Timers.uninstrument` puts the functions back)."""
    from fast import cpu, prefill, step
    from ref.decoder import Kernels

    timers = Timers()
    places = [(cpu, name, name) for name in ROWS] + [(prefill, name, name) for name in PREFILL_ROWS] + [
        (step, "_layers", "_layers"), (step.DecodeStep, "__call__", "DecodeStep.__call__")]
    for owner, attr, row in places:
        timers.saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, timers.wrap(row, getattr(owner, attr)))
    model.kernels = Kernels(**{f.name: getattr(cpu, f.name) for f in dataclasses.fields(Kernels)} |
                            {"lm_head": model._lm_head})  # the compiled step's logits, else the wrapped cpu.lm_head
    return timers


def profile(model, ids: np.ndarray, n_decode: int, repeats: int = 3) -> dict:
    """-> {"prefill": (seconds, {row: (calls, seconds)}), "decode": (seconds per token, {row: (calls per
    token, seconds per token)})}. Prefill: the fastest of `repeats` one-token generations; decode: the
    steps after the first token of one generation, as means per token. The functions are unwrapped again
    on return."""
    model.compile()  # before wrapping: the compiled step must see fast.cpu's kernels, not the timers
    timers = instrument(model)
    try:
        model.generate(ids, max_new_tokens=2)  # warm-up
        best = None
        for _ in range(repeats):
            timers.reset()
            timers.on = True
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1)
            total = time.perf_counter() - t
            timers.on = False
            if best is None or total < best[0]:
                best = (total, {n: (timers.calls[n], timers.own[n]) for n in timers.own})
        stamps: list[float] = []

        def on_token(_):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:  # the prefill is done: time the steps from here
                timers.reset()
                timers.on = True

        model.generate(ids, max_new_tokens=1 + n_decode, on_token=on_token)
        timers.on = False
        n = len(stamps) - 1
        decode = ((stamps[-1] - stamps[0]) / n, {k: (timers.calls[k] / n, timers.own[k] / n) for k in timers.own})
    finally:
        timers.uninstrument()
    return {"prefill": best, "decode": decode}


def table(title: str, total: float, rows: dict) -> str:
    lines = [f"{title}: {total * 1e3:.2f} ms", f"  {'function':19} {'calls':>7} {'ms':>8} {'share':>6}"]
    for name, (calls, own) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        what = ROWS.get(name) or PREFILL_ROWS.get(name) or STEP_ROWS[name]
        lines.append(f"  {name:19} {calls:7.0f} {own * 1e3:8.2f} {own / total:6.1%}  {what}")
    rest = total - sum(own for _, own in rows.values())
    lines.append(f"  {'rest':19} {'':7} {rest * 1e3:8.2f} {rest / total:6.1%}  ref's layer code, embedding, masks, "
                 "cache bookkeeping, token selection")
    return "\n".join(lines)


def main(argv=None) -> int:
    import fast
    from fast.bench import (bench_config, bench_prompt, decoder_weight_counts, own_weight_buffers, read_limits,
                            write_bench_checkpoint)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer-code", action="store_true", help="decode through ref's layer code, kernel by kernel")
    ap.add_argument("--prefill-layer-code", action="store_true",
                    help="prefill through ref's layer code with fast's kernels, not token-minor")
    args = ap.parse_args(argv)
    hf = bench_config(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        model = fast.load_model(write_bench_checkpoint(Path(tmp), hf))
        model.compile()
        model.whole_step = not args.layer_code
        model.token_minor = not args.prefill_layer_code
        buffers = own_weight_buffers(model, hf)
        before = read_limits(buffers)
        r = profile(model, bench_prompt(args.prompt), args.decode)
        bw, own = map(max, before, read_limits(buffers))
    weight_bytes = 2 * decoder_weight_counts(hf)[0]
    print(table(f"prefill, {args.prompt} tokens (fastest of 3)", *r["prefill"]))
    print()
    print(table(f"decode, per token (mean of {args.decode} steps after the prompt)", *r["decode"]))
    print(f"\nread bandwidth beside the run: {bw:.1f} GB/s in 1 GB probes, {own:.1f} GB/s over the model's own "
          f"weights; at the better of them the {weight_bytes / 1e6:.0f} MB of bf16 weights take "
          f"{weight_bytes / max(bw, own) / 1e6:.2f} ms per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
