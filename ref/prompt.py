"""Prompt building: tokenizer, chat template, placeholder expansion, token types (Gemma4UnifiedProcessor).

  1. messages -> text: the checkpoint's `chat_template.jinja` rendered with jinja2, else the Gemma 4 turn
     format below. Either way each image becomes one `<|image|>`, each audio clip one `<|audio|>`, each
     video one `<|video|>` (the placeholders the processor looks for)
  2. expand the placeholders (`replace_image_token`, `replace_audio_token`, `replace_video_token`):
       image  -> `<|image>` + n x `<|image|>` + `<image|>`
       audio  -> `<|audio>` + n x `<|audio|>` + `<audio|>`
       video  -> per frame `mm:ss <|image>` + n x `<|video|>` + `<image|>`, frames joined by spaces
  3. tokenize with `tokenizer.json` (the `tokenizers` library). Special strings are single tokens and the
     template writes `<bos>` itself, so nothing is added
  4. mm_token_type_ids from the ids: 0 text, 1 image, 2 video, 3 audio (boi/eoi/boa/eoa are text)

Special ids are always looked up by their string in the tokenizer, never assumed: the real checkpoint's
`<|image|>` is 258880, the embedded demo model's is a small number.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
TURN_START, TURN_END = "<|turn>", "<turn|>"
BOI, IMAGE, EOI = "<|image>", "<|image|>", "<image|>"
BOA, AUDIO, EOA = "<|audio>", "<|audio|>", "<audio|>"
VIDEO = "<|video|>"

TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE, AUDIO_TYPE = 0, 1, 2, 3


@dataclass(frozen=True)
class SpecialIds:
    """The ids of the strings above in one tokenizer."""

    bos: int
    eos: int
    pad: int
    turn_end: int
    boi: int
    image: int
    eoi: int
    boa: int
    audio: int
    eoa: int
    video: int


def special_ids(tokenizer) -> SpecialIds:
    """tokenizers.Tokenizer -> SpecialIds; a missing string is a ConfigError naming it."""
    names = {"bos": BOS, "eos": EOS, "pad": PAD, "turn_end": TURN_END, "boi": BOI, "image": IMAGE, "eoi": EOI,
             "boa": BOA, "audio": AUDIO, "eoa": EOA, "video": VIDEO}
    ids = {}
    for field_name, s in names.items():
        i = tokenizer.token_to_id(s)
        if i is None:
            raise ConfigError(f"tokenizer.json has no token {s!r} (needed for Gemma 4 prompts)")
        ids[field_name] = i
    return SpecialIds(**ids)


def load_tokenizer(model_dir: str | Path):
    """<dir>/tokenizer.json -> tokenizers.Tokenizer (ConfigError if missing or unreadable)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise ConfigError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def load_chat_template(model_dir: str | Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's "chat_template"
    (older exports), else None (the turn format below is used)."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        if isinstance(template, str):
            return template
    return None


# ---- 1. messages -> text -----------------------------------------------------------------------------

def chat_messages(prompt: str, system: str | None = None, n_images: int = 0, n_videos: int = 0,
                  n_audio: int = 0) -> list[dict]:
    """One user turn in HF's chat format: the media first (images, videos, audio), then the question."""
    content = ([{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "audio"}] * n_audio
               + [{"type": "text", "text": prompt}])
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


# How one content item appears in a turn: the same strings Gemma 4's own template writes.
ITEM_TEXT = {"image": f"\n\n{IMAGE}\n\n", "audio": AUDIO, "video": f"\n\n{VIDEO}\n\n"}


def turn_format(messages: list[dict], bos_token: str = BOS, add_generation_prompt: bool = True) -> str:
    """The Gemma 4 turn format (SPEC.md), for checkpoints without a chat template:
    `<bos><|turn>user\\n{content}<turn|>\\n ... <|turn>model\\n`. "assistant" is written as "model"."""
    out = [bos_token]
    for m in messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        content = m["content"]
        if isinstance(content, str):
            body = content.strip()
        else:
            body = "".join(item["text"].strip() if item["type"] == "text" else ITEM_TEXT[item["type"]]
                           for item in content)
        out.append(f"{TURN_START}{role}\n{body}{TURN_END}\n")
    if add_generation_prompt:
        out.append(f"{TURN_START}model\n")
    return "".join(out)


def _template_env():
    """A sandboxed jinja2 environment set up as HF's `apply_chat_template` sets it up (trim_blocks,
    lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not escape HTML, `strftime_now`),
    so a checkpoint's template renders to the same text here as there."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def render(messages: list[dict], template: str | None, special: dict[str, str] | None = None,
           add_generation_prompt: bool = True) -> str:
    """messages -> prompt text, with one placeholder per media item. `special` maps bos_token, eos_token, ...
    to their strings (template variables, as HF passes them)."""
    special = special or {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    if template is None:
        return turn_format(messages, special.get("bos_token", BOS), add_generation_prompt)
    import jinja2

    try:
        compiled = _template_env().from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise ConfigError(f"chat_template.jinja: {type(e).__name__}: {e}") from None


# ---- 2. placeholder expansion ------------------------------------------------------------------------

def timestamp(seconds: float) -> str:
    """Seconds -> "mm:ss", both parts truncated (HF's `replace_video_token`)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def image_text(n: int) -> str:
    return BOI + IMAGE * n + EOI


def audio_text(n: int) -> str:
    return BOA + AUDIO * n + EOA


def video_text(timestamps: list[float], n: int) -> str:
    """One video: every frame as `mm:ss <|image>` + n x `<|video|>` + `<image|>`, joined by spaces."""
    return " ".join(f"{timestamp(t)} {BOI}{VIDEO * n}{EOI}" for t in timestamps)


def expand(text: str, image_tokens: list[int] = (), audio_tokens: list[int] = (),
           videos: list[tuple[list[float], int]] = ()) -> str:
    """Replace the k-th `<|image|>` / `<|audio|>` / `<|video|>` of the rendered text with the k-th item's
    soft-token run. image_tokens / audio_tokens: soft tokens per image / clip; videos: (frame timestamps
    in seconds, soft tokens per frame) per video. The counts must match the placeholders."""
    parts = re.split(f"({re.escape(IMAGE)}|{re.escape(AUDIO)}|{re.escape(VIDEO)})", text)
    found = {IMAGE: parts[1::2].count(IMAGE), AUDIO: parts[1::2].count(AUDIO), VIDEO: parts[1::2].count(VIDEO)}
    given = {IMAGE: len(image_tokens), AUDIO: len(audio_tokens), VIDEO: len(videos)}
    for s, what in ((IMAGE, "images"), (AUDIO, "audio clips"), (VIDEO, "videos")):
        if found[s] != given[s]:
            raise ValueError(f"the prompt has {found[s]} {s} placeholder(s) for {given[s]} {what}")
    queues = {IMAGE: iter(image_tokens), AUDIO: iter(audio_tokens), VIDEO: iter(videos)}
    make = {IMAGE: image_text, AUDIO: audio_text, VIDEO: lambda v: video_text(*v)}
    for i in range(1, len(parts), 2):
        parts[i] = make[parts[i]](next(queues[parts[i]]))
    return "".join(parts)


# ---- 3, 4. ids and token types -----------------------------------------------------------------------

def token_types(ids: np.ndarray, sp: SpecialIds) -> np.ndarray:
    """ids [T] -> mm_token_type_ids [T]: 1 image, 2 video, 3 audio placeholder, 0 everything else."""
    ids = np.asarray(ids)
    types = np.zeros(ids.shape, np.int64)
    types[ids == sp.image] = IMAGE_TYPE
    types[ids == sp.video] = VIDEO_TYPE
    types[ids == sp.audio] = AUDIO_TYPE
    return types


@dataclass
class Prompt:
    text: str  # the expanded prompt text
    ids: np.ndarray  # [T] int64
    types: np.ndarray  # [T] int64 mm_token_type_ids

    def count(self, kind: int) -> int:
        return int((self.types == kind).sum())


def build_prompt(tokenizer, template: str | None, prompt: str, system: str | None = None,
                 image_tokens: list[int] = (), audio_tokens: list[int] = (),
                 videos: list[tuple[list[float], int]] = ()) -> Prompt:
    """Steps 1-4: a question + media soft-token counts -> the ids and token types the model takes."""
    sp = special_ids(tokenizer)
    special = {"bos_token": tokenizer.id_to_token(sp.bos), "eos_token": tokenizer.id_to_token(sp.eos),
               "pad_token": tokenizer.id_to_token(sp.pad)}
    messages = chat_messages(prompt, system, len(image_tokens), len(videos), len(audio_tokens))
    text = expand(render(messages, template, special), list(image_tokens), list(audio_tokens), list(videos))
    ids = np.array(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
    return Prompt(text, ids, token_types(ids, sp))


class StreamDecoder:
    """Token ids in, printable text out, one step at a time. Decodes everything seen so far and returns
    what is new, holding back an incomplete UTF-8 sequence (byte-fallback tokens) until it completes.
    Special tokens (turn markers, eos) are not shown."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
