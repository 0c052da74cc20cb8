"""Tiny random checkpoints, written without torch: for tests, the demo and golden cases.

Weights are random but well scaled, so a forward pass exercises every path with non-trivial values:
norm weights near 1, q_norm/k_norm weights in (0.2, 0.6) (near-one-hot random attention would turn
float32 rounding into chaos; see tests/hf_peer.py), layer_scalar in (0.05, 1), biases non-zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import from_hf_dict
from .safetensors_io import Bf16, f32_to_bf16, save_file
from .weights import expected_shapes


def random_tensors(hf_config: dict, seed: int = 0, dtype: str = "F32") -> dict:
    """Every tensor of the config, random but well scaled: norms near 1, layer_scalar in (0.05, 1)."""
    cfg = from_hf_dict(hf_config)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("layer_scalar"):
            t = rng.uniform(0.05, 1.0, shape)
        elif "q_norm" in name or "k_norm" in name:
            t = rng.uniform(0.2, 0.6, shape)
        elif "norm" in name or "_ln" in name:
            t = (rng.uniform(0.5, 1.5, shape) if name.endswith("weight") else rng.normal(0, 0.1, shape))
        elif name.endswith("pos_embedding"):
            t = rng.normal(0, 0.5, shape)
        elif name.endswith("bias"):
            t = rng.normal(0, 0.05, shape)
        else:
            t = rng.normal(0, 1.0 / np.sqrt(shape[-1]), shape)
            if "embed_tokens" in name:
                t = t * 0.5
        t = t.astype(np.float32)
        out[name] = Bf16(f32_to_bf16(t)) if dtype == "BF16" else t.astype(np.float16) if dtype == "F16" else t
    return out


def write_checkpoint(path: Path, hf_config: dict, tensors: dict, generation: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    save_file(tensors, path / "model.safetensors")
    return path


def write_large_bf16_checkpoint(path: Path, hf_config: dict, seed: int = 0) -> Path:
    """A checkpoint of any size, streamed tensor by tensor without holding it in memory (for memory
    tests and benchmarks). Values are random bf16 bit patterns: weights in +-[2^-7, 2^-6) with random
    mantissas, norm weights and layer_scalar in [1, 2)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    shapes = expected_shapes(from_hf_dict(hf_config))
    header, offset = {}, 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name]))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(shapes):
            n, done = int(np.prod(shapes[name])), 0
            one = len(shapes[name]) == 1 or name.endswith("layer_scalar")
            base, keep = (0x3F80, 0x007F) if one else (0x3C00, 0x807F)  # exponent of 1.0 or of 2^-7
            while done < n:
                m = min(n - done, 1 << 24)
                bits = (rng.integers(0, 1 << 16, m, dtype=np.uint16) & np.uint16(keep)) | np.uint16(base)
                f.write(bits.tobytes())
                done += m
    tmp.replace(path / "model.safetensors")
    return path
