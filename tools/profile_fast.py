"""Where fast's CPU time goes: a prefill and cached decode steps of fast.bench's model, split by function.

Each function of fast/cpu.py that a forward pass calls (the kernels' Python wrappers and the compiled
kernels) is timed by its own time: its time less that of the timed functions it calls, so the rows add
up. The `rest` row is what no timer covers: ref's layer code (residual adds, scaling, masks, the cache's
bookkeeping), the embedding and the token's selection. A timer costs about a microsecond per call, which
lands in the row it wraps (a decoded token makes ~200 calls). The figures in fast/PERFORMANCE.md's "Where the time
goes" come from this tool.

A prompt runs token-minor (fast/prefill.py: its functions' rows); `--prefill-layer-code` runs it through
ref's layer code with fast's kernels instead. A decoding step runs compiled whole (fast/step.py): its
layers are one row, `_layers`, the Python around them (the cache's slots, the masks, RoPE tables) the
row `DecodeStep._run`, and greedy decoding's embedding and choice (its compiled loop) `_embed_token` and
`_choose`. `--layer-code` decodes through ref's layer code with fast's kernels instead,
which splits the step kernel by kernel. `--stages` splits the compiled step instead, stage by stage
(`stage_profile`): a copy of it reads the CPU's cycle counter at every barrier its threads meet at.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/profile_fast.py [--prompt 512] [--decode 32]
        [--layer-code] [--prefill-layer-code] [--stages]
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
    "matmuls_t": "a layer's q, k, v, token-minor, in one BLAS product (and the wrapper)",
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
    "DecodeStep._run": "decode: the step's Python side (slots, masks, RoPE tables)",
    "_embed_token": "decode: the token's embedding (the greedy loop's, compiled)",
    "_choose": "decode: the greedy choice (the greedy loop's, compiled)",
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
        (step, name, name) for name in ("_layers", "_embed_token", "_choose")] + [
        (step.DecodeStep, "_run", "DecodeStep._run")]
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


# ---- the compiled step, stage by stage -----------------------------------------------------------------

# What each stage of fast/step.py's `_member` covers: from the earliest member's departure from the barrier
# before it to the last member's arrival at its own (so a stage holds the small steps that open it).
STAGES = {
    "q/k/v": "input norm, the q/k/v GEMV",
    "K/V row": "q's norm and RoPE, the new key and value rows (every layer with its own K/V)",
    "attention": "the split-key attention programs",
    "o": "the chunks' merge, the o GEMV",
    "gate/up": "residual add and its norms, the gate/up GEMV",
    "down": "GELU, the down GEMV",
    "head": "residual, layer scalar, final norm, the head's GEMV and soft-capping",
}


def cycle_counter():
    """A Numba intrinsic -> the CPU's cycle counter (LLVM's readcyclecounter: rdtsc on x86; 0 where the CPU
    has none), and its ticks per second measured over 0.2 s (0.0 if it does not tick)."""
    import numba as nb
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def cycles(typingctx):
        def codegen(context, builder, sig, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                                "llvm.readcyclecounter")
            return builder.call(fn, [])
        return types.int64(), codegen

    read = nb.njit(lambda: cycles())
    read()
    c0, t0 = read(), time.perf_counter()
    time.sleep(0.2)
    c1, t1 = read(), time.perf_counter()
    return cycles, (c1 - c0) / (t1 - t0)


def stamped_layers(cycles):
    """fast.step's `_layers` and `_member`, recompiled from their source with a cycle-counter reading at
    the member's start, before and after every barrier (fast.team.wait) and where a stage's programs begin
    -> `_layers` taking one more argument, stamps int64 [threads, events, 3]: member tid's event e (0: its
    start; then its barriers in the order it meets them) arrived at stamps[tid, e, 0] and left at
    stamps[tid, e, 1], and the stage that ends there began its programs (GEMV rows or key chunks) at
    stamps[tid, e, 2] (0 for a stage without them). The numbers are the step's own (the same kernels in the
    same order)."""
    import inspect
    import textwrap

    import numba as nb

    from fast import step

    lines, waits = [], 0
    for line in textwrap.dedent(inspect.getsource(step._member.py_func)).splitlines():
        pad = line[:len(line) - len(line.lstrip())]
        if line.strip() == "x = x0.copy()":  # the first statement: the member's start
            lines += [f"{pad}ev = 1", f"{pad}st[tid, 0, 0] = st[tid, 0, 1] = cycles()"]
        if line.strip().startswith("_programs(") or line.strip() == "for pid in range(lo, hi):":
            lines.append(f"{pad}st[tid, ev, 2] = cycles()")
        if "team.wait(counter, members, gen)" in line:
            lines += [f"{pad}st[tid, ev, 0] = cycles()", line, f"{pad}st[tid, ev, 1] = cycles()", f"{pad}ev += 1"]
            waits += 1
        else:
            lines.append(line)
    if waits != len(STAGES) or not any("ev = 1" in line for line in lines):
        raise RuntimeError(f"fast.step._member changed: {waits} barriers found where this tool knows {len(STAGES)}")
    member = "\n".join(lines).replace("@nb.njit(cache=True)\n", "").replace(", big, o, d):", ", big, o, d, st):")
    layers = textwrap.dedent(inspect.getsource(step._layers.py_func))
    layers = layers[layers.index("def "):].replace("logits):", "logits, st):").replace(", o, d)", ", o, d, st)")
    space = dict(vars(step), cycles=cycles)
    exec(member, space)
    space["_member"] = nb.njit(space["_member"])
    exec(layers, space)
    return nb.njit(parallel=step.PRANGE_ONLY)(space["_layers"])


def stage_names(table, head: bool) -> list[str]:
    """The barriers a member meets in one step, in order, for the step's table (KV-shared layers write no
    K/V row and skip that barrier)."""
    from fast import step

    names = []
    for row in table:
        names += [n for n in STAGES if n != "head" and (n != "K/V row" or row[step.MODE] != step.SHARED)]
    return names + ["head"] * head


def stage_bytes(model) -> dict:
    """Bytes of weights each GEMV stage streams per token: {stage: bytes}."""
    from fast import step

    s = model._step
    out = dict.fromkeys(STAGES, 0)
    for i, mode in enumerate(s.modes_by_layer):
        m = [s.mats[7 * i + j] for j in range(7)]
        out["q/k/v"] += sum(m[j].nbytes for j in range(step.PROJECTIONS[mode]))
        out["o"] += m[step.O].nbytes
        out["gate/up"] += m[step.GATE].nbytes + m[step.UP].nbytes
        out["down"] += m[step.DOWN].nbytes
    out["head"] = s.head_bits.nbytes
    return out


def stage_profile(model, ids: np.ndarray, n_decode: int) -> dict:
    """Decode `n_decode` tokens after the prompt ids with the stamped step in place of fast.step._layers ->
    {"token": s, "step": s, "stages": {stage: s}, "openings": {stage: s}, "waits": s} per token, medians
    over the steps: the token's time (its gap in generate), the compiled call's (perf_counter around it),
    each stage's summed over the layers, of which its opening (from a member's leaving the barrier before
    to its first program; the mean of the members), and the time a member waits at barriers (the mean of
    the members)."""
    from fast import step

    model.compile()
    cycles, hz = cycle_counter()
    if hz <= 0:
        raise RuntimeError("this CPU has no cycle counter that LLVM can read")
    stamped, real = stamped_layers(cycles), step._layers
    records = []

    def layers(*args):  # fast.step._layers' arguments: table is args[1], threads args[11], head args[14]
        st = np.zeros((args[11], 2 + len(args[1]) * len(STAGES), 3), np.int64)
        t = time.perf_counter()
        roles = stamped(*args, st)
        records.append((time.perf_counter() - t, st, stage_names(args[1], args[14].shape[0] > 0), roles))
        return roles

    step._layers = layers
    try:
        model.generate(ids, max_new_tokens=2)  # compiles the stamped copy
        records.clear()
        stamps: list[float] = []
        model.generate(ids, max_new_tokens=1 + n_decode, on_token=lambda _: stamps.append(time.perf_counter()))
    finally:
        step._layers = real
    per_token = []
    for seconds, st, names, roles in records:
        # the members that worked (one that went solo stamps as member 0, whichever thread it was)
        st = st[st[:, 0, 0] != 0]
        if not (st[:, :1 + len(names), 1].all() and not st[:, 1 + len(names):].any()):
            raise RuntimeError(f"the step met other barriers than the {len(names)} named: {names}")
        st = st[:, :1 + len(names)].astype(np.float64) / hz
        arrive, leave, begin = st[:, :, 0], st[:, :, 1], st[:, :, 2]
        spans = arrive[:, 1:].max(axis=0) - leave[:, :-1].min(axis=0)  # a stage: earliest start to last arrival
        opens = (np.where(begin[:, 1:] > 0, begin[:, 1:], arrive[:, 1:]) - leave[:, :-1]).mean(axis=0)
        stages, openings = dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)
        for name, span, opening in zip(names, spans, opens):
            stages[name] += span
            openings[name] += opening
        per_token.append((seconds, stages, openings, (leave[:, 1:] - arrive[:, 1:]).sum(axis=1).mean()))
    return {"token": float(np.median(np.diff(stamps))), "step": float(np.median([p[0] for p in per_token])),
            "stages": {n: float(np.median([p[1][n] for p in per_token])) for n in STAGES},
            "openings": {n: float(np.median([p[2][n] for p in per_token])) for n in STAGES},
            "waits": float(np.median([p[3] for p in per_token]))}


def stage_table(r: dict, nbytes: dict, limit_bw: float) -> str:
    """The stage profile as text; limit_bw: the read bandwidth (GB/s) the GEMV stages are set against."""
    lines = [f"decode, the compiled step by stage, per token (medians of the steps): token {r['token'] * 1e3:.2f} ms, "
             f"the compiled call {r['step'] * 1e3:.2f} ms",
             f"  {'stage':10} {'ms':>7} {'share':>6} {'opening':>7} {'MB':>7} {'GB/s':>6} {'of bw':>6}"]
    for name, what in STAGES.items():
        sec, b = r["stages"][name], nbytes.get(name, 0)
        speed = f"{b / sec / 1e9:6.1f} {b / sec / 1e9 / limit_bw:6.0%}" if b and sec > 0 else f"{'':6} {'':6}"
        lines.append(f"  {name:10} {sec * 1e3:7.3f} {sec / r['token']:6.1%} {r['openings'][name] * 1e3:7.3f} "
                     f"{b / 1e6:7.1f} {speed}  {what}")
    rest = r["step"] - sum(r["stages"].values())
    lines.append(f"  {'in the call':10} {rest * 1e3:7.3f} {rest / r['token']:6.1%}  the team's start and end, "
                 "the call from Python")
    outside = r["token"] - r["step"]
    lines.append(f"  {'outside':10} {outside * 1e3:7.3f} {outside / r['token']:6.1%}  Python: the step's side, "
                 "embedding, head's wrapper, selection, generate's loop")
    lines.append(f"  opening: the small steps before a stage's first program (ms, the members' mean); a member "
                 f"waited {r['waits'] * 1e3:.3f} ms a token at the barriers (both inside the stages' times)")
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
    ap.add_argument("--stages", action="store_true", help="also split the compiled decoding step by stage")
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
        stages = None
        if args.stages and not args.layer_code:
            stages = stage_profile(model, bench_prompt(args.prompt), args.decode), stage_bytes(model)
        bw, own = map(max, before, read_limits(buffers))
    weight_bytes = 2 * decoder_weight_counts(hf)[0]
    print(table(f"prefill, {args.prompt} tokens (fastest of 3)", *r["prefill"]))
    print()
    print(table(f"decode, per token (mean of {args.decode} steps after the prompt)", *r["decode"]))
    print(f"\nread bandwidth beside the run: {bw:.1f} GB/s in 1 GB probes, {own:.1f} GB/s over the model's own "
          f"weights; at the better of them the {weight_bytes / 1e6:.0f} MB of bf16 weights take "
          f"{weight_bytes / max(bw, own) / 1e6:.2f} ms per token")
    if stages:
        print()
        print(stage_table(*stages, max(bw, own)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
