"""ref and fast against HF transformers on larger random configs with long prompts (minutes: not in CI).

tests/test_parity_hf.py draws its random configs at tiny widths (32-96) and prompts of up to 300 tokens.
This draws wider ones (`--widths`, head dims 64-128 on sliding and 128-256 on global layers, 3-7 layers,
windows 64-512, float32 or bf16 checkpoints) with text prompts of up to 900 tokens (`--prompts`), where
float32 rounding has more room to grow and errors that grow with the position (RoPE angles) show. Each
draw builds HF's model with random weights (tests/hf_peer.py), saves it, and compares every backend's
logits with HF's float32 ones (max |ours - hf| / max |hf|, beside HF's own float32 distance from its
float64 logits) and its greedy tokens with HF's, recomputed in full each step. Each backend's distance
from the float64 logits, over HF's float32 one, follows in brackets, and its median over the draws at the
end: below 1, closer to exact than HF's float32.

    python tools/parity_sweep.py [--trials 16] [--seed 1] [--backends ref,fast] [--tol 1e-4]
                                 [--global-head-dims 128,256]

One line per draw; exit status 1 if any backend is further than --tol from HF or picks other tokens.
Needs the interop extra (torch, transformers) and, for fast, the fast extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ref.config import FULL, SLIDING, tiny_hf_dict  # noqa: E402

VOCAB = 4096


def draw_config(rng: np.random.Generator, widths: list[int], global_dims: list[int]) -> dict:
    """A random HF config dict at `widths` and global head dims `global_dims` with a VOCAB-token vocabulary
    (media ids at its top)."""
    heads = int(rng.choice([4, 8]))
    layers = int(rng.integers(3, 8))
    types = [str(rng.choice([SLIDING, FULL])) for _ in range(layers - 1)] + [FULL]
    return tiny_hf_dict(
        vocab_size=VOCAB, hidden_size=int(rng.choice(widths)), intermediate_size=int(rng.choice([1024, 1536])),
        num_hidden_layers=layers, layer_types=types, num_attention_heads=heads,
        num_key_value_heads=int(rng.choice([k for k in (1, 2, 4) if heads % k == 0])),
        num_global_key_value_heads=int(rng.choice([1, 2])), head_dim=int(rng.choice([64, 96, 128])),
        global_head_dim=int(rng.choice(global_dims)), sliding_window=int(rng.choice([64, 200, 512])),
        attention_k_eq_v=bool(rng.integers(2)), max_position_embeddings=4096)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backends", default="ref,fast")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--widths", default="256,384,768", help="hidden sizes to draw from")
    ap.add_argument("--prompts", default="40,300,600,900", help="prompt lengths to draw from")
    ap.add_argument("--new-tokens", type=int, default=6, help="greedy tokens compared with HF's")
    ap.add_argument("--global-head-dims", default="128,256", help="global layers' head dims to draw from")
    args = ap.parse_args(argv)
    names = args.backends.split(",")
    if not names or not set(names) <= {"ref", "fast"}:
        ap.error(f"--backends takes ref and/or fast, comma-separated, not {args.backends!r}")
    try:
        import hf_peer
        import torch
        from transformers.utils import logging
    except ImportError as e:
        print(f"parity_sweep: needs the interop extra (pip install '.[interop]'): {e}", file=sys.stderr)
        return 2
    import ref

    torch.set_num_threads(os.cpu_count() or 1)  # hf_peer keeps torch to one thread, for tiny models
    logging.disable_progress_bar()  # HF's bars for every save and load
    if "fast" in names:
        import fast
    loaders = {name: (fast if name == "fast" else ref).load_model for name in names}
    widths = [int(w) for w in args.widths.split(",")]
    prompts = [int(t) for t in args.prompts.split(",")]
    global_dims = [int(d) for d in args.global_head_dims.split(",")]
    rng = np.random.default_rng(args.seed)
    worst, bad = {name: 0.0 for name in loaders}, 0
    ratios = {name: [] for name in loaders}  # distance from float64 over HF float32's, per draw
    for trial in range(args.trials):
        hf_cfg = draw_config(rng, widths, global_dims)
        bf16 = bool(rng.integers(2))
        ids = rng.integers(3, VOCAB - 12, (1, int(rng.choice(prompts))))
        with tempfile.TemporaryDirectory() as tmp:
            model = hf_peer.build(hf_cfg, trial)
            path = hf_peer.save(model, Path(tmp) / "ckpt", torch.bfloat16 if bf16 else torch.float32)
            if bf16:
                model = hf_peer.load(path)  # HF computes in float32 from the stored bf16 values
            want = hf_peer.forward(model, ids)
            exact = hf_peer.forward_float64(model, ids)
            hf_error = _rel(want, exact)
            text = hf_cfg["text_config"]
            line = (f"{trial:3}: {ids.shape[1]:4} tokens, {'bf16' if bf16 else 'f32 '} width {text['hidden_size']:4} "
                    f"heads {text['num_attention_heads']}/{text['num_key_value_heads']} dims {text['head_dim']}/"
                    f"{text['global_head_dim']} layers {text['num_hidden_layers']} window {text['sliding_window']:3}; "
                    f"HF float32 vs float64 {hf_error:.1e}")
            tokens = None
            for name, load in loaders.items():
                ours = load(path)
                if tokens is None:
                    cfg = ours.config
                    tokens = hf_peer.greedy(model, ids, None, args.new_tokens, suppress=cfg.suppress_tokens,
                                            eos=cfg.eos_token_ids)
                logits = ours.forward(ids)
                err = _rel(logits, want)
                ratios[name].append(_rel(logits, exact) / hf_error)
                same = np.array_equal(ours.generate(ids, max_new_tokens=args.new_tokens)[:, :tokens.shape[1]], tokens)
                worst[name] = max(worst[name], err)
                bad += err > args.tol or not same
                line += f"; {name} {err:.1e} ({ratios[name][-1]:.2f}x){'' if same else ' OTHER TOKENS'}"
            print(line, flush=True)
    print("worst: " + ", ".join(f"{name} {err:.2e}" for name, err in worst.items()) + f" (bound {args.tol:g})")
    print("from float64, over HF float32's distance: " + ", ".join(
        f"{name} median {np.median(r):.2f}x, at most {max(r):.2f}x" for name, r in ratios.items() if r))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
