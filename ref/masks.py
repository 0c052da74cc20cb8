"""Which keys each query may see, per layer type (SPEC.md, "The attention mask").

Our semantics, as Google's JAX code and HF's `create_masks_for_vision_model`:
  full layers:    causal
  sliding layers: window AND (causal OR same image/video block)
and, for `use_bidirectional_attention == "all"`, no causality at all: full layers see every real key,
sliding layers see keys with |q - k| <= window // 2 + 1 (`sliding_window_bidirectional_overlay`).
Padding keys (attention_mask 0) are never visible. Queries and keys are named by their absolute index
in the sequence (not their RoPE position), so the same function serves prefill and cached decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .config import FULL, Config


def block_ids(mm_token_type_ids: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """mm_token_type_ids [B, T] (0 text, 1 image, 2 video, 3 audio) -> [B, T] int: -1 outside vision blocks,
    else the index of the contiguous run of image/video tokens it belongs to. Mirrors
    `get_block_sequence_ids_for_mask`; each video frame is its own run because boi/eoi separate frames."""
    if mm_token_type_ids is None:
        return np.full(shape, -1, np.int64)
    t = np.asarray(mm_token_type_ids)
    vision = (t == 1) | (t == 2)
    starts = vision & ~np.concatenate([np.zeros_like(vision[:, :1]), vision[:, :-1]], axis=1)
    return np.where(vision, np.cumsum(starts, axis=1) - 1, -1)


def layer_mask(cfg: Config, kind: str, q_idx: np.ndarray, k_idx: np.ndarray, key_ok: np.ndarray,
               q_block: np.ndarray, k_block: np.ndarray) -> np.ndarray:
    """q_idx [T], k_idx [S] absolute indices; key_ok [B, S] (not padding); q_block [B, T], k_block [B, S]
    from `block_ids` -> [B, T, S] bool, True where the query may attend to the key."""
    d = q_idx[:, None] - k_idx[None, :]  # [T, S]: how far back the key is
    if cfg.bidirectional == "all":
        allowed = np.ones_like(d, bool) if kind == FULL else np.abs(d) <= cfg.window
        allowed = np.broadcast_to(allowed, (key_ok.shape[0],) + d.shape)
    else:
        causal = np.broadcast_to(d >= 0, (key_ok.shape[0],) + d.shape)
        if kind == FULL:
            allowed = causal
        else:
            blocks = cfg.bidirectional == "vision"
            same = (q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0) if blocks else False
            allowed = (causal | same) & (d < cfg.window)
    return allowed & key_ok[:, None, :]


@dataclass(frozen=True)
class MaskSpec:
    """Everything that decides one layer type's mask, without materialising it: kernels that tile
    attention compute the mask on the fly from these; `dense()` is the [B, T, S] reference."""

    cfg: Config
    kind: str
    q_idx: np.ndarray  # [T] absolute index of each query
    k_idx: np.ndarray  # [S] absolute index of each key
    key_ok: np.ndarray  # [B, S] False for padding keys
    q_block: np.ndarray  # [B, T] vision block id, -1 outside blocks
    k_block: np.ndarray  # [B, S]

    @classmethod
    def from_seen(cls, cfg: Config, kind: str, q_idx: np.ndarray, k_idx: np.ndarray, key_ok: np.ndarray,
             block: np.ndarray) -> "MaskSpec":
        """The mask of queries q_idx [T] over keys k_idx [S] (absolute indices), from the padding flags and
        vision-block ids of every token seen so far, key_ok / block [B, seen]."""
        return cls(cfg, kind, q_idx, k_idx, key_ok[:, k_idx], block[:, q_idx], block[:, k_idx])

    def dense(self) -> np.ndarray:
        """-> [B, T, S] bool, built on the first call and kept: within a forward pass every layer of a kind
        shares one MaskSpec. Shared, so callers only read it."""
        return self._dense

    @cached_property
    def _dense(self) -> np.ndarray:
        return layer_mask(self.cfg, self.kind, self.q_idx, self.k_idx, self.key_ok, self.q_block, self.k_block)
