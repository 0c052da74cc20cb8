"""Train the embedded demo model (ref/assets/demo_model) and write the bundled demo media (ref/assets).

The task needs both encoder-free paths: pictures of shapes through the vision embedder, generated beeps
through the audio embedder, and one question that needs both.

  picture (70 soft tokens)    "What shape is this and what colour?"   -> "A red circle."
                              "What shape is this?"                   -> "A circle."
                              "What colour is this?"                  -> "Red."
  sound (1.2 s, 30 tokens)    "Is this tone high or low?"             -> "High."
                              "How many beeps?"                       -> "Three."
                              "Describe the sound."                   -> "Three high beeps."
  picture + sound             "Describe the picture and the sound."   -> "A red circle. Three high beeps."

Shapes: circle, square, triangle, star; colours: red, green, blue, yellow, purple; each drawn at a random
size, place and shade on a light gray canvas (96-256 px, aspect 3:4 to 4:3), a quarter saved as JPEG.
Beeps: one to four 0.16 s beeps, low (200-450 Hz) or high (1-2.5 kHz), random gaps and loudness,
sometimes faint hiss.

The model is HF's Gemma4UnifiedForConditionalGeneration (transformers 5.23) at a tiny size, trained with
SPEC.md's masks passed explicitly (`create_masks_for_generate` with mm_token_type_ids), saved with
`save_pretrained` in bfloat16, then scored by `ref` (not torch) on a held-out generated set. Prompts are
built by `ref.prompt` with the model's own chat template and tokenizer, exactly as `python -m ref.run`
builds them. Fixed seeds fix the data, the initialisation and the order (the tokenizer, config and media
files come out byte-identical; torch's CPU kernels may change the weights' last bits between machines).

  python tools/train_demo_model.py                  # train, write ref/assets/, score with ref
  python tools/train_demo_model.py --eval-only      # score the bundled model with ref

Runtime: 30 minutes on 2 shared CPU cores (torch 2.13 CPU build, 4000 steps of 24 examples), then 11 s
to score 700 held-out questions with ref. Measured: 98.3 % held-out accuracy (docs/run.md).
Needs the interop extra (torch, transformers) to train; scoring needs only ref.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ref import prompt as P  # noqa: E402
from ref.audio import preprocess_audio  # noqa: E402
from ref.image import preprocess_images  # noqa: E402

ASSETS = ROOT / "ref" / "assets"
MODEL_DIR = ASSETS / "demo_model"
TRAIN_SEED, HELDOUT_SEED = 1234, 987654
BUDGET = 70  # image soft tokens, in training and as the demo model's default
RATE, CLIP_S = 16000, 1.2

COLOURS = {"red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 200, 35),
           "purple": (135, 55, 175)}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = ("One", "Two", "Three", "Four")

Q_IMAGE = "What shape is this and what colour?"
Q_SHAPE = "What shape is this?"
Q_COLOUR = "What colour is this?"
Q_PITCH = "Is this tone high or low?"
Q_COUNT = "How many beeps?"
Q_SOUND = "Describe the sound."
Q_BOTH = "Describe the picture and the sound."

# Gemma 4's turn format as a jinja template (our own wording of it): one placeholder per media item,
# written where the real template writes them.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
    {{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '\\n\\n<|image|>\\n\\n' -}}
            {%- elif item['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '\\n\\n<|video|>\\n\\n' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
{%- endif -%}
"""

SPECIAL_TOKENS = [P.PAD, P.EOS, P.BOS, "<unk>", "<mask>", P.TURN_START, P.TURN_END, P.BOI, P.IMAGE, P.EOI,
                  P.BOA, P.AUDIO, P.EOA, P.VIDEO, "<|think|>", "<|channel>", "<channel|>"]


# ---- the generated data --------------------------------------------------------------------------------

@dataclass
class Example:
    kind: str  # which question
    question: str
    answer: str
    image: np.ndarray | None = None  # [H, W, 3] uint8
    audio: np.ndarray | None = None  # [n] float32 at 16 kHz


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) with 'radius' r (circle: many points)."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return list(zip(cx + r * np.cos(a), cy + r * np.sin(a)))
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "star":
        a = np.radians(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        return list(zip(cx + rad * np.cos(a), cy + rad * np.sin(a)))
    raise ValueError(shape)


def draw_shape(rng: np.random.Generator, shape: str, colour: str) -> np.ndarray:
    """One picture: a shape of a colour, random size, place and shade, on a light gray canvas. A quarter
    of them go through JPEG: the embedder's first LayerNorm turns a flat gray patch into its bias alone,
    but faint compression noise into a full-size random vector, and the model must learn to ignore that."""
    w = int(rng.integers(96, 257))
    h = int(np.clip(w * rng.uniform(0.75, 1.33), 96, 256))
    img = Image.new("RGB", (w, h), (int(rng.integers(225, 256)),) * 3)
    r = min(w, h) * rng.uniform(0.28, 0.45)
    cx = rng.uniform(r + 2, w - r - 2)
    cy = rng.uniform(r + 2, h - r - 2)
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])
    ImageDraw.Draw(img).polygon(shape_points(shape, cx, cy, r), fill=fill)
    if rng.random() < 0.25:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
        img = Image.open(buf).convert("RGB")
    return np.asarray(img)


def beeps(rng: np.random.Generator, count: int, high: bool) -> np.ndarray:
    """[19200] float32: `count` beeps of 0.16 s in 1.2 s at 16 kHz, 10 ms fades, random gaps >= 0.08 s."""
    n, beep, gap = int(RATE * CLIP_S), int(RATE * 0.16), int(RATE * 0.08)
    slack = n - count * beep - (count - 1) * gap
    shares = rng.dirichlet(np.ones(count + 1)) * slack
    freq = rng.uniform(1000, 2500) if high else rng.uniform(200, 450)
    amp = rng.uniform(0.2, 0.7)
    t = np.arange(beep) / RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    out = np.zeros(n, np.float64)
    at = shares[0]
    for i in range(count):
        s = int(at)
        out[s:s + beep] += amp * fade * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
        at += beep + gap + shares[i + 1]
    if rng.random() < 0.3:  # faint hiss, below what the audio embedder's RMSNorm (eps 1e-6) lifts to full size
        out += rng.normal(0, rng.uniform(0.0001, 0.0005), n)
    return out.astype(np.float32)


def sound_answer(count: int, high: bool) -> str:
    return f"{NUMBERS[count - 1]} {'high' if high else 'low'} beep{'s' if count > 1 else ''}."


KINDS = ("image", "shape", "colour", "pitch", "count", "sound", "both")
KIND_WEIGHTS = (0.15, 0.15, 0.05, 0.08, 0.2, 0.15, 0.22)  # more of the skills that take longest: shape, count


def make_example(rng: np.random.Generator, kind: str | None = None) -> Example:
    """One question of the task, with its picture and/or sound and the expected answer."""
    kind = kind or str(rng.choice(KINDS, p=KIND_WEIGHTS))
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    count, high = int(rng.integers(1, 5)), bool(rng.random() < 0.5)
    picture = f"A {colour} {shape}."
    image = draw_shape(rng, shape, colour) if kind in ("image", "shape", "colour", "both") else None
    audio = beeps(rng, count, high) if kind in ("pitch", "count", "sound", "both") else None
    question, answer = {
        "image": (Q_IMAGE, picture),
        "shape": (Q_SHAPE, f"A {shape}."),
        "colour": (Q_COLOUR, f"{colour.capitalize()}."),
        "pitch": (Q_PITCH, "High." if high else "Low."),
        "count": (Q_COUNT, f"{NUMBERS[count - 1]}."),
        "sound": (Q_SOUND, sound_answer(count, high)),
        "both": (Q_BOTH, f"{picture} {sound_answer(count, high)}"),
    }[kind]
    return Example(kind, question, answer, image, audio)


def heldout_set(n: int, seed: int = HELDOUT_SEED) -> list[Example]:
    """n held-out examples, the kinds in turn (so every kind gets n / 7), from a seed training never uses."""
    rng = np.random.default_rng(seed)
    return [make_example(rng, KINDS[i % len(KINDS)]) for i in range(n)]


def demo_media() -> tuple[np.ndarray, np.ndarray]:
    """The bundled picture (a red circle, 160 x 160) and sound (three high beeps)."""
    img = Image.new("RGB", (160, 160), (255, 255, 255))
    ImageDraw.Draw(img).polygon(shape_points("circle", 80, 80, 52), fill=COLOURS["red"])
    rng = np.random.default_rng(3)
    wave = beeps(rng, 3, True)
    while np.abs(wave).max() < 0.4:  # a clearly audible draw
        wave = beeps(rng, 3, True)
    return np.asarray(img), wave


# ---- tokenizer and config --------------------------------------------------------------------------------

def corpus() -> list[str]:
    """Every question and answer of the task, plus the turn scaffolding, for the BPE merges."""
    answers = [f"A {c} {s}." for c in COLOURS for s in SHAPES] + [f"A {s}." for s in SHAPES]
    answers += [f"{c.capitalize()}." for c in COLOURS] + ["High.", "Low."] + [f"{n}." for n in NUMBERS]
    answers += [sound_answer(k, h) for k in range(1, 5) for h in (True, False)]
    questions = [Q_IMAGE, Q_SHAPE, Q_COLOUR, Q_PITCH, Q_COUNT, Q_SOUND, Q_BOTH]
    scaffold = ["user\n", "model\n", "system\n", "\n\n", "\n"]
    return (questions + answers + scaffold) * 4


def build_tokenizer():
    """A small BPE in the shape of Gemma's: spaces as "▁", byte fallback for anything unseen, the real
    Gemma 4 special-token strings (ids 0 pad, 1 eos, 2 bos as in Gemma), decoded back with spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    alphabet = [chr(c) for c in range(32, 127) if chr(c) != " "] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=560, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS + byte_tokens, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus(), trainer)
    # The byte tokens belong to the BPE vocabulary (for byte fallback), not to the added tokens: as added
    # tokens the literal text "<0x41>" would become one token.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    return Tokenizer.from_str(json.dumps(data))


def hf_config(tok) -> dict:
    """The demo model's config.json: six layers (sliding, sliding, full) x 2, hidden 128, 2.29 M parameters."""
    sp = P.special_ids(tok)
    vocab = -(-tok.get_vocab_size() // 64) * 64
    sliding, full = "sliding_attention", "full_attention"
    return {
        "model_type": "gemma4_unified",
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "text_config": {
            "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 64,
            "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 64,
            "layer_types": [sliding, sliding, full, sliding, sliding, full],
            "rope_parameters": {sliding: {"rope_type": "default", "rope_theta": 10000.0},
                                full: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                       "rope_theta": 1000000.0}},
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
            "pad_token_id": sp.pad, "eos_token_id": sp.eos, "bos_token_id": sp.bos,
            "use_bidirectional_attention": "vision",
        },
        "vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 64, "output_proj_dims": 64,
                          "mm_posemb_size": 1120},
        "audio_config": {"audio_embed_dim": 640},
        "image_token_id": sp.image, "audio_token_id": sp.audio, "video_token_id": sp.video,
        "boi_token_id": sp.boi, "eoi_token_id": sp.eoi, "boa_token_id": sp.boa, "eoa_token_index": sp.eoa,
        "tie_word_embeddings": True,
    }


def generation_config(tok) -> dict:
    sp = P.special_ids(tok)
    return {"bos_token_id": sp.bos, "pad_token_id": sp.pad, "eos_token_id": [sp.eos, sp.turn_end],
            "do_sample": False}


# ---- training (torch) --------------------------------------------------------------------------------------

def encode(ex: Example, tok, template: str) -> dict:
    """One example -> arrays in HF's layout: ids, mm_token_type_ids and labels [T]; media as for ref."""
    out = {}
    image_tokens, audio_tokens = [], []
    if ex.image is not None:
        pv, pos, n = preprocess_images([ex.image], BUDGET)
        out.update(pixel_values=pv, image_position_ids=pos)
        image_tokens = [int(n[0])]
    if ex.audio is not None:
        feats, mask = preprocess_audio([ex.audio])
        out.update(input_features=feats, input_features_mask=mask)
        audio_tokens = [int(mask.sum())]
    prompt = P.build_prompt(tok, template, ex.question, image_tokens=image_tokens, audio_tokens=audio_tokens)
    answer = tok.encode(ex.answer, add_special_tokens=False).ids + [P.special_ids(tok).turn_end]
    out["ids"] = np.concatenate([prompt.ids, answer])
    out["types"] = np.concatenate([prompt.types, np.zeros(len(answer), np.int64)])
    out["labels"] = np.concatenate([np.full(len(prompt.ids), -100), answer])
    return out


def collate(items: list[dict]):
    """Right-padded batch. Padding needs no attention mask: it comes after every real token (causal) and
    is never in a vision block."""
    import torch

    T = max(len(it["ids"]) for it in items)
    pad = lambda key, fill: torch.tensor(np.stack([np.pad(it[key], (0, T - len(it[key])), constant_values=fill)
                                                   for it in items]))
    batch = {"input_ids": pad("ids", 0), "mm_token_type_ids": pad("types", 0), "labels": pad("labels", -100)}
    with_image = [it for it in items if "pixel_values" in it]
    if with_image:
        batch["pixel_values"] = torch.tensor(np.concatenate([it["pixel_values"] for it in with_image]))
        batch["image_position_ids"] = torch.tensor(np.concatenate([it["image_position_ids"] for it in with_image]))
    with_audio = [it for it in items if "input_features" in it]
    if with_audio:
        batch["input_features"] = torch.tensor(np.concatenate([it["input_features"] for it in with_audio]))
        batch["input_features_mask"] = torch.tensor(np.concatenate([it["input_features_mask"] for it in with_audio]))
    return batch


def train(steps: int, batch_size: int, lr: float, out: Path, log_every: int = 50, kind_fn=None) -> None:
    """Train from scratch and save to `out` in bfloat16. kind_fn(rng) picks each example's question kind."""
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    kind_fn = kind_fn or (lambda rng: str(rng.choice(KINDS, p=KIND_WEIGHTS)))
    torch.manual_seed(TRAIN_SEED)
    torch.set_num_threads(2)
    rng = np.random.default_rng(TRAIN_SEED)
    tok = build_tokenizer()
    cfg_dict = hf_config(tok)
    config = Gemma4UnifiedConfig(**cfg_dict)
    config._attn_implementation = "sdpa"
    model = Gemma4UnifiedForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, vocab {tok.get_vocab_size()}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0, running = time.time(), {k: [] for k in KINDS}
    model.train()
    for step in range(steps):
        examples = [make_example(rng, kind_fn(rng)) for _ in range(batch_size)]
        batch = collate([encode(ex, tok, CHAT_TEMPLATE) for ex in examples])
        ids, labels = batch.pop("input_ids"), batch.pop("labels")
        B, T = ids.shape
        positions = torch.arange(T)[None].expand(B, T)
        masks = model.create_masks_for_generate(config, torch.zeros(B, T, config.text_config.hidden_size), None,
                                                None, positions, mm_token_type_ids=batch["mm_token_type_ids"])
        logits = model(input_ids=ids, attention_mask=masks, position_ids=positions, **batch).logits
        # next-token loss on the answer only, kept per example to report each question kind
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        answer = (labels[:, 1:] != -100).float()
        per_example = (per_token * answer).sum(1) / answer.sum(1)
        loss = per_example.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        for ex, v in zip(examples, per_example.tolist()):
            running[ex.kind].append(v)
        if (step + 1) % log_every == 0 or step == steps - 1:
            kinds = "  ".join(f"{k} {np.mean(v):.3f}" for k, v in running.items() if v)
            print(f"step {step + 1}/{steps}  loss by kind: {kinds}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:.0f} s", flush=True)
            running = {k: [] for k in KINDS}
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # written 0600 through a temporary file
    write_side_files(tok, out)
    print(f"trained in {time.time() - t0:.0f} s; wrote {out}", flush=True)


def write_side_files(tok, out: Path) -> None:
    """Everything beside the weights: config (ours, so the special ids match the tokenizer), generation
    config, tokenizer, chat template, and the processor's default image budget."""
    (out / "config.json").write_text(json.dumps(hf_config(tok), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Gemma4UnifiedProcessor", "image_seq_length": BUDGET, "audio_seq_length": 750},
        indent=2) + "\n")


def write_demo_media() -> None:
    import soundfile as sf

    picture, wave = demo_media()
    ASSETS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(ASSETS / "demo_picture.png", optimize=True)
    sf.write(ASSETS / "demo_beeps.wav", wave, RATE, subtype="PCM_16")


# ---- scoring (ref) ------------------------------------------------------------------------------------------

def score(model_dir: Path, examples: list[Example]) -> dict[str, float]:
    """Exact-match accuracy of ref's greedy answers, per question kind and overall."""
    from ref.run import Session

    session = Session.open(model_dir)
    hits: dict[str, list[bool]] = {}
    for ex in examples:
        got = session.ask(ex.question, images=[ex.image] if ex.image is not None else [],
                          audios=[(ex.audio, RATE)] if ex.audio is not None else [], max_new_tokens=16).answer
        hits.setdefault(ex.kind, []).append(got.strip() == ex.answer)
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    acc["all"] = float(np.mean([h for v in hits.values() for h in v]))
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--heldout", type=int, default=700)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.eval_only:
        write_demo_media()
        train(args.steps, args.batch_size, args.lr, args.out)
    t0 = time.time()
    acc = score(args.out, heldout_set(args.heldout))
    print(f"held-out accuracy by ref ({args.heldout} questions, {time.time() - t0:.0f} s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
