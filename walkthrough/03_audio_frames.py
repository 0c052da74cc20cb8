# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Audio as raw frames
#
# Speech models usually start with a mel spectrogram and a Conformer or Whisper-style encoder.
# Gemma 4 12B Unified has neither. The waveform, resampled to 16 kHz, is cut into frames of 640
# samples (40 ms), and each frame *is* one soft token's input: 640 raw sample values, normalised
# and projected by one matrix. The steps of `ref/audio.py`, which mirrors HF's
# `Gemma4UnifiedAudioFeatureExtractor`, are:
#
# 1. mono (channels averaged), resampled to 16 kHz with a band-limited resampler (soxr)
# 2. zero-padded to a multiple of 640 samples: `ceil(n / 640)` frames, one soft token each, up to 750 (30 s) per clip
# 3. in a batch, shorter clips padded with zero frames, which are marked False in `input_features_mask`
#
# and then, in the embedder (`ref/embedders.py`, `audio_embed`): RMSNorm without a scale, and a Linear
# from 640 to the decoder's width. The embedder's weights here come from `ref.tiny` and are **random**.

# %%
import matplotlib.pyplot as plt
import numpy as np

from ref import Model, from_hf_dict, from_name, preprocess_audio
from ref.audio import FRAME, MAX_FRAMES, SAMPLING_RATE, frames, num_frames, to_mono_16k
from ref.config import tiny_hf_dict
from ref.embedders import audio_embed
from ref.layers import rms_norm
from ref.tiny import random_tensors
from ref.weights import expected_shapes

plt.rcParams.update({"figure.dpi": 72})

# %% [markdown]
# ## A sound
#
# We make one second of stereo audio at 44.1 kHz, CD quality, which is what a file on disk often is.
# It has a vowel-like gliding tone with harmonics, a hiss like an "s", two beeps, and a faint 11 kHz
# whistle throughout. The whistle is there to show what resampling must remove.

# %%
RATE = 44100
t = np.arange(int(1.0 * RATE)) / RATE
pitch = 180 + 120 * t  # a gliding voice-like fundamental
phase = 2 * np.pi * np.cumsum(pitch) / RATE
vowel = sum(np.sin(k * phase) / k for k in range(1, 8)) * np.exp(-((t - 0.25) / 0.12) ** 2)
hiss = np.random.default_rng(0).normal(0, 0.25, t.size) * np.exp(-((t - 0.55) / 0.04) ** 2)
beeps = sum(np.sin(2 * np.pi * f * t) * ((t > t0) & (t < t0 + 0.08)) for f, t0 in ((880, 0.7), (660, 0.85)))
whistle = 0.05 * np.sin(2 * np.pi * 11000 * t)
mono = 0.4 * vowel + hiss + 0.5 * beeps + whistle
wave = np.stack([mono, 0.9 * mono], axis=1).astype(np.float32)  # [n, 2]: soundfile's channels-last layout
print(wave.shape, wave.dtype, f"{len(wave) / RATE:.2f} s at {RATE} Hz")

# %% [markdown]
# ## Step 1: mono, 16 kHz
#
# `to_mono_16k` averages the channels and resamples with soxr at its "very high quality" setting.
# 44,100 samples per second become 16,000. Nothing above 8 kHz, half the new rate, can be represented
# any more, so a good resampler filters it out first. A naive one, such as linear interpolation, folds
# the 11 kHz whistle down to a false 5 kHz tone (16 - 11 = 5). HF's feature extractor expects 16 kHz
# input and leaves resampling to the caller. `ref` does it for you.

# %%
x16 = to_mono_16k(wave, RATE)  # [16000] float32
naive = np.interp(np.arange(len(x16)) / SAMPLING_RATE, t, wave.mean(axis=1)).astype(np.float32)
print(f"{len(wave)} samples at {RATE} Hz -> {len(x16)} at {SAMPLING_RATE} Hz")


def spectrum(x, rate):  # -> (frequencies in Hz, magnitude in dB) of a Hann-windowed FFT
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate), 20 * np.log10(mag / mag.max() + 1e-9)


fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
zoom = slice(int(0.25 * RATE), int(0.255 * RATE))
axes[0].plot(t[zoom] * 1e3, wave[zoom].mean(axis=1), ".-", ms=3, lw=0.5, label="44.1 kHz")
z16 = slice(int(0.25 * SAMPLING_RATE), int(0.255 * SAMPLING_RATE))
axes[0].plot(np.arange(len(x16))[z16] / SAMPLING_RATE * 1e3, x16[z16], "o", ms=4, label="16 kHz (soxr)")
axes[0].set(title="5 ms of the waveform", xlabel="time (ms)")
axes[0].legend(fontsize=8)
for x, rate, label in ((wave.mean(axis=1), RATE, "44.1 kHz original"),
                       (naive, SAMPLING_RATE, "16 kHz, linear interpolation"),
                       (x16, SAMPLING_RATE, "16 kHz, soxr (ref)")):
    f, db = spectrum(x[: int(0.45 * rate)], rate)  # the vowel and the whistle only
    axes[1].plot(f / 1e3, db, lw=0.8, label=label)
axes[1].axvline(8, color="k", ls=":", lw=1)
axes[1].set(xlim=(0, 14), ylim=(-120, 5), xlabel="frequency (kHz)", ylabel="dB",
            title="spectrum of the first 0.45 s: the 11 kHz whistle\nmust vanish, not fold to 5 kHz")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Step 2: frames of 640 samples (40 ms)
#
# The 16 kHz signal is cut into consecutive frames of 640 samples, with no overlap and no window. The
# last frame is filled up with zeros. One frame is one soft token, so the token count is
# `ceil(n / 640)`: 25 tokens per second and 750 for the 30 s maximum of one clip.

# %%
for seconds in (0.01, 0.04, 0.041, 0.3, 1.0, 30.0):
    n = int(round(seconds * SAMPLING_RATE))
    print(f"{seconds:6.3f} s = {n:6} samples -> ceil({n} / {FRAME}) = {num_frames(n):3} soft tokens")
assert num_frames(MAX_FRAMES * FRAME) == 750
F = frames(x16)  # [25, 640]
print("frames:", F.shape)

# %% [markdown]
# ## Raw frames versus a mel spectrogram, in one figure
#
# The top panel is the waveform with the 40 ms frame boundaries. The middle panel is exactly what Gemma 4
# Unified's embedder receives: each column is one frame of 640 raw samples, one token. The bottom
# panel is, for contrast, what a conventional front end computes from the same audio: a log-mel
# spectrogram as in Whisper's original front end (25 ms windows every 10 ms, 80 mel bands). It is
# computed in the next cell only for this comparison, because **this model has no such step**. A mel
# front end gives 100 frames per second of smooth, phase-free energies, and an encoder must then
# reduce them to tokens. Here the embedder sees the signal itself, 25 times per second, phase and all.
# The golden case `audio_batch` catches ports that use a mel extractor, because the count and the shape
# of the features differ.

# %%
def log_mel(x, rate=16000, n_fft=400, hop=160, n_mels=80):
    """For contrast only, not part of Gemma 4 Unified: |STFT|^2 of Hann windows -> triangular mel filters -> log10."""
    win = np.hanning(n_fft + 1)[:-1]
    starts = np.arange(0, len(x) - n_fft + 1, hop)
    power = np.abs(np.fft.rfft(np.stack([x[s:s + n_fft] * win for s in starts]), axis=-1)) ** 2  # [frames, n_fft/2+1]
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    edges = 700 * (10 ** (np.linspace(mel(0), mel(rate / 2), n_mels + 2) / 2595) - 1)
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)  # [n_mels, n_fft/2+1]
    return np.log10(power @ bank.T + 1e-10).T  # [n_mels, frames]


mels = log_mel(x16)
fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 2, 2]})
time16 = np.arange(len(x16)) / SAMPLING_RATE
axes[0].plot(time16, x16, lw=0.4)
for k in range(len(F) + 1):
    axes[0].axvline(k * FRAME / SAMPLING_RATE, color="r", lw=0.4)
axes[0].set(title=f"16 kHz waveform, {len(x16)} samples; red: 40 ms frame boundaries")
axes[1].imshow(F.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, extent=(0, len(F) * FRAME / SAMPLING_RATE, FRAME, 0))
axes[1].set(ylabel="sample in frame", title=f"Gemma 4 Unified: input_features, {len(F)} frames x {FRAME} raw samples "
            f"= {len(F)} soft tokens")
axes[2].imshow(mels, aspect="auto", origin="lower", cmap="magma", extent=(0, mels.shape[1] * 0.01, 0, mels.shape[0]))
axes[2].set(ylabel="mel band", xlabel="time (s)",
            title=f"for contrast, a mel front end: {mels.shape[1]} frames x {mels.shape[0]} mel bands, then an encoder")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Step 3: a batch
#
# `preprocess_audio` does steps 1 and 2 for a list of clips and stacks them. A shorter clip is padded
# with whole zero frames, and `input_features_mask` says which frames are real. Padded frames are
# dropped before the soft tokens enter the prompt.

# %%
input_features, input_features_mask = preprocess_audio([wave, wave[: RATE // 4]], sampling_rate=RATE)
print("input_features", input_features.shape, "input_features_mask", input_features_mask.shape)
print("real frames per clip:", input_features_mask.sum(axis=1))
assert np.array_equal(input_features[0], F)

# %% [markdown]
# ## The embedder: RMSNorm without scale, then Linear
#
# Each frame is divided by its root mean square (plus `eps` 1e-6 inside the square root), with no
# learned scale, and multiplied by one matrix of 640 x D. That is 640 x 3,840 = 2.5 M parameters in
# the real model. The RMSNorm removes the loudness of each frame, so the quiet and the loud parts of
# the vowel reach the projection at the same scale. The `eps` acts as a gate for near-silence: a frame
# whose mean square is far below 1e-6 is scaled up by at most 1000 and stays small. Zero padding stays
# exactly zero.

# %%
shapes = expected_shapes(from_name("gemma-4-12b"))
print("real model:", {k: list(v) for k, v in shapes.items() if "audio" in k})

hf = tiny_hf_dict()
cfg = from_hf_dict(hf)
model = Model(cfg, random_tensors(hf, seed=0))  # random weights
stages = {}
soft = audio_embed(input_features, model.params.embed_audio, cfg, trace=lambda name, a: stages.setdefault(name, a))
normed = stages["audio.rms_norm"]  # [2, 25, 640]
assert np.allclose(normed, rms_norm(input_features, None, cfg.audio.rms_norm_eps))
print("audio.rms_norm", normed.shape, "-> projection", soft.shape)

rms = lambda a: np.sqrt(np.mean(a**2, axis=-1))
fig, ax = plt.subplots(figsize=(9, 3))
ax.semilogy(rms(input_features[0]) + 1e-9, "o-", label="frame RMS before (input_features)")
ax.semilogy(rms(normed[0]) + 1e-9, "s-", label="after RMSNorm without scale")
ax.semilogy(rms(soft[0]) + 1e-9, "^-", label="after the projection (random weights)")
ax.set(xlabel="frame = audio soft token", ylabel="root mean square", title="Clip 0, frame by frame")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Into the prompt
#
# As with images, the clip's real frames replace the `<|audio|>` placeholders between `<|audio>` and
# `<audio|>`, unscaled, and padding frames are dropped. Unlike image tokens, audio tokens get no
# bidirectional block in the attention mask: they are read strictly left to right, like text
# (notebook 4).

# %%
n_real = int(input_features_mask[1].sum())
ids = np.array([[cfg.bos_token_id, cfg.boa_token_id] + [cfg.audio_token_id] * n_real + [cfg.eoa_token_id, 21, 22]])
embeds = model.embed(ids, input_features=input_features[1:], input_features_mask=input_features_mask[1:])
assert np.array_equal(embeds[0, 2:2 + n_real], soft[1, :n_real])
print(f"clip 1: {n_real} real frames of {input_features.shape[1]} -> prompt of {ids.shape[1]} tokens")
