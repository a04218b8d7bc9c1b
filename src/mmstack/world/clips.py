"""Short clips: 1-2 objects moving in straight lines (8 directions), with captions and motion questions.

Positions are continuous (normalised image coordinates, y down), not tied to grid cells. Paths are
sampled so that objects stay inside the frame and never overlap in any frame.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from mmstack.errors import ConfigError
from mmstack.world.language import join_list
from mmstack.world.questions import Question
from mmstack.world.render import add_noise, check_size, texture_background
from mmstack.world.scene import as_random, check_split
from mmstack.world.shapes import shape_polygon
from mmstack.world.vocab import ALL_PAIRS, BACKGROUND, COLOURS, HELD_OUT_PAIRS, MOTIONS, SEEN_PAIRS, SIZES

# Radius as a fraction of min(width, height): the grid sizes of a scene (cell = 1/3 of the image).
CLIP_RADIUS = {"small": 0.09, "large": 0.14}
MOTION_PHRASES = {
    "left": "moves to the left",
    "right": "moves to the right",
    "up": "moves up",
    "down": "moves down",
    "up left": "moves up and to the left",
    "up right": "moves up and to the right",
    "down left": "moves down and to the left",
    "down right": "moves down and to the right",
}


@dataclass(frozen=True)
class ClipObject:
    """A moving object: it travels in a straight line from ``start`` to ``end`` (normalised x, y)."""

    shape: str
    colour: str
    size: str
    motion: str
    start: tuple[float, float]
    end: tuple[float, float]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def position(self, t: float) -> tuple[float, float]:
        """Normalised centre at time ``t`` in [0, 1]."""
        return self.start[0] + t * (self.end[0] - self.start[0]), self.start[1] + t * (self.end[1] - self.start[1])

    def to_dict(self, n_frames: int) -> dict[str, Any]:
        track = [self.position(i / (n_frames - 1)) for i in range(n_frames)]
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "motion": self.motion,
            "start": [round(v, 4) for v in self.start],
            "end": [round(v, 4) for v in self.end],
            "trajectory": [[round(x, 4), round(y, 4)] for x, y in track],
        }


@dataclass(frozen=True)
class Clip:
    """A clip: its moving objects and its number of frames."""

    objects: tuple[ClipObject, ...]
    n_frames: int = 8


def _sample_path(rng: random.Random, size: str, motion: str) -> tuple[tuple[float, float], tuple[float, float]]:
    r = CLIP_RADIUS[size] + 0.02  # keep a margin from the border
    dx, dy = MOTIONS[motion]
    dist = rng.uniform(0.3, 0.5) / (math.sqrt(2) if dx and dy else 1.0)
    lo_x, hi_x = r + max(0.0, -dx * dist), 1 - r - max(0.0, dx * dist)
    lo_y, hi_y = r + max(0.0, -dy * dist), 1 - r - max(0.0, dy * dist)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    return (x0, y0), (x0 + dx * dist, y0 + dy * dist)


def _apart(a: ClipObject, b: ClipObject, n_frames: int) -> bool:
    """No overlap in any frame (radii in min-dimension units bound the normalised distance on any aspect)."""
    need = CLIP_RADIUS[a.size] + CLIP_RADIUS[b.size] + 0.04
    return all(
        math.dist(a.position(i / (n_frames - 1)), b.position(i / (n_frames - 1))) > need for i in range(n_frames)
    )


def _clip_pairs(rng: random.Random, split: str, n: int) -> list[tuple[str, str]]:
    if split == "compositional":
        return [rng.choice(HELD_OUT_PAIRS)] + [rng.choice(ALL_PAIRS) for _ in range(n - 1)]
    return [rng.choice(SEEN_PAIRS) for _ in range(n)]


def sample_clip(rng: Any, n_frames: int = 8, split: str = "train", max_objects: int = 2) -> Clip:
    """Sample a clip of 1-``max_objects`` moving objects with distinct (colour, shape) names.

    Held-out pairs follow the scene rules: never in train/val, at least one per compositional clip.
    """
    check_split(split)
    if n_frames < 2:
        raise ConfigError(f"--clip-frames must be >= 2 (a clip needs motion); got {n_frames}")
    rng = as_random(rng)
    n = rng.randint(1, max_objects)
    while True:
        pairs = _clip_pairs(rng, split, n)
        if len(set(pairs)) < n:
            continue
        objs = []
        for shape, colour in pairs:
            size, motion = rng.choice(SIZES), rng.choice(tuple(MOTIONS))
            start, end = _sample_path(rng, size, motion)
            objs.append(ClipObject(shape, colour, size, motion, start, end))
        if all(_apart(a, b, n_frames) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            return Clip(tuple(objs), n_frames)


def render_clip(
    clip: Clip, width: int = 64, height: int | None = None, noise: float = 0.0, texture: bool = False, seed: int = 0
) -> list[Image.Image]:
    """Render every frame of ``clip`` (same background in all frames, fresh noise per frame)."""
    import numpy as np

    height = width if height is None else height
    check_size(width, height)
    rng = np.random.default_rng(seed)
    bg = Image.fromarray(texture_background(width, height, rng), mode="RGB") if texture else None
    unit = min(width, height)
    frames = []
    for i in range(clip.n_frames):
        img = bg.copy() if bg is not None else Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for obj in clip.objects:
            x, y = obj.position(i / (clip.n_frames - 1))
            draw.polygon(
                shape_polygon(obj.shape, x * width, y * height, CLIP_RADIUS[obj.size] * unit), fill=COLOURS[obj.colour]
            )
        frames.append(add_noise(img, noise, rng) if noise > 0 else img)
    return frames


def clip_captions(clip: Clip) -> list[str]:
    """'the red circle moves to the right' (and the same with sizes, and 'a ... and a ...' for two)."""
    plain = join_list([f"the {o.name} {MOTION_PHRASES[o.motion]}" for o in clip.objects])
    sized = join_list([f"the {o.size} {o.name} {MOTION_PHRASES[o.motion]}" for o in clip.objects])
    return [plain, sized]


def _along(a: str, b: str) -> bool:
    """Whether motion ``a`` has a component along motion ``b`` (positive dot product)."""
    (ax, ay), (bx, by) = MOTIONS[a], MOTIONS[b]
    return ax * bx + ay * by > 0


def clip_questions(clip: Clip, rng: Any) -> list[Question]:
    """Motion questions: which way an object moves (open and yes/no), and what moves in a direction.

    To stay unambiguous, a 'no' asks about a direction with no component along the true motion, and
    'what moves to the left?' is asked only when exactly one object has any leftward component.
    """
    rng = as_random(rng)
    out = []
    for obj in clip.objects:
        out.append(Question(f"Which way does the {obj.name} move?", obj.motion, "motion"))
        asked = obj.motion if rng.random() < 0.5 else rng.choice([m for m in MOTIONS if not _along(m, obj.motion)])
        phrase = MOTION_PHRASES[asked].removeprefix("moves ")
        out.append(Question(f"Does the {obj.name} move {phrase}?", "yes" if asked == obj.motion else "no", "motion"))
    for motion in sorted({o.motion for o in clip.objects}):
        movers = [o for o in clip.objects if _along(o.motion, motion)]
        if len(movers) == 1:
            phrase = MOTION_PHRASES[motion].removeprefix("moves ")
            out.append(Question(f"What moves {phrase}?", movers[0].name, "motion"))
    out.append(Question("How many objects are moving?", str(len(clip.objects)), "count"))
    return out
