"""Scenes: 1-4 objects on a 3x3 grid (at most one per cell), sampled per split from seeded streams."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mmstack.errors import ConfigError
from mmstack.world.vocab import (
    ALL_PAIRS,
    CELLS,
    HELD_OUT_PAIRS,
    RELATIONS,
    SEEN_PAIRS,
    SIZE_RADIUS,
    SIZES,
    SPLITS,
    cell_index,
    derive_seed,
    is_held_out,
)


def as_random(rng: Any) -> random.Random:
    """Accept a ``random.Random``, an int seed or a ``numpy.random.Generator`` and return a ``random.Random``.

    Scalar sampling uses Python's ``random`` because it is several times faster than NumPy per call.
    """
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int):
        return random.Random(rng)
    if hasattr(rng, "integers"):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    raise TypeError(f"rng must be random.Random, int or numpy Generator, got {type(rng).__name__}")


def check_split(split: str) -> str:
    """Return ``split`` or raise ``ConfigError`` listing the valid ones."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    return split


@dataclass(frozen=True)
class WorldObject:
    """One object: what it is, its grid cell, and where exactly it sits inside the cell.

    ``jx``/``jy`` in [-1, 1] place the centre within the free room of the cell (so the geometry adapts to any
    image size and aspect); ``angle`` (degrees, clockwise) is used only when rendering with rotation.
    """

    shape: str
    colour: str
    size: str
    cell: str
    jx: float = 0.0
    jy: float = 0.0
    angle: float = 0.0

    @property
    def row(self) -> int:
        return cell_index(self.cell)[0]

    @property
    def col(self) -> int:
        return cell_index(self.cell)[1]

    @property
    def name(self) -> str:
        """'red circle': the canonical short answer that names the object."""
        return f"{self.colour} {self.shape}"

    def radius_px(self, width: int, height: int) -> float:
        """Circumradius in pixels for an image of ``width`` x ``height``."""
        return SIZE_RADIUS[self.size] * min(width, height) / 3

    def centre_px(self, width: int, height: int) -> tuple[float, float]:
        """Centre in pixels: cell centre plus jitter within the room left by the radius and a margin."""
        cw, ch = width / 3, height / 3
        r = self.radius_px(width, height)
        margin = max(1.0, 0.04 * min(cw, ch))
        room_x, room_y = max(0.0, cw / 2 - r - margin), max(0.0, ch / 2 - r - margin)
        row, col = cell_index(self.cell)
        return (col + 0.5) * cw + self.jx * room_x, (row + 0.5) * ch + self.jy * room_y

    def to_dict(self, width: int | None = None, height: int | None = None) -> dict[str, Any]:
        """JSON-ready fields; with an image size also the pixel centre and radius."""
        row, col = cell_index(self.cell)
        d: dict[str, Any] = {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "cell": self.cell,
            "row": row,
            "col": col,
            "jitter": [self.jx, self.jy],  # unrounded, so Scene.from_dict restores the exact scene
            "angle": self.angle,
        }
        if width is not None and height is not None:
            cx, cy = self.centre_px(width, height)
            d["centre"] = [round(cx / width, 4), round(cy / height, 4)]
            d["centre_px"] = [round(cx, 2), round(cy, 2)]
            d["radius_px"] = round(self.radius_px(width, height), 2)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldObject:
        jx, jy = d.get("jitter", (0.0, 0.0))
        return cls(d["shape"], d["colour"], d["size"], d["cell"], float(jx), float(jy), float(d.get("angle", 0.0)))


def relation_holds(a: WorldObject, b: WorldObject, relation: str) -> bool:
    """Whether ``a <relation> b`` holds, judged on grid cells (e.g. 'left of': a's column < b's)."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


@dataclass(frozen=True)
class Scene:
    """A scene: its objects in sampling order (cells are distinct)."""

    objects: tuple[WorldObject, ...]

    def __len__(self) -> int:
        return len(self.objects)

    def relations(self) -> list[tuple[int, str, int]]:
        """All (i, relation, j) facts between distinct objects."""
        return [
            (i, rel, j)
            for i, a in enumerate(self.objects)
            for j, b in enumerate(self.objects)
            if i != j
            for rel in RELATIONS
            if relation_holds(a, b, rel)
        ]

    def has_held_out(self) -> bool:
        return any(is_held_out(o.shape, o.colour) for o in self.objects)

    def to_dict(self, width: int | None = None, height: int | None = None) -> dict[str, Any]:
        return {"objects": [o.to_dict(width, height) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(tuple(WorldObject.from_dict(o) for o in d["objects"]))


def _sample_object(rng: random.Random, cell: str, pair: tuple[str, str]) -> WorldObject:
    size = rng.choice(SIZES)
    return WorldObject(
        shape=pair[0],
        colour=pair[1],
        size=size,
        cell=cell,
        jx=rng.uniform(-1.0, 1.0),
        jy=rng.uniform(-1.0, 1.0),
        angle=rng.uniform(0.0, 360.0),
    )


def sample_scene(rng: Any, split: str = "train", min_objects: int = 1, max_objects: int = 4) -> Scene:
    """Sample one scene of ``split``.

    train/val never use a held-out (shape, colour) pair; every compositional scene has at least one.
    """
    check_split(split)
    if not 1 <= min_objects <= max_objects <= len(CELLS):
        raise ConfigError(f"need 1 <= min_objects <= max_objects <= 9; got {min_objects}, {max_objects}")
    rng = as_random(rng)
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(CELLS, n)
    if split == "compositional":
        pairs = [rng.choice(HELD_OUT_PAIRS)] + [rng.choice(ALL_PAIRS) for _ in range(n - 1)]
    else:
        pairs = [rng.choice(SEEN_PAIRS) for _ in range(n)]
    return Scene(tuple(_sample_object(rng, cell, pair) for cell, pair in zip(cells, pairs, strict=True)))


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The RNG of scene ``index``: one independent stream per (seed, split, index), so any scene can be
    regenerated alone and val differs from train under the same seed."""
    return random.Random(derive_seed("scene", int(seed), split, int(index)))


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """The first ``n`` scenes of (seed, split): the same scenes ``generate_world`` writes."""
    check_split(split)
    return [sample_scene(scene_rng(seed, split, i), split) for i in range(n)]
