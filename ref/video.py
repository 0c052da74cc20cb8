"""Video frames -> model patches (Gemma4UnifiedVideoProcessor): every frame through the image path
(`ref.image`) at 70 soft tokens by default; the frames of all videos concatenated on one axis."""

from __future__ import annotations

import numpy as np

from .image import check_budget, image_to_patches


def preprocess_video(videos, max_soft_tokens: int = 70) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[F, H, W, 3] uint8 (or a list of such videos) -> (pixel_values_videos [sum F, S, 6912] float32,
    video_position_ids [sum F, S, 2] int64, num_frames_per_video [num videos] int64), S = max_soft_tokens."""
    check_budget(max_soft_tokens)
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    patches, positions, counts = [], [], []
    for video in videos:
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[0] == 0:
            raise ValueError(f"expected video frames of shape [F, H, W, 3] with F >= 1, got {list(video.shape)}")
        for frame in video:
            p, pos, _ = image_to_patches(frame, max_soft_tokens)
            patches.append(p)
            positions.append(pos)
        counts.append(len(video))
    if not counts:
        raise ValueError("no video given")
    return np.stack(patches), np.stack(positions), np.array(counts, np.int64)
