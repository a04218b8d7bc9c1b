"""Shape outlines as polygons in unit coordinates (circumradius <= 1, y downwards).

Rendering and the parser share ``shape_polygon``, so a template drawn by the parser is rasterised exactly
like the object it is compared with.
"""

from __future__ import annotations

import math
from functools import cache

from mmstack.world.vocab import SHAPES

Point = tuple[float, float]


def _regular(n: int, radius: float, start_deg: float) -> list[Point]:
    return [
        (
            radius * math.cos(math.radians(start_deg + 360 * k / n)),
            radius * math.sin(math.radians(start_deg + 360 * k / n)),
        )
        for k in range(n)
    ]


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> list[Point]:
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        a = math.radians(-90 + 180 * k / points)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(arm: float = 0.9, half_width: float = 0.3) -> list[Point]:
    a, w = arm, half_width
    return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]


def _heart(n: int = 36) -> list[Point]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x, y))
    # Centre the bounding box and scale so the farthest vertex lies on the unit circle.
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = max(math.hypot(x - cx, y - cy) for x, y in pts)
    return [((x - cx) / scale, (y - cy) / scale) for x, y in pts]


@cache
def unit_polygon(shape: str) -> tuple[Point, ...]:
    """Vertices of ``shape`` at circumradius about 1, unrotated."""
    table = {
        "circle": lambda: _regular(40, 0.92, 0.0),
        "square": lambda: [(-0.68, -0.68), (0.68, -0.68), (0.68, 0.68), (-0.68, 0.68)],
        "triangle": lambda: _regular(3, 1.0, -90.0),
        "star": _star,
        "cross": _cross,
        # A tall rhombus, so that a square rotated by 45 degrees is not a diamond.
        "diamond": lambda: [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)],
        "hexagon": lambda: _regular(6, 0.95, 0.0),
        "heart": _heart,
    }
    if shape not in table:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return tuple(table[shape]())


# Rotational symmetry in degrees: rotating by this maps the shape onto itself (the parser's search range).
SYMMETRY_DEG: dict[str, float] = {
    "circle": 360.0,
    "square": 90.0,
    "triangle": 120.0,
    "star": 72.0,
    "cross": 90.0,
    "diamond": 180.0,
    "hexagon": 60.0,
    "heart": 360.0,
}


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle_deg: float = 0.0) -> list[Point]:
    """Pixel-space vertices of ``shape`` centred at (cx, cy) with circumradius ``radius``, rotated clockwise."""
    pts = unit_polygon(shape)
    if angle_deg:
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in pts]
    return [(cx + radius * x, cy + radius * y) for x, y in pts]


@cache
def unit_area(shape: str) -> float:
    """Area of the unit polygon (shoelace formula), used to estimate a radius from a blob's area."""
    pts = unit_polygon(shape)
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))
    return abs(twice) / 2


@cache
def unit_perimeter(shape: str) -> float:
    """Perimeter of the unit polygon."""
    pts = unit_polygon(shape)
    return sum(math.dist(a, b) for a, b in zip(pts, pts[1:] + pts[:1], strict=True))


@cache
def unit_centroid(shape: str) -> Point:
    """Area centroid of the unit polygon (non-zero for the heart, whose bounding box is centred instead)."""
    pts = unit_polygon(shape)
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    return cx / (3 * a), cy / (3 * a)


def radius_from_area(shape: str, area: float) -> float:
    """Circumradius whose rasterised ``shape`` covers ``area`` pixels.

    PIL fills every pixel an edge touches, which adds about half a pixel along the perimeter, so solve
    ``A r^2 + (P / 2) r = area`` rather than ``A r^2 = area``.
    """
    a, half_p = unit_area(shape), unit_perimeter(shape) / 2
    return (-half_p + math.sqrt(half_p * half_p + 4 * a * max(area, 0.0))) / (2 * a)
