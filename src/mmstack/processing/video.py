"""Video frames for the bridge VLM: pick K frames of a clip, evenly spread over its length."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mmstack.errors import ConfigError, DataError


def sample_frame_indices(n_frames: int, k: int) -> list[int]:
    """Indices of ``k`` frames out of ``n_frames``: the centre of each of ``k`` equal segments (TSN).

    Always includes frames near both ends, so motion over the whole clip is visible; with fewer frames
    than ``k`` some frames repeat (the output always has ``k`` indices, in order).
    """
    if k <= 0:
        raise ConfigError(f"frames to sample must be > 0, got {k}")
    if n_frames <= 0:
        raise DataError("a clip has no frames")
    return [min(n_frames - 1, int((i + 0.5) * n_frames / k)) for i in range(k)]


def load_frames(paths: Sequence[str | Path], k: int) -> list[Image.Image]:
    """Load ``k`` evenly spread frames of a clip given as a list of frame image paths."""
    from mmstack.data.images import load_image

    return [load_image(paths[i]) for i in sample_frame_indices(len(paths), k)]
