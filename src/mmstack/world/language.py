"""Captions of scenes (several templates and paraphrases) and the reverse: objects named in a prompt."""

from __future__ import annotations

import re
from itertools import pairwise
from typing import NamedTuple

from mmstack.world.scene import Scene, WorldObject
from mmstack.world.vocab import CELLS, COLOUR_NAMES, NUMBER_WORDS, PLURALS, SHAPES, SIZES

# Location phrases per cell; the first is canonical. describe_prompt reads all of them back.
LOCATION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top center": ("at the top center", "at the top", "in the top middle"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "middle left": ("at the middle left", "on the left", "at the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "middle right": ("at the middle right", "on the right", "at the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom center": ("at the bottom center", "at the bottom", "in the bottom middle"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
RELATIVE_PHRASES = {
    "left of": "to the left of it",
    "right of": "to the right of it",
    "above": "above it",
    "below": "below it",
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(obj: WorldObject, size: bool = True, det: str = "a") -> str:
    """'a large red circle' (or without the size)."""
    words = f"{obj.size} {obj.colour} {obj.shape}" if size else f"{obj.colour} {obj.shape}"
    return f"{article(words) if det == 'a' else det} {words}"


def join_list(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def reading_order(scene: Scene) -> list[WorldObject]:
    return sorted(scene.objects, key=lambda o: CELLS.index(o.cell))


def _relational(scene: Scene) -> tuple[str, bool]:
    """'there is a red circle in the top left corner and a small blue star below it'."""
    objs = list(scene.objects)
    parts = [f"{noun_phrase(objs[0])} {LOCATION_PHRASES[objs[0].cell][1 if objs[0].cell in _CORNERS else 0]}"]
    complete = True
    for prev, obj in pairwise(objs):
        rel = _simple_relation(obj, prev)
        if rel is None:
            parts.append(f"{noun_phrase(obj)} {LOCATION_PHRASES[obj.cell][0]}")
        else:
            parts.append(f"{noun_phrase(obj)} {RELATIVE_PHRASES[rel]}")
            complete = False
    return "there is " + join_list(parts), complete


_CORNERS = {"top left", "top right", "bottom left", "bottom right"}


def _simple_relation(obj: WorldObject, ref: WorldObject) -> str | None:
    """The one relation of ``obj`` to ``ref`` when they share a row or a column."""
    if obj.row == ref.row:
        return "left of" if obj.col < ref.col else "right of"
    if obj.col == ref.col:
        return "above" if obj.row < ref.row else "below"
    return None


def caption_variants(scene: Scene) -> list[tuple[str, bool]]:
    """All captions of ``scene`` with a flag: True when the caption pins every object's shape, colour, size
    and cell (so it identifies the scene up to jitter)."""
    ordered = reading_order(scene)
    n = len(ordered)
    full = [f"{noun_phrase(o)} {LOCATION_PHRASES[o.cell][0]}" for o in ordered]
    alt = [f"{noun_phrase(o)} {LOCATION_PHRASES[o.cell][1 + i % 2]}" for i, o in enumerate(scene.objects)]
    count = f"{NUMBER_WORDS[n]} object{'s' if n > 1 else ''}"
    structured = "; ".join(f"{o.cell}: {o.size} {o.colour} {o.shape}" for o in ordered)
    bare = join_list([noun_phrase(o) for o in ordered])
    return [
        (join_list(full), True),
        (f"{count}: {join_list(full)}", True),
        (f"a picture of {join_list(alt)}", True),
        _relational(scene),
        (structured, True),
        (f"an image with {bare}", False),
    ]


def shape_captions(scene: Scene) -> list[str]:
    """Captions that name the objects' shapes (and cells) but not their colours or sizes: "an image with a
    cross and a star", "a cross at the top left and a star in the center". A contrastive model cannot match
    these by colour, the shortcut the full captions allow, so they make it learn shapes (``data.shape_captions``
    of the CLIP recipe)."""
    ordered = reading_order(scene)
    shapes = [f"{article(o.shape)} {o.shape}" for o in ordered]
    placed = [f"{name} {LOCATION_PHRASES[o.cell][0]}" for name, o in zip(shapes, ordered, strict=True)]
    return [f"an image with {join_list(shapes)}", join_list(placed)]


def object_captions(scene: Scene) -> list[str]:
    """One caption per object that names that object only, by colour and shape: "an image with a yellow
    diamond". Queries name one thing of a busy scene ("Which exhibit shows a yellow diamond?"); these teach a
    contrastive model to match them (``data.object_captions`` of the CLIP recipe)."""
    return [f"an image with {noun_phrase(o, size=False)}" for o in reading_order(scene)]


def captions_for(scene: Scene, complete_only: bool = False) -> list[str]:
    """Valid captions of ``scene`` from several templates and paraphrases (deterministic, no duplicates).

    With ``complete_only`` only those that state every object's shape, colour, size and cell.
    """
    out: list[str] = []
    for text, complete in caption_variants(scene):
        if (complete or not complete_only) and text not in out:
            out.append(text)
    return out


class PromptObject(NamedTuple):
    """An object a prompt asks for; None where the prompt leaves the attribute open."""

    shape: str
    colour: str | None
    cell: str | None
    size: str | None


_ROW_WORDS = {
    "top": "top",
    "upper": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "middle": "middle",
    "center": "middle",
}
_COL_WORDS = {"left": "left", "right": "right", "center": "center", "middle": "center"}
_LOC = r"(?P<row>top|upper|bottom|lower|middle|center)?[\s]*(?P<col>left|right|center|middle)?"
_LOC_AFTER = re.compile(r"\b(?:at|in|on)\s+the\s+" + _LOC + r"(?:\s+(?:corner|side|edge))?\b")
_MODIFIERS = "|".join(("a", "an", "the", *SIZES, *COLOUR_NAMES))
_LOC_BEFORE = re.compile(r"(?:^|[;,.])\s*" + _LOC + r"\s*:\s*(?:(?:" + _MODIFIERS + r")\s+)*$")
_RELATIVE = re.compile(r"^\s*(?:to the (?:left|right) of|above|below|under|beside|next to)\b")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_MENTION = re.compile(r"\b(" + "|".join(sorted(_SHAPE_WORDS, key=len, reverse=True)) + r")\b")
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}


def _cell_from(row: str | None, col: str | None) -> str | None:
    if row is None and col is None:
        return None
    r = _ROW_WORDS.get(row or "", "middle")
    c = _COL_WORDS.get(col or "", "center")
    if r == "middle":
        return "center" if c == "center" else f"middle {c}"
    return f"{r} {c}"


def _normalise(text: str) -> str:
    text = text.lower().replace("centre", "center").replace("-", " ")
    return re.sub(r"\s+", " ", text)


def describe_prompt(text: str) -> list[PromptObject]:
    """Objects a caption-like prompt asks for, as (shape, colour, cell, size) with None where unspecified.

    Reads every caption template of ``captions_for`` (locations after the noun, 'cell: object' lists,
    relative phrases such as 'below it' give cell None) and plain prompts like 'two red circles'.
    """
    text = _normalise(text)
    mentions = list(_MENTION.finditer(text))
    out: list[PromptObject] = []
    for k, m in enumerate(mentions):
        before = text[mentions[k - 1].end() if k else 0 : m.start()]
        after = text[m.end() : mentions[k + 1].start() if k + 1 < len(mentions) else len(text)]
        colour, size, number = _modifiers(re.findall(r"[a-z]+", before))
        cell = _location(before, after)
        shape = _SHAPE_WORDS[m.group(1)]
        count = 1 if m.group(1) == shape else (number or 2)  # plural: 'two red circles'
        out.extend(PromptObject(shape, colour, cell, size) for _ in range(count))
    return out


def _modifiers(words: list[str]) -> tuple[str | None, str | None, int | None]:
    """Colour, size and number words directly in front of a shape noun ('two large red')."""
    colour = size = number = None
    for w in reversed(words):
        if w in COLOUR_NAMES and colour is None:
            colour = w
        elif w in SIZES and size is None:
            size = w
        elif w in _NUMBERS and number is None:
            number = _NUMBERS[w]
        else:
            break
    return colour, size, number


def _location(before: str, after: str) -> str | None:
    head = after.split(" and ")[0]
    if not _RELATIVE.match(head):
        found = _LOC_AFTER.search(head)
        if found and (found.group("row") or found.group("col")):
            return _cell_from(found.group("row"), found.group("col"))
    prefix = _LOC_BEFORE.search(before)
    if prefix and (prefix.group("row") or prefix.group("col")):
        return _cell_from(prefix.group("row"), prefix.group("col"))
    return None
