"""Read and write safetensors files as memory maps, keeping bf16 as raw 16-bit words.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data. We parse it ourselves so that every failure gets a one-line message and no tensor is
ever copied or upcast while loading: the 23 GB bf16 checkpoint stays 23 GB of mapped file pages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# safetensors dtype -> numpy storage dtype. BF16 has no numpy type: it is stored as uint16 bits.
STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class Bf16:
    """A bfloat16 tensor held as its uint16 bit patterns (usually a memory map). Upcast with `to_f32`."""

    bits: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def __getitem__(self, index) -> "Bf16":
        return Bf16(self.bits[index])


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bf16 is the top half of an f32. [...] uint16 -> [...] float32."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: one float32-sized array, not two
    return wide.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (what torch's .to(bfloat16) does). [...] f32 -> [...] uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def to_f32(w) -> np.ndarray:
    """Any stored tensor -> float32 (exact for bf16, f16 and f32). Array methods only, so a device
    array (CuPy) stays on its device."""
    if isinstance(w, Bf16):
        return bf16_to_f32(w.bits)
    w = w if hasattr(w, "dtype") else np.asarray(w)
    return w if w.dtype == np.float32 else w.astype(np.float32)


def read_header(path: Path) -> tuple[dict, int]:
    """-> ({name: entry}, data_start). Checks that every tensor lies inside the file and has the right size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated file ({size} bytes, no safetensors header)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path.name}: header length {n} points past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, e in header.items():
        try:
            dtype, shape, (lo, hi) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: malformed header entry for {name}") from None
        if dtype not in STORAGE:
            raise CheckpointError(f"{path.name}: tensor {name} has unknown dtype {dtype}")
        want = math.prod(shape) * np.dtype(STORAGE[dtype]).itemsize
        if hi - lo != want or lo < 0:
            raise CheckpointError(f"{path.name}: tensor {name} has {hi - lo} bytes, its {dtype} shape {shape} needs {want}")
        if start + hi > size:
            raise CheckpointError(
                f"{path.name}: tensor {name} ends at byte {start + hi}, past the end of the {size}-byte file (truncated?)")
    return header, start


def open_tensors(path: Path) -> dict:
    """safetensors file -> {name: np.memmap view, or Bf16 of one}. Nothing is read until used."""
    header, start = read_header(path)
    if not header:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in header.items():
        lo, hi = e["data_offsets"]
        arr = mm[start + lo:start + hi].view(STORAGE[e["dtype"]]).reshape(e["shape"])
        out[name] = Bf16(arr) if e["dtype"] == "BF16" else arr
    return out


def save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """{name: float32/float16 array or Bf16} -> safetensors, written to a temp file then renamed (never half-written)."""
    path = Path(path)
    header, offset, items = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, Bf16):
            dtype, data = "BF16", np.ascontiguousarray(t.bits, dtype=np.uint16)
        else:
            data = np.ascontiguousarray(t)
            dtype = {v: k for k, v in STORAGE.items() if k != "BF16"}[data.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        items.append(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in items:
            f.write(data.tobytes(order="C") if data.nbytes < (1 << 26) else memoryview(data.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
