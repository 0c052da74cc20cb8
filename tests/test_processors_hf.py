"""Compare ``ref.preprocess_images`` / ``ref.preprocess_video`` with Hugging Face.

Every expected value in this module comes from the peer implementation,
Hugging Face transformers 5.23.0 (``Gemma4UnifiedImageProcessor`` and
``Gemma4UnifiedVideoProcessor`` with torch 2.14.1 / torchvision 0.29.1), via
the committed fixtures in ``tests/fixtures/processors/``.  Nothing here is
computed by this repository's own code.  To regenerate the fixtures (needs a
separate venv with torch/torchvision; CI never does this):

    python3 -m venv /tmp/venv_tv
    /tmp/venv_tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        transformers==5.23.0 numpy pillow
    /tmp/venv_tv/bin/python tools/make_processor_fixtures.py

The fixture layout is documented at the top of that script.  In short, each
``img_*.npz`` / ``vid_*.npz`` holds the uint8 input(s), the budget
(max_soft_tokens), HF's token counts, HF's full position ids (padding rows
included) and HF's valid pixel rows as uint8 (HF's float values are exact
multiples of 1/255, checked by the generator).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ref

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "processors"
IMAGE_FIXTURES = sorted(FIXTURE_DIR.glob("img_*.npz"))
VIDEO_FIXTURES = sorted(FIXTURE_DIR.glob("vid_*.npz"))
SAMPLING_JSON = FIXTURE_DIR / "video_sampling.json"

PATCH_DIM = 48 * 48 * 3
BUDGETS = (70, 140, 280, 560, 1120)

# Pixel tolerance: HF resizes with torchvision's antialiased bicubic on uint8
# tensors, ours with Pillow's bicubic; both are 8-bit results of the same
# kernel (a=-0.5, support scaled on downsampling) but round differently, so
# values may differ by a couple of 8-bit levels.  Allow 2/255 max abs
# (plus float slack).  Paths without a resize are expected to match exactly
# and still fall well within this bound.
PIXEL_ATOL = 2.0 / 255.0 + 1e-6


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _case_id(path: Path) -> str:
    return path.stem.split("_", 1)[1]


def _image_inputs(fx: dict[str, np.ndarray]) -> list:
    inputs = []
    for i in range(int(fx["n_images"])):
        arr = fx[f"input_{i}"]
        inputs.append(Image.fromarray(arr) if bool(fx[f"as_pil_{i}"]) else arr)
    return inputs


def _check_rows(
    what: str,
    pixels: np.ndarray,
    positions: np.ndarray,
    n_valid: int,
    want_positions: np.ndarray,
    want_pixels_u8: np.ndarray,
) -> None:
    """Compare one image/frame: [S, 6912] pixels and [S, 2] positions."""
    budget = want_positions.shape[0]
    assert pixels.shape == (budget, PATCH_DIM), f"{what}: pixel shape {pixels.shape}"
    assert positions.shape == (budget, 2), f"{what}: position shape {positions.shape}"

    # positions: exact, padding rows included (HF pads with (-1, -1))
    bad = np.nonzero(np.any(positions != want_positions, axis=-1))[0]
    assert bad.size == 0, (
        f"{what}: {bad.size} position rows differ, first at row {bad[0]}: "
        f"got {positions[bad[0]].tolist()} want {want_positions[bad[0]].tolist()}"
    )

    # valid pixel rows: within PIXEL_ATOL of HF
    want = want_pixels_u8.astype(np.float64) / 255.0
    diff = np.abs(pixels[:n_valid].astype(np.float64) - want)
    worst = float(diff.max()) if diff.size else 0.0
    if worst > PIXEL_ATOL:
        r, c = np.unravel_index(int(diff.argmax()), diff.shape)
        pytest.fail(
            f"{what}: max |pixel - HF| = {worst * 255:.3f}/255 at token {r}, value {c} "
            f"(got {pixels[r, c]:.6f}, want {want[r, c]:.6f}); "
            f"{int((diff > PIXEL_ATOL).sum())} values over {PIXEL_ATOL * 255:.0f}/255"
        )

    # padding rows (ours): all zero, positions (-1, -1)
    pad_pix = pixels[n_valid:]
    assert not np.any(pad_pix), f"{what}: padding pixel rows are not all zero"
    assert np.all(positions[n_valid:] == -1), f"{what}: padding positions are not (-1, -1)"


def test_fixtures_present_and_cover_all_budgets():
    assert len(IMAGE_FIXTURES) >= 20, f"image fixtures missing in {FIXTURE_DIR}"
    assert len(VIDEO_FIXTURES) >= 2, f"video fixtures missing in {FIXTURE_DIR}"
    budgets = {int(_load(p)["budget"]) for p in IMAGE_FIXTURES}
    assert budgets == set(BUDGETS)


def _check_batch(what, pixel_values, position_ids, budget, fx, label):
    """Our [N, budget, 6912] pixels and [N, budget, 2] positions against a fixture whose rows are HF's
    valid patches concatenated (`num_soft_tokens` per image or frame); label(i) names item i."""
    pixel_values, position_ids = np.asarray(pixel_values), np.asarray(position_ids)
    want_n = fx["num_soft_tokens"].astype(np.int64)
    assert pixel_values.dtype == np.float32, pixel_values.dtype
    assert position_ids.dtype == np.int64, position_ids.dtype
    assert pixel_values.shape == (len(want_n), budget, PATCH_DIM)
    assert position_ids.shape == (len(want_n), budget, 2)
    offsets = np.concatenate([[0], np.cumsum(want_n)])
    assert offsets[-1] == fx["pixels"].shape[0]
    for i in range(len(want_n)):
        _check_rows(f"{what}[{label(i)}]", pixel_values[i], position_ids[i], int(want_n[i]),
                    fx["position_ids"][i], fx["pixels"][offsets[i]:offsets[i + 1]])


@pytest.mark.parametrize("path", IMAGE_FIXTURES, ids=_case_id)
def test_preprocess_images_matches_hf(path: Path):
    fx = _load(path)
    assert str(fx["kind"]) == "image"
    budget = int(fx["budget"])
    pixel_values, position_ids, num_soft_tokens = ref.preprocess_images(_image_inputs(fx), max_soft_tokens=budget)
    assert len(fx["num_soft_tokens"]) == int(fx["n_images"])
    got_n = np.asarray(num_soft_tokens).reshape(-1).astype(np.int64)
    assert got_n.tolist() == fx["num_soft_tokens"].astype(np.int64).tolist(), "num_soft_tokens differ from HF"
    _check_batch(path.stem, pixel_values, position_ids, budget, fx, str)


@pytest.mark.parametrize("path", VIDEO_FIXTURES, ids=_case_id)
def test_preprocess_video_matches_hf(path: Path):
    fx = _load(path)
    assert str(fx["kind"]) == "video"
    budget = int(fx["budget"])
    assert len(fx["num_soft_tokens"]) == fx["frames"].shape[0]  # per frame
    pixel_values, position_ids, num_frames = ref.preprocess_video(fx["frames"], max_soft_tokens=budget)
    assert np.asarray(num_frames).reshape(-1).tolist() == fx["num_frames_per_video"].tolist()
    _check_batch(path.stem, pixel_values, position_ids, budget, fx, lambda t: f"frame {t}")


def test_image_default_budget_is_280():
    fx = _load(FIXTURE_DIR / "img_gradient_pil_280.npz")
    assert int(fx["budget"]) == 280
    pixel_values, position_ids, num_soft_tokens = ref.preprocess_images(_image_inputs(fx))
    assert np.asarray(pixel_values).shape == (1, 280, PATCH_DIM)
    assert np.asarray(num_soft_tokens).reshape(-1).tolist() == fx["num_soft_tokens"].tolist()
    np.testing.assert_array_equal(np.asarray(position_ids), fx["position_ids"])


def test_video_default_budget_is_70():
    fx = _load(FIXTURE_DIR / "vid_square_4x64x96_70.npz")
    assert int(fx["budget"]) == 70
    pixel_values, position_ids, _ = ref.preprocess_video(fx["frames"])
    assert np.asarray(pixel_values).shape == (4, 70, PATCH_DIM)
    np.testing.assert_array_equal(np.asarray(position_ids), fx["position_ids"])


@pytest.mark.parametrize("budget", [100, 0, 69, 2240])
def test_unsupported_budget_raises(budget: int):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError):
        ref.preprocess_images([image], max_soft_tokens=budget)
    with pytest.raises(ValueError):
        ref.preprocess_video(np.zeros((2, 32, 32, 3), np.uint8), max_soft_tokens=budget)


def test_video_sampling_json_is_well_formed():
    doc = json.loads(SAMPLING_JSON.read_text(encoding="utf-8"))
    assert doc["default_num_frames"] == 32
    assert doc["default_video_max_soft_tokens"] == 70
    assert doc["default_image_max_soft_tokens"] == 280
    records = doc["num_frames_sampling"]
    assert records
    combos = {(r["total_num_frames"], r["fps"]) for r in records}
    assert {(300, 30.0), (50, 25.0), (10, 24.0), (1000, 29.97)} <= combos
    for r in records:
        total, fps, n = r["total_num_frames"], r["fps"], r["num_frames"]
        if "error" in r:
            assert n > total, r  # HF refuses to sample more frames than exist
            continue
        idx, ts, strs = r["indices"], r["timestamps"], r["timestamp_strings"]
        assert len(idx) == len(ts) == len(strs) == n
        assert all(isinstance(i, int) and 0 <= i < total for i in idx)
        assert idx == sorted(set(idx))
        for i, t, s in zip(idx, ts, strs):
            assert t == pytest.approx(i / fps)
            mm, ss = s.split(":")
            assert len(mm) == 2 and len(ss) == 2 and 0 <= int(ss) < 60
    assert any(r["num_frames"] == 32 and "indices" in r for r in records)
