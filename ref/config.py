"""One typed config for Gemma 4 Unified, read from HF's config.json, with one spec per decoder layer.

Mirrors `Gemma4UnifiedTextConfig.__post_init__` and `kv_sharing_modes` (configuration_gemma4_unified.py):
the default 5-sliding-1-full pattern, the forced full last layer, global head_dim / kv heads
(`global_head_dim`, `num_global_key_value_heads` or `per_layer_config`), KV sharing sources, and the
halved window of fully bidirectional models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


@dataclass(frozen=True)
class Rope:
    """Rotary frequencies of one layer type: `theta ** (-2i / head_dim)` for the first `rotated` pairs, 0 after."""

    theta: float
    rotated_fraction: float = 1.0  # "proportional" RoPE rotates only this share of the head_dim/2 pairs
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    """Everything that differs between decoder layers."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # no v_proj: V is the k_proj output (global layers with attention_k_eq_v)
    kv_source: int  # the layer whose K/V this layer attends with (itself unless KV-shared)
    intermediate_size: int
    rope: Rope


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default; the checkpoint's rms_norm_eps does not apply here

    @property
    def model_patch_size(self) -> int:  # 48
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:  # 48 * 48 * 3 = 6912
        return self.model_patch_size**2 * 3


@dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int = 640  # samples per frame = features per audio soft token
    rms_norm_eps: float = 1e-6
    sampling_rate: int = 16000


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    layers: tuple[LayerSpec, ...]
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024  # as in config.json; see `window`
    bidirectional: str | None = "vision"  # None, "vision" or "all"
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    image_token_id: int = 258880
    audio_token_id: int = 258881
    video_token_id: int = 258884
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    boa_token_id: int = 256000
    eoa_token_id: int = 258883
    suppress_tokens: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def window(self) -> int:
        """Sliding layers see keys with `q - window < k <= q` (causal) or `|q - k| <= window` (bidirectional "all").

        A fully bidirectional model halves the configured window: HF sets `sliding_window // 2 + 1`
        in `__post_init__` and writes the original value back in `to_dict`.
        """
        if self.bidirectional == "all":
            return self.sliding_window // 2 + 1
        return self.sliding_window

    def kv_shared(self, i: int) -> bool:
        return self.layers[i].kv_source != i


def _layer_types(text: dict) -> list[str]:
    n = text["num_hidden_layers"]
    types = text.get("layer_types")
    if types is None:
        types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
    types = list(types)
    if len(types) != n:
        raise ConfigError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    bad = sorted({t for t in types if t not in (SLIDING, FULL)})
    if bad:
        raise ConfigError(f"config.json: unknown layer type(s) {bad}; expected {SLIDING!r} or {FULL!r}")
    types[-1] = FULL  # HF forces the last layer to full attention
    return types


def _rope(text: dict, kind: str) -> Rope:
    params = text.get("rope_parameters")
    if params is None:
        params = {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
    p = params[kind] if kind in params else params  # one dict for every layer type is allowed too
    rope_type = p.get("rope_type", "default")
    if rope_type == "default":
        return Rope(theta=float(p["rope_theta"]))
    if rope_type == "proportional":
        return Rope(float(p["rope_theta"]), float(p.get("partial_rotary_factor", 1.0)), float(p.get("factor", 1.0)))
    raise ConfigError(f"config.json: rope_type {rope_type!r} for {kind} is not supported (default, proportional)")


def _per_layer_overrides(text: dict, types: list[str]) -> dict[int, dict]:
    """`per_layer_config` when present, else the global head_dim / kv heads HF derives for full layers."""
    if "per_layer_config" in text and text["per_layer_config"] is not None:
        return {int(k): dict(v) for k, v in text["per_layer_config"].items()}
    override = {"head_dim": text.get("global_head_dim", 512)}
    if text.get("attention_k_eq_v", False) and text.get("num_global_key_value_heads") is not None:
        override["num_key_value_heads"] = text["num_global_key_value_heads"]
    return {i: override for i, t in enumerate(types) if t == FULL}


def _kv_sources(types: list[str], num_shared: int) -> list[int]:
    """Layer i attends with the K/V of layer kv_source[i]: itself, or (for the last `num_shared` layers)
    the last earlier non-shared layer of the same type. Mirrors `kv_sharing_modes`."""
    n = len(types)
    first_shared = n - num_shared
    sources = list(range(n))
    for i in range(first_shared, n):
        earlier = [j for j in range(first_shared) if types[j] == types[i]]
        if not earlier:
            raise ConfigError(f"config.json: KV-shared layer {i} ({types[i]}) has no earlier layer of its type")
        sources[i] = earlier[-1]
    return sources


def from_hf_dict(cfg: dict, generation: dict | None = None) -> Config:
    """HF `config.json` (composite or text-only) [+ generation_config.json] -> Config."""
    try:
        return _from_hf_dict(cfg, generation or {})
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"config.json: {what}") from None


def _from_hf_dict(cfg: dict, gen: dict) -> Config:
    if not isinstance(cfg, dict):
        raise ConfigError("config.json: top level is not a JSON object")
    text = cfg.get("text_config", cfg)
    types = _layer_types(text)
    n = len(types)
    overrides = _per_layer_overrides(text, types)
    num_shared = int(text.get("num_kv_shared_layers", 0) or 0)
    if not 0 <= num_shared < n:
        raise ConfigError(f"config.json: num_kv_shared_layers={num_shared} must be in [0, {n})")
    sources = _kv_sources(types, num_shared)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    double_wide = bool(text.get("use_double_wide_mlp", False))
    layers = []
    for i, kind in enumerate(types):
        o = overrides.get(i, {})
        layers.append(
            LayerSpec(
                kind=kind,
                head_dim=int(o.get("head_dim", text.get("head_dim", 256))),
                num_kv_heads=int(o.get("num_key_value_heads", text["num_key_value_heads"])),
                k_eq_v=k_eq_v and kind == FULL,
                kv_source=sources[i],
                intermediate_size=int(text["intermediate_size"]) * (2 if double_wide and sources[i] != i else 1),
                rope=_rope(text, kind),
            )
        )
    heads = int(text["num_attention_heads"])
    for i, spec in enumerate(layers):
        if heads % spec.num_kv_heads:
            raise ConfigError(f"config.json: layer {i} has {spec.num_kv_heads} kv heads, not a divisor of {heads}")
    if text.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ConfigError(f"config.json: hidden_activation {text['hidden_activation']!r} is not supported")
    bidir = text.get("use_bidirectional_attention", "vision")
    if bidir not in (None, "vision", "all"):
        raise ConfigError(f"config.json: use_bidirectional_attention={bidir!r}; expected null, 'vision' or 'all'")

    vision = cfg.get("vision_config")
    audio = cfg.get("audio_config")
    if vision is not None and vision.get("output_proj_dims", 3840) != vision.get("mm_embed_dim", 3840):
        raise ConfigError(f"config.json: vision output_proj_dims={vision.get('output_proj_dims', 3840)} must equal "
                          f"mm_embed_dim={vision.get('mm_embed_dim', 3840)} (the projection reads the embedder's output)")
    eos = gen.get("eos_token_id", text.get("eos_token_id", 1))
    eos = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    return Config(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        num_attention_heads=heads,
        layers=tuple(layers),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        sliding_window=int(text.get("sliding_window", 1024)),
        bidirectional=bidir,
        final_logit_softcapping=text.get("final_logit_softcapping"),
        attention_bias=bool(text.get("attention_bias", False)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        vision=None if vision is None else VisionConfig(
            patch_size=int(vision.get("patch_size", 16)),
            pooling_kernel_size=int(vision.get("pooling_kernel_size", 3)),
            mm_embed_dim=int(vision.get("mm_embed_dim", 3840)),
            mm_posemb_size=int(vision.get("mm_posemb_size", 1120)),
            rms_norm_eps=float(vision.get("rms_norm_eps", 1e-6)),
        ),
        audio=None if audio is None else AudioConfig(
            audio_embed_dim=int(audio.get("audio_embed_dim", 640)),
            rms_norm_eps=float(audio.get("rms_norm_eps", 1e-6)),
        ),
        pad_token_id=int(gen.get("pad_token_id", text.get("pad_token_id", 0)) or 0),
        bos_token_id=int(text.get("bos_token_id", 2) or 2),
        eos_token_ids=tuple(int(e) for e in eos),
        image_token_id=int(cfg.get("image_token_id", 258880)),
        audio_token_id=int(cfg.get("audio_token_id", 258881)),
        video_token_id=int(cfg.get("video_token_id", 258884)),
        boi_token_id=int(cfg.get("boi_token_id", 255999)),
        eoi_token_id=int(cfg.get("eoi_token_id", 258882)),
        boa_token_id=int(cfg.get("boa_token_id", 256000)),
        eoa_token_id=int(cfg.get("eoa_token_index", cfg.get("eoa_token_id", 258883))),
        suppress_tokens=tuple(int(t) for t in (gen.get("suppress_tokens") or ())),
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is not a JSON object")
    return data


def load_config(model_dir: str | Path) -> Config:
    """<dir>/config.json [+ generation_config.json] -> Config."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json", "config.json")
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path, "generation_config.json") if gen_path.exists() else {}
    return from_hf_dict(cfg, gen)


# ---- named presets -----------------------------------------------------------------------------

def gemma4_12b_hf_dict() -> dict:
    """The text/vision/audio sizes of google/gemma-4-12B-it (SPEC.md), as an HF config dict."""
    return {
        "model_type": "gemma4_unified",
        "text_config": {
            "vocab_size": 262144, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
            "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 1024,
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
        },
        "vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840, "mm_posemb_size": 1120},
        "audio_config": {"audio_embed_dim": 640},
    }


MEDIA_TOKENS = ("image_token_id", "audio_token_id", "video_token_id", "boi_token_id", "eoi_token_id",
                "boa_token_id", "eoa_token_index")


def media_token_ids(vocab_size: int) -> dict:
    """The seven media token ids of a test config, at vocab_size - 12 onwards in MEDIA_TOKENS order (500-506
    for the tiny vocabulary of 512), clear of the random text ids tests draw from the bottom of it."""
    return {name: vocab_size - 12 + i for i, name in enumerate(MEDIA_TOKENS)}


def tiny_hf_dict(**text_overrides) -> dict:
    """A few-hundred-thousand-parameter config with every feature of the real one, for tests. Its media
    token ids follow the vocabulary (`media_token_ids`), so a wider vocab_size moves them to its top."""
    text = {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 8,
        "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
    }
    text.update(text_overrides)
    return {
        "model_type": "gemma4_unified",
        "text_config": text,
        "vision_config": {"mm_embed_dim": 48, "mm_posemb_size": 64, "output_proj_dims": 48},
        "audio_config": {"audio_embed_dim": 640},
        **media_token_ids(text["vocab_size"]),
    }


PRESETS = {"gemma-4-12b": gemma4_12b_hf_dict, "tiny": tiny_hf_dict}


def from_name(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return from_hf_dict(PRESETS[name]())


__all__ = ["Config", "LayerSpec", "Rope", "VisionConfig", "AudioConfig", "from_hf_dict", "load_config", "from_name",
           "SLIDING", "FULL", "SOFT_TOKEN_BUDGETS", "replace"]
