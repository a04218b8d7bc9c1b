"""Hard-negative twins: a scene with exactly one thing changed (one object's shape, colour, size or cell).

Contrastive training on random batches of shapes-world scenes finds a shortcut: the colours and cells of the
objects alone tell almost any two scenes of a batch apart, so nothing makes the image tower see shape (a linear
probe on the demo CLIP's image features read shape at chance). A batch that holds a scene *and* its twin can
only be solved by the attribute that differs, which turns the cheap cue into a real one.

    twin = twin_scene(scene, random.Random(0))          # same scene, one attribute of one object changed
    img = render_scene(twin, 64, seed=1)
"""

from __future__ import annotations

import random
from dataclasses import replace

from mmstack.world.scene import Scene, WorldObject, check_split
from mmstack.world.vocab import CELLS, COLOUR_NAMES, SHAPES, SIZES, is_held_out

# How often each attribute is the one that changes: shape, the cue the shortcut skips, most often.
TWIN_ATTRIBUTES: dict[str, float] = {"shape": 0.5, "colour": 0.25, "size": 0.125, "cell": 0.125}


def _allowed(obj: WorldObject, split: str) -> bool:
    """train/val never show a held-out (shape, colour) pair; compositional scenes may."""
    return split == "compositional" or not is_held_out(obj.shape, obj.colour)


def _changed(obj: WorldObject, attribute: str, free_cells: list[str], rng: random.Random) -> list[WorldObject]:
    """Every variant of ``obj`` with ``attribute`` set to another value (in random order)."""
    if attribute == "shape":
        values = [replace(obj, shape=s) for s in SHAPES if s != obj.shape]
    elif attribute == "colour":
        values = [replace(obj, colour=c) for c in COLOUR_NAMES if c != obj.colour]
    elif attribute == "size":
        values = [replace(obj, size=z) for z in SIZES if z != obj.size]
    else:
        values = [replace(obj, cell=c) for c in free_cells]
    rng.shuffle(values)
    return values


def twin_scene(scene: Scene, rng: random.Random, split: str = "train") -> Scene:
    """``scene`` with one attribute of one object changed, the pair rules of ``split`` kept.

    The attribute is drawn with ``TWIN_ATTRIBUTES``' weights; when no variant of it is allowed (say, every
    other cell is taken), the next attribute is tried, so a twin always differs from its scene.
    """
    check_split(split)
    taken = {o.cell for o in scene.objects}
    free = [c for c in CELLS if c not in taken]
    first = rng.choices(list(TWIN_ATTRIBUTES), weights=list(TWIN_ATTRIBUTES.values()))[0]
    order = [first, *(a for a in TWIN_ATTRIBUTES if a != first)]
    for attribute in order:
        for i in rng.sample(range(len(scene.objects)), len(scene.objects)):
            for obj in _changed(scene.objects[i], attribute, free, rng):
                if _allowed(obj, split):
                    objects = list(scene.objects)
                    objects[i] = obj
                    return Scene(tuple(objects))
    raise AssertionError("unreachable: a size change is always allowed")
