"""fast: the same model as `ref` with its hot loops compiled (Numba on the CPU).

`fast.load_model(path, device="cpu")` returns a model with ref's `forward` and `generate`: config,
loader, processors, masks and sampling are ref's; only the kernels (fast/cpu.py) and the KV cache
(preallocated, a ring buffer for sliding layers) differ. Results equal ref's to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

from ref.config import load_config
from ref.errors import ConfigError
from ref.model import Model
from ref.weights import load_tensors

DEVICES = ("cpu",)


class CpuModel(Model):
    """ref's Model with Numba kernels and a preallocated cache."""

    def __init__(self, *args, **kwargs):
        from . import cpu  # compiles (or loads cached) kernels on first use

        super().__init__(*args, **kwargs)
        self.kernels = cpu.KERNELS
        self._cache_type = cpu.RingKVCache

    def new_cache(self, batch: int, max_len: int):
        return self._cache_type(batch, max_len)


def load_model(path: str | Path, device: str = "cpu") -> Model:
    """Like ref.load_model, with fast kernels on `device`."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not available in fast/ (have: {', '.join(DEVICES)})")
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a model directory")
    cfg = load_config(path)
    return CpuModel(cfg, load_tensors(path, cfg), path)
