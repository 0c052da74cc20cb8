"""`python -m ref.verify CASE [--tensors DUMP] [--impl ref|transformers|fast] [--masks spec|plain|any]`

Compares an implementation with a golden case (golden/<case>/, written by `python -m ref.golden make`), stage
by stage, in pipeline order, and names the first stage that is wrong, with a guess at why when the error
looks like a bug someone shipped before (x and y swapped, LayerNorm eps 1e-6, layer_scalar ignored, ...).

  --tensors DUMP   a safetensors file of your own stages, named as in golden/README.md; stages it lacks are
                   skipped, names verify does not know are listed (not an error)
  --impl ref       runs `ref` on the case (processors on the raw media, forward, greedy tokens); the default.
                   --impl fast runs the same through fast/'s compiled kernels
  --impl transformers  runs HF transformers 5.23 with SPEC.md's masks (`create_masks_for_generate` with
                   mm_token_type_ids), captures every stage it exposes with hooks; pixel_values are fed from the
                   golden files (HF's image processor needs torchvision), audio goes through HF's feature extractor.
                   --hf-plain-masks runs HF's plain forward instead (its own masks)
  --masks          which mask semantics must match for exit status 0: spec (SPEC.md, the default), plain (HF's
                   plain forward: the block OR-ed onto every layer type), or any. Either way the report says
                   which one the stages match.

Exit status: 0 all compared stages pass, 1 a stage fails, 2 the case, dump or backend could not be used.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import FULL, SLIDING
from .embedders import position_embedding
from .errors import CheckpointError, OneLineParser, UsageError
from .golden import (GOLDEN_DIR, IMAGE_BUDGET, NEW_TOKENS, VIDEO_BUDGET, load_case, media, plain_layer_mask, run_ref,
                     stage_rank, tolerance)
from .layers import layer_norm
from .masks import block_ids, layer_mask
from .model import load_model
from .safetensors_io import open_tensors, to_f32


class VerifyError(Exception):
    """Something verify cannot work with (a missing case, an unreadable dump, a missing backend): one line, exit 2."""


# ---- comparing -------------------------------------------------------------------------------------

@dataclass
class Row:
    stage: str
    shape: tuple
    abs_err: float | None
    rel_err: float | None
    tol: float
    ok: bool
    note: str = ""


@dataclass
class Report:
    rows: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # golden stages not produced
    unknown: list = field(default_factory=list)  # produced names that are no stage of the case

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)


def _as_mask(got: np.ndarray) -> tuple[np.ndarray, str]:
    """A dumped mask -> bool (True = may attend). Accepts bool, 0/1 numbers, or an additive mask (0 / very negative)."""
    if got.dtype == bool:
        return got, ""
    values = np.unique(got)
    if np.isin(values, (0, 1)).all():
        return got != 0, ""
    if got.dtype.kind == "f" and (values <= 0).all():
        return got == 0, "additive mask read as 0 = attend"
    return got != 0, "mask values are neither bool, 0/1 nor additive"


def compare_stage(name: str, got, want: np.ndarray, tol: float) -> Row:
    """One stage: shape check (size-1 axes may differ, e.g. HF's [B, 1, T, S] masks), then exact (int/bool) or
    relative (float: max |got - want| / max |want|) comparison."""
    got = np.asarray(got)
    note = ""
    if got.shape != want.shape:
        if got.size == want.size and tuple(d for d in got.shape if d != 1) == tuple(d for d in want.shape if d != 1):
            note = f"reshaped from {list(got.shape)}"
            got = got.reshape(want.shape)
        else:
            return Row(name, got.shape, None, None, tol, False, f"shape {list(got.shape)}, golden {list(want.shape)}")
    if want.dtype == bool:
        got, how = _as_mask(got)
        note = ", ".join(n for n in (note, how) if n)
    if want.dtype.kind in "biu":
        diff = got.astype(np.int64) != want.astype(np.int64)
        n = int(diff.sum())
        err = float(np.abs(got.astype(np.int64) - want.astype(np.int64)).max()) if got.size else 0.0
        if n:
            note = ", ".join(x for x in (note, f"{n} of {diff.size} differ") if x)
        return Row(name, want.shape, err, None, 0.0, n == 0, note)
    got = got.astype(np.float64)
    if not np.isfinite(got).all():
        bad = int((~np.isfinite(got)).sum())
        return Row(name, want.shape, float("nan"), float("nan"), tol, False, f"{bad} NaN/Inf values")
    err = float(np.abs(got - want).max()) if got.size else 0.0
    scale = float(np.abs(want).max()) if want.size else 0.0
    rel = err / scale if scale > 0 else err
    return Row(name, want.shape, err, rel, tol, rel <= tol, note)


def compare(golden: dict, got: dict, tolerances: dict | None = None) -> Report:
    """golden, got: {stage: array} -> Report over the stages both have, in pipeline order."""
    report = Report()
    for name in sorted(golden, key=stage_rank):
        if name not in got:
            report.missing.append(name)
            continue
        tol = tolerances[name] if tolerances and name in tolerances else tolerance(name, golden[name].dtype)
        report.rows.append(compare_stage(name, got[name], golden[name], tol))
    report.unknown = sorted(n for n in got if n not in golden)
    return report


# ---- guesses at the cause -------------------------------------------------------------------------------

class _Context:
    """What the hints need: the golden case, and (lazily) its config and weights through `ref`."""

    def __init__(self, case_dir: Path, inputs: dict, golden: dict):
        self.case_dir, self.inputs, self.golden = case_dir, inputs, golden
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.case_dir / "checkpoint")
        return self._model


def _close(a, b, tol=1e-4) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-30)


def _hint_pixels(name, got, ctx):
    want = ctx.golden[name]
    real = (ctx.golden["image_position_ids" if name == "pixel_values" else "video_position_ids"] != -1).all(-1)
    if got.shape == want.shape and _close(1.0 - got[real], want[real], 1e-5):
        return "colours inverted (1 - x): white read as black"
    real_got, real_want = int((np.abs(got).sum(-1) > 0).sum()), int((np.abs(want).sum(-1) > 0).sum())
    if real_got < real_want:
        return f"{real_got} non-zero patches, golden {real_want}: the resize does not fill the token budget"
    return None


def _hint_positions(name, got, ctx):
    want = ctx.golden[name]
    if got.shape != want.shape:
        return None
    if np.array_equal(got[..., ::-1], want):
        return "x and y swapped: positions are (x, y) = (column, row)"
    real = (want != -1).all(-1)
    if (got[..., 1][real] == 0).all() and (want[..., 1][real] != 0).any():
        return "y coordinates collapsed to 0"
    if int((got != -1).all(-1).sum()) < int(real.sum()):
        return "fewer real patches than golden: the resize does not fill the token budget"
    return None


def _hint_ln1(name, got, ctx):
    p = ctx.model.params.vision_embedder.patch_ln1
    pixels = ctx.golden["pixel_values" if name.startswith("vision") else "pixel_values_videos"]
    if _close(got, layer_norm(pixels, p.weight, p.bias, 1e-6), 1e-6):
        return "LayerNorm eps looks like 1e-6: the vision embedder uses nn.LayerNorm's default 1e-5"
    return None


def _hint_pos_embed(name, got, ctx):
    prefix = name.split(".")[0]
    ln2 = ctx.golden[f"{prefix}.ln2"]
    pos = ctx.golden["image_position_ids" if prefix == "vision" else "video_position_ids"]
    table = ctx.model.params.vision_embedder.pos_embedding
    guesses = (("x and y look swapped in the position lookup", pos[..., ::-1]),
               ("y looks collapsed to 0 in the position lookup", np.where(pos == -1, -1, pos * [1, 0])),
               ("padding patches look given position (0, 0) instead of none", np.maximum(pos, 0)))
    for text, p in guesses:
        if _close(got, ln2 + position_embedding(p, table), 1e-5):
            return text
    return None


def _hint_layer(name, got, ctx):
    i = int(name.split(".")[1])
    scalar = float(to_f32(ctx.model.params.language_model.layers[i].layer_scalar)[0])
    if abs(scalar - 1) > 1e-3 and _close(got * scalar, ctx.golden[name], 1e-4):
        return f"layer_scalar looks ignored (layer {i}'s is {scalar:.3g})"
    return None


def _mask_guesses(ctx, kind):
    """(text, mask [B, T, T]) for the wrong masks ports have shipped, for one layer type."""
    cfg = ctx.model.config
    types = ctx.inputs["mm_token_type_ids"]
    B, T = types.shape
    idx, ok = np.arange(T), np.ones((B, T), bool)
    kind = FULL if kind == "full" else SLIDING
    blocks = block_ids(types, (B, T))
    none = np.full((B, T), -1)
    per_modality = np.where((types == 1) | (types == 2), types, -1)  # all images one block, all video frames one
    with_audio = block_ids(np.where(types == 3, 1, types), (B, T))
    yield "image/video blocks look causal (no bidirectional block)", layer_mask(cfg, kind, idx, idx, ok, none, none)
    yield ("HF's plain-forward masks: the block is OR-ed onto this layer type (after the window on sliding layers)",
           plain_layer_mask(cfg, kind, idx, idx, ok, blocks, blocks))
    yield ("all images (or all frames of a video) look merged into one block",
           layer_mask(cfg, kind, idx, idx, ok, per_modality, per_modality))
    yield "audio tokens look given a bidirectional block", layer_mask(cfg, kind, idx, idx, ok, with_audio, with_audio)
    for delta in (1, -1):
        wider = replace(cfg, sliding_window=cfg.sliding_window + delta)
        yield "the sliding window looks off by one", layer_mask(wider, kind, idx, idx, ok, blocks, blocks)


def _hint_mask(name, got, ctx):
    want = ctx.golden[name]
    for text, mask in _mask_guesses(ctx, name.split(".")[1]):
        if not np.array_equal(mask, want) and np.array_equal(got, mask):
            return text
    return None


def _hint_inputs_embeds(name, got, ctx):
    want, g = ctx.golden[name], ctx.golden
    if "audio.projection" in g and "input_features_mask" in g:
        ids = ctx.inputs["input_ids"]
        at = ids == ctx.model.config.audio_token_id
        undropped = want.copy()
        undropped[at] = g["audio.projection"].reshape(-1, want.shape[-1])[: int(at.sum())]
        if _close(got, undropped, 1e-5):
            return "audio padding frames look not dropped before the scatter"
    types = ctx.inputs["mm_token_type_ids"]
    soft = types > 0
    if soft.any() and got.shape == want.shape:
        scaled = want.copy()
        scaled[soft] *= np.float32(want.shape[-1] ** 0.5)
        if _close(got, scaled, 1e-5):
            return "soft tokens look scaled by sqrt(hidden): only text embeddings are"
    return None


def _hint_text_embeds(name, got, ctx):
    want = ctx.golden[name]
    D = want.shape[-1]
    if got.shape == want.shape and _close(got * np.float32(D**0.5), want, 1e-5):
        return "the sqrt(hidden) embedding scale looks missing"
    return None


def _hint_features(name, got, ctx):
    want = ctx.golden[name]
    if got.shape[-1:] != want.shape[-1:]:
        return f"{got.shape[-1]} features per frame, golden {want.shape[-1]}: raw 640-sample frames, not a mel spectrogram"
    if got.ndim == want.ndim and got.shape[-2] < want.shape[-2]:
        return "fewer frames than golden: the last partial frame must be zero-padded (ceil(n / 640)), not dropped"
    return None


def _hint_tokens(name, got, ctx):
    gen = ctx.case_dir / "checkpoint" / "generation_config.json"
    suppress = (json.loads(gen.read_text()).get("suppress_tokens") or []) if gen.exists() else []
    hit = sorted(set(int(t) for t in np.asarray(got).ravel()) & set(suppress))
    if hit:
        return f"suppress_tokens not honoured: generated {hit}"
    return None


def _hint_logits(name, got, ctx):
    cap = ctx.model.config.final_logit_softcapping
    if cap is not None and np.abs(got).max() > cap * (1 + 1e-5):
        return f"logits beyond +-{cap:g}: final soft-capping (cap * tanh(x / cap)) looks missing"
    return None


HINTS = {
    "pixel_values": _hint_pixels, "pixel_values_videos": _hint_pixels,
    "image_position_ids": _hint_positions, "video_position_ids": _hint_positions,
    "vision.ln1": _hint_ln1, "video.ln1": _hint_ln1,
    "vision.pos_embed": _hint_pos_embed, "video.pos_embed": _hint_pos_embed,
    "mask.full": _hint_mask, "mask.sliding": _hint_mask,
    "inputs_embeds": _hint_inputs_embeds, "text_embeds": _hint_text_embeds,
    "input_features": _hint_features, "tokens": _hint_tokens, "logits": _hint_logits,
}


def hint(name: str, got, ctx: _Context) -> str | None:
    """A guess at why stage `name` failed, or None. Never raises: a hint is a courtesy."""
    fn = _hint_layer if name.startswith("layers.") else HINTS.get(name)
    if fn is None:
        return None
    got, want = np.asarray(got), ctx.golden[name]
    if got.shape != want.shape and got.size == want.size:
        got = got.reshape(want.shape)  # as compare_stage does: size-1 axes may differ
    if want.dtype == bool:
        got = _as_mask(got)[0]
    try:
        return fn(name, got, ctx)
    except Exception:  # noqa: BLE001  (a hint that cannot be computed is no hint)
        return None


# ---- implementations ---------------------------------------------------------------------------------

def run_impl(impl: str, case_dir: Path, manifest: dict, inputs: dict, golden: dict, hf_plain: bool = False):
    """-> ({stage: array}, [stages fed from the golden files rather than produced])."""
    settings = manifest["inputs"]
    new_tokens = settings.get("new_tokens", NEW_TOKENS)
    if impl == "transformers":
        return run_transformers(case_dir, inputs, golden, new_tokens, hf_plain)
    if impl == "ref":
        model = load_model(case_dir / "checkpoint")
    elif impl == "fast":
        try:
            import fast
            model = fast.load_model(case_dir / "checkpoint")
        except ImportError as e:
            raise VerifyError(f"--impl fast: the fast backend is not available ({e}; pip install '.[fast]')") from None
    else:
        raise VerifyError(f"unknown --impl {impl!r} (ref, transformers, fast)")
    return run_ref(model, inputs, new_tokens, settings.get("image_budget", IMAGE_BUDGET),
                   settings.get("video_budget", VIDEO_BUDGET)), []


def run_transformers(case_dir: Path, inputs: dict, golden: dict, new_tokens: int, plain: bool = False):
    """HF transformers on the case, every stage it exposes captured with forward hooks."""
    try:
        import torch
        import transformers
        from transformers import Gemma4UnifiedForConditionalGeneration
        from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
            Gemma4UnifiedAudioFeatureExtractor)
    except ImportError as e:
        raise VerifyError(f"--impl transformers needs torch and transformers 5.23 (pip install '.[interop]'): {e}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        case_dir / "checkpoint", dtype=torch.float32, attn_implementation="eager").eval()
    gen_path = case_dir / "checkpoint" / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}

    stages, fed, kw = {}, [], {}
    for names in (("pixel_values", "image_position_ids"), ("pixel_values_videos", "video_position_ids",
                                                             "num_frames_per_video")):
        for n in names:
            if n in golden:
                kw[n] = torch.as_tensor(np.array(golden[n]), dtype=torch.float32 if n.startswith("pixel") else torch.long)
                fed.append(n)
    audios = media(inputs, "audio")
    if audios:
        out = Gemma4UnifiedAudioFeatureExtractor()(audios, return_tensors="np")
        stages["input_features"], stages["input_features_mask"] = out["input_features"], out["input_features_mask"]
        kw["input_features"] = torch.as_tensor(out["input_features"], dtype=torch.float32)
        kw["input_features_mask"] = torch.as_tensor(out["input_features_mask"], dtype=torch.bool)

    capturing = [True]
    prefixes = (["vision"] if "pixel_values" in kw else []) + (["video"] if "pixel_values_videos" in kw else [])
    calls = [-1]

    def keep(name):
        def hook(module, args, output):
            if capturing[0]:
                out = output[0] if isinstance(output, tuple) else output
                stages[name() if callable(name) else name] = out.detach().float().numpy().copy()
        return hook

    inner = model.model
    lm = inner.language_model
    handles = []
    if inner.embed_vision is not None:
        ev = inner.embed_vision

        def count(module, args):
            calls[0] += 1
        handles.append(ev.register_forward_pre_hook(count))

        def vname(step):
            return lambda: f"{prefixes[calls[0]]}.{step}"
        for step, module in (("ln1", ev.patch_ln1), ("dense", ev.patch_dense), ("ln2", ev.patch_ln2),
                             ("pos_norm", ev.pos_norm),
                             ("rms_norm", ev.multimodal_embedder.embedding_pre_projection_norm),
                             ("projection", ev.multimodal_embedder.embedding_projection)):
            handles.append(module.register_forward_hook(keep(vname(step))))

        def pos_embed(module, args):
            if capturing[0]:
                stages[f"{prefixes[calls[0]]}.pos_embed"] = args[0].detach().float().numpy().copy()
        handles.append(ev.pos_norm.register_forward_pre_hook(pos_embed))
    if inner.embed_audio is not None:
        handles.append(inner.embed_audio.embedding_pre_projection_norm.register_forward_hook(keep("audio.rms_norm")))
        handles.append(inner.embed_audio.embedding_projection.register_forward_hook(keep("audio.projection")))
    handles.append(lm.embed_tokens.register_forward_hook(keep("text_embeds")))

    def lm_inputs(module, args, kwargs):
        if not capturing[0]:
            return
        stages["inputs_embeds"] = kwargs["inputs_embeds"].detach().float().numpy().copy()
        for kind, key in (("full", "full_attention"), ("sliding", "sliding_attention")):
            m = kwargs["attention_mask"].get(key) if isinstance(kwargs["attention_mask"], dict) else None
            if m is not None and key in model.config.text_config.layer_types:
                m = m.detach()
                stages[f"mask.{kind}"] = (m if m.dtype == torch.bool else m == 0)[:, 0].numpy().copy()
    handles.append(lm.register_forward_pre_hook(lm_inputs, with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_hook(keep(f"layers.{i}")))
    handles.append(lm.norm.register_forward_hook(keep("final_norm")))

    ids = np.asarray(inputs["input_ids"])
    types = np.asarray(inputs["mm_token_type_ids"])

    def forward(seq, seq_types):
        B, T = seq.shape
        t_types = torch.as_tensor(np.array(seq_types), dtype=torch.long)
        if plain:
            masks = None
        else:
            embeds = torch.zeros(B, T, model.config.text_config.hidden_size)
            masks = model.create_masks_for_generate(model.config, embeds, None, None,
                                                    torch.arange(T)[None].expand(B, T), mm_token_type_ids=t_types)
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(np.array(seq), dtype=torch.long), attention_mask=masks,
                        mm_token_type_ids=t_types, **kw)
        return out.logits.float().numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: worker threads only add their start-up cost, seconds on a busy machine
    try:
        stages["logits"] = forward(ids, types).copy()
        capturing[0] = False
        stages["tokens"] = _greedy(forward, ids, types, new_tokens, gen)
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    return stages, fed


def _greedy(forward, ids, types, new_tokens: int, gen: dict) -> np.ndarray:
    """Greedy decoding by recomputing the whole sequence each step (the definition a KV cache reproduces),
    honouring generation_config.json's suppress_tokens and eos_token_id."""
    suppress = list(gen.get("suppress_tokens") or [])
    eos = gen.get("eos_token_id", [])
    eos = set(eos if isinstance(eos, list) else [eos])
    seq, out = ids, []
    for _ in range(new_tokens):
        seq_types = np.pad(types, ((0, 0), (0, seq.shape[1] - types.shape[1])))
        logits = forward(seq, seq_types)[:, -1]
        logits[:, suppress] = -np.inf
        nxt = logits.argmax(-1)
        out.append(nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        if all(int(t) in eos for t in nxt):
            break
    return np.stack(out, axis=1).astype(np.int64)


# ---- the verdict ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    case: str
    spec: Report
    plain: Report | None  # None: the case has no block, both semantics agree
    semantics: str  # which mask semantics the stages match, in words
    ok: bool
    shown: Report  # the report for the semantics asked for
    fed: list = field(default_factory=list)
    hints: dict = field(default_factory=dict)


def resolve_case(case: str, golden_dir: Path = GOLDEN_DIR) -> Path:
    p = Path(case)
    if (p / "manifest.json").is_file():
        return p
    if (golden_dir / case / "manifest.json").is_file():
        return golden_dir / case
    known = sorted(d.name for d in golden_dir.iterdir() if (d / "manifest.json").is_file()) if golden_dir.is_dir() else []
    raise VerifyError(f"no golden case {case!r} (a name under {golden_dir} or a directory with manifest.json; "
                      f"known: {', '.join(known) or 'none'})")


def read_dump(path: Path) -> dict:
    if not Path(path).is_file():
        raise VerifyError(f"cannot read dump {path}: no such file")
    try:
        raw = open_tensors(Path(path))
        return {k: to_f32(v) if type(v).__name__ == "Bf16" else np.array(v) for k, v in raw.items()}
    except (CheckpointError, OSError, ValueError) as e:
        raise VerifyError(f"cannot read dump {path}: {e}") from None


def check(case_dir: Path, got: dict, masks: str = "spec", fed=()) -> Verdict:
    """Compare produced stages with the case's golden stages under both mask semantics."""
    manifest, inputs, golden, plain = load_case(case_dir)
    tolerances = {s["name"]: s["tolerance"] for s in manifest["stages"]["list"]}
    got = {k: v for k, v in got.items() if k not in fed}
    spec_report = compare(golden, got, tolerances)
    plain_report = compare({**golden, **plain}, got, tolerances) if plain else None
    if plain_report is None:
        semantics = "this case has no image or video block: both mask semantics give the same stages"
    elif not any(n in got for n in plain):
        semantics = "cannot tell: no stage that differs between the two mask semantics was compared"
    elif spec_report.ok:
        semantics = "SPEC.md's masks (full layers causal, the block windowed on sliding layers)"
    elif plain_report.ok:
        semantics = "HF's plain-forward masks (the block OR-ed onto every layer type), not SPEC.md's"
    else:
        semantics = _partial_semantics(spec_report, plain_report)
    if masks == "plain" and plain_report is not None:
        ok, shown = plain_report.ok, plain_report
    elif masks == "any" and plain_report is not None:
        ok = spec_report.ok or plain_report.ok
        shown = plain_report if (plain_report.ok and not spec_report.ok) else spec_report
    else:
        ok, shown = spec_report.ok, spec_report
    expect = {**golden, **plain} if shown is plain_report else golden
    ctx = _Context(case_dir, inputs, expect)
    hints = {r.stage: h for r in shown.rows if not r.ok and (h := hint(r.stage, got[r.stage], ctx))}
    return Verdict(manifest["case"], spec_report, plain_report, semantics, ok, shown, list(fed), hints)


def _partial_semantics(spec: Report, plain: Report) -> str:
    """Which semantics a failing run follows, judged by its masks alone."""
    def masks_ok(r):
        return all(x.ok for x in r.rows if x.stage.startswith("mask."))
    if not any(x.stage.startswith("mask.") for x in spec.rows):
        return "cannot tell: no mask stage was compared, and other stages differ"
    if masks_ok(spec):
        return "SPEC.md's masks (the masks match; other stages differ)"
    if masks_ok(plain):
        return "HF's plain-forward masks (the masks match; other stages differ)"
    return "neither SPEC.md's nor HF's plain-forward masks"


def _fmt(x: float | None) -> str:
    return "-" if x is None else "nan" if x != x else "0" if x == 0 else f"{x:.2e}"


def render(v: Verdict, source: str) -> str:
    r = v.shown
    lines = [f"case {v.case}: {source}"]
    width = max([len(x.stage) for x in r.rows] + [5])
    lines.append(f"{'stage':<{width}}  {'shape':<18} {'max abs err':>11} {'max rel err':>11} {'tolerance':>9}  result")
    for x in r.rows:
        shape = str(list(x.shape)).replace(" ", "")
        note = f"  {x.note}" if x.note else ""
        lines.append(f"{x.stage:<{width}}  {shape:<18} {_fmt(x.abs_err):>11} {_fmt(x.rel_err):>11} "
                     f"{_fmt(x.tol):>9}  {'PASS' if x.ok else 'FAIL'}{note}")
    first = r.first_failure
    if first is not None:
        why = v.hints.get(first.stage)
        lines.append(f"first failing stage: {first.stage} (max abs err {_fmt(first.abs_err)})"
                     + (f": {why}" if why else (f": {first.note}" if first.note else "")))
        for stage, why in v.hints.items():
            if stage != first.stage:
                lines.append(f"  also {stage}: {why}")
    elif r.rows:
        lines.append(f"all {len(r.rows)} compared stages pass")
    else:
        lines.append("no stage of the case was produced: nothing compared")
    lines.append(f"masks: {v.semantics}")
    if v.fed:
        lines.append(f"fed from the golden files, not compared: {', '.join(v.fed)}")
    missing = [n for n in r.missing if n not in v.fed]
    if missing:
        lines.append(f"not produced (skipped): {', '.join(missing)}")
    if r.unknown:
        lines.append(f"names verify does not know (ignored): {', '.join(r.unknown)}")
    lines.append("PASS" if v.ok else "FAIL")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = OneLineParser(prog="python -m ref.verify", description="Compare an implementation with a "
                                 "golden case, stage by stage (golden/README.md).")
    ap.add_argument("case", help="a case name under golden/ or a case directory")
    ap.add_argument("--tensors", type=Path, metavar="DUMP", help="a safetensors dump of your stages")
    ap.add_argument("--impl", choices=("ref", "transformers", "fast"), help="run an implementation (default: ref)")
    ap.add_argument("--masks", choices=("spec", "plain", "any"), default="spec",
                    help="mask semantics required for exit 0 (default: spec)")
    ap.add_argument("--hf-plain-masks", action="store_true", help="with --impl transformers: HF's plain forward masks")
    ap.add_argument("--golden", type=Path, default=GOLDEN_DIR, help="where the cases are (default: golden/)")
    try:
        args = ap.parse_args(argv)
        case_dir = resolve_case(args.case, args.golden)
        if args.tensors is not None and args.impl is not None:
            raise VerifyError("give --tensors or --impl, not both")
        try:
            manifest, inputs, golden, _ = load_case(case_dir)
        except (OSError, ValueError, KeyError) as e:
            raise VerifyError(f"cannot read golden case {case_dir}: {e}") from None
        if args.tensors is not None:
            got, fed, source = read_dump(args.tensors), [], f"dump {args.tensors}"
        else:
            impl = args.impl or "ref"
            got, fed = run_impl(impl, case_dir, manifest, inputs, golden, args.hf_plain_masks)
            source = f"--impl {impl}" + (" (HF plain-forward masks)" if args.hf_plain_masks else "")
        verdict = check(case_dir, got, args.masks, fed)
    except (VerifyError, UsageError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 2
    print(render(verdict, source))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
