"""The shapes world: vocabulary, splits, rendering, captions, questions, preference pairs, clips."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from mmstack.errors import ConfigError
from mmstack.world import (
    CELLS,
    COLOURS,
    HELD_OUT_PAIRS,
    MOTIONS,
    REJECTIONS,
    SHAPES,
    WORLD,
    Scene,
    WorldObject,
    captions_for,
    clip_questions,
    describe_prompt,
    is_held_out,
    parse_image,
    preference_pairs_for,
    questions_for,
    render_clip,
    render_scene,
    sample_clip,
    sample_scene,
    sample_scenes,
)
from mmstack.world.clips import MOTION_PHRASES, clip_captions
from mmstack.world.language import caption_variants
from mmstack.world.preferences import DESCRIBE_PROMPTS

# ---------------------------------------------------------------- vocabulary and splits


def test_vocabulary_is_rich_and_colours_are_separated():
    assert len(SHAPES) >= 8 and {"circle", "square", "triangle", "star", "cross", "diamond"} <= set(SHAPES)
    assert len(COLOURS) >= 8 and len(CELLS) == 9 and {"top left", "center", "bottom right"} <= set(CELLS)
    closest = min(math.dist(a, b) for a, b in itertools.combinations(COLOURS.values(), 2))
    assert closest > 80, closest
    assert set(WORLD.to_dict()) >= {"shapes", "colours", "sizes", "cells", "relations", "motions"}


def test_held_out_pairs_are_a_fixed_tenth_and_cover_every_word_once():
    frac = len(HELD_OUT_PAIRS) / (len(SHAPES) * len(COLOURS))
    assert 0.10 <= frac <= 0.15
    assert sorted(s for s, _ in HELD_OUT_PAIRS) == sorted(SHAPES)
    assert sorted(c for _, c in HELD_OUT_PAIRS) == sorted(COLOURS)


def test_scenes_are_deterministic_and_splits_use_different_streams():
    a, b = sample_scenes(50, seed=3), sample_scenes(50, seed=3)
    assert a == b
    assert sample_scenes(50, seed=4) != a
    assert sample_scenes(50, seed=3, split="val") != a


def test_train_and_val_never_contain_held_out_pairs_and_compositional_always_does():
    for split in ("train", "val"):
        scenes = sample_scenes(1500, seed=0, split=split)
        assert not any(is_held_out(o.shape, o.colour) for s in scenes for o in s.objects)
        # Text about train/val scenes never names a held-out pair either (negatives included).
        rng = random.Random(0)
        for s in scenes[:300]:
            texts = captions_for(s) + [q.question for q in questions_for(s, rng)]
            texts += [t for p in preference_pairs_for(s, rng) for t in (p.prompt, p.chosen, p.rejected)]
            for t in texts:
                assert not any(is_held_out(o.shape, o.colour) for o in describe_prompt(t) if o.colour), t
    comp = sample_scenes(500, seed=0, split="compositional")
    assert all(any(is_held_out(o.shape, o.colour) for o in s.objects) for s in comp)
    assert Counter(len(s) for s in comp).keys() == {1, 2, 3, 4}


def test_scene_rules_hold_and_records_round_trip():
    for s in sample_scenes(500, seed=1):
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict(64, 48)))) == s
        assert 1 <= len(s) <= 4
        assert len({o.cell for o in s.objects}) == len(s)  # at most one object per cell


def test_bad_split_is_a_config_error():
    with pytest.raises(ConfigError, match="--split"):
        sample_scene(random.Random(0), split="test")


# ---------------------------------------------------------------- rendering


def test_rendering_is_deterministic_and_seeded():
    scene = sample_scenes(1, seed=0)[0]
    a = np.asarray(render_scene(scene, noise=0.1, texture=True, rotation=True, seed=5))
    b = np.asarray(render_scene(scene, noise=0.1, texture=True, rotation=True, seed=5))
    c = np.asarray(render_scene(scene, noise=0.1, texture=True, rotation=True, seed=6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(("width", "height"), [(96, 48), (40, 80), (64, 64)])
def test_non_square_rendering_puts_objects_in_their_cells(width, height):
    scenes = sample_scenes(40, seed=2)
    for i, scene in enumerate(scenes):
        img = render_scene(scene, width, height, seed=i)
        assert img.size == (width, height)
        arr = np.asarray(img).astype(int)
        for obj in scene.objects:
            cx, cy = obj.centre_px(width, height)
            assert obj.col == int(cx * 3 / width) and obj.row == int(cy * 3 / height)
            assert tuple(arr[int(cy), int(cx)]) == COLOURS[obj.colour] or obj.shape in ("heart", "star", "cross")
        # Every object's colour is present and nothing else but the background.
        colours = {tuple(p) for p in arr.reshape(-1, 3)}
        assert colours <= {COLOURS[o.colour] for o in scene.objects} | {(24, 24, 24)}


def test_render_rejects_tiny_images():
    with pytest.raises(ConfigError, match="--image-size"):
        render_scene(sample_scenes(1, seed=0)[0], 8)


# ---------------------------------------------------------------- captions and prompts


def _key(o):
    return (o.shape, o.colour, o.cell, o.size)


def test_complete_captions_read_back_to_exactly_the_scene():
    for scene in sample_scenes(300, seed=5):
        truth = sorted(_key(o) for o in scene.objects)
        captions = captions_for(scene)
        assert len(captions) >= 4 and len(set(captions)) == len(captions)
        for text, complete in caption_variants(scene):
            got = describe_prompt(text)
            assert len(got) == len(scene), text
            if complete:
                assert sorted(_key(o) for o in got) == truth, text
            else:  # whatever the caption states is true of a distinct object
                remaining = list(scene.objects)
                for p in got:
                    match = next(o for o in remaining if _consistent(p, o))
                    remaining.remove(match)


def _consistent(p, o) -> bool:
    return all(v is None or v == getattr(o, a) for a, v in zip(("shape", "colour", "cell", "size"), p, strict=True))


def test_describe_prompt_reads_plain_prompts():
    got = describe_prompt("Two red circles and a small blue star in the centre.")
    assert got.count(("circle", "red", None, None)) == 2
    assert ("star", "blue", "center", "small") in got
    assert describe_prompt("top-left: large green hexagon") == [("hexagon", "green", "top left", "large")]
    assert describe_prompt("a yellow heart on the right") == [("heart", "yellow", "middle right", None)]
    assert describe_prompt("nothing to see") == []


# ---------------------------------------------------------------- questions (checked by independent logic)

_COLOURS = "|".join(COLOURS)
_SHAPES = "|".join(SHAPES)
_PLURAL = {"crosses": "cross", **{s + "s": s for s in SHAPES}}
_CELL = "|".join(CELLS)
_REF = rf"the (?:(?:small|large) )?(?:(?:{_COLOURS}) )?(?:{_SHAPES}|object)(?: at the (?:{_CELL}))?"
_NUM = {"one": 1, "two": 2, "three": 3, "four": 4}


def _resolve(ref: str, scene: Scene) -> WorldObject:
    """The single object a reference like 'the large red object at the top left' denotes."""
    words = ref.removeprefix("the ")
    cell = None
    if " at the " in words:
        words, cell = words.split(" at the ")
    toks = words.split()
    hits = [
        o
        for o in scene.objects
        if (cell is None or o.cell == cell) and all(t == "object" or t in (o.size, o.colour, o.shape) for t in toks)
    ]
    assert len(hits) == 1, f"ambiguous or empty reference {ref!r}: {hits}"
    return hits[0]


def _left(a, b):
    return a.col < b.col


_REL = {"left of": _left, "right of": lambda a, b: a.col > b.col, "above": lambda a, b: a.row < b.row}
_REL["below"] = lambda a, b: a.row > b.row


def _answer(q: str, s: Scene) -> str:
    yn = {True: "yes", False: "no"}
    objs = s.objects
    if m := re.fullmatch(rf"What colour is ({_REF})\?", q):
        return _resolve(m[1], s).colour
    if m := re.fullmatch(r"What shape is at the (.+)\?", q):
        return next(o.shape for o in objs if o.cell == m[1])
    if m := re.fullmatch(rf"What shape is ({_REF})\?", q):
        return _resolve(m[1], s).shape
    if m := re.fullmatch(rf"What size is ({_REF})\?", q):
        return _resolve(m[1], s).size
    if m := re.fullmatch(rf"Where is ({_REF})\?", q):
        return _resolve(m[1], s).cell
    if q == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(rf"How many ({_COLOURS}) objects are there\?", q):
        return str(sum(o.colour == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(o.shape == _PLURAL[m[1]] for o in objs))
    if q == "Is there exactly one object?":
        return yn[len(objs) == 1]
    if m := re.fullmatch(r"Are there (\w+) objects\?", q):
        return yn[len(objs) == _NUM[m[1]]]
    if m := re.fullmatch(r"Is there an object at the (.+)\?", q):
        return yn[any(o.cell == m[1] for o in objs)]
    if m := re.fullmatch(rf"Is ({_REF}) (left of|right of|above|below) ({_REF})\?", q):
        return yn[_REL[m[2]](_resolve(m[1], s), _resolve(m[3], s))]
    if m := re.fullmatch(rf"What is (left of|right of|above|below) ({_REF})\?", q):
        b = _resolve(m[2], s)
        hits = [o for o in objs if o is not b and _REL[m[1]](o, b)]
        assert len(hits) == 1, q
        return f"{hits[0].colour} {hits[0].shape}"
    if m := re.fullmatch(rf"Is ({_REF}) at the ({_CELL})\?", q):
        return yn[_resolve(m[1], s).cell == m[2]]
    if m := re.fullmatch(rf"Is ({_REF}) an? ({_SHAPES})\?", q):
        return yn[_resolve(m[1], s).shape == m[2]]
    if m := re.fullmatch(rf"Is ({_REF}) (small|large)\?", q):
        return yn[_resolve(m[1], s).size == m[2]]
    if m := re.fullmatch(rf"Is ({_REF}) ({_COLOURS})\?", q):
        return yn[_resolve(m[1], s).colour == m[2]]
    if m := re.fullmatch(r"Is there an? (.+)\?", q):
        toks = m[1].split()
        return yn[any(all(t in (o.size, o.colour, o.shape) for t in toks) and o.shape == toks[-1] for o in objs)]
    raise AssertionError(f"question form not covered by the checker: {q!r}")


def test_every_answer_is_right_by_independent_logic():
    kinds, answers = Counter(), Counter()
    for split in ("train", "compositional"):
        for i, scene in enumerate(sample_scenes(300, seed=7, split=split)):
            questions = questions_for(scene, random.Random(i))
            assert len({q.kind for q in questions}) == len(questions) >= 5
            for q in questions:
                assert _answer(q.question, scene) == q.answer, (q, scene)
                kinds[q.kind] += 1
                answers[q.answer] += 1
    assert set(kinds) == {"colour", "shape", "size", "count", "position", "existence", "relation"}
    assert answers["yes"] > 100 and answers["no"] > 100  # yes/no variants, roughly balanced
    assert 0.6 < answers["yes"] / answers["no"] < 1.6


# ---------------------------------------------------------------- preference pairs


def test_preference_pairs_reject_wrong_answers():
    seen = Counter()
    for i, scene in enumerate(sample_scenes(300, seed=8)):
        shapes, colours = {o.shape for o in scene.objects}, {o.colour for o in scene.objects}
        for p in preference_pairs_for(scene, random.Random(i)):
            seen[p.rejection] += 1
            assert p.rejection in REJECTIONS and p.chosen != p.rejected
            if p.prompt in DESCRIBE_PROMPTS:  # a description: it reads back to exactly the scene
                assert sorted(map(_key, describe_prompt(p.chosen))) == sorted(map(_key, scene.objects))
            else:  # a question: the chosen answer is the right one
                assert _answer(p.prompt, scene) == p.chosen
            rejected = describe_prompt(p.rejected)
            if p.rejection == "hallucinated_object":
                assert (p.rejected in SHAPES and p.rejected not in shapes) or any(
                    o.shape not in shapes for o in rejected
                )
            elif p.rejection == "wrong_colour":
                assert (p.rejected in COLOURS and p.rejected not in colours) or any(
                    o.colour not in colours for o in rejected
                )
            elif p.rejection == "wrong_count":
                assert p.rejected.isdigit()
            else:  # terse: names nothing at all
                assert rejected == [] and not any(c in p.rejected for c in COLOURS)
    assert set(seen) == set(REJECTIONS)


# ---------------------------------------------------------------- clips


def test_clip_motion_answers_match_trajectories_and_pixels():
    for i in range(30):
        clip = sample_clip(random.Random(i), n_frames=6)
        frames = render_clip(clip, 64, seed=i)
        assert len(frames) == 6
        first, last = parse_image(frames[0]), parse_image(frames[-1])
        for obj in clip.objects:
            dx, dy = obj.end[0] - obj.start[0], obj.end[1] - obj.start[1]
            expected = " ".join(
                w
                for w, on in (("up", dy < -1e-6), ("down", dy > 1e-6), ("left", dx < -1e-6), ("right", dx > 1e-6))
                if on
            )
            assert obj.motion == expected
            # The parser sees the object move the same way in the pixels.
            a = next(p for p in first if (p.colour, p.shape) == (obj.colour, obj.shape))
            b = next(p for p in last if (p.colour, p.shape) == (obj.colour, obj.shape))
            assert (b.centre[0] - a.centre[0] > 3) == (dx > 0) and (b.centre[1] - a.centre[1] > 3) == (dy > 0)
        by_name = {o.name: o for o in clip.objects}
        for o in clip.objects:
            assert f"the {o.name} {MOTION_PHRASES[o.motion]}" in clip_captions(clip)[0]
        for q in clip_questions(clip, random.Random(i)):
            if m := re.fullmatch(r"Which way does the (.+) move\?", q.question):
                assert q.answer == by_name[m[1]].motion
            elif m := re.fullmatch(r"Does the (\w+ \w+) move (.+)\?", q.question):
                motion = _PHRASE_TO_MOTION[m[2]]
                assert q.answer == ("yes" if motion == by_name[m[1]].motion else "no")
                assert q.answer == "yes" or _dot(motion, by_name[m[1]].motion) <= 0  # never half-true
            elif m := re.fullmatch(r"What moves (.+)\?", q.question):
                movers = [o.name for o in clip.objects if _dot(_PHRASE_TO_MOTION[m[1]], o.motion) > 0]
                assert movers == [q.answer]
            else:
                assert q.question == "How many objects are moving?" and q.answer == str(len(clip.objects))


_PHRASE_TO_MOTION = {p.removeprefix("moves "): m for m, p in MOTION_PHRASES.items()}


def _dot(a: str, b: str) -> int:
    return MOTIONS[a][0] * MOTIONS[b][0] + MOTIONS[a][1] * MOTIONS[b][1]


def test_compositional_clips_hold_a_held_out_pair_and_train_clips_never_do():
    for i in range(100):
        assert any(is_held_out(o.shape, o.colour) for o in sample_clip(random.Random(i), split="compositional").objects)
        assert not any(is_held_out(o.shape, o.colour) for o in sample_clip(random.Random(i), split="train").objects)
