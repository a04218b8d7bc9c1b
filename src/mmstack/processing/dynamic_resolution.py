"""Image geometry for the bridge VLM: dynamic resolution and high-resolution tiling.

- ``dynamic_size``: keep the aspect ratio, align both sides to the patch size, and keep the number of
  patches between ``min_tokens`` and ``max_tokens`` (the rule of Qwen2-VL's ``smart_resize``, in patches).
- ``select_grid`` / ``tile_views``: LLaVA-NeXT's "anyres". Pick the grid of base-size tiles (at most
  ``max_tiles``) that keeps the most of the image's resolution with the least padding, then return a
  global view (the whole image at the base size) followed by the tiles, row by row.
"""

from __future__ import annotations

import math

from PIL import Image

from mmstack.errors import ConfigError

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def num_patches(width: int, height: int, patch_size: int) -> int:
    """Patches of a ``width`` x ``height`` view (both multiples of the patch size)."""
    return (width // patch_size) * (height // patch_size)


def dynamic_size(width: int, height: int, patch_size: int, max_tokens: int, min_tokens: int = 1) -> tuple[int, int]:
    """(width, height) to resize an image to: aspect ratio kept, sides multiples of ``patch_size``,
    ``min_tokens <= patches <= max_tokens``.

    Sides are first rounded to the nearest multiple of the patch size; if that gives too many patches
    the image is scaled down (rounding down), if too few it is scaled up (rounding up).
    """
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tokens <= max_tokens:
        raise ConfigError(f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    p = patch_size
    w = max(p, round(width / p) * p)
    h = max(p, round(height / p) * p)
    if (w // p) * (h // p) > max_tokens:
        beta = math.sqrt(width * height / (max_tokens * p * p))
        w = max(p, math.floor(width / beta / p) * p)
        h = max(p, math.floor(height / beta / p) * p)
    elif (w // p) * (h // p) < min_tokens:
        beta = math.sqrt(min_tokens * p * p / (width * height))
        w = math.ceil(width * beta / p) * p
        h = math.ceil(height * beta / p) * p
    # An extreme aspect ratio can clamp one side at one patch; trim the other side to stay within budget.
    if (w // p) * (h // p) > max_tokens:
        if w >= h:
            w = max(p, max_tokens // (h // p) * p)
        else:
            h = max(p, max_tokens // (w // p) * p)
    return w, h


def select_grid(width: int, height: int, base: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of base-size tiles that best fit the image (LLaVA-NeXT's ``select_best_resolution``).

    Maximise the effective resolution (image pixels kept after fitting into the grid, capped at the
    original), then minimise wasted (padded) area.
    """
    if max_tiles < 1:
        raise ConfigError(f"max_tiles must be >= 1, got {max_tiles}")
    best, best_key = (1, 1), (-1.0, 0.0)
    for cols in range(1, max_tiles + 1):
        for rows in range(1, max_tiles // cols + 1):
            gw, gh = cols * base, rows * base
            scale = min(gw / width, gh / height)
            effective = min(width * height * scale * scale, width * height)
            waste = gw * gh - effective
            key = (effective, -waste)
            if key > best_key:
                best, best_key = (cols, rows), key
    return best


def resize_and_pad(img: Image.Image, width: int, height: int, resample: str = "bicubic", fill=(0, 0, 0)) -> Image.Image:
    """Fit ``img`` into ``width`` x ``height`` keeping its aspect ratio; centre it on a ``fill`` canvas."""
    scale = min(width / img.width, height / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(img.resize((w, h), RESAMPLE[resample]), ((width - w) // 2, (height - h) // 2))
    return canvas


def tile_views(
    img: Image.Image, base: int, max_tiles: int, resample: str = "bicubic", fill=(0, 0, 0)
) -> list[Image.Image]:
    """A global view (the image squashed to ``base`` x ``base``) then the tiles of the best grid, row-major.

    A 1x1 grid gives the global view only (a tile would repeat it).
    """
    views = [img.resize((base, base), RESAMPLE[resample])]
    cols, rows = select_grid(img.width, img.height, base, max_tiles)
    if cols * rows == 1:
        return views
    big = resize_and_pad(img, cols * base, rows * base, resample, fill)
    for r in range(rows):
        for c in range(cols):
            views.append(big.crop((c * base, r * base, (c + 1) * base, (r + 1) * base)))
    return views
