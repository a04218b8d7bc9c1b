"""The parser reads rendered (and degraded) shapes-world images back into objects."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmstack.errors import ImageError
from mmstack.world import parse_image, render_scene, sample_scenes
from mmstack.world.parser import connected_components


def _accuracy(scenes, transform=lambda im: im, **render) -> tuple[float, float, int]:
    """(objects fully right: shape+colour+cell, sizes right, spurious objects) over ``scenes``."""
    right = sizes = extra = total = 0
    for i, scene in enumerate(scenes):
        found = parse_image(transform(render_scene(scene, seed=i, **render)))
        by_cell = {p.cell: p for p in found}
        extra += max(0, len(found) - len(scene))
        for o in scene.objects:
            total += 1
            p = by_cell.get(o.cell)
            right += bool(p and (p.shape, p.colour) == (o.shape, o.colour))
            sizes += bool(p and p.size == o.size)
    return right / total, sizes / total, extra


def test_parser_reads_noisy_scenes_at_least_99_percent():
    acc, size_acc, extra = _accuracy(sample_scenes(300, seed=11), noise=0.05)
    assert acc >= 0.99 and size_acc >= 0.99 and extra == 0, (acc, size_acc, extra)


def test_parser_copes_with_rotation_texture_and_other_aspects():
    scenes = sample_scenes(60, seed=12)
    assert _accuracy(scenes, noise=0.05, rotation=True)[0] >= 0.98
    assert _accuracy(scenes, noise=0.05, texture=True)[0] >= 0.98
    assert _accuracy(scenes, noise=0.05, width=96, height=48)[0] >= 0.97
    assert _accuracy(scenes, noise=0.03, antialias=True)[0] >= 0.97


def test_parser_degrades_gracefully_on_blurry_speckled_images():
    scenes = sample_scenes(60, seed=13)
    blurred = _accuracy(scenes, lambda im: im.filter(ImageFilter.GaussianBlur(0.7)), noise=0.03)
    assert blurred[0] >= 0.95 and blurred[2] == 0

    def speckle(im):
        arr = np.array(im)
        rng = np.random.default_rng(0)
        ys, xs = rng.integers(0, 64, (2, 40))
        arr[ys, xs] = rng.integers(0, 256, (40, 3))
        return Image.fromarray(arr)

    speckled = _accuracy(scenes, speckle)
    assert speckled[0] >= 0.99 and speckled[2] == 0


def test_parser_reports_geometry():
    scene = sample_scenes(1, seed=14)[0]
    found = parse_image(render_scene(scene, 64))
    for o, p in zip(sorted(scene.objects, key=lambda o: o.cell), sorted(found, key=lambda p: p.cell), strict=True):
        cx, cy = o.centre_px(64, 64)
        x0, y0, x1, y1 = p.bbox
        assert x0 <= cx <= x1 and y0 <= cy <= y1 and p.area > 10 and 0.8 < p.score <= 1.0


def test_blank_image_has_no_objects_and_arrays_work():
    assert parse_image(Image.new("RGB", (64, 64), (24, 24, 24))) == []
    arr = np.asarray(render_scene(sample_scenes(1, seed=0)[0]))
    assert len(parse_image(arr)) == len(sample_scenes(1, seed=0)[0])


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.45
    labels, count = connected_components(mask)
    # Reference: breadth-first flood fill with 8-connectivity.
    ref, seen, n = {}, set(), 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if (y, x) in seen:
            continue
        stack = [(y, x)]
        seen.add((y, x))
        while stack:
            cy, cx = stack.pop()
            ref[(cy, cx)] = n
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < 40 and 0 <= nx < 50 and mask[ny, nx] and (ny, nx) not in seen:
                        seen.add((ny, nx))
                        stack.append((ny, nx))
        n += 1
    assert count == n
    pairs = {(ref[(y, x)], int(labels[y, x])) for y, x in ref}
    assert len(pairs) == n and (labels[~mask] == -1).all()


def test_bad_image_inputs_give_image_errors(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        parse_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        parse_image(junk)
