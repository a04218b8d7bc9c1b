"""Questions with short canonical answers, always unambiguous and correct against the scene.

Objects are referred to by a description that fits exactly one object in the scene and never contains the
attribute asked about ("what colour is the star?" only when there is exactly one star).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from mmstack.world.language import article
from mmstack.world.scene import Scene, WorldObject, as_random, relation_holds
from mmstack.world.vocab import CELLS, COLOUR_NAMES, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES, SIZES, is_held_out

KINDS = ("colour", "shape", "size", "count", "position", "existence", "relation")
# Attribute sets tried when referring to an object, from short to long; a question never uses the asked one.
_REFERENCE_SETS = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
    ("colour",),
    ("size", "colour"),
    ("cell",),
    ("cell", "shape"),
)


@dataclass(frozen=True)
class Question:
    """A question about a scene, its short canonical answer ('red', 'circle', '2', 'top left', 'yes') and
    its kind (one of ``KINDS``)."""

    question: str
    answer: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matches(obj: WorldObject, ref: WorldObject, attrs: tuple[str, ...]) -> bool:
    return all(getattr(obj, a) == getattr(ref, a) for a in attrs)


def refer(obj: WorldObject, scene: Scene, exclude: set[str], rng: random.Random) -> str | None:
    """A unique description of ``obj`` ('the red star', 'the object at the top left') that avoids the
    attributes in ``exclude``; None when none exists. Picks at random among the unique ones."""
    options = [
        attrs
        for attrs in _REFERENCE_SETS
        if not exclude.intersection(attrs) and sum(_matches(o, obj, attrs) for o in scene.objects) == 1
    ]
    return _phrase(obj, rng.choice(options)) if options else None


def _phrase(obj: WorldObject, attrs: tuple[str, ...]) -> str:
    words = [getattr(obj, a) for a in ("size", "colour") if a in attrs]
    words.append(obj.shape if "shape" in attrs else "object")
    text = "the " + " ".join(words)
    return text + f" at the {obj.cell}" if "cell" in attrs else text


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


_VOCAB = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "cell": CELLS}


def other_value(rng: random.Random, scene: Scene, obj: WorldObject, attr: str) -> str:
    """A random value of ``attr`` different from ``obj``'s that does not form a forbidden held-out pair."""

    def ok(v: str) -> bool:
        if attr not in ("shape", "colour"):
            return True
        return allowed_pair(scene, v if attr == "shape" else obj.shape, v if attr == "colour" else obj.colour)

    return rng.choice([v for v in _VOCAB[attr] if v != getattr(obj, attr) and ok(v)])


def allowed_pair(scene: Scene, shape: str, colour: str) -> bool:
    """Whether text about ``scene`` may name (shape, colour): held-out pairs are named only in scenes that
    contain one (the compositional split), so train and val text never mentions them either."""
    return not is_held_out(shape, colour) or scene.has_held_out()


def _colour_question(scene: Scene, rng: random.Random, yes_no: bool) -> Question | None:
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, {"colour"}, rng)
    if ref is None:
        return None
    if not yes_no:
        return Question(f"What colour is {ref}?", obj.colour, "colour")
    colour = obj.colour if rng.random() < 0.5 else other_value(rng, scene, obj, "colour")
    return Question(f"Is {ref} {colour}?", _yes_no(colour == obj.colour), "colour")


def _shape_question(scene: Scene, rng: random.Random, yes_no: bool) -> Question | None:
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, {"shape"}, rng)
    if ref is None:
        return None
    if not yes_no:
        text = f"What shape is at the {obj.cell}?" if ref.startswith("the object at") else f"What shape is {ref}?"
        return Question(text, obj.shape, "shape")
    shape = obj.shape if rng.random() < 0.5 else other_value(rng, scene, obj, "shape")
    return Question(f"Is {ref} {article(shape)} {shape}?", _yes_no(shape == obj.shape), "shape")


def _size_question(scene: Scene, rng: random.Random, yes_no: bool) -> Question | None:
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, {"size"}, rng)
    if ref is None:
        return None
    if not yes_no:
        return Question(f"What size is {ref}?", obj.size, "size")
    size = rng.choice(SIZES)
    return Question(f"Is {ref} {size}?", _yes_no(size == obj.size), "size")


def _count_question(scene: Scene, rng: random.Random, yes_no: bool) -> Question:
    n = len(scene.objects)
    if yes_no:
        k = n if rng.random() < 0.5 else rng.choice([m for m in range(1, 5) if m != n])
        text = "Is there exactly one object?" if k == 1 else f"Are there {NUMBER_WORDS[k]} objects?"
        return Question(text, _yes_no(k == n), "count")
    mode = rng.choice(("all", "colour", "shape"))
    if mode == "colour":
        colour = rng.choice(scene.objects).colour if rng.random() < 0.7 else rng.choice(COLOUR_NAMES)
        count = sum(o.colour == colour for o in scene.objects)
        return Question(f"How many {colour} objects are there?", str(count), "count")
    if mode == "shape":
        shape = rng.choice(scene.objects).shape if rng.random() < 0.7 else rng.choice(SHAPES)
        count = sum(o.shape == shape for o in scene.objects)
        return Question(f"How many {PLURALS[shape]} are there?", str(count), "count")
    return Question("How many objects are there?", str(n), "count")


def _position_question(scene: Scene, rng: random.Random, yes_no: bool) -> Question | None:
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, {"cell"}, rng)
    if yes_no and rng.random() < 0.5:
        cell = rng.choice(CELLS)
        occupied = any(o.cell == cell for o in scene.objects)
        return Question(f"Is there an object at the {cell}?", _yes_no(occupied), "position")
    if ref is None:
        return None
    if not yes_no:
        return Question(f"Where is {ref}?", obj.cell, "position")
    cell = obj.cell if rng.random() < 0.5 else other_value(rng, scene, obj, "cell")
    return Question(f"Is {ref} at the {cell}?", _yes_no(cell == obj.cell), "position")


def _existence_question(scene: Scene, rng: random.Random) -> Question:
    attrs = rng.choice((("colour", "shape"), ("shape",), ("size", "colour", "shape")))
    obj = rng.choice(scene.objects)
    values = {a: getattr(obj, a) for a in attrs}
    if rng.random() < 0.5:
        # Usually a 'no' question about something plausible: one attribute of a present object changed.
        changed = rng.choice(attrs)
        values[changed] = other_value(rng, scene, obj, changed)
    present = any(all(getattr(o, a) == v for a, v in values.items()) for o in scene.objects)
    words = " ".join(values[a] for a in ("size", "colour", "shape") if a in values)
    return Question(f"Is there {article(words)} {words}?", _yes_no(present), "existence")


def _relation_question(scene: Scene, rng: random.Random, yes_no: bool) -> Question | None:
    if len(scene.objects) < 2:
        return None
    a, b = rng.sample(scene.objects, 2)
    ref_b = refer(b, scene, {"cell"}, rng)
    if ref_b is None:
        return None
    if yes_no:
        ref_a = refer(a, scene, {"cell"}, rng)
        if ref_a is None:
            return None
        rel = rng.choice(RELATIONS)
        return Question(f"Is {ref_a} {rel} {ref_b}?", _yes_no(relation_holds(a, b, rel)), "relation")
    unique = [r for r in RELATIONS if sum(relation_holds(o, b, r) for o in scene.objects if o is not b) == 1]
    if not unique:
        return None
    rel = rng.choice(unique)
    target = next(o for o in scene.objects if o is not b and relation_holds(o, b, rel))
    return Question(f"What is {rel} {ref_b}?", target.name, "relation")


def questions_for(scene: Scene, rng: Any, yes_no_rate: float = 0.35) -> list[Question]:
    """One question of each kind that the scene allows (relations need two objects), in random order.

    Each kind is asked openly or as a yes/no variant (probability ``yes_no_rate``; existence is always
    yes/no, balanced between yes and no).
    """
    rng = as_random(rng)
    out: list[Question] = []
    for kind in KINDS:
        yes_no = rng.random() < yes_no_rate
        for _ in range(4):  # a random pick may have no unique description; try a few objects
            q = _ask(kind, scene, rng, yes_no)
            if q is not None:
                out.append(q)
                break
    rng.shuffle(out)
    return out


def _ask(kind: str, scene: Scene, rng: random.Random, yes_no: bool) -> Question | None:
    if kind == "count":
        return _count_question(scene, rng, yes_no)
    if kind == "existence":
        return _existence_question(scene, rng)
    makers = {
        "colour": _colour_question,
        "shape": _shape_question,
        "size": _size_question,
        "position": _position_question,
        "relation": _relation_question,
    }
    return makers[kind](scene, rng, yes_no)
