"""Estimate Gemma 4 12B's speed on this CPU without its 23 GB file.

Writes a checkpoint with the real model's sizes but two decoder layers (one sliding, one global) and the
real 262144 x 3840 output table (~2.9 GB of random bf16), runs a prefill and a few decode steps through
`ref` and `fast`, times every layer and the output head, and extrapolates to the real layer pattern
(40 sliding + 8 global layers). The prompt carries a 280-token image block, so the sliding layers' block
mask is exercised; the vision embedder itself (~15 GFLOP for 280 soft tokens) is not counted.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/estimate_12b.py [--prompt 300] [--decode 16]

Every figure is an estimate: one layer of each kind measured, multiplied by the layer counts, with the
weights in the page cache (the real file needs ~32 GB of RAM for that). fast runs twice: with its weights
mapped from the page cache, and copied into anonymous memory (what `fast.load_model` does by default
where they take at most half of the free memory: ~48 GB for the real file).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ref  # noqa: E402
from ref.config import FULL, SLIDING, from_hf_dict, gemma4_12b_hf_dict  # noqa: E402
from ref.decoder import decoder_forward  # noqa: E402
from ref.tiny import write_large_bf16_checkpoint  # noqa: E402


def run_steps(model, prompt: int, decode: int, between=None) -> dict:
    """One prefill of `prompt` tokens and `decode` single-token steps -> seconds per layer and for the
    head: {"prefill": ([layer s...], head s), "decode": ([median layer s...], median head s)}.
    `between()`, if given, runs after the prefill and before the first step."""
    cfg = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (1, prompt))
    block = np.full((1, prompt), -1, np.int64)
    block[0, 10:10 + min(280, prompt - 20)] = 0  # one image's soft tokens
    cache = model.new_cache(1, prompt + decode)

    def step(x, positions, key_ok, blk):
        stamps = [time.perf_counter()]

        def trace(name, _):
            if name.startswith("layers."):
                stamps.append(time.perf_counter())

        h = decoder_forward(x, model.decoder_params, cfg, positions, key_ok, blk, cache, trace=trace,
                            kern=model.kernels)
        t = time.perf_counter()
        logits = model.kernels.lm_head(h[:, -1:], model.head, cfg.final_logit_softcapping)
        return np.diff(stamps), time.perf_counter() - t, int(logits[0, -1].argmax())

    layers, head, nxt = step(model.embed(ids), np.arange(prompt)[None], np.ones((1, prompt), bool), block)
    out = {"prefill": (layers, head)}
    if between is not None:
        between()
    per_layer, heads = [], []
    for i in range(decode):
        layers, h, nxt = step(model.embed(np.array([[nxt]])), np.array([[prompt + i]]), np.ones((1, 1), bool),
                              np.full((1, 1), -1, np.int64))
        per_layer.append(layers)
        heads.append(h)
    out["decode"] = (np.median(per_layer, axis=0), float(np.median(heads)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--decode", type=int, default=16)
    args = ap.parse_args(argv)

    real = from_hf_dict(gemma4_12b_hf_dict())
    counts = {kind: sum(s.kind == kind for s in real.layers) for kind in (SLIDING, FULL)}
    hf = gemma4_12b_hf_dict()
    hf["text_config"].update(num_hidden_layers=2, layer_types=[SLIDING, FULL])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"Gemma 4 12B: {counts[SLIDING]} sliding + {counts[FULL]} global layers; measured: one of each "
          f"+ the output head; prompt {args.prompt} tokens (280 in an image block), {args.decode} decode steps")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_large_bf16_checkpoint(Path(tmp) / "two_layers", hf)
        print(f"checkpoint: {(path / 'model.safetensors').stat().st_size / 1e9:.1f} GB bf16 (two layers + head)")
        backends = [("--backend numpy", ref.load_model)]
        try:
            import fast

            # mapped: what a machine without room for a copy runs (this one: 24 GB for a 23.8 GB file);
            # copied: fast.load_model's default where the weights fit in half the free memory
            backends += [("--backend fast, mapped", partial(fast.load_model, resident=False)),
                         ("--backend fast, copied", partial(fast.load_model, resident=True))]
        except ImportError:
            print("fast: not installed (pip install '.[fast]')")
        measure = len(backends) > 1  # the limits, where fast (its probes) is installed
        if measure:  # the machine's limits, read as fast.bench reads them
            from fast.bench import cpu_limits, decoder_weight_counts, own_weight_buffers, prefill_flops

            weights, _ = decoder_weight_counts(gemma4_12b_hf_dict())
            flops = prefill_flops(gemma4_12b_hf_dict(), args.prompt, last_only=False)  # as timed: every layer whole
            print(f"the real model: {flops / 1e12:.2f} TFLOP for this prefill (attention counted as causal), "
                  f"{2 * weights / 1e9:.1f} GB of bf16 weights read per decoded token; the limits are read right "
                  f"before and after each phase (prefill, decode steps), the better of each")
        print(f"\n{'':30} {'sliding ms':>10} {'global ms':>10} {'head ms':>8}   48 layers + head")
        for name, load in backends:
            model = load(path)
            # map the weights in, compile (or load Numba's cache) for fast, and let the allocator meet the
            # prompt's activation sizes once: a first 300-token prefill ran 20-30 % slower than the next
            run_steps(model, args.prompt, 2)
            # before, between and after the phases; the bandwidth also over this model's own weights
            limits_now = partial(cpu_limits, own_weight_buffers(model, hf)) if measure else None
            readings = [limits_now()] if measure else []
            between = (lambda: readings.append(limits_now())) if measure else None
            r = run_steps(model, args.prompt, args.decode, between)
            readings += [limits_now()] if measure else []
            for i, phase in enumerate(("prefill", "decode")):
                limits = tuple(map(max, readings[i], readings[i + 1])) if measure else None
                (sliding, full), head = r[phase]
                total = counts[SLIDING] * sliding + counts[FULL] * full + head
                rate = (f"{total:6.1f} s = {args.prompt / total:.1f} tok/s" if phase == "prefill"
                        else f"{total:6.2f} s/token")
                if limits:
                    rate += (f", {flops / total / 1e9 / limits[0]:.0%} of {limits[0]:.0f} GFLOP/s" if phase == "prefill"
                             else f", {2 * weights / total / 1e9 / limits[1]:.0%} of {limits[1]:.1f} GB/s")
                print(f"{name + ' ' + phase:30} {sliding * 1e3:10.0f} {full * 1e3:10.0f} {head * 1e3:8.0f}   {rate}")
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
