"""The shapes-world vocabulary: shapes, colours, sizes, grid cells, relations, motions, held-out pairs.

Everything else in ``mmstack.world`` (and the models trained on it) names things with these words, so the
lists are data and their order is part of the generator version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

GENERATOR_VERSION = "1.0"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")

# Saturated colours, pairwise at least ~100 apart in RGB, so nearest-palette classification survives noise
# and blur; the background is grey (zero chroma), which is how the parser tells objects from background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (235, 230, 40),
    "green": (30, 180, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 230),
    "purple": (140, 50, 210),
    "pink": (245, 110, 190),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND: tuple[int, int, int] = (24, 24, 24)

SIZES: tuple[str, ...] = ("small", "large")
# Circumradius of an object as a fraction of min(cell width, cell height); a rotated object stays in its cell.
SIZE_RADIUS: dict[str, float] = {"small": 0.27, "large": 0.42}

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
CELLS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MOTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates: y grows downwards
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up left": (-1, -1),
    "up right": (1, -1),
    "down left": (-1, 1),
    "down right": (1, 1),
}

SPLITS: tuple[str, ...] = ("train", "val", "compositional")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
PLURALS: dict[str, str] = {s: s + "es" if s.endswith(("ss", "x", "sh", "ch")) else s + "s" for s in SHAPES}
PLURALS["cross"] = "crosses"

# Held-out (shape, colour) pairs of the compositional split: shape i with colour (3*i + 1) mod 8. Every shape
# and every colour is held out exactly once (8 of 64 pairs, 12.5%), so a model still sees each word in train.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (shape, COLOUR_NAMES[(3 * i + 1) % len(COLOUR_NAMES)]) for i, shape in enumerate(SHAPES)
)
_HELD_OUT = frozenset(HELD_OUT_PAIRS)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((s, c) for s in SHAPES for c in COLOUR_NAMES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in _HELD_OUT)  # train and val


def is_held_out(shape: str, colour: str) -> bool:
    """Whether (shape, colour) is one of the compositional split's held-out pairs."""
    return (shape, colour) in _HELD_OUT


def cell_name(row: int, col: int) -> str:
    """The cell name of grid position (row, col), each in 0..2."""
    return CELLS[3 * row + col]


_CELL_POS: dict[str, tuple[int, int]] = {c: divmod(i, 3) for i, c in enumerate(CELLS)}


def cell_index(cell: str) -> tuple[int, int]:
    """(row, col) of a cell name."""
    return _CELL_POS[cell]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (no PYTHONHASHSEED dependence)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Vocabulary:
    """The world's words in one object (``WORLD``), for code that wants them together."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOUR_NAMES
    sizes: tuple[str, ...] = SIZES
    cells: tuple[str, ...] = CELLS
    relations: tuple[str, ...] = RELATIONS
    motions: tuple[str, ...] = tuple(MOTIONS)
    splits: tuple[str, ...] = SPLITS

    @property
    def colour_rgb(self) -> dict[str, tuple[int, int, int]]:
        return dict(COLOURS)

    def to_dict(self) -> dict:
        """JSON-ready vocabulary (colours with their RGB values), as written to ``world.json``."""
        return {
            "shapes": list(self.shapes),
            "colours": {c: list(COLOURS[c]) for c in self.colours},
            "sizes": list(self.sizes),
            "cells": list(self.cells),
            "relations": list(self.relations),
            "motions": list(self.motions),
            "splits": list(self.splits),
            "background": list(BACKGROUND),
        }


WORLD = Vocabulary()
