#!/usr/bin/env python3
"""Regenerate the Gemma 4 Unified processor fixtures from the peer implementation.

The expected values in ``tests/fixtures/processors/`` come from Hugging Face
transformers (5.23.0): ``Gemma4UnifiedImageProcessor`` and
``Gemma4UnifiedVideoProcessor``, constructed directly (no hub download).
This script is never run by CI; it needs a separate virtual environment:

    python3 -m venv /tmp/venv_tv
    /tmp/venv_tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        transformers==5.23.0 numpy pillow
    /tmp/venv_tv/bin/python tools/make_processor_fixtures.py

Output (deterministic: running it twice gives byte-identical files):

* ``img_<case>.npz``  one image case (one or more images, one budget)
* ``vid_<case>.npz``  one video case (pre-sampled frames, one budget)
* ``video_sampling.json``  HF's frame-sampling indices and prompt timestamps

Every npz holds:

* ``kind``            "image" or "video"
* ``budget``          max_soft_tokens passed to HF
* ``n_images``        number of images (image cases) / 1 (video cases)
* ``input_<i>``       the uint8 input exactly as given to HF (HWC, HW for
                      grayscale, HWC with 4 channels for RGBA; video cases
                      store ``frames`` [F, H, W, 3] instead)
* ``as_pil_<i>``      True if the input was handed to HF as a PIL image
                      (``PIL.Image.fromarray(input_<i>)``), else as an array
* ``hf_given_<i>``    "array", "pil" or "gray2d" (2-D input; HF was given
                      ``input[..., None]`` since it rejects 2-D arrays)
* ``resized_hw``      [N, 2] size HF resized to (computed from HF's helper)
* ``num_soft_tokens`` [N] (image) or [F] (video) valid rows per image/frame
* ``position_ids``    HF's full position ids [N or F, budget, 2], padding incl.
* ``pixels``          uint8 [sum(num_soft_tokens), 6912]: HF's valid
                      pixel_values rows, concatenated, as round(v * 255).
                      The generator asserts that HF's float values are exact
                      multiples of 1/255 before storing them this way.
* ``scale_form``      how HF's float32 values relate to the uint8 (either
                      "k*float32(1/255)" or "k/255"), for information
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile

import numpy as np
import PIL
import PIL.Image
import torch
import torchvision
import transformers
from transformers import Gemma4UnifiedImageProcessor, Gemma4UnifiedVideoProcessor
from transformers.models.gemma4_unified import image_processing_gemma4_unified as hf_img
from transformers.video_utils import VideoMetadata

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "processors")
PATCH_DIM = 48 * 48 * 3
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------
# deterministic npz writer (np.savez_compressed stamps the current time)
# ----------------------------------------------------------------------------
def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())


# ----------------------------------------------------------------------------
# synthetic inputs
# ----------------------------------------------------------------------------
def solid(h, w, rgb):
    img = np.empty((h, w, 3), np.uint8)
    img[...] = np.asarray(rgb, np.uint8)
    return img


def gradient(h, w):
    y = np.linspace(0.0, 1.0, h)[:, None]
    x = np.linspace(0.0, 1.0, w)[None, :]
    r = 255 * x + 0 * y
    g = 255 * y + 0 * x
    b = 255 * (1 - 0.5 * (x + y))
    return np.clip(np.rint(np.stack([r, g, b], -1)), 0, 255).astype(np.uint8)


def noise(h, w, seed, channels=3):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def waves(h, w):
    """Smooth but non-trivial content (sines of different frequency per channel)."""
    y = np.arange(h)[:, None].astype(np.float64)
    x = np.arange(w)[None, :].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / 7.0) * np.cos(y / 11.0)
    g = 127.5 + 127.5 * np.sin((x + y) / 13.0)
    b = 127.5 + 127.5 * np.cos(x / 23.0 - y / 5.0)
    return np.clip(np.rint(np.stack([r, g, b], -1)), 0, 255).astype(np.uint8)


def checker(h, w, cell=3):
    """Sharp high-frequency checkerboard over a colour ramp (stresses antialiasing)."""
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    on = ((y // cell + x // cell) % 2).astype(np.float64)
    r = 40 + 180 * on
    g = 255.0 * x / max(w - 1, 1) + 0 * on
    b = 255.0 * y / max(h - 1, 1) * (1 - on)
    return np.clip(np.rint(np.stack([r, g, b], -1)), 0, 255).astype(np.uint8)


def quadrants(h, w):
    img = np.empty((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (230, 40, 40)
    img[: h // 2, w // 2 :] = (40, 200, 60)
    img[h // 2 :, : w // 2] = (30, 60, 220)
    img[h // 2 :, w // 2 :] = (250, 250, 250)
    return img


def rgba(h, w, seed):
    rng = np.random.default_rng(seed)
    rgb = waves(h, w)
    alpha = np.clip(np.rint(np.linspace(0, 255, w))[None, :] + np.zeros((h, 1)), 0, 255).astype(np.uint8)
    alpha[: h // 3] = 255  # fully opaque band
    alpha[-(h // 4) :] = rng.integers(0, 256, size=(h // 4, w), dtype=np.uint8)  # random alpha band
    return np.concatenate([rgb, alpha[..., None]], -1)


def gray_ramp(h, w):
    v = np.linspace(0, 255, h * w).reshape(h, w)
    v = v + 40 * np.sin(np.arange(w) / 3.0)[None, :]
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def moving_square(num_frames, h, w, side=16, step=(5, 9)):
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    frames[...] = (20, 30, 90)
    for t in range(num_frames):
        y0 = (4 + t * step[0]) % (h - side)
        x0 = (4 + t * step[1]) % (w - side)
        frames[t, y0 : y0 + side, x0 : x0 + side] = (250, 240, 30)
    return frames


def tall_video(num_frames, h, w):
    base = gradient(h, w).astype(np.int32)
    frames = []
    for t in range(num_frames):
        f = base.copy()
        f[:, :, 2] = np.clip(f[:, :, 2] + 40 * t - 40, 0, 255)
        y0 = 10 + 25 * t
        f[y0 : y0 + 12, 5 : w - 5] = (255, 255, 255)
        frames.append(f.astype(np.uint8))
    return np.stack(frames)


# (name, budget, [(input array, how it is handed over), ...]) where "how" is
#   "array": the uint8 array as is (HWC),
#   "pil":   PIL.Image.fromarray(array) (mode L for 2-D, RGBA for 4 channels),
#   "gray2d": a 2-D array; ours gets it as is, HF gets array[..., None] because
#            HF's image processor rejects 2-D numpy arrays ("Could not make a
#            flat list of images"); an H x W x 1 array is RGB-expanded by HF.
IMAGE_CASES = [
    ("white_280", 280, [(solid(30, 40, (255, 255, 255)), "array")]),
    ("yellow_70", 70, [(solid(17, 23, (255, 255, 0)), "array")]),
    ("red_140", 140, [(solid(64, 64, (255, 0, 0)), "array")]),
    ("black_1120", 1120, [(solid(50, 70, (0, 0, 0)), "array")]),
    ("gradient_560", 560, [(gradient(60, 80), "array")]),
    ("gradient_pil_280", 280, [(gradient(45, 61), "pil")]),
    ("noise_upscale_70", 70, [(noise(20, 30, seed=1), "array")]),
    ("noise_downscale_70", 70, [(noise(100, 1800, seed=2), "array")]),
    ("checker_downscale_70", 70, [(checker(420, 500), "array")]),
    ("wide_40x2000_140", 140, [(checker(40, 2000, cell=8), "array")]),
    ("tall_2000x40_280", 280, [(gradient(2000, 40), "array")]),
    ("strip_1x2000_70", 70, [(noise(1, 2000, seed=3), "array")]),
    ("strip_2000x1_280", 280, [(gradient(2000, 1), "array")]),
    ("tiny_5x7_70", 70, [(noise(5, 7, seed=4), "array")]),
    ("tiny_1x1_1120", 1120, [(solid(1, 1, (10, 200, 99)), "array")]),
    ("tiny_1x1_pil_70", 70, [(solid(1, 1, (200, 10, 99)), "pil")]),
    ("gray_2d_140", 140, [(gray_ramp(30, 50), "gray2d")]),
    ("gray_pil_L_70", 70, [(gray_ramp(41, 29), "pil")]),
    ("rgba_array_70", 70, [(rgba(36, 48, seed=5), "array")]),
    ("rgba_pil_70", 70, [(rgba(36, 48, seed=6), "pil")]),
    ("exact_336x480_70", 70, [(checker(336, 480, cell=24), "array")]),
    ("upscale_12x16_1120", 1120, [(quadrants(12, 16), "array")]),
    ("upscale_8x8_560", 560, [(quadrants(8, 8), "array")]),
    (
        "batch3_70",
        70,
        [(noise(9, 11, seed=7), "array"), (gradient(40, 30), "array"), (gray_ramp(20, 20), "gray2d")],
    ),
]

VIDEO_CASES = [
    ("square_4x64x96_70", 70, moving_square(4, 64, 96)),
    ("tall_3x120x40_140", 140, tall_video(3, 120, 40)),
    ("square_1x48x48_280", 280, moving_square(1, 48, 48, side=8)),
]

# (total_num_frames, fps) pairs and num_frames values for the sampling record
SAMPLING_VIDEOS = [(300, 30.0), (50, 25.0), (10, 24.0), (1000, 29.97), (32, 24.0), (7200, 60.0)]
SAMPLING_NUM_FRAMES = [32, 16, 8, 1]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def to_uint8_rows(values: np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """Check HF floats are exact multiples of 1/255 and return them as uint8."""
    values = np.asarray(values, np.float32)
    k = np.rint(values.astype(np.float64) * 255.0)
    if k.min() < 0 or k.max() > 255:
        raise AssertionError(f"{what}: values outside [0, 1]")
    k32 = k.astype(np.float32)
    mul = k32 * np.float32(1.0 / 255.0)
    div = k32 / np.float32(255.0)
    if np.array_equal(values, mul):
        form = "k*float32(1/255)"
    elif np.array_equal(values, div):
        form = "k/255"
    else:
        worst = max(np.abs(values - mul).max(), np.abs(values - div).max())
        raise AssertionError(f"{what}: HF values are not exact multiples of 1/255 (max dev {worst})")
    return k.astype(np.uint8), form


def hf_input(arr: np.ndarray, how: str):
    if how == "pil":
        return PIL.Image.fromarray(arr)
    if how == "gray2d":
        assert arr.ndim == 2
        return arr[..., None]
    assert how == "array"
    return arr


def target_hw(h: int, w: int, budget: int) -> tuple[int, int]:
    return hf_img.get_aspect_ratio_preserving_size(
        height=h, width=w, patch_size=16, max_patches=budget * 9, pooling_kernel_size=3
    )


def check_padding(pv: np.ndarray, pos: np.ndarray, n: int, what: str) -> None:
    if np.any(pv[n:] != 0) or np.any(pos[n:] != -1):
        raise AssertionError(f"{what}: HF padding rows are not zero / (-1, -1)")
    if np.any(pos[:n] < 0):
        raise AssertionError(f"{what}: HF valid rows have negative positions")


# ----------------------------------------------------------------------------
# image / video fixtures
# ----------------------------------------------------------------------------
def make_image_case(name, budget, items, proc):
    inputs = [hf_input(a, how) for a, how in items]
    # input_data_format is given explicitly for arrays: HF guesses the channel
    # axis otherwise and misreads e.g. a (1, 1, 3) or (1, 2000, 3) HWC array
    # as channels-first.  PIL inputs carry their own layout.
    kwargs = {"max_soft_tokens": budget, "return_tensors": "pt"}
    if not any(how == "pil" for _, how in items):
        kwargs["input_data_format"] = "channels_last"
    out = proc(images=inputs, **kwargs)
    pv = out["pixel_values"].numpy()
    pos = out["image_position_ids"].numpy()
    nst = np.asarray(out["num_soft_tokens_per_image"]).astype(np.int64).reshape(-1)
    assert pv.shape == (len(items), budget, PATCH_DIM), pv.shape
    assert pos.shape == (len(items), budget, 2), pos.shape
    rows, forms = [], set()
    resized = []
    for i, (arr, _) in enumerate(items):
        n = int(nst[i])
        check_padding(pv[i], pos[i], n, f"{name}[{i}]")
        u8, form = to_uint8_rows(pv[i, :n], f"{name}[{i}]")
        rows.append(u8)
        forms.add(form)
        th, tw = target_hw(arr.shape[0], arr.shape[1], budget)
        assert (th // 48) * (tw // 48) == n, (name, th, tw, n)
        resized.append((th, tw))
    assert len(forms) == 1, forms
    arrays = {
        "kind": np.array("image"),
        "budget": np.array(budget, np.int64),
        "n_images": np.array(len(items), np.int64),
        "num_soft_tokens": nst,
        "position_ids": pos.astype(np.int64),
        "pixels": np.concatenate(rows, 0),
        "resized_hw": np.asarray(resized, np.int64),
        "scale_form": np.array(forms.pop()),
    }
    for i, (arr, how) in enumerate(items):
        arrays[f"input_{i}"] = arr
        arrays[f"as_pil_{i}"] = np.array(how == "pil")
        arrays[f"hf_given_{i}"] = np.array(how)
    write_npz(os.path.join(OUT_DIR, f"img_{name}.npz"), arrays)
    return {"case": name, "budget": budget, "num_soft_tokens": nst.tolist(), "resized_hw": resized}


def video_call(proc, frames, budget):
    # Pre-sampled frames: do_sample_frames=False keeps all F frames (with the
    # default do_sample_frames=True HF asks for 32 frames and raises when F < 32).
    return proc(
        videos=frames,
        do_sample_frames=False,
        max_soft_tokens=budget,
        input_data_format="channels_last",
        return_tensors="pt",
        return_metadata=True,
    )


def make_video_case(name, budget, frames, proc):
    out = video_call(proc, frames, budget)
    pv = out["pixel_values_videos"].numpy()
    pos = out["video_position_ids"].numpy()
    nfr = np.asarray(out["num_frames_per_video"]).astype(np.int64).reshape(-1)
    nst_video = np.asarray(out["num_soft_tokens_per_video"]).astype(np.int64).reshape(-1)
    f = frames.shape[0]
    assert nfr.tolist() == [f], nfr
    assert pv.shape == (f, budget, PATCH_DIM), pv.shape
    n = int(nst_video[0])
    th, tw = target_hw(frames.shape[1], frames.shape[2], budget)
    assert (th // 48) * (tw // 48) == n
    meta = out["video_metadata"][0]
    assert list(meta.frames_indices) == list(range(f)), meta.frames_indices
    rows, forms = [], set()
    for t in range(f):
        check_padding(pv[t], pos[t], n, f"{name}[{t}]")
        u8, form = to_uint8_rows(pv[t, :n], f"{name}[{t}]")
        rows.append(u8)
        forms.add(form)
    assert len(forms) == 1, forms
    arrays = {
        "kind": np.array("video"),
        "budget": np.array(budget, np.int64),
        "n_images": np.array(1, np.int64),
        "frames": frames,
        "num_frames_per_video": nfr,
        "num_soft_tokens": np.full((f,), n, np.int64),
        "position_ids": pos.astype(np.int64),
        "pixels": np.concatenate(rows, 0),
        "resized_hw": np.asarray([(th, tw)], np.int64),
        "scale_form": np.array(forms.pop()),
    }
    write_npz(os.path.join(OUT_DIR, f"vid_{name}.npz"), arrays)
    return {"case": name, "budget": budget, "frames": f, "num_soft_tokens_per_frame": n}


def mmss(seconds: float) -> str:
    # same formatting rule as the HF processor prompt: zero-padded mm:ss,
    # both parts truncated toward zero
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def make_sampling_record(proc):
    records = []
    for total, fps in SAMPLING_VIDEOS:
        for num_frames in SAMPLING_NUM_FRAMES:
            entry = {"total_num_frames": total, "fps": fps, "num_frames": num_frames}
            meta = VideoMetadata(total_num_frames=total, fps=fps)
            try:
                idx = proc.sample_frames(metadata=meta, num_frames=num_frames)
            except ValueError as exc:
                entry["error"] = "ValueError"
                entry["message"] = str(exc)
                records.append(entry)
                continue
            idx = [int(i) for i in np.asarray(idx).reshape(-1)]
            meta.frames_indices = idx
            ts = [float(t) for t in meta.timestamps]
            # cross-check against the full preprocess path on a tiny video whose
            # frames carry their own index
            frames = np.zeros((total, 4, 4, 3), np.uint8)
            frames[..., 0] = (np.arange(total) % 256)[:, None, None]
            frames[..., 1] = (np.arange(total) // 256)[:, None, None]
            out = proc(
                videos=frames,
                video_metadata={"total_num_frames": total, "fps": fps},
                num_frames=num_frames,
                max_soft_tokens=70,
                input_data_format="channels_last",
                return_metadata=True,
                return_tensors="pt",
            )
            got = [int(i) for i in out["video_metadata"][0].frames_indices]
            assert got == idx, (total, fps, num_frames, got, idx)
            assert [float(t) for t in out["video_metadata"][0].timestamps] == ts
            entry["indices"] = idx
            entry["timestamps"] = ts
            entry["timestamp_strings"] = [mmss(t) for t in ts]
            records.append(entry)
    # fps-driven sampling.  In 5.23.0 an fps request never takes effect:
    # sample_frames() substitutes the default num_frames (32) when num_frames is
    # None, and the full preprocess call fills num_frames=32 in by default, then
    # refuses fps + num_frames together.  Recorded so a later change is visible.
    fps_records = []
    for total, fps in SAMPLING_VIDEOS:
        frames = np.zeros((total, 4, 4, 3), np.uint8)
        for target_fps in (1.0, 2.0):
            entry = {"total_num_frames": total, "fps": fps, "sample_fps": target_fps}
            meta = VideoMetadata(total_num_frames=total, fps=fps)
            try:
                idx = proc.sample_frames(metadata=meta, num_frames=None, fps=target_fps)
                idx = [int(i) for i in np.asarray(idx).reshape(-1)]
                meta.frames_indices = idx
                entry["sample_frames_indices"] = idx
            except ValueError as exc:
                entry["sample_frames_error"] = "ValueError: " + str(exc)
            for label, extra in (("full_call_fps", {}), ("full_call_fps_num_frames_none", {"num_frames": None})):
                try:
                    out = proc(
                        videos=frames,
                        video_metadata={"total_num_frames": total, "fps": fps},
                        fps=target_fps,
                        max_soft_tokens=70,
                        input_data_format="channels_last",
                        return_metadata=True,
                        return_tensors="pt",
                        **extra,
                    )
                    entry[label] = [int(i) for i in out["video_metadata"][0].frames_indices]
                except ValueError as exc:
                    entry[label] = "ValueError: " + str(exc)
            fps_records.append(entry)
    return records, fps_records


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(OUT_DIR, exist_ok=True)
    for fn in os.listdir(OUT_DIR):
        if fn.endswith(".npz") or fn.endswith(".json"):
            os.remove(os.path.join(OUT_DIR, fn))

    iproc = Gemma4UnifiedImageProcessor()
    vproc = Gemma4UnifiedVideoProcessor()
    assert iproc.max_soft_tokens == 280 and vproc.max_soft_tokens == 70
    assert vproc.num_frames == 32 and vproc.do_sample_frames

    budgets_used = set()
    for name, budget, items in IMAGE_CASES:
        info = make_image_case(name, budget, items, iproc)
        budgets_used.add(budget)
        print("image", info)
    assert budgets_used == {70, 140, 280, 560, 1120}, budgets_used
    for name, budget, frames in VIDEO_CASES:
        print("video", make_video_case(name, budget, frames, vproc))

    # behaviour notes checked here so a version bump that changes them is noticed
    unsupported = {}
    for b in (100, 0, 2240):
        try:
            iproc(images=[solid(8, 8, (1, 2, 3))], max_soft_tokens=b, input_data_format="channels_last")
            unsupported[str(b)] = "accepted"
        except ValueError:
            unsupported[str(b)] = "ValueError"
    try:
        vproc(videos=moving_square(4, 64, 96), input_data_format="channels_last")
        default_sampling_short_video = "accepted"
    except ValueError:
        default_sampling_short_video = "ValueError"
    try:
        iproc(images=[gray_ramp(8, 8)], input_data_format="channels_last")
        two_d_arrays = "accepted"
    except ValueError:
        two_d_arrays = "ValueError"
    # pre-sampled frames with no metadata: the processor's prompt falls back to fps=24
    out = video_call(vproc, moving_square(4, 64, 96), 70)
    meta = out["video_metadata"][0]
    no_meta = {
        "fps": meta.fps,
        "frames_indices": [int(i) for i in meta.frames_indices],
        "prompt_fps_fallback": 24,
        "timestamps_at_fallback_fps": [i / 24 for i in meta.frames_indices],
        "timestamp_strings_at_fallback_fps": [mmss(i / 24) for i in meta.frames_indices],
    }

    records, fps_records = make_sampling_record(vproc)
    doc = {
        "generator": "tools/make_processor_fixtures.py",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "torchvision": torchvision.__version__.split("+")[0],
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "sampling_function": "Gemma4UnifiedVideoProcessor.sample_frames(metadata=VideoMetadata(total_num_frames, fps), num_frames=n) -> transformers.video_utils.default_sample_indices_fn",
        "sampling_rule": "indices = arange(num_frames) * total_num_frames // num_frames; ValueError if num_frames > total_num_frames; with fps (and num_frames=None): num_frames = max(1, int(total_num_frames / video_fps * fps))",
        "timestamp_rule": "timestamps[i] = indices[i] / fps; prompt string f'{int(t // 60):02d}:{int(t % 60):02d}'",
        "default_num_frames": int(vproc.num_frames),
        "default_do_sample_frames": bool(vproc.do_sample_frames),
        "default_video_max_soft_tokens": int(vproc.max_soft_tokens),
        "default_image_max_soft_tokens": int(iproc.max_soft_tokens),
        "presampled_call": "Gemma4UnifiedVideoProcessor()(videos=frames_FHWC_uint8, do_sample_frames=False, max_soft_tokens=S, input_data_format='channels_last', return_tensors='pt', return_metadata=True)",
        "default_sampling_on_4_frame_video": default_sampling_short_video,
        "presampled_without_metadata": no_meta,
        "unsupported_budgets": unsupported,
        "image_processor_on_2d_numpy_array": two_d_arrays,
        "expected_errors": [
            r for r in records if "error" in r
        ],
        "num_frames_sampling": records,
        "fps_sampling_note": "fps-based sampling does not take effect in this version: sample_frames(num_frames=None, fps=x) falls back to num_frames=32; a full call with fps=x raises (num_frames defaults to 32 and the two are mutually exclusive)",
        "fps_sampling": fps_records,
    }
    with open(os.path.join(OUT_DIR, "video_sampling.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=False)
        fh.write("\n")

    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR))
    print(f"wrote {len(os.listdir(OUT_DIR))} files, {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
