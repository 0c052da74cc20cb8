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

`--switches` also draws the config's other switches (KV sharing and double-wide MLPs, bidirectional
attention, soft-capping, attention biases, the global layers' rotary fraction), and `--media` puts an image
(up to 252 soft tokens), an audio clip and, every other draw, a video of 2-4 frames into each prompt, with
text around them to the drawn length: at these widths fast's token-minor prompt pass and its tiled
attention meet the image and video blocks that tests/test_parity_hf.py's tiny configs only meet small.

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

from ref.config import FULL, SLIDING, from_hf_dict, tiny_hf_dict  # noqa: E402
from helpers import multimodal_prompt, synthetic_patches  # noqa: E402

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


def draw_switches(rng: np.random.Generator, text: dict) -> dict:
    """The switches of a text config `text` (drawn by draw_config) beyond its sizes, as tests/test_parity_hf.py's
    combined configs draw them: KV sharing where every shared layer has an earlier layer of its type (HF and
    ref reject others), double-wide MLPs with it, bidirectional attention, soft-capping, attention biases and
    the proportional RoPE's rotary fraction -> overrides for `text`."""
    n, types = text["num_hidden_layers"], text["layer_types"]
    out = {"use_bidirectional_attention": [None, "vision", "all"][int(rng.integers(3))],
           "final_logit_softcapping": [None, 30.0, 5.0][int(rng.integers(3))],
           "attention_bias": bool(rng.integers(2)),
           "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                               FULL: {"rope_type": "proportional", "rope_theta": 1e6,
                                      "partial_rotary_factor": float(rng.choice([0.25, 0.5, 1.0]))}}}
    shared = int(rng.integers(0, n - 1))
    if shared and all(t in types[:n - shared] for t in types[n - shared:]):
        out.update(num_kv_shared_layers=shared, use_double_wide_mlp=bool(rng.integers(2)))
    return out


def media_prompt(rng: np.random.Generator, cfg, length: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A prompt of about `length` tokens (at least the media's) around one image of 4-252 soft tokens (a
    random grid, its budget padded past it), one audio clip of 4-60 frames and, in every other draw, one
    video of 2-4 frames of 4-70 soft tokens -> (ids [1, T], mm_token_type_ids [1, T], media arguments)."""
    rows, cols = int(rng.integers(2, 15)), int(rng.integers(2, 19))
    pv, pos = synthetic_patches(rng, 1, rows * cols + int(rng.integers(0, 9)), [(rows, cols)])
    frames = int(rng.integers(4, 61))
    media = dict(pixel_values=pv, image_position_ids=pos, input_features_mask=np.ones((1, frames), bool),
                 input_features=rng.normal(0, 0.2, (1, frames, 640)).astype(np.float32))
    video = []
    if rng.integers(2):
        grid = (int(rng.integers(2, 8)), int(rng.integers(2, 11)))
        video = [grid[0] * grid[1]] * int(rng.integers(2, 5))
        vv, vpos = synthetic_patches(rng, len(video), 70, [grid] * len(video))
        media.update(pixel_values_videos=vv, video_position_ids=vpos, num_frames_per_video=np.array([len(video)]))
    fixed = rows * cols + frames + sum(video) + 4 * len(video) + 10  # media, their delimiters, the text between
    ids, types = multimodal_prompt(cfg, rng, n_text=max(5, (length - fixed) // 2), image_tokens=[rows * cols],
                                   video_frames=video, audio_tokens=[frames])
    return ids, types, media


def describe(text: dict, types: np.ndarray | None) -> str:
    """The drawn switches that differ from draw_config's and the prompt's media, for a draw's line: '' when
    neither was drawn, else e.g. 'shared 2 wide, bidir all, cap 5, bias, rotary 0.5; media 1/96 2/60 3/12; '
    (mm_token_type_ids kind/count: 1 image, 2 video, 3 audio)."""
    parts = []
    if text.get("num_kv_shared_layers"):
        parts.append(f"shared {text['num_kv_shared_layers']}" + (" wide" if text.get("use_double_wide_mlp") else ""))
    if "rope_parameters" in text:  # drawn with the other switches
        cap = text["final_logit_softcapping"]
        parts += [f"bidir {text['use_bidirectional_attention'] or 'none'}", f"cap {cap:g}" if cap else "no cap"]
        parts += ["bias"] * text["attention_bias"]
        parts.append(f"rotary {text['rope_parameters'][FULL]['partial_rotary_factor']:g}")
    out = ", ".join(parts) + "; " if parts else ""
    if types is not None:
        kinds, counts = np.unique(types[types > 0], return_counts=True)
        out += "media " + " ".join(f"{k}/{c}" for k, c in zip(kinds, counts)) + "; "
    return out


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
    ap.add_argument("--switches", action="store_true",
                    help="also draw KV sharing, double-wide MLPs, bidirectional attention, soft-capping, biases")
    ap.add_argument("--media", action="store_true",
                    help="an image, audio and (every other draw) a video in each prompt")
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
        if args.switches:
            hf_cfg["text_config"].update(draw_switches(rng, hf_cfg["text_config"]))
        bf16 = bool(rng.integers(2))
        if args.media:
            ids, types, media = media_prompt(rng, from_hf_dict(hf_cfg), int(rng.choice(prompts)))
        else:
            ids, types, media = rng.integers(3, VOCAB - 12, (1, int(rng.choice(prompts)))), None, {}
        with tempfile.TemporaryDirectory() as tmp:
            model = hf_peer.build(hf_cfg, trial)
            path = hf_peer.save(model, Path(tmp) / "ckpt", torch.bfloat16 if bf16 else torch.float32)
            if bf16:
                model = hf_peer.load(path)  # HF computes in float32 from the stored bf16 values
            want = hf_peer.forward(model, ids, types, **media)
            exact = hf_peer.forward_float64(model, ids, types, **media)
            hf_error = _rel(want, exact)
            text = hf_cfg["text_config"]
            line = (f"{trial:3}: {ids.shape[1]:4} tokens, {'bf16' if bf16 else 'f32 '} width {text['hidden_size']:4} "
                    f"heads {text['num_attention_heads']}/{text['num_key_value_heads']} dims {text['head_dim']}/"
                    f"{text['global_head_dim']} layers {text['num_hidden_layers']} window {text['sliding_window']:3}; "
                    f"{describe(text, types)}HF float32 vs float64 {hf_error:.1e}")
            tokens = None
            for name, load in loaders.items():
                ours = load(path)
                if tokens is None:
                    cfg = ours.config
                    tokens = hf_peer.greedy(model, ids, types, args.new_tokens, suppress=cfg.suppress_tokens,
                                            eos=cfg.eos_token_ids, **media)
                logits = ours.forward(ids, mm_token_type_ids=types, **media)
                err = _rel(logits, want)
                ratios[name].append(_rel(logits, exact) / hf_error)
                got = ours.generate(ids, mm_token_type_ids=types, max_new_tokens=args.new_tokens, **media)
                same = np.array_equal(got[:, :tokens.shape[1]], tokens)
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
