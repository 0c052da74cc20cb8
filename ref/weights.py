"""Tensor names, shapes and the strict loader.

The names are the checkpoint's own (what `save_pretrained` writes, SPEC.md): `model.language_model.*`,
`model.vision_embedder.*`, `model.embed_vision.embedding_projection.weight`,
`model.embed_audio.embedding_projection.weight`. HF's in-memory module names are accepted too and
renamed on the way in. Loading re-nests the flat names into attribute trees (`p.layers[3].mlp.up_proj.weight`),
so model code is written with the checkpoint's vocabulary. Nothing is copied: bf16 stays a memory map.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import Config
from .errors import CheckpointError
from .safetensors_io import open_tensors

# HF module-tree names -> checkpoint names (Gemma4UnifiedModel's conversion mapping, in reverse).
_ALIASES = (
    ("model.embed_vision.multimodal_embedder.embedding_projection.", "model.embed_vision.embedding_projection."),
    ("model.embed_vision.patch_ln1.", "model.vision_embedder.patch_ln1."),
    ("model.embed_vision.patch_dense.", "model.vision_embedder.patch_dense."),
    ("model.embed_vision.patch_ln2.", "model.vision_embedder.patch_ln2."),
    ("model.embed_vision.pos_norm.", "model.vision_embedder.pos_norm."),
    ("model.embed_vision.pos_embedding", "model.vision_embedder.pos_embedding"),
)


def canonical_name(name: str) -> str:
    for hf, ours in _ALIASES:
        if name.startswith(hf):
            return ours + name[len(hf):]
    return name


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape ([out, in] for linears)."""
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    lm = "model.language_model."
    s = {lm + "embed_tokens.weight": (V, D), lm + "norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, D)
    for i, spec in enumerate(cfg.layers):
        p, dh, kv, inter = f"{lm}layers.{i}.", spec.head_dim, spec.num_kv_heads, spec.intermediate_size
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            s[p + norm + ".weight"] = (D,)
        s[p + "layer_scalar"] = (1,)
        projs = {"q_proj": (H * dh, D), "o_proj": (D, H * dh)}
        s[p + "self_attn.q_norm.weight"] = (dh,)
        if not cfg.kv_shared(i):
            projs["k_proj"] = (kv * dh, D)
            if not spec.k_eq_v:
                projs["v_proj"] = (kv * dh, D)
            s[p + "self_attn.k_norm.weight"] = (dh,)
        for name, shape in projs.items():
            s[p + f"self_attn.{name}.weight"] = shape
            if cfg.attention_bias:
                s[p + f"self_attn.{name}.bias"] = (shape[0],)
        s[p + "mlp.gate_proj.weight"] = (inter, D)
        s[p + "mlp.up_proj.weight"] = (inter, D)
        s[p + "mlp.down_proj.weight"] = (D, inter)
    if cfg.vision is not None:
        v, E, P = "model.vision_embedder.", cfg.vision.mm_embed_dim, cfg.vision.patch_dim
        s.update({v + "patch_ln1.weight": (P,), v + "patch_ln1.bias": (P,),
                  v + "patch_dense.weight": (E, P), v + "patch_dense.bias": (E,),
                  v + "patch_ln2.weight": (E,), v + "patch_ln2.bias": (E,),
                  v + "pos_embedding": (cfg.vision.mm_posemb_size, 2, E),
                  v + "pos_norm.weight": (E,), v + "pos_norm.bias": (E,),
                  "model.embed_vision.embedding_projection.weight": (D, E)})
    if cfg.audio is not None:
        s["model.embed_audio.embedding_projection.weight"] = (D, cfg.audio.audio_embed_dim)
    return s


def num_parameters(cfg: Config) -> int:
    """Parameter count implied by a config (tied embeddings counted once)."""
    return sum(math.prod(shape) for shape in expected_shapes(cfg).values())


def _files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index.name}: not a valid safetensors index (no weight_map)") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model.safetensors (or shards with an index)")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{model_dir}: shard {missing[0]} named in the index does not exist")
    return files


def load_tensors(model_dir: str | Path, cfg: Config) -> dict:
    """Map every tensor of the checkpoint and check it against the config: -> {checkpoint name: array}.

    Raises CheckpointError naming the first missing, unexpected or mis-shaped tensor.
    """
    model_dir = Path(model_dir)
    tensors = {}
    for f in _files(model_dir):
        for name, t in open_tensors(f).items():
            tensors[canonical_name(name)] = t
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports write the tied head anyway; it is the embedding
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more}")
    unexpected = sorted(n for n in tensors if n not in want)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]}{more}")
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"shape mismatch for {name}: got {list(got)}, want {list(shape)}")
    return tensors


class Params(dict):
    """A dict whose keys also read as attributes: p.self_attn.q_proj.weight. The dict is its own attribute
    namespace, so an attribute read is Python's ordinary lookup (a decoded token reads some 250 of them;
    a __getattr__ method costs ~0.3 us each)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__ = self


def nest(flat: dict) -> Params:
    """{'model.language_model.layers.0.mlp.up_proj.weight': w, ...} -> p.language_model.layers[0].mlp.up_proj.weight.

    The leading `model.` is dropped; numeric parts become list indices.
    """
    root = Params()
    for name, value in flat.items():
        parts = name.split(".")
        if parts[0] == "model":
            parts = parts[1:]
        node = root
        for part, nxt in zip(parts[:-1], parts[1:]):
            node = _child(node, part, list if nxt.isdigit() else Params)
        _set(node, parts[-1], value)
    return root


def _child(node, key, kind):
    if isinstance(node, list):
        i = int(key)
        while len(node) <= i:
            node.append(None)
        if node[i] is None:
            node[i] = kind()
        return node[i]
    if key not in node:
        node[key] = kind()
    return node[key]


def _set(node, key, value):
    if isinstance(node, list):
        _child(node, key, Params)
        node[int(key)] = value
    else:
        node[key] = value
