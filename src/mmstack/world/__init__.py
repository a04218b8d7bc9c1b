"""The shapes world: synthetic scenes, captions, questions, preference pairs and clips with exactly known
ground truth, and a parser that reads images back into objects.

    scenes = sample_scenes(100, seed=0, split="train")
    img = render_scene(scenes[0], width=64, noise=0.05, seed=0)
    parse_image(img)  # [ParsedObject(shape='star', colour='red', size='large', cell='top left', ...)]
    generate_world("data/world", n=1000, seed=0)  # the on-disk dataset (see mmstack.world.generate)
"""

from mmstack.world.clips import Clip, ClipObject, clip_captions, clip_questions, render_clip, sample_clip
from mmstack.world.generate import WorldConfig, generate_world
from mmstack.world.language import PromptObject, captions_for, describe_prompt
from mmstack.world.parser import ParsedObject, parse_image
from mmstack.world.preferences import REJECTIONS, PreferencePair, preference_pairs_for
from mmstack.world.questions import KINDS, Question, questions_for
from mmstack.world.rag_world import generate_rag_world as generate_rag_world
from mmstack.world.rag_world import sample_rag_world as sample_rag_world
from mmstack.world.render import render_scene
from mmstack.world.scene import Scene, WorldObject, relation_holds, sample_scene, sample_scenes
from mmstack.world.sheet import contact_sheet
from mmstack.world.vocab import (
    BACKGROUND,
    CELLS,
    COLOURS,
    GENERATOR_VERSION,
    HELD_OUT_PAIRS,
    MOTIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    WORLD,
    is_held_out,
)

__all__ = [
    "BACKGROUND",
    "CELLS",
    "COLOURS",
    "GENERATOR_VERSION",
    "HELD_OUT_PAIRS",
    "KINDS",
    "MOTIONS",
    "REJECTIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "WORLD",
    "Clip",
    "ClipObject",
    "ParsedObject",
    "PreferencePair",
    "PromptObject",
    "Question",
    "Scene",
    "WorldConfig",
    "WorldObject",
    "captions_for",
    "clip_captions",
    "clip_questions",
    "contact_sheet",
    "describe_prompt",
    "generate_world",
    "is_held_out",
    "parse_image",
    "preference_pairs_for",
    "questions_for",
    "relation_holds",
    "render_clip",
    "render_scene",
    "sample_clip",
    "sample_scene",
    "sample_scenes",
]
