"""The model: load a checkpoint directory, run the forward pass, generate.

A reader can follow one input from here down: `embed_inputs` (embedders.py) turns ids and media into
[B, T, D], `decoder_forward` (decoder.py) runs the layers, `lm_head` gives soft-capped logits.
Mirrors Gemma4UnifiedForConditionalGeneration.forward.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .config import Config, load_config
from .decoder import REF, KVCache, decoder_forward
from .embedders import embed_inputs
from .errors import ConfigError
from .generate import generate as _generate
from .masks import block_ids
from .weights import load_tensors, nest


class Model:
    """A loaded checkpoint. `params` mirrors the tensor names: params.language_model.layers[0].mlp.up_proj.weight.
    `kernels` are the decoder's hot loops (ref's NumPy ones here; fast/ subclasses swap them)."""

    kernels = REF

    def __init__(self, config: Config, tensors: dict, path: str | Path | None = None):
        self.config = config
        self.tensors = tensors
        self.params = nest(tensors)
        self.path = Path(path) if path is not None else None

    @property
    def decoder_params(self):
        """The decoder's weights (params.language_model); fast/'s GPU model keeps a device copy."""
        return self.params.language_model

    @property
    def head(self):
        """The output projection [V, D]: the embedding itself when tied."""
        if self.config.tie_word_embeddings:
            return self.params.language_model.embed_tokens.weight
        return self.tensors["lm_head.weight"]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens (sizes unused here; fast/ preallocates)."""
        return KVCache()

    def check_length(self, n: int) -> None:
        """Warn where a call reaches n positions, past max_position_embeddings. The model computes there
        anyway, as HF's does (RoPE takes any position; HF's generate warns too): a small test config may set
        a low limit. `python -m ref.run` refuses such prompts instead."""
        limit = self.config.max_position_embeddings
        if n > limit:
            warnings.warn(f"this call reaches {n} positions, past the model's limit of {limit} "
                          f"(max_position_embeddings); it computes them as HF does, beyond what the model "
                          f"was trained on", UserWarning, stacklevel=3)

    def embed(self, input_ids, pixel_values=None, image_position_ids=None, pixel_values_videos=None,
              video_position_ids=None, num_frames_per_video=None, input_features=None, input_features_mask=None,
              trace=None) -> np.ndarray:
        """input_ids [B, T] + media -> inputs_embeds [B, T, D]."""
        if pixel_values_videos is not None and num_frames_per_video is not None:
            if int(np.sum(num_frames_per_video)) != len(pixel_values_videos):
                raise ValueError(f"num_frames_per_video sums to {int(np.sum(num_frames_per_video))}, "
                                 f"pixel_values_videos has {len(pixel_values_videos)} frames")
        return embed_inputs(self.params, self.config, np.asarray(input_ids), pixel_values, image_position_ids,
                            pixel_values_videos, video_position_ids, input_features, input_features_mask, trace)

    def blocks(self, mm_token_type_ids, shape) -> np.ndarray:
        """Vision block ids [B, T] (-1 = not in a block); none unless the model has bidirectional vision blocks."""
        if self.config.bidirectional != "vision":
            mm_token_type_ids = None
        return block_ids(mm_token_type_ids, shape)

    def run_decoder(self, x: np.ndarray, positions: np.ndarray, key_ok: np.ndarray, block: np.ndarray,
                    cache: KVCache | None = None, trace=None, last_only: bool = False) -> np.ndarray:
        """inputs_embeds [B, T, D] -> final-normed hidden states [B, T, D]: `decoder_forward` with this
        model's weights and kernels (fast/'s CPU model compiles a decoding step whole here). last_only: the
        caller reads only the last token's states (generation) -> [B, 1, D]; ref computes every token and
        returns the last, fast's prompt pass skips the work no other token needs (in its last layer). A
        model may return [B, T, D] all the same (fast's GPU passes do): callers take h[:, -1:]."""
        h = decoder_forward(x, self.decoder_params, self.config, positions, key_ok, block, cache, trace,
                            self.kernels)
        return h[:, -1:] if last_only else h

    def forward(self, input_ids, pixel_values=None, image_position_ids=None, pixel_values_videos=None,
                video_position_ids=None, num_frames_per_video=None, input_features=None, input_features_mask=None,
                mm_token_type_ids=None, attention_mask=None, position_ids=None, trace=None) -> np.ndarray:
        """-> logits [B, T, V] float32. Arguments have HF's names, shapes and meaning:

        input_ids [B, T]; pixel_values [N, S, 6912] + image_position_ids [N, S, 2];
        pixel_values_videos [F, S, 6912] + video_position_ids [F, S, 2] + num_frames_per_video [videos];
        input_features [A, Ta, 640] + input_features_mask [A, Ta]; mm_token_type_ids [B, T] (0 text,
        1 image, 2 video, 3 audio: without it image tokens get no bidirectional block, as in HF);
        attention_mask [B, T] (1 = real token, 0 = padding); position_ids [B, T] (default 0..T-1, as HF's forward).
        `trace(name, array)`, if given, sees every intermediate stage (see ref/golden).
        """
        ids = np.asarray(input_ids, np.int64)
        B, T = ids.shape
        self.check_length(T)
        x = self.embed(ids, pixel_values, image_position_ids, pixel_values_videos, video_position_ids,
                       num_frames_per_video, input_features, input_features_mask, trace)
        key_ok = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        positions = np.broadcast_to(np.arange(T), (B, T)) if position_ids is None else np.asarray(position_ids)
        positions = np.broadcast_to(positions, (B, T))
        h = self.run_decoder(x, positions, key_ok, self.blocks(mm_token_type_ids, (B, T)), trace=trace)
        logits = self.kernels.lm_head(h, self.head, self.config.final_logit_softcapping)
        if trace is not None:
            trace("logits", logits)
        return logits

    __call__ = forward

    def generate(self, input_ids, pixel_values=None, image_position_ids=None, pixel_values_videos=None,
                 video_position_ids=None, num_frames_per_video=None, input_features=None, input_features_mask=None,
                 mm_token_type_ids=None, attention_mask=None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, on_token=None) -> np.ndarray:
        """Same inputs as `forward` -> new token ids [B, <= max_new_tokens]. Greedy unless temperature > 0;
        stops at the eos ids; `suppress_tokens` from generation_config.json never appear. See generate.py."""
        return _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed, attention_mask,
                         mm_token_type_ids, use_cache, on_token, pixel_values=pixel_values,
                         image_position_ids=image_position_ids, pixel_values_videos=pixel_values_videos,
                         video_position_ids=video_position_ids, num_frames_per_video=num_frames_per_video,
                         input_features=input_features, input_features_mask=input_features_mask)


def load_model(path: str | Path) -> Model:
    """An HF-format checkpoint directory (config.json, model.safetensors or shards, generation_config.json)
    -> Model. Weights stay memory-mapped in their stored dtype; errors name the offending file or tensor."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a model directory")
    cfg = load_config(path)
    return Model(cfg, load_tensors(path, cfg), path)
