"""Rendering scenes to images: PIL polygons on a plain or textured grey background, optional noise.

Deterministic: the same scene, size, options and seed give the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

from mmstack.errors import ConfigError
from mmstack.world.scene import Scene, WorldObject
from mmstack.world.shapes import shape_polygon
from mmstack.world.vocab import BACKGROUND, COLOURS

TEXTURES = ("stripes", "checker", "gradient", "blotches")
MIN_IMAGE_SIZE = 16


def check_size(width: int, height: int) -> None:
    """Raise ``ConfigError`` for images too small to hold a 3x3 grid of recognisable objects."""
    if width < MIN_IMAGE_SIZE or height < MIN_IMAGE_SIZE:
        raise ConfigError(f"--image-size must be >= {MIN_IMAGE_SIZE} px in both dimensions; got {width}x{height}")


def texture_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A grey (zero-chroma) texture as a (H, W, 3) uint8 array: stripes, checker, gradient or blotches."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(5, 14) * min(width, height) / 64
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
    elif kind == "checker":
        cell = max(2, int(rng.integers(4, 11) * min(width, height) / 64))
        wave = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = (xx / width - 0.5) * np.cos(theta) + (yy / height - 0.5) * np.sin(theta)
        wave = t * 2.5
    else:
        coarse = rng.uniform(-1, 1, size=(5, 5)).astype(np.float32)
        small = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8), mode="L")
        wave = np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    amplitude = rng.uniform(12, 28)
    grey = np.clip(BACKGROUND[0] + 22 + amplitude * wave, 0, 110).astype(np.uint8)  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)


def draw_object(
    draw: ImageDraw.ImageDraw, obj: WorldObject, width: int, height: int, rotation: bool, scale: int = 1
) -> None:
    """Draw ``obj`` filled with its colour; ``scale`` > 1 draws onto a supersampled canvas."""
    cx, cy = obj.centre_px(width, height)
    pts = shape_polygon(
        obj.shape, cx * scale, cy * scale, obj.radius_px(width, height) * scale, obj.angle if rotation else 0.0
    )
    draw.polygon(pts, fill=COLOURS[obj.colour])


def add_noise(img: Image.Image, noise: float, rng: np.random.Generator) -> Image.Image:
    """Add i.i.d. Gaussian pixel noise with standard deviation ``noise`` (fraction of the 0-255 range)."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * (noise * 255.0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def render_objects(
    objects: Iterable[WorldObject],
    width: int,
    height: int,
    noise: float = 0.0,
    rotation: bool = False,
    texture: bool = False,
    seed: int = 0,
    antialias: bool = False,
) -> Image.Image:
    """Render objects (their own cells and jitter) into a ``width`` x ``height`` RGB image."""
    check_size(width, height)
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"--noise must be in [0, 1] (a fraction of the pixel range); got {noise}")
    rng = np.random.default_rng(seed) if (noise > 0 or texture) else None
    scale = 4 if antialias else 1
    if texture:
        bg = texture_background(width, height, rng)
        img = Image.fromarray(bg, mode="RGB")
        if scale > 1:
            img = img.resize((width * scale, height * scale), Image.NEAREST)
    else:
        img = Image.new("RGB", (width * scale, height * scale), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        draw_object(draw, obj, width, height, rotation, scale)
    if scale > 1:
        img = img.resize((width, height), Image.BOX)
    if noise > 0:
        img = add_noise(img, noise, rng)
    return img


def render_scene(
    scene: Scene,
    width: int = 64,
    height: int | None = None,
    noise: float = 0.0,
    rotation: bool = False,
    texture: bool = False,
    seed: int = 0,
    antialias: bool = False,
) -> Image.Image:
    """Render ``scene`` as an RGB image of ``width`` x ``height`` (square when ``height`` is None).

    Args:
        noise: standard deviation of Gaussian pixel noise as a fraction of 255 (0 = clean).
        rotation: rotate each object by its sampled ``angle``.
        texture: a grey textured background instead of a plain one.
        seed: seeds the noise and texture, so the output is deterministic.
        antialias: draw at 4x and downsample (smoother edges; the parser copes with both).
    """
    return render_objects(
        scene.objects, width, width if height is None else height, noise, rotation, texture, seed, antialias
    )
