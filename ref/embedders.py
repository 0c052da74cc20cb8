"""Token, image, video and audio inputs -> one sequence of embeddings [B, T, D].

Vision (Gemma4UnifiedVisionEmbedder + Gemma4UnifiedMultimodalEmbedder), per 48 px patch:
  1. LayerNorm (eps 1e-5)   2. Dense (+bias)   3. LayerNorm
  4. + pos_embedding[x, 0] + pos_embedding[y, 1] (a -1 coordinate adds nothing)
  5. LayerNorm              6. RMSNorm without scale   7. Linear (no bias) to the text width
Audio (Gemma4UnifiedMultimodalEmbedder), per 640-sample frame: RMSNorm without scale, Linear.
Text: embedding row * sqrt(D). Soft tokens replace the placeholder positions unscaled, padding
patches and padded audio frames dropped first (Gemma4UnifiedModel.forward).
"""

from __future__ import annotations

import numpy as np

from .config import Config
from .layers import layer_norm, linear, rms_norm
from .safetensors_io import to_f32


def position_embedding(positions: np.ndarray, table) -> np.ndarray:
    """positions [N, P, 2] (x, y; -1 = padding), table [M, 2, E] -> [N, P, E]: table[x, 0] + table[y, 1]."""
    x, y = positions[..., 0], positions[..., 1]
    ex = to_f32(table[np.maximum(x, 0), 0]) * (x != -1)[..., None]
    ey = to_f32(table[np.maximum(y, 0), 1]) * (y != -1)[..., None]
    return (ex + ey).astype(np.float32)


def vision_embed(pixel_values: np.ndarray, positions: np.ndarray, p, proj, cfg: Config, trace=None,
                 prefix: str = "vision") -> np.ndarray:
    """pixel_values [N, P, 6912], positions [N, P, 2] -> [N, P, D]. p: model.vision_embedder,
    proj: model.embed_vision. `trace(name, array)`, if given, sees every step as `{prefix}.ln1` ... (golden files)."""
    eps = cfg.vision.layer_norm_eps
    emit = trace or (lambda name, a: None)
    h = layer_norm(np.asarray(pixel_values, np.float32), p.patch_ln1.weight, p.patch_ln1.bias, eps)
    emit(f"{prefix}.ln1", h)  # 1
    h = linear(h, p.patch_dense.weight, p.patch_dense.bias)
    emit(f"{prefix}.dense", h)  # 2
    h = layer_norm(h, p.patch_ln2.weight, p.patch_ln2.bias, eps)
    emit(f"{prefix}.ln2", h)  # 3
    h = h + position_embedding(np.asarray(positions), p.pos_embedding)
    emit(f"{prefix}.pos_embed", h)  # 4
    h = layer_norm(h, p.pos_norm.weight, p.pos_norm.bias, eps)
    emit(f"{prefix}.pos_norm", h)  # 5
    h = rms_norm(h, None, cfg.vision.rms_norm_eps)
    emit(f"{prefix}.rms_norm", h)  # 6
    h = linear(h, proj.embedding_projection.weight)
    emit(f"{prefix}.projection", h)  # 7
    return h


def audio_embed(features: np.ndarray, proj, cfg: Config, trace=None) -> np.ndarray:
    """features [N, T, 640] -> [N, T, D]. proj: model.embed_audio."""
    h = rms_norm(np.asarray(features, np.float32), None, cfg.audio.rms_norm_eps)
    if trace is not None:
        trace("audio.rms_norm", h)
    return linear(h, proj.embedding_projection.weight)


def embed_tokens(ids: np.ndarray, table, hidden_size: int) -> np.ndarray:
    """ids [B, T] -> [B, T, D]: rows of the embedding times sqrt(D) (rounded to float32 first, as HF)."""
    return to_f32(table[ids]) * np.float32(hidden_size**0.5)


def _scatter(x: np.ndarray, where: np.ndarray, soft: np.ndarray, what: str) -> None:
    """Write soft tokens [n, D] into x [B, T, D] at the n True places of where [B, T], in row-major order."""
    if int(where.sum()) != len(soft):
        raise ValueError(f"{what}: the prompt has {int(where.sum())} placeholder tokens, the inputs give {len(soft)}")
    x[where] = soft


def embed_inputs(params, cfg: Config, input_ids: np.ndarray, pixel_values=None, image_position_ids=None,
                 pixel_values_videos=None, video_position_ids=None, input_features=None,
                 input_features_mask=None, trace=None) -> np.ndarray:
    """Token ids [B, T] + media -> inputs_embeds [B, T, D]. Placeholders are embedded as pad, then replaced."""
    ids = np.asarray(input_ids)
    image_at, video_at, audio_at = (ids == cfg.image_token_id), (ids == cfg.video_token_id), (ids == cfg.audio_token_id)
    text_ids = np.where(image_at | video_at | audio_at, cfg.pad_token_id, ids)
    x = embed_tokens(text_ids, params.language_model.embed_tokens.weight, cfg.hidden_size)
    emit = trace or (lambda name, a: None)
    emit("text_embeds", x)
    for pixels, positions, at, what in ((pixel_values, image_position_ids, image_at, "image"),
                                        (pixel_values_videos, video_position_ids, video_at, "video")):
        if pixels is None:
            continue
        if cfg.vision is None:
            raise ValueError(f"{what} inputs given to a model without a vision embedder")
        if positions is None:
            raise ValueError(f"{what} inputs need their position ids")
        positions = np.asarray(positions)
        soft = vision_embed(pixels, positions, params.vision_embedder, params.embed_vision, cfg, trace,
                            prefix="vision" if what == "image" else "video")
        _scatter(x, at, soft[(positions != -1).all(-1)], what)
    if input_features is not None and input_features_mask is not None:
        if cfg.audio is None:
            raise ValueError("audio inputs given to a model without an audio embedder")
        soft = audio_embed(input_features, params.embed_audio, cfg, trace)
        emit("audio.projection", soft)
        _scatter(x, audio_at, soft[np.asarray(input_features_mask, bool)], "audio")
    emit("inputs_embeds", x)
    return x
