"""Waveform -> audio frames (Gemma4UnifiedAudioFeatureExtractor). No mel, no normalisation.

  1. mono (channels averaged), 16 kHz (band-limited resampling with soxr)
  2. zero-pad to a multiple of 640 samples (40 ms): ceil(n / 640) frames, one soft token each
  3. batch: pad to the longest clip with zero frames, marked False in the mask
"""

from __future__ import annotations

import numpy as np

SAMPLING_RATE = 16000
FRAME = 640  # samples per frame = per audio soft token
MAX_FRAMES = 750  # 30 s: the processor's audio_seq_length


def to_mono_16k(waveform, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """[n] or [n, C] (soundfile's channels-last layout) at any rate -> [m] float32 mono at 16 kHz."""
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a waveform of shape [n] or [n, channels], got {list(x.shape)}")
    if sampling_rate != SAMPLING_RATE and x.size:
        import soxr  # chosen for quality: a band-limited resampler, not linear interpolation

        x = soxr.resample(x, sampling_rate, SAMPLING_RATE, quality="VHQ").astype(np.float32)
    return x


def num_frames(num_samples: int) -> int:
    """ceil(n / 640): the number of audio soft tokens for n samples at 16 kHz."""
    return -(-num_samples // FRAME)


def frames(waveform: np.ndarray) -> np.ndarray:
    """[n] -> [ceil(n / 640), 640] float32, the last frame zero-padded."""
    n = num_frames(len(waveform))
    out = np.zeros(n * FRAME, np.float32)
    out[: len(waveform)] = waveform
    return out.reshape(n, FRAME)


def preprocess_audio(waveforms, sampling_rate: int = SAMPLING_RATE) -> tuple[np.ndarray, np.ndarray]:
    """list of N waveforms -> (input_features [N, T, 640] float32, input_features_mask [N, T] bool),
    T = the most frames of any clip."""
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        waveforms = [waveforms]
    clips = [frames(to_mono_16k(w, sampling_rate)) for w in waveforms]
    if not clips:
        raise ValueError("no audio given")
    T = max(len(c) for c in clips)
    features = np.zeros((len(clips), T, FRAME), np.float32)
    mask = np.zeros((len(clips), T), bool)
    for i, c in enumerate(clips):
        features[i, : len(c)], mask[i, : len(c)] = c, True
    return features, mask
