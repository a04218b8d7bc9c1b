"""Shapes-world speed and parser accuracy (one core, no torch).

Speed: scenes/s for sampling + rendering at 64 px (the target is >= 1,000/s on one core), for the full
per-scene work of ``generate`` without PNG writing (captions, questions, preference pairs), and for a
whole ``generate_world`` run including PNG writing. Accuracy: the parser on noisy rendered scenes with and
without rotation and texture, and on blurred images (a stand-in for generated ones).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import ImageFilter

from mmstack.world import (
    captions_for,
    generate_world,
    parse_image,
    preference_pairs_for,
    questions_for,
    render_scene,
    sample_scene,
)
from mmstack.world.scene import scene_rng


def _rate(fn: Callable[[int], object], n: int, repeats: int = 3) -> float:
    """Best items/s over ``repeats`` runs of ``fn(i)`` for i in range(n) (best: other jobs share the cores)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def _render_only(i: int, noise: float = 0.0) -> None:
    rng = scene_rng(0, "train", i)
    render_scene(sample_scene(rng), 64, noise=noise, seed=i)


def _full_record(i: int) -> None:
    rng = scene_rng(0, "train", i)
    scene = sample_scene(rng)
    render_scene(scene, 64, seed=rng.getrandbits(32))
    rng.choice(captions_for(scene, complete_only=True))
    captions_for(scene)
    questions_for(scene, rng)
    preference_pairs_for(scene, rng)


def _generate_rate(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_world(Path(tmp) / "w", n=n, seed=0)
        return n / (time.perf_counter() - t0)


def parser_accuracy(n: int, seed: int = 100, transform=None, **render) -> dict[str, float]:
    """Fraction of objects read fully right (shape, colour and cell), sizes right, and spurious objects."""
    right = sizes = total = extra = 0
    t0 = time.perf_counter()
    for i in range(n):
        scene = sample_scene(scene_rng(seed, "val", i), "val")
        img = render_scene(scene, seed=i, **render)
        found = parse_image(transform(img) if transform else img)
        by_cell = {p.cell: p for p in found}
        extra += max(0, len(found) - len(scene))
        for o in scene.objects:
            total += 1
            p = by_cell.get(o.cell)
            right += bool(p and (p.shape, p.colour) == (o.shape, o.colour))
            sizes += bool(p and p.size == o.size)
    return {
        "objects": total,
        "accuracy": round(right / total, 4),
        "size_accuracy": round(sizes / total, 4),
        "spurious": extra,
        "ms_per_image": round(1000 * (time.perf_counter() - t0) / n, 2),
    }


def run(quick: bool) -> dict:
    """Speeds (scenes/s) and parser accuracies; ``quick`` uses small sizes."""
    n_speed, n_gen, n_parse = (300, 200, 60) if quick else (3000, 2000, 500)
    random.seed(0)
    blur = lambda im: im.filter(ImageFilter.GaussianBlur(1.0))  # noqa: E731
    return {
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "image_size": 64,
        "scenes_per_s_render_only": round(_rate(_render_only, n_speed)),
        "scenes_per_s_render_noise": round(_rate(lambda i: _render_only(i, 0.05), n_speed)),
        "scenes_per_s_full_record_no_png": round(_rate(_full_record, n_speed)),
        "scenes_per_s_generate_with_png": round(_generate_rate(n_gen)),
        "parser": {
            "noise_0.05": parser_accuracy(n_parse, noise=0.05),
            "noise_0.10": parser_accuracy(n_parse, noise=0.10),
            "noise_0.05_rotation": parser_accuracy(n_parse, noise=0.05, rotation=True),
            "noise_0.05_texture": parser_accuracy(n_parse, noise=0.05, texture=True),
            "noise_0.05_rotation_texture": parser_accuracy(n_parse, noise=0.05, rotation=True, texture=True),
            "blur_1.0": parser_accuracy(n_parse, noise=0.02, transform=blur),
        },
    }
