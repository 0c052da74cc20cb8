"""Image -> model patches (Gemma4UnifiedImageProcessor).

  1. RGB, aspect-preserving resize to the largest sides that are multiples of 48 within the budget
  2. scale to [0, 1] (no mean/std: the embedder's LayerNorm does the normalising)
  3. patchify into 16 px patches, raster order, HWC inside a patch
  4. merge each 3x3 group of 16 px patches into one 48 px patch (= a direct 48 px patchify)
  5. (x, y) position of every 48 px patch
  6. pad to the budget with zero patches at position (-1, -1)
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .config import SOFT_TOKEN_BUDGETS

PATCH, KERNEL = 16, 3  # 16 px patches, merged 3x3 into 48 px model patches


def check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")


def budget_size(height: int, width: int, max_soft_tokens: int, patch: int = PATCH, k: int = KERNEL) -> tuple[int, int]:
    """Step 1's target (H, W): the largest multiples of k*patch with H*W <= max_soft_tokens * k^2 * patch^2,
    aspect kept. A side that rounds to 0 becomes one model patch, and the other the aspect ratio in model
    patches, capped at the budget. Mirrors `get_aspect_ratio_preserving_size`."""
    target_px = max_soft_tokens * k * k * patch * patch
    factor = math.sqrt(target_px / (height * width))
    side = k * patch
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise ValueError(f"cannot resize a {height}x{width} image to at least one {side} px patch")
    longest = max_soft_tokens * side  # (max_patches // k^2) model patches in a row
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    return h, w


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 -> [H, W, 3] uint8: transparency over white, as HF's torchvision path does it:
    c * a + (1 - a) on [0, 1] floats, back to 8 bits by truncating v * 255.999."""
    f = rgba.astype(np.float32) * np.float32(1 / 255)
    c, a = f[..., :3], f[..., 3:]
    return np.trunc((c * a + (np.float32(1) - a)) * np.float32(255.999)).astype(np.uint8)


def to_rgb_array(image) -> np.ndarray:
    """PIL image or array ([H, W] gray, [H, W, 1|3|4]) -> [H, W, 3] uint8. Transparency is composited
    onto white (HF's convert_to_rgb), for PIL images with PIL's alpha_composite."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image of shape [H, W], [H, W, 3] or [H, W, 4], got {list(a.shape)}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image has no pixels ({a.shape[0]}x{a.shape[1]})")
    return _composite_on_white(a) if a.shape[-1] == 4 else np.ascontiguousarray(a)


def resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] uint8 -> [height, width, 3] uint8, bicubic with antialiasing (Pillow; HF's torchvision
    resize agrees within 2/255). An image already at the target size is returned unchanged, as HF does."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, C] -> [(H/p) * (W/p), p * p * C]: raster order over patches, HWC order inside one."""
    H, W, C = image.shape
    grid = image.reshape(H // patch, patch, W // patch, patch, C).transpose(0, 2, 1, 3, 4)
    return grid.reshape(-1, patch * patch * C)


def merge_patches(patches: np.ndarray, rows: int, cols: int, k: int = KERNEL) -> np.ndarray:
    """[rows * cols, p*p*3] 16 px patches (raster) -> [rows/k * cols/k, (k*p)^2 * 3] merged patches (raster),
    each laid out HWC over its k*p x k*p pixels. Equals patchify(image, k*p) (tested)."""
    p = math.isqrt(patches.shape[-1] // 3)
    g = patches.reshape(rows // k, k, cols // k, k, p, p, 3)  # [R, a, Cc, b, y, x, c]
    g = g.transpose(0, 2, 1, 4, 3, 5, 6)  # [R, Cc, a, y, b, x, c]: pixel row a*p+y, pixel column b*p+x
    return g.reshape((rows // k) * (cols // k), (k * p) ** 2 * 3)


def patch_positions(rows: int, cols: int) -> np.ndarray:
    """-> [rows * cols, 2] int64 (x, y) of each model patch in raster order."""
    y, x = np.divmod(np.arange(rows * cols), cols)
    return np.stack([x, y], axis=-1).astype(np.int64)


def image_to_patches(image, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One image -> (patches [S, 6912] float32, positions [S, 2] int64, n real patches); S = max_soft_tokens."""
    rgb = to_rgb_array(image)
    h, w = budget_size(rgb.shape[0], rgb.shape[1], max_soft_tokens)  # 1
    pixels = resize(rgb, h, w).astype(np.float32) * np.float32(1 / 255)  # 1, 2
    small = patchify(pixels, PATCH)  # 3
    rows, cols = h // (PATCH * KERNEL), w // (PATCH * KERNEL)
    merged = merge_patches(small, rows * KERNEL, cols * KERNEL)  # 4
    n = rows * cols
    out = np.zeros((max_soft_tokens, merged.shape[1]), np.float32)  # 6
    pos = np.full((max_soft_tokens, 2), -1, np.int64)
    out[:n], pos[:n] = merged, patch_positions(rows, cols)  # 5
    return out, pos, n


def preprocess_images(images, max_soft_tokens: int = 280) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list of N images (HWC uint8 arrays or PIL) -> (pixel_values [N, S, 6912] float32,
    image_position_ids [N, S, 2] int64, num_soft_tokens [N] int64), S = max_soft_tokens."""
    check_budget(max_soft_tokens)
    if isinstance(images, (np.ndarray, Image.Image)):
        images = [images]
    done = [image_to_patches(im, max_soft_tokens) for im in images]
    if not done:
        raise ValueError("no images given")
    return (np.stack([d[0] for d in done]), np.stack([d[1] for d in done]),
            np.array([d[2] for d in done], np.int64))
