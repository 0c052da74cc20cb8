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
