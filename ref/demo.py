"""`python -m ref.demo`: one picture and one sound through the whole pipeline of a tiny model.

The tiny model's weights are random (written on the fly by `ref.tiny`), so its "answer" is noise: what
the demo shows is every stage — budget resize, 48 px patches, audio frames, placeholder expansion,
the decoder with sliding and global layers, cached generation — with shapes and timings.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np

from . import load_model, preprocess_audio, preprocess_images
from .config import tiny_hf_dict
from .tiny import random_tensors, write_checkpoint


def _picture() -> np.ndarray:
    """A red disc on white, 120 x 200."""
    y, x = np.mgrid[:120, :200]
    img = np.full((120, 200, 3), 255, np.uint8)
    img[(x - 100) ** 2 + (y - 60) ** 2 < 40**2] = (220, 30, 30)
    return img


def _tone() -> tuple[np.ndarray, int]:
    """0.3 s of 440 Hz, stereo, 44.1 kHz (so the resampler and the downmix run too)."""
    t = np.arange(int(0.3 * 44100)) / 44100
    s = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([s, s], axis=1), 44100


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        hf = tiny_hf_dict()
        model = load_model(write_checkpoint(tmp, hf, random_tensors(hf)))
        cfg = model.config
        pv, pos, n_img = preprocess_images([_picture()], max_soft_tokens=70)
        wave, rate = _tone()
        feats, fmask = preprocess_audio([wave], sampling_rate=rate)
        n_aud = int(fmask.sum())
        ids = ([cfg.bos_token_id, 7, 8] + [cfg.boi_token_id] + [cfg.image_token_id] * int(n_img[0])
               + [cfg.eoi_token_id, cfg.boa_token_id] + [cfg.audio_token_id] * n_aud + [cfg.eoa_token_id, 9])
        types = [1 if i == cfg.image_token_id else 3 if i == cfg.audio_token_id else 0 for i in ids]
        ids, types = np.array([ids]), np.array([types])
        print(f"image 120x200 -> {int(n_img[0])} soft tokens of {pv.shape[-1]} values "
              f"(grid {pos[0, :int(n_img[0]), 0].max() + 1} x {pos[0, :int(n_img[0]), 1].max() + 1}, padded to {pv.shape[1]})")
        print(f"audio 0.3 s stereo 44.1 kHz -> {n_aud} frames of {feats.shape[-1]} samples")
        print(f"prompt: {ids.shape[1]} tokens; model: {cfg.num_layers} layers "
              f"({sum(s.kind == 'full_attention' for s in cfg.layers)} global), window {cfg.window}")
        t0 = time.perf_counter()
        logits = model.forward(ids, pixel_values=pv, image_position_ids=pos, input_features=feats,
                               input_features_mask=fmask, mm_token_type_ids=types)
        t1 = time.perf_counter()
        new = model.generate(ids, pixel_values=pv, image_position_ids=pos, input_features=feats,
                             input_features_mask=fmask, mm_token_type_ids=types, max_new_tokens=8)
        t2 = time.perf_counter()
        print(f"forward: logits {list(logits.shape)} in {t1 - t0:.3f} s; generate: {new.shape[1]} tokens "
              f"{new[0].tolist()} in {t2 - t1:.3f} s")
        print("(random weights: the tokens are noise; `python -m ref.run` with a trained model answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
