"""Golden cases: every intermediate stage of `ref` on tiny checkpoints, for other implementations to check against.

`python -m ref.golden make [--out golden] [CASE ...]` (re)writes golden/<case>/ from `ref`, the same bytes on every
run on one machine (another BLAS may round the last bits differently, far inside the tolerances):
  manifest.json              what the case is, the bugs it catches, every stage's shape, dtype and tolerance
  checkpoint/                a tiny HF-format model: config.json, generation_config.json, model.safetensors
  inputs.safetensors         the prompt (input_ids, mm_token_type_ids) and the raw media: image.{i} [H, W, 3]
                             uint8, video.{i} [F, H, W, 3] uint8, audio.{i} [n] float32 at 16 kHz
  stages.safetensors         every stage (names in golden/README.md), under SPEC.md's attention masks
  stages_plain.safetensors   the stages that change under HF's plain-forward masks (block overlay on every
                             layer type); only cases with an image or video block have one
`python -m ref.verify CASE` compares an implementation (or a dump of its tensors) with these files.

Each case is built to catch one class of bug that other ports shipped (SPEC.md, "Bugs others shipped").
Images are chosen so that any bicubic resize gives the same pixels (solid colours, or images already at
their budget size): a porter whose resize kernel differs from Pillow's still matches bit for bit.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import masks as _masks
from .audio import preprocess_audio
from .config import FULL, SLIDING, Config, tiny_hf_dict
from .errors import OneLineParser, UsageError
from .image import preprocess_images
from .model import Model, load_model
from .safetensors_io import Bf16, f32_to_bf16, open_tensors, save_file, to_f32
from .tiny import random_tensors, write_checkpoint
from .video import preprocess_video

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"
IMAGE_BUDGET = VIDEO_BUDGET = 70  # soft tokens per image / video frame: the smallest budget keeps files small
NEW_TOKENS = 4  # greedy tokens generated per case

# The stages HF's plain forward changes: its masks, and everything downstream of them.
PLAIN_ABOUT = ("HF's plain forward (and its generate with the default cache): the image/video block is OR-ed onto "
               "the mask of every layer type, after the sliding window. SPEC.md's masks keep full-attention layers "
               "causal and window the block on sliding layers.")


# ---- the tiny model every case starts from ---------------------------------------------------------

def base_hf_config(**text_overrides) -> dict:
    """The tiny preset, made smaller still (hidden 32, vision width 8) so that a case's files stay small.
    mm_posemb_size 80 leaves room for a 70-patch row or column."""
    text = dict(hidden_size=32, intermediate_size=48, head_dim=8, global_head_dim=16)
    text.update(text_overrides)
    hf = tiny_hf_dict(**text)
    hf["vision_config"].update(mm_embed_dim=8, output_proj_dims=8, mm_posemb_size=80)
    return hf


# ---- media: deterministic, and exact under any bicubic resize ------------------------------------------

WHITE, YELLOW, RED = (255, 255, 255), (255, 255, 0), (255, 0, 0)


def solid(height: int, width: int, rgb) -> np.ndarray:
    """-> [H, W, 3] uint8 of one colour. Any resize of a constant image is the same constant."""
    return np.broadcast_to(np.array(rgb, np.uint8), (height, width, 3)).copy()


def noise(rng, height: int, width: int) -> np.ndarray:
    """-> [H, W, 3] uint8, uniform noise (every patch distinct)."""
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth(rng, height: int, width: int) -> np.ndarray:
    """-> [H, W, 3] uint8, a slow gradient with faint noise: low-variance patches, where LayerNorm's eps matters."""
    y, x = np.mgrid[:height, :width].astype(np.float64)
    base = 128 + 40 * np.sin(x / 70.0) * np.cos(y / 50.0)
    img = base[..., None] + np.array([0.0, 6.0, -6.0]) + rng.normal(0, 1.5, (height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def moving_square(rng, frames: int, height: int, width: int) -> np.ndarray:
    """-> [F, H, W, 3] uint8: a bright square moving over a fixed noisy background."""
    background = (rng.integers(40, 120, (height, width, 3))).astype(np.uint8)
    video = np.repeat(background[None], frames, axis=0)
    for f in range(frames):
        top, left = 30 + 40 * f, 60 + 90 * f
        video[f, top:top + 96, left:left + 96] = (250, 220, 40)
    return video


def tone(n: int, freq: float, amp: float = 0.3) -> np.ndarray:
    """-> [n] float32, a sine at 16 kHz with a little second harmonic."""
    t = np.arange(n) / 16000.0
    return (amp * np.sin(2 * np.pi * freq * t) + 0.1 * amp * np.sin(4 * np.pi * freq * t)).astype(np.float32)


# ---- cases -------------------------------------------------------------------------------------------

def T(n):  # noqa: N802  (prompt segments read like a template: T(3), IMG(0), VID(0), AUD(1))
    return ("text", n)


def IMG(i):  # noqa: N802
    return ("image", i)


def VID(i):  # noqa: N802
    return ("video", i)


def AUD(i):  # noqa: N802
    return ("audio", i)


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    catches: tuple  # ((bug, stages where it shows), ...)
    prompt: tuple  # segments: T(n) text tokens, IMG(i), VID(i), AUD(i)
    text: dict = field(default_factory=dict)  # text_config overrides on the base config
    images: Callable = lambda rng: []
    videos: Callable = lambda rng: []
    audios: Callable = lambda rng: []
    dtype: str = "F32"
    tweak: Callable | None = None  # (tensors, hf_config) -> None, edits weights in place
    generation: dict = field(default_factory=lambda: {"eos_token_id": [1]})
    seed: int = 0


def _extreme_layer_scalars(tensors: dict, hf: dict) -> None:
    """layer_scalar over the real checkpoint's range (0.005 .. 0.92), most of them far below 1."""
    values = [0.005, 0.92, 0.03, 0.4, 0.011, 0.07]
    for i, v in enumerate(values):
        tensors[f"model.language_model.layers.{i}.layer_scalar"] = np.array([v], np.float32)


def _fold_eoi_eoa_rows(tensors: dict, hf: dict) -> None:
    """Like the real checkpoint's folded rows: eoi and eoa embeddings 60x larger than the others, so through the
    tied head they give near-capped logits (+-30) and would win the argmax whenever their sign is right."""
    table = tensors["model.language_model.embed_tokens.weight"]
    for t in (hf["eoi_token_id"], hf["eoa_token_index"]):
        table[t] *= 60.0


CASES = (
    Case("solid_colors",
         "three solid images in one prompt, each its own block: white 90x130, yellow 200x120, red 37x300; each is "
         "resized to fill the 70-token budget (60, 60 and 46 patches)",
         (("colours inverted by the preprocessor or the patch embedder (white read as black)",
           "pixel_values, vision.ln1"),
          ("image token count too small: the resize does not fill the budget", "pixel_values, image_position_ids"),
          ("the images of one prompt merged into one bidirectional block", "mask.sliding"),
          ("the block OR-ed onto full-attention layers too (HF plain-forward masks)", "mask.full")),
         prompt=(T(3), IMG(0), T(2), IMG(1), T(2), IMG(2), T(3)),
         images=lambda rng: [solid(90, 130, WHITE), solid(200, 120, YELLOW), solid(37, 300, RED)], seed=1),
    Case("wide_image",
         "one wide image, 96x1680 (2 rows x 35 columns of patches, already at its budget size): a 70-token block, "
         "almost 9 times the sliding window (8)",
         (("x and y swapped in the factorized position embedding", "vision.pos_embed"),
          ("patches or positions in column-major instead of raster order", "pixel_values, image_position_ids"),
          ("an image longer than the sliding window made fully causal", "mask.sliding"),
          ("the block not windowed on sliding layers, or OR-ed onto full layers (HF plain-forward masks)",
           "mask.full, mask.sliding")),
         prompt=(T(3), IMG(0), T(3)),
         images=lambda rng: [noise(rng, 96, 1680)], seed=2),
    Case("tall_image",
         "one tall low-contrast image, 1680x96 (35 rows x 2 columns of patches, already at its budget size)",
         (("y coordinates collapsed (every patch at y = 0) or x and y swapped", "image_position_ids, vision.pos_embed"),
          ("LayerNorm eps 1e-6 (the text rms_norm_eps) instead of nn.LayerNorm's 1e-5 in the vision embedder",
           "vision.ln1")),
         prompt=(T(3), IMG(0), T(3)),
         images=lambda rng: [smooth(rng, 1680, 96)], seed=3),
    Case("video_frames",
         "a video of three 288x480 frames (60 patches each, 70-token budget), each frame `mm:ss <|image>` + "
         "<|video|> x 60 + `<image|>`",
         (("the frames of a video treated as one block", "mask.sliding"),
          ("video tokens not given bidirectional blocks (mm_token_type_ids 2 ignored)", "mask.sliding"),
          ("frames embedded in the wrong order or with the image path's positions mixed up", "video.pos_embed")),
         prompt=(T(3), VID(0), T(3)),
         videos=lambda rng: [moving_square(rng, 3, 288, 480)], seed=4),
    Case("audio_batch",
         "two audio clips of different lengths in one prompt: 1700 samples (3 frames, the last one padded) and "
         "3200 samples (5 full frames); batched into input_features [2, 5, 640]",
         (("the last frame dropped instead of zero-padded (floor instead of ceil)", "input_features"),
          ("a mel-spectrogram processor: token / feature count mismatch", "input_features, input_features_mask"),
          ("batch padding frames not dropped before the scatter", "inputs_embeds"),
          ("audio tokens given a bidirectional block", "mask.sliding")),
         prompt=(T(3), AUD(0), T(2), AUD(1), T(3)),
         audios=lambda rng: [tone(1700, 440.0), tone(3200, 660.0, 0.2)], seed=5),
    Case("k_eq_v_global",
         "three global layers (layers 0, 2, 5) with attention_k_eq_v, one kv head and head_dim 16, proportional "
         "RoPE (a quarter of the pairs rotate)",
         (("V from a v_proj that does not exist, or taken after k_norm / RoPE instead of before", "layers.0"),
          ("global layers given the sliding layers' kv heads or head_dim", "layers.0"),
          ("proportional RoPE rotating every pair, or with the exponent over the rotated part only", "layers.0")),
         prompt=(T(6), AUD(0), T(6)),
         text={"layer_types": [FULL, SLIDING, FULL, SLIDING, SLIDING, FULL]},
         audios=lambda rng: [tone(1920, 300.0)], seed=6),
    Case("kv_shared_double_wide",
         "8 layers, the last 3 share K/V (layers 5, 6 reuse layer 3's, layer 7 reuses layer 4's) and have a "
         "double-wide MLP (96)",
         (("KV-shared layers computing their own K/V or reusing the wrong layer's", "layers.5"),
          ("use_double_wide_mlp ignored (the checkpoint will not load) or applied to every layer", "layers.5"),),
         prompt=(T(10), AUD(0), T(8)),
         text={"num_hidden_layers": 8, "num_kv_shared_layers": 3, "use_double_wide_mlp": True,
               "layer_types": [SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]},
         audios=lambda rng: [tone(1280, 500.0)], seed=7),
    Case("layer_scalar_extreme",
         "layer_scalar set to 0.005, 0.92, 0.03, 0.4, 0.011, 0.07 (the real checkpoint's range)",
         (("layer_scalar dropped by the loader or ignored", "layers.0"),
          ("layer_scalar applied to the residual branch only instead of the whole layer output", "layers.0")),
         prompt=(T(12),), tweak=_extreme_layer_scalars, seed=8),
    Case("folded_eoi_eoa",
         "the eoi (504) and eoa (506) embedding rows 60x too large, as folded in the real checkpoint; "
         "generation_config.json lists them in suppress_tokens",
         (("suppress_tokens ignored: greedy picks a folded eoi / eoa row", "tokens"),
          ("soft-capping skipped: the folded rows give logits far beyond +-30", "logits")),
         prompt=(T(4), AUD(0), T(3)), tweak=_fold_eoi_eoa_rows,
         generation={"eos_token_id": [1], "suppress_tokens": [504, 506]},
         audios=lambda rng: [tone(1500, 350.0)], seed=9),
    Case("bf16_checkpoint",
         "every weight stored as bfloat16 (computed in float32 after an exact upcast), text and one audio clip",
         (("bf16 weights read as float16 or truncated on upcast", "text_embeds, audio.projection, layers.0"),
          ("the embedding scale sqrt(hidden) rounded to bf16 (HF computes it in float32 for a float32 run)",
           "text_embeds")),
         prompt=(T(5), AUD(0), T(5)), dtype="BF16",
         audios=lambda rng: [tone(2000, 250.0)], seed=10),
)
CASE_NAMES = tuple(c.name for c in CASES)


# ---- prompts ---------------------------------------------------------------------------------------

def build_prompt(cfg: Config, segments: tuple, image_tokens, frame_tokens, audio_tokens, rng):
    """Segments -> (input_ids [1, T], mm_token_type_ids [1, T]) int64, starting with bos.

    image_tokens[i]: soft tokens of image i; frame_tokens[v]: per-frame soft tokens of video v;
    audio_tokens[a]: frames of clip a. Text ids are drawn below the special range."""
    ids, types = [cfg.bos_token_id], [0]

    def add(seq, kind):
        ids.extend(int(t) for t in seq)
        types.extend([kind] * len(seq) if isinstance(kind, int) else kind)

    def text(n):
        add(rng.integers(3, min(cfg.image_token_id, cfg.boi_token_id, cfg.vocab_size), n), 0)

    for kind, i in segments:
        if kind == "text":
            text(i)
        elif kind == "image":
            n = int(image_tokens[i])
            add([cfg.boi_token_id] + [cfg.image_token_id] * n + [cfg.eoi_token_id], [0] + [1] * n + [0])
        elif kind == "video":
            for n in frame_tokens[i]:
                text(2)  # stands for the frame's "mm:ss" timestamp
                add([cfg.boi_token_id] + [cfg.video_token_id] * int(n) + [cfg.eoi_token_id], [0] + [2] * int(n) + [0])
        elif kind == "audio":
            n = int(audio_tokens[i])
            add([cfg.boa_token_id] + [cfg.audio_token_id] * n + [cfg.eoa_token_id], [0] + [3] * n + [0])
    return np.array([ids], np.int64), np.array([types], np.int64)


def media(inputs: dict, kind: str) -> list:
    """inputs.safetensors' image.0, image.1, ... (or video.*, audio.*) in index order."""
    found = sorted((int(k.split(".")[1]), k) for k in inputs if k.startswith(kind + ".") and k.split(".")[1].isdigit())
    return [np.asarray(inputs[k]) for _, k in found]


# ---- stages ----------------------------------------------------------------------------------------

VISION_STEPS = ("ln1", "dense", "ln2", "pos_embed", "pos_norm", "rms_norm", "projection")
_ORDER = (["pixel_values", "image_position_ids"] + [f"vision.{s}" for s in VISION_STEPS]
          + ["pixel_values_videos", "video_position_ids", "num_frames_per_video"] + [f"video.{s}" for s in VISION_STEPS]
          + ["input_features", "input_features_mask", "audio.rms_norm", "audio.projection",
             "text_embeds", "inputs_embeds", "mask.full", "mask.sliding"])
_TAIL = ("final_norm", "logits", "tokens")


def stage_rank(name: str) -> tuple:
    """Pipeline order: processors, embedders, masks, layers by index, final norm, logits, tokens; unknown last."""
    if name in _ORDER:
        return (0, _ORDER.index(name))
    if name.startswith("layers.") and name[7:].isdigit():
        return (1, int(name[7:]))
    if name in _TAIL:
        return (2, _TAIL.index(name))
    return (3, name)


# Tolerance of a float stage: max |got - golden| / max |golden| over the stage. Two float32 implementations of the
# same math differ by a few ulp per op (summation order in a LayerNorm over 6912 values, BLAS blocking, tanh and exp):
# ref and HF agree within 2e-6 on every embedder stage, hence 1e-5. In the decoder, RMSNorm rescales small vectors
# (an attention output that nearly cancels) to unit size and with them their rounding: ref and HF differ by up to
# 1.8e-5 after a few layers of random weights, hence 1e-4, still far below what any real bug does (1e-2 and up;
# bfloat16 or TF32 arithmetic gives about 1e-3). Integer and bool stages (positions, masks, tokens) are exact.
def tolerance(name: str, dtype) -> float:
    if np.dtype(dtype).kind in "biu":
        return 0.0
    if name in ("pixel_values", "pixel_values_videos", "input_features"):
        return 1e-6  # preprocessed inputs: exact up to the rounding of k / 255
    if name.startswith("layers.") or name in ("final_norm", "logits"):
        return 1e-4
    return 1e-5


def run_ref(model: Model, inputs: dict, new_tokens: int = NEW_TOKENS, image_budget: int = IMAGE_BUDGET,
            video_budget: int = VIDEO_BUDGET) -> dict:
    """One case through `ref`: processors on the raw media, forward with a trace, greedy generation.
    -> {stage name: array}. The same function makes the golden files and runs `verify --impl ref`."""
    stages = {}

    def record(name, a):
        stages[name] = np.array(a)  # a copy: ref fills some buffers in place after tracing them

    kw = {}
    images, videos, audios = media(inputs, "image"), media(inputs, "video"), media(inputs, "audio")
    if images:
        kw["pixel_values"], kw["image_position_ids"], _ = preprocess_images(images, image_budget)
    if videos:
        kw["pixel_values_videos"], kw["video_position_ids"], kw["num_frames_per_video"] = \
            preprocess_video(videos, video_budget)
    if audios:
        kw["input_features"], kw["input_features_mask"] = preprocess_audio(audios)
    for name, a in kw.items():
        record(name, a)
    ids, types = np.asarray(inputs["input_ids"]), np.asarray(inputs["mm_token_type_ids"])
    model.forward(ids, mm_token_type_ids=types, trace=record, **kw)
    record("tokens", model.generate(ids, mm_token_type_ids=types, max_new_tokens=new_tokens, **kw))
    return stages


def plain_layer_mask(cfg: Config, kind: str, q_idx, k_idx, key_ok, q_block, k_block) -> np.ndarray:
    """HF's plain-forward masks (`create_masks_for_generate` with block_sequence_ids), same arguments and
    result as `masks.layer_mask`: full layers causal OR same block; sliding layers (causal AND window) OR same
    block. The block overlay comes after the window, so a block longer than the window is seen whole."""
    if cfg.bidirectional != "vision":
        return _masks.layer_mask(cfg, kind, q_idx, k_idx, key_ok, q_block, k_block)
    d = q_idx[:, None] - k_idx[None, :]  # [T, S]
    allowed = (d >= 0) if kind == FULL else (d >= 0) & (d < cfg.window)
    same = (q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0)  # [B, T, S]
    return (allowed[None] | same) & key_ok[:, None, :]


@contextmanager
def plain_forward_masks():
    """Within the block, `ref` builds HF's plain-forward masks instead of SPEC.md's (for the variant files).
    Every mask `ref` materialises goes through `masks.layer_mask` (MaskSpec.dense); if that ever changes, the
    variant equals the main stages, no variant file is written, and tests/test_golden.py fails."""
    saved = _masks.layer_mask
    _masks.layer_mask = plain_layer_mask
    try:
        yield
    finally:
        _masks.layer_mask = saved


def plain_variant(model: Model, inputs: dict, stages: dict, new_tokens: int = NEW_TOKENS) -> dict:
    """The stages HF's plain-forward masks change: the masks, every layer, the final norm, the logits and the
    tokens. {} when the masks are the same (no image or video block)."""
    with plain_forward_masks():
        plain = run_ref(model, inputs, new_tokens)
    masks_differ = any(not np.array_equal(plain[m], stages[m]) for m in ("mask.full", "mask.sliding") if m in stages)
    if not masks_differ:
        return {}
    downstream = [n for n in plain if n.startswith(("mask.", "layers.")) or n in _TAIL]
    return {n: plain[n] for n in downstream}


# ---- files -----------------------------------------------------------------------------------------

def _normalise(a: np.ndarray) -> np.ndarray:
    """Stage arrays as stored: bool, int64 or float32."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    return a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32)


def _describe(stages: dict) -> list:
    return [{"name": n, "shape": list(stages[n].shape), "dtype": str(stages[n].dtype),
             "tolerance": tolerance(n, stages[n].dtype)} for n in sorted(stages, key=stage_rank)]


def make_case(case: Case, out: Path) -> Path:
    """Write golden/<case>/ from scratch."""
    d = out / case.name
    if d.exists():
        shutil.rmtree(d)
    rng = np.random.default_rng(1000 + case.seed)
    hf = base_hf_config(**case.text)
    tensors = random_tensors(hf, case.seed, "F32")
    if case.tweak is not None:
        case.tweak(tensors, hf)
    if case.dtype == "BF16":  # round the (tweaked) float32 weights once, as a bf16 export would
        tensors = {k: Bf16(f32_to_bf16(v)) for k, v in tensors.items()}
    write_checkpoint(d / "checkpoint", hf, tensors, case.generation)
    model = load_model(d / "checkpoint")

    images, videos, audios = case.images(rng), case.videos(rng), case.audios(rng)
    raw = {**{f"image.{i}": a for i, a in enumerate(images)}, **{f"video.{i}": a for i, a in enumerate(videos)},
           **{f"audio.{i}": a for i, a in enumerate(audios)}}
    image_tokens = preprocess_images(images, IMAGE_BUDGET)[2] if images else []
    frame_tokens = [(preprocess_video(v, VIDEO_BUDGET)[1] != -1).all(-1).sum(-1) for v in videos]
    audio_tokens = preprocess_audio(audios)[1].sum(-1) if audios else []
    ids, types = build_prompt(model.config, case.prompt, image_tokens, frame_tokens, audio_tokens, rng)
    inputs = {"input_ids": ids, "mm_token_type_ids": types, **raw}

    stages = {k: _normalise(v) for k, v in run_ref(model, inputs).items()}
    plain = {k: _normalise(v) for k, v in plain_variant(model, inputs, stages).items()}
    save_file(inputs, d / "inputs.safetensors")
    save_file(stages, d / "stages.safetensors")
    if plain:
        save_file(plain, d / "stages_plain.safetensors")

    manifest = {
        "case": case.name,
        "about": case.about,
        "catches": [{"bug": bug, "stages": where} for bug, where in case.catches],
        "checkpoint": {"dir": "checkpoint", "dtype": case.dtype, "computed_in": "float32", "seed": case.seed},
        "inputs": {"file": "inputs.safetensors", "image_budget": IMAGE_BUDGET, "video_budget": VIDEO_BUDGET,
                   "sampling_rate": 16000, "new_tokens": NEW_TOKENS,
                   "tensors": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                               for k, v in sorted(inputs.items())}},
        "masks": "SPEC.md: full layers causal; sliding layers window AND (causal OR same image/video block)",
        "stages": {"file": "stages.safetensors", "list": _describe(stages)},
        "variants": {} if not plain else {
            "plain": {"file": "stages_plain.safetensors", "about": PLAIN_ABOUT, "list": _describe(plain)}},
        "tolerance_rule": "float stages: max |got - golden| / max |golden| <= tolerance; int and bool stages exact",
        "made_by": "python -m ref.golden make",
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return d


def load_case(case_dir: Path) -> tuple[dict, dict, dict, dict]:
    """golden/<case>/ -> (manifest, inputs, stages, plain variant stages or {}). Arrays are float32/int64/bool."""
    manifest = json.loads((case_dir / "manifest.json").read_text())

    def read(name):
        return {k: to_f32(v) if type(v).__name__ == "Bf16" else np.asarray(v) for k, v in
                open_tensors(case_dir / name).items()}

    inputs = read(manifest["inputs"]["file"])
    stages = read(manifest["stages"]["file"])
    plain = read(manifest["variants"]["plain"]["file"]) if "plain" in manifest.get("variants", {}) else {}
    return manifest, inputs, stages, plain


def main(argv=None) -> int:
    ap = OneLineParser(prog="python -m ref.golden", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="(re)write golden cases from ref")
    mk.add_argument("cases", nargs="*", metavar="CASE", help=f"default: all ({', '.join(CASE_NAMES)})")
    mk.add_argument("--out", type=Path, default=GOLDEN_DIR, help="default: golden/ at the repository root")
    sub.add_parser("list", help="list the cases and what each catches")
    try:
        args = ap.parse_args(argv)
    except UsageError as e:
        print(f"golden: {e}", file=sys.stderr)
        return 2
    if args.command == "list":
        for c in CASES:
            print(f"{c.name}: {c.about}")
        return 0
    unknown = [n for n in args.cases if n not in CASE_NAMES]
    if unknown:
        print(f"golden: unknown case {unknown[0]!r} (known: {', '.join(CASE_NAMES)})", file=sys.stderr)
        return 2
    chosen = [c for c in CASES if not args.cases or c.name in args.cases]
    args.out.mkdir(parents=True, exist_ok=True)
    for c in chosen:
        d = make_case(c, args.out)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{c.name}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
