"""`python -m ref.run`: ask a Gemma 4 Unified checkpoint about pictures, sounds and videos.

Without --model it uses the embedded demo model (ref/assets/demo_model: 2.3 M parameters trained on
generated shapes and beeps, see tools/train_demo_model.py); without media and prompt it runs the built-in
demo on a bundled picture and sound. One question goes:
  1. files -> arrays                         ref.media (Pillow, soundfile, PyAV)
  2. arrays -> patches / audio frames        ref.image, ref.audio, ref.video
  3. question + soft-token counts -> ids     ref.prompt (tokenizer.json, chat_template.jinja)
  4. ids + patches + frames -> answer        ref.model (Model.generate), streamed token by token

Exit status: 0 done, 1 a bad file, checkpoint or input (one `error: ...` line on stderr), 2 a bad command
line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import media
from . import prompt as P
from .audio import preprocess_audio
from .config import SOFT_TOKEN_BUDGETS
from .errors import ConfigError, OneLineParser, UsageError, positive_int
from .image import check_budget, preprocess_images
from .model import Model, load_model
from .video import preprocess_video

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"
DEMO_PICTURE, DEMO_SOUND = ASSETS / "demo_picture.png", ASSETS / "demo_beeps.wav"
# The built-in demo: (uses the picture, uses the sound, question, the demo model's expected answer).
DEMO_QUESTIONS = (
    (True, False, "What shape is this and what colour?", "A red circle."),
    (False, True, "Is this tone high or low?", "High."),
    (False, True, "How many beeps?", "Three."),
    (True, True, "Describe the picture and the sound.", "A red circle. Three high beeps."),
)
DEFAULT_BUDGET = 280  # HF's image_seq_length, when the checkpoint has no processor_config.json
VIDEO_BUDGET = 70  # soft tokens per video frame (HF's video processor default)
WARM_UP_BYTES = 1 << 30  # read checkpoints larger than this into the page cache with a progress bar
PREFILL_BAR_FLOPS = 1e12  # show per-layer prefill progress when the prompt costs more than this


def default_budget(model_dir: Path) -> int:
    """The checkpoint's image soft-token budget: processor_config.json's image_seq_length (or its image
    processor's max_soft_tokens), else 280."""
    path = model_dir / "processor_config.json"
    if not path.is_file():
        return DEFAULT_BUDGET
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    budget = cfg.get("image_seq_length") if isinstance(cfg, dict) else None
    if budget is None and isinstance(cfg, dict) and isinstance(cfg.get("image_processor"), dict):
        budget = cfg["image_processor"].get("max_soft_tokens")
    if budget is None:
        return DEFAULT_BUDGET
    if budget not in SOFT_TOKEN_BUDGETS:
        raise ConfigError(f"{path}: image_seq_length {budget} is not one of {SOFT_TOKEN_BUDGETS}")
    return int(budget)


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(set(Path(model_dir).glob("*.safetensors")))


def _size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def is_large(model_dir: Path) -> bool:
    """Whether the checkpoint's weight files take WARM_UP_BYTES or more: loading it shows progress."""
    return _size(_weight_files(model_dir)) >= WARM_UP_BYTES


def warm_up(model: Model, progress: bool) -> None:
    """Read a large checkpoint's files once, front to back, so the first forward pass does not fault its
    pages in one by one; with a progress bar on stderr. Small checkpoints are left alone, and so are
    weights that are not memory-mapped (fast copies those that fit into memory as it loads them)."""
    mapped = any(isinstance(getattr(t, "bits", t), np.memmap) for t in model.tensors.values())
    files = _weight_files(model.path) if model.path is not None and mapped else []
    total = _size(files)
    if not files or total < WARM_UP_BYTES:
        return
    from tqdm import tqdm

    chunk = bytearray(64 << 20)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
              file=sys.stderr) as bar:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(chunk):
                    bar.update(n)


class _LayerProgress(list):
    """Stands in for params.language_model.layers during a prefill: `decoder_forward` reads layers[i]
    once per layer, so each read advances the bar."""

    def __init__(self, layers, bar):
        super().__init__(layers)
        self.bar = bar

    def __getitem__(self, i):
        self.bar.update(1)
        return super().__getitem__(i)


def _load_fast(path: Path, device: str, progress: bool) -> Model:
    try:
        import fast

        return fast.load_model(path, device, progress=progress)
    except ImportError as e:  # numba (the fast extra) or CuPy (the gpu extra) missing
        raise ValueError(f"--backend fast needs its extra (pip install '.[fast]', and '.[gpu]' for --device gpu): "
                         f"{_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@dataclass
class Answer:
    question: str
    answer: str
    prompt_tokens: int
    soft_tokens: dict  # {"image": [per image], "audio": [per clip], "video": [per video]}
    new_tokens: int
    prefill_s: float
    decode_s: float
    preprocess_s: float = 0.0
    expected: str | None = None

    def timings(self) -> dict:
        return {"preprocess_s": round(self.preprocess_s, 4), "prefill_s": round(self.prefill_s, 4),
                "prefill_tokens_per_s": round(self.prompt_tokens / max(self.prefill_s, 1e-9), 1),
                "decode_s": round(self.decode_s, 4),
                "decode_tokens_per_s": round(max(self.new_tokens - 1, 0) / max(self.decode_s, 1e-9), 1)}

    def to_json(self) -> dict:
        d = {"question": self.question, "answer": self.answer,
             "tokens": {"prompt": self.prompt_tokens, "new": self.new_tokens, **self.soft_tokens},
             "timings": self.timings()}
        if self.expected is not None:
            d.update(expected=self.expected, correct=self.answer.strip() == self.expected)
        return d

    def summary(self) -> str:
        t = self.timings()
        soft = ", ".join(f"{sum(v)} {k}" for k, v in self.soft_tokens.items() if v)
        return (f"prompt {self.prompt_tokens} tokens{f' ({soft})' if soft else ''}; prefill {self.prefill_s:.2f} s "
                f"({t['prefill_tokens_per_s']:.0f} tokens/s); {self.new_tokens} new tokens in "
                f"{self.prefill_s + self.decode_s:.2f} s (decode {t['decode_tokens_per_s']:.1f} tokens/s)")


@dataclass
class Session:
    """A loaded checkpoint with its tokenizer, chat template and default image budget."""

    model: Model
    tokenizer: object
    template: str | None
    budget: int
    path: Path
    load_s: float = 0.0
    compile_s: float | None = None  # fast's kernels: compiled, or loaded from Numba's cache
    progress: bool = False
    special: P.SpecialIds = field(init=False)

    def __post_init__(self):
        self.special = P.special_ids(self.tokenizer)

    @classmethod
    def open(cls, model_dir: str | Path = DEMO_MODEL, progress: bool = False, backend: str = "numpy",
             device: str = "cpu") -> "Session":
        """Load a checkpoint directory. backend "numpy" is ref itself (CPU only); "fast" swaps in fast/'s
        compiled kernels on `device` (same config, loader, prompt and sampling)."""
        t0 = time.perf_counter()
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a model directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json (not a checkpoint directory)")
        model = load_model(path) if backend == "numpy" else _load_fast(path, device, progress and is_large(path))
        tokenizer = P.load_tokenizer(path)
        session = cls(model, tokenizer, P.load_chat_template(path), default_budget(path), path, progress=progress)
        warm_up(model, progress)
        session.load_s = time.perf_counter() - t0
        if backend == "fast":  # compile before the first question, and report it apart from its timings
            session.compile_s = model.compile()
        return session

    def setup_timings(self) -> dict:
        """{"load_s": ..., and "compile_s" for the fast backend}, rounded for JSON."""
        d = {"load_s": round(self.load_s, 4)}
        if self.compile_s is not None:
            d["compile_s"] = round(self.compile_s, 4)
        return d

    @property
    def is_demo_model(self) -> bool:
        return self.path.resolve() == DEMO_MODEL.resolve()

    def _check_media(self, images, audios, videos) -> None:
        cfg = self.model.config
        if (images or videos) and cfg.vision is None:
            raise ValueError(f"{self.path}: this model has no vision embedder (no vision_config); it takes no images")
        if audios and cfg.audio is None:
            raise ValueError(f"{self.path}: this model has no audio embedder (no audio_config); it takes no audio")

    def _check_positions(self, positions: np.ndarray, what: str) -> None:
        limit = self.model.config.vision.mm_posemb_size
        if positions.size and positions.max() >= limit:
            raise ValueError(f"{what} is {positions.max() + 1} patches long on one side; the model's position "
                             f"table has {limit} (lower --max-soft-tokens)")

    def ask(self, question: str, images=(), audios=(), videos=(), system: str | None = None,
            max_soft_tokens: int | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
            on_text=None) -> Answer:
        """Answer one question about media (steps 2-4 of the module docstring). images: [H, W, 3] uint8
        arrays (or PIL images); audios: 16 kHz mono waveforms [n] or (waveform, sampling rate) pairs, each
        at most 30 s; videos: media.Video. `on_text(str)` receives the answer as it is generated."""
        t0 = time.perf_counter()
        self._check_media(images, audios, videos)
        media_kwargs, counts = self._preprocess(images, audios, videos, max_soft_tokens or self.budget)  # 2
        prompt = P.build_prompt(self.tokenizer, self.template, question, system, counts["image"],
                                counts["audio"], counts["video"])  # 3
        T = len(prompt.ids)
        limit = self.model.config.max_position_embeddings
        if T >= limit:
            raise ValueError(f"the prompt is {T} tokens long ({prompt.count(P.TEXT_TYPE)} text, "
                             f"{prompt.count(P.IMAGE_TYPE)} image, {prompt.count(P.AUDIO_TYPE)} audio, "
                             f"{prompt.count(P.VIDEO_TYPE)} video), over the model's limit of {limit} positions "
                             f"(max_position_embeddings)")
        t_pre = time.perf_counter()
        text, n_new, t_first, t_end = self._generate(prompt, media_kwargs, min(max_new_tokens, limit - T),
                                                     temperature, top_k, top_p, seed, on_text)  # 4
        soft = {"image": counts["image"], "audio": counts["audio"],
                "video": [len(ts) * n for ts, n in counts["video"]]}
        return Answer(question, text, T, soft, n_new, t_first - t_pre, t_end - t_first, t_pre - t0)

    def _preprocess(self, images, audios, videos, budget: int) -> tuple[dict, dict]:
        """Media -> (the model's media arguments, soft-token counts for the prompt: per image, per audio
        clip, and (frame times, tokens per frame) per video)."""
        check_budget(budget)
        kwargs, counts = {}, {"image": [], "audio": [], "video": []}
        if images:
            pv, pos, n = preprocess_images(list(images), budget)  # [N, S, 6912], [N, S, 2], [N]
            self._check_positions(pos, "an image")
            kwargs.update(pixel_values=pv, image_position_ids=pos)
            counts["image"] = [int(k) for k in n]
        if audios:
            clips = [media.to_mono_16k(*a) if isinstance(a, tuple) else np.asarray(a, np.float32) for a in audios]
            for c in clips:
                if len(c) > media.MAX_CLIP_SAMPLES:
                    raise ValueError(f"an audio clip of {len(c) / media.SAMPLING_RATE:.1f} s is longer than 30 s")
            feats, fmask = preprocess_audio(clips)  # [A, Ta, 640], [A, Ta]
            kwargs.update(input_features=feats, input_features_mask=fmask)
            counts["audio"] = [int(k) for k in fmask.sum(axis=1)]
        if videos:
            pvv, vpos, frames = preprocess_video([v.frames for v in videos], VIDEO_BUDGET)  # [F, S, 6912], ...
            self._check_positions(vpos, "a video frame")
            kwargs.update(pixel_values_videos=pvv, video_position_ids=vpos, num_frames_per_video=frames)
            per_frame = (vpos != -1).all(-1).sum(-1)  # [F]; equal within a video (one frame size)
            first = np.concatenate([[0], np.cumsum(frames)[:-1]])
            counts["video"] = [(v.timestamps, int(per_frame[f])) for v, f in zip(videos, first)]
        return kwargs, counts

    def _generate(self, prompt: P.Prompt, media_kwargs: dict, max_new_tokens, temperature, top_k, top_p, seed,
                  on_text):
        """-> (answer text, new tokens, time of the first token, time of the last)."""
        decoder = P.StreamDecoder(self.tokenizer)
        lm = self.model.decoder_params
        layers = lm["layers"]
        bar = None
        flops = 2.0 * len(prompt.ids) * sum(np.prod(t.shape) for t in self.model.tensors.values())
        if self.progress and flops > PREFILL_BAR_FLOPS:
            from tqdm import tqdm

            bar = tqdm(total=len(layers), desc=f"prefill {len(prompt.ids)} tokens", unit="layer", file=sys.stderr,
                       leave=False)
            lm["layers"] = _LayerProgress(layers, bar)
        times = []

        def on_token(ids: np.ndarray) -> None:
            times.append(time.perf_counter())
            if len(times) == 1 and bar is not None:
                lm["layers"] = layers
                bar.close()
            piece = decoder.push(int(ids[0]))
            if piece and on_text is not None:
                on_text(piece)

        try:
            self.model.generate(prompt.ids[None], mm_token_type_ids=prompt.types[None], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, on_token=on_token,
                                **media_kwargs)
        finally:
            lm["layers"] = layers
            if bar is not None:
                bar.close()
        if not times:
            times = [time.perf_counter()]
        return decoder.text(), len(decoder.ids), times[0], times[-1]


# ---- the command line -------------------------------------------------------------------------------------

def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _non_negative(s: str) -> float:
    v = float(s)
    if not v >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m ref.run", description="Ask Gemma 4 Unified about pictures, sounds and videos. "
                 "Without --model: the embedded demo model; without media and prompt: the built-in demo.")
    ap.add_argument("--model", type=Path, help="checkpoint directory (config.json, model.safetensors, tokenizer.json, "
                    "chat_template.jinja); default: the embedded demo model")
    ap.add_argument("--image", action="append", default=[], metavar="PATH", help="a picture (repeatable)")
    ap.add_argument("--audio", action="append", default=[], metavar="PATH", help="a sound, at most 30 s (repeatable)")
    ap.add_argument("--video", action="append", default=[], metavar="PATH", help="a video or animated GIF (repeatable)")
    ap.add_argument("--prompt", help="the question (default: a description request for the media given)")
    ap.add_argument("--system", help="a system prompt")
    ap.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N")
    ap.add_argument("--temperature", type=_non_negative, default=0.0, metavar="T", help="0 = greedy (default)")
    ap.add_argument("--top-k", type=positive_int, default=None, metavar="K", help="sampling only")
    ap.add_argument("--top-p", type=_fraction, default=None, metavar="P", help="sampling only")
    ap.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    ap.add_argument("--max-soft-tokens", type=int, choices=SOFT_TOKEN_BUDGETS, default=None, metavar="{70,140,280,560,1120}",
                    help="image budget (default: the checkpoint's processor_config.json, else 280)")
    ap.add_argument("--video-frames", type=positive_int, default=media.DEFAULT_NUM_FRAMES, metavar="N",
                    help="frames sampled per video (default 32)")
    ap.add_argument("--audio-chunk", action="store_true", help="split sounds longer than 30 s into 30 s clips "
                    "(default: refuse them)")
    ap.add_argument("--backend", choices=("numpy", "fast"), default="numpy",
                    help="numpy: ref itself; fast: fast/'s compiled kernels (the fast extra)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="gpu needs --backend fast and CuPy")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return ap


def default_question(n_images: int, n_audio: int, n_videos: int) -> str:
    if n_videos:
        return "Describe the video."
    if n_images and n_audio:
        return "Describe the picture and the sound."
    if n_images:
        return "What shape is this and what colour?" if n_images == 1 else "Describe the pictures."
    return "Describe the sound."


def _print(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _ask_kwargs(args) -> dict:
    return dict(system=args.system, max_soft_tokens=args.max_soft_tokens, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def run_demo(session: Session, args) -> int:
    picture = media.load_image(DEMO_PICTURE)
    sound = media.load_audio(DEMO_SOUND)
    label = "the embedded demo model" if session.is_demo_model else str(session.path)
    results = []
    if not args.json:
        n_params = sum(int(np.prod(t.shape)) for t in session.model.tensors.values())
        _print(f"model: {label} ({n_params / 1e6:,.1f} M parameters, loaded in {session.load_s:.2f} s"
               + (f"; fast kernels ready in {session.compile_s:.2f} s)" if session.compile_s is not None else ")"))
        _print(f"picture: {DEMO_PICTURE.name} ({picture.shape[1]}x{picture.shape[0]})   "
               f"sound: {DEMO_SOUND.name} ({sound.seconds:.2f} s)")
    for use_picture, use_sound, question, expected in DEMO_QUESTIONS:
        media_note = " + ".join(w for w, used in (("picture", use_picture), ("sound", use_sound)) if used)
        if not args.json:
            _print(f"\nQ [{media_note}]: {question}")
            _print("A: ", end="")
        a = session.ask(question, images=[picture] if use_picture else [], audios=[sound.wave] if use_sound else [],
                        on_text=None if args.json else (lambda s: _print(s, end="")), **_ask_kwargs(args))
        if session.is_demo_model:
            a.expected = expected
        results.append(a)
        if not args.json:
            verdict = ""
            if a.expected is not None:
                verdict = "   (correct)" if a.answer.strip() == expected else f"   (expected: {expected})"
            _print(verdict)
            _print(f"   {a.summary()}")
    if args.json:
        _print(json.dumps({"model": str(session.path), **session.setup_timings(),
                           "demo": [a.to_json() for a in results]}))
    return 0


def run_question(session: Session, args) -> int:
    images = [media.load_image(p) for p in args.image]
    audios = []
    for p in args.audio:
        audios += media.audio_clips(media.load_audio(p), args.audio_chunk)
    videos = [media.load_video(p, args.video_frames) for p in args.video]
    question = args.prompt if args.prompt is not None else default_question(len(images), len(audios), len(videos))
    stream = None if args.json else (lambda s: _print(s, end=""))
    a = session.ask(question, images=images, audios=audios, videos=videos, on_text=stream, **_ask_kwargs(args))
    if args.json:
        _print(json.dumps({"model": str(session.path), **a.to_json(),
                           "timings": {**session.setup_timings(), **a.timings()}}))
    else:
        _print()
        if session.compile_s is not None:
            print(f"fast kernels ready in {session.compile_s:.2f} s (not counted below)", file=sys.stderr)
        print(a.summary(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.device == "gpu" and args.backend != "fast":
            raise UsageError("--device gpu needs --backend fast (the numpy backend runs on the CPU)")
        session = Session.open(args.model or DEMO_MODEL, progress=not args.json or sys.stderr.isatty(),
                               backend=args.backend, device=args.device)
        if not (args.image or args.audio or args.video) and args.prompt is None:
            return run_demo(session, args)
        return run_question(session, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (see docs/run.md for what the real checkpoint needs)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
