"""Media files -> arrays: pictures with Pillow, sounds with soundfile, videos with PyAV (or Pillow for
animated GIF / WebP / PNG). What comes out is what `ref.image`, `ref.audio` and `ref.video` take.

Every problem with a file (missing, not media, unreadable, corrupt, too long) is one `MediaError` (a
ValueError) whose message names the file and the problem on one line, so a command line tool can print
it as it is. Whatever the decoders raise is caught and reworded: PyAV's and Pillow's own errors are often
ValueErrors too, but without the file's name.

Video frame sampling is HF's (`Gemma4UnifiedVideoProcessor.sample_frames` with its default 32 frames):
  indices = arange(n) * total // n,  timestamps = index / fps, shown as "mm:ss" (both parts truncated).
HF raises when a video has fewer frames than asked for; we use every frame instead (a 10-frame GIF gives
10 frames). Without a known frame rate HF assumes 24 fps; so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import FRAME, MAX_FRAMES, SAMPLING_RATE, to_mono_16k
from .image import to_rgb_array

DEFAULT_NUM_FRAMES = 32
# FFmpeg decodes text files as "video" (ANSI art and friends); for us they are not videos.
TEXT_ART_CODECS = {"ansi", "bintext", "xbin", "idf"}
DEFAULT_FPS = 24.0  # HF's fallback when a video's frame rate is unknown
MAX_CLIP_SAMPLES = MAX_FRAMES * FRAME  # 30 s at 16 kHz: the most one audio clip may hold


class MediaError(ValueError):
    """A media file that cannot be used; the message names it."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def check_file(path: str | Path) -> Path:
    """-> Path, or MediaError if it does not exist, is not a regular file, or cannot be opened."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file")
    if not p.is_file():
        raise MediaError(f"{p}: not a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise MediaError(f"{p}: cannot open ({e.strerror or _first_line(e)})") from None
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: empty file")
    return p


# ---- pictures -----------------------------------------------------------------------------------------

def _open_picture(p: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(p)
    except UnidentifiedImageError:
        raise MediaError(f"{p}: not {what} (Pillow does not recognise the format)") from None
    except Exception as e:
        raise MediaError(f"{p}: unreadable {what} ({_first_line(e)})") from None


def load_image(path: str | Path) -> np.ndarray:
    """PNG, JPEG, WebP, GIF (first frame), BMP, TIFF ... -> [H, W, 3] uint8. Grayscale, palette and
    alpha images are converted to RGB (transparency over white, as HF does)."""
    from PIL import Image

    p = check_file(path)
    im = _open_picture(p, "an image")
    try:
        with im:
            im.seek(0)
            im.load()
            return to_rgb_array(im)
    except Image.DecompressionBombError as e:
        raise MediaError(f"{p}: image too large to decode safely ({_first_line(e)})") from None
    except Exception as e:  # truncated data, bad chunks, decoder errors: Pillow raises many kinds
        raise MediaError(f"{p}: corrupt or truncated image ({_first_line(e)})") from None


# ---- sounds -------------------------------------------------------------------------------------------

@dataclass
class Audio:
    """One sound file, resampled: `wave` [n] float32 mono at 16 kHz; what it was in the file beside it."""

    path: Path
    wave: np.ndarray
    source_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLING_RATE


def load_audio(path: str | Path) -> Audio:
    """WAV, FLAC, OGG, MP3 (where libsndfile has it), any rate, mono or multichannel -> Audio at 16 kHz mono."""
    import soundfile as sf

    p = check_file(path)
    try:
        data, rate = sf.read(p, dtype="float32", always_2d=True)  # [n, C]
    except Exception as e:  # soundfile raises LibsndfileError (unknown format, corrupt header) and others
        raise MediaError(f"{p}: not a readable audio file ({_first_line(e)})") from None
    if data.shape[0] == 0:
        raise MediaError(f"{p}: audio file has no samples")
    if not np.isfinite(data).all():
        raise MediaError(f"{p}: corrupt audio (samples that are not finite numbers)")
    return Audio(p, to_mono_16k(data, rate), int(rate), int(data.shape[1]))


def audio_clips(audio: Audio, chunk: bool) -> list[np.ndarray]:
    """One sound -> the clips the model sees, each at most 30 s (750 soft tokens). A longer sound is an
    error, or with `chunk` is cut into consecutive 30 s clips (the last one shorter)."""
    n = len(audio.wave)
    if n <= MAX_CLIP_SAMPLES:
        return [audio.wave]
    if not chunk:
        raise MediaError(f"{audio.path}: {n / SAMPLING_RATE:.1f} s of audio; the model takes at most "
                         f"{MAX_CLIP_SAMPLES / SAMPLING_RATE:.0f} s per clip ({MAX_FRAMES} soft tokens): "
                         f"pass --audio-chunk to split it into 30 s clips")
    return [audio.wave[i:i + MAX_CLIP_SAMPLES] for i in range(0, n, MAX_CLIP_SAMPLES)]


# ---- videos -------------------------------------------------------------------------------------------

def sample_indices(total: int, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """-> [min(n, total)] frame indices, evenly spaced from 0: arange(n) * total // n (HF's
    `default_sample_indices_fn`). A video with fewer frames than n gives all of them."""
    n = min(num_frames, total)
    return np.arange(n) * total // n


@dataclass
class Video:
    """Sampled frames [F, H, W, 3] uint8 and each frame's time in seconds [F]."""

    path: Path
    frames: np.ndarray
    timestamps: list[float]
    total_frames: int
    fps: float


def _video_with_pillow(p: Path, im, num_frames: int) -> Video:
    """Animated GIF / WebP / PNG. A frame's time is where it starts (the sum of the earlier frames'
    durations); that is index / fps when every frame lasts as long, and 24 fps when durations are missing."""
    total = getattr(im, "n_frames", 1)
    durations = []
    for i in range(total):
        im.seek(i)
        durations.append(im.info.get("duration") or 0)
    if all(d > 0 for d in durations):
        starts = np.concatenate([[0.0], np.cumsum(durations[:-1], dtype=np.float64)]) / 1000.0
        fps = 1000.0 * total / float(sum(durations))
    else:
        starts, fps = np.arange(total) / DEFAULT_FPS, DEFAULT_FPS
    idx = sample_indices(total, num_frames)
    frames = []
    for i in idx:
        im.seek(int(i))
        frames.append(to_rgb_array(im))
    if len({f.shape for f in frames}) > 1:  # Pillow gives every frame the canvas size; a guard all the same
        raise MediaError(f"{p}: frames of different sizes")
    return Video(p, np.stack(frames), [float(starts[i]) for i in idx], total, fps)


def _video_with_pyav(p: Path, num_frames: int) -> Video:
    try:
        import av
    except ImportError:
        raise MediaError(f"{p}: reading this video needs PyAV (pip install 'gemma4-unified-ref[video]'); "
                         "animated GIFs work without it") from None
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise MediaError(f"{p}: no video stream in the file")
            stream = container.streams.video[0]
            if stream.codec_context.name in TEXT_ART_CODECS:
                raise MediaError(f"{p}: not a video (FFmpeg reads it as text)")
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else DEFAULT_FPS
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if total <= 0:
            raise MediaError(f"{p}: video has no frames")
        want = sample_indices(total, num_frames)
        wanted, frames = set(int(i) for i in want), {}
        with av.open(str(p)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= want[-1]:
                    break
    except MediaError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends
        raise MediaError(f"{p}: not a readable video ({_first_line(e)})") from None
    kept = [int(i) for i in want if int(i) in frames]  # a container may over-count its frames
    if not kept:
        raise MediaError(f"{p}: no frame could be decoded")
    return Video(p, np.stack([frames[i] for i in kept]), [i / fps for i in kept], total, fps)


def load_video(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> Video:
    """A video file -> up to `num_frames` evenly sampled frames with their times. Animated GIF, WebP and
    PNG are read with Pillow; anything else (MP4, WebM, MKV, AVI, ...) needs PyAV (the `video` extra)."""
    from PIL import Image, UnidentifiedImageError

    p = check_file(path)
    if num_frames < 1:
        raise MediaError(f"number of video frames must be at least 1, got {num_frames}")
    try:
        im = Image.open(p)
    except UnidentifiedImageError:
        return _video_with_pyav(p, num_frames)
    except Exception as e:
        raise MediaError(f"{p}: unreadable file ({_first_line(e)})") from None
    try:
        with im:
            return _video_with_pillow(p, im, num_frames)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{p}: corrupt or truncated animation ({_first_line(e)})") from None
