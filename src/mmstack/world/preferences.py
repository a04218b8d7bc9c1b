"""Preference pairs: a correct answer (chosen) against a hallucinated, miscounted or terse one (rejected)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from mmstack.world.language import caption_variants
from mmstack.world.questions import allowed_pair, other_value, refer
from mmstack.world.scene import Scene, as_random
from mmstack.world.vocab import COLOUR_NAMES, SHAPES

REJECTIONS = ("hallucinated_object", "wrong_colour", "wrong_count", "terse")
DESCRIBE_PROMPTS = ("Describe the image.", "What is in this image?", "Describe the objects and where they are.")
TERSE_ANSWERS = ("shapes.", "an image.", "some objects.", "I don't know.", "it is a picture.", "colours.", "yes.")


@dataclass(frozen=True)
class PreferencePair:
    """``prompt`` with a ``chosen`` answer that is right and a ``rejected`` one that is wrong for the image,
    of kind ``rejection`` (one of ``REJECTIONS``)."""

    prompt: str
    chosen: str
    rejected: str
    rejection: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe(scene: Scene, rng: random.Random) -> tuple[int, str]:
    """A complete caption (template index, text) used as the chosen description."""
    complete = [(i, text) for i, (text, ok) in enumerate(caption_variants(scene)) if ok]
    return rng.choice(complete)


def _swapped(scene: Scene, rng: random.Random, attr: str) -> tuple[Scene, str] | None:
    """The scene with one object's ``attr`` changed to a value absent from the whole scene."""
    present = {getattr(o, attr) for o in scene.objects}
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    for _ in range(8):
        value = other_value(rng, scene, obj, attr)
        if value not in present:
            objs = list(scene.objects)
            objs[i] = replace(obj, **{attr: value})
            return Scene(tuple(objs)), value
    return None


def _hallucination(scene: Scene, rng: random.Random, attr: str, rejection: str) -> PreferencePair | None:
    """Either a description naming an absent shape/colour, or a short answer that is absent from the image."""
    if rng.random() < 0.5:
        swapped = _swapped(scene, rng, attr)
        if swapped is None:
            return None
        index, chosen = _describe(scene, rng)
        rejected = caption_variants(swapped[0])[index][0]
        return PreferencePair(rng.choice(DESCRIBE_PROMPTS), chosen, rejected, rejection)
    obj = rng.choice(scene.objects)
    ref = refer(obj, scene, {attr}, rng)
    present = {getattr(o, attr) for o in scene.objects}
    absent = [
        v
        for v in (SHAPES if attr == "shape" else COLOUR_NAMES)
        if v not in present and allowed_pair(scene, **{"shape": obj.shape, "colour": obj.colour, attr: v})
    ]
    if ref is None or not absent:
        return None
    if attr == "shape":
        prompt = f"What shape is at the {obj.cell}?" if ref.startswith("the object at") else f"What shape is {ref}?"
    else:
        prompt = f"What colour is {ref}?"
    return PreferencePair(prompt, getattr(obj, attr), rng.choice(absent), rejection)


def _wrong_count(scene: Scene, rng: random.Random) -> PreferencePair:
    n = len(scene.objects)
    if rng.random() < 0.5:
        colour = rng.choice(scene.objects).colour
        n = sum(o.colour == colour for o in scene.objects)
        prompt = f"How many {colour} objects are there?"
    else:
        prompt = "How many objects are there?"
    lowest = 1 if prompt == "How many objects are there?" else 0
    wrong = rng.choice([m for m in range(lowest, 6) if m != n])
    return PreferencePair(prompt, str(n), str(wrong), "wrong_count")


def preference_pairs_for(scene: Scene, rng: Any) -> list[PreferencePair]:
    """One preference pair per rejection kind the scene allows (normally all four), in ``REJECTIONS`` order."""
    rng = as_random(rng)
    pairs = [
        _hallucination(scene, rng, "shape", "hallucinated_object"),
        _hallucination(scene, rng, "colour", "wrong_colour"),
        _wrong_count(scene, rng),
    ]
    _, caption = _describe(scene, rng)
    pairs.append(PreferencePair(rng.choice(DESCRIBE_PROMPTS), caption, rng.choice(TERSE_ANSWERS), "terse"))
    return [p for p in pairs if p is not None]
