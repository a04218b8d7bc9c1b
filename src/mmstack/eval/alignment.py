"""Evaluation of alignment: reward-model pairwise accuracy, hallucination rate, VQA before and after.

- ``pairwise_accuracy``: share of held-out preference pairs whose chosen answer the reward model scores
  above the rejected one, overall and by rejection kind.
- ``evaluate_hallucination``: the model describes each scene of a world folder and answers its questions
  whose reference answer names a shape or a colour; an answer *hallucinates* when it names an object the
  scene does not have (checked against ``scenes.jsonl``, the ground truth): a shape or a colour that no
  object has, or a coloured shape that is not there ("a pink square" beside an orange square and a pink
  diamond). The object can be implied by the question: "pink" for "What colour is the cross?" claims a pink
  cross. Reported: the share of answers that hallucinate (``rate``; CHAIR_s of Rohrbach et al. 2018, with
  objects as the world defines them), its two parts (``word_rate``: absent shapes/colours, the metric of
  sessions 1-15; ``object_rate``: absent coloured shapes), the share of named shapes, colours and coloured
  shapes that are absent (``mention_rate``; CHAIR_i), by prompt kind, with examples.
- ``evaluate_alignment``: both of the above plus VQA accuracy (``mmstack.eval.vqa``), for before/after
  tables; ``compare`` gives the changes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from mmstack.errors import DataError
from mmstack.world.vocab import COLOUR_NAMES, PLURALS, SHAPES

DESCRIBE_PROMPT = "Describe the image."
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{plural: s for s, plural in PLURALS.items()}}
_COLOUR_WORDS = {c: c for c in COLOUR_NAMES}
_WORD = re.compile(r"[a-z]+")


# ------------------------------------------------------------------------------------ reward model


@torch.inference_mode()
def reward_scores(model: Any, data: Any, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected answer of every pair of a ``PreferenceBatches``: (N,), (N,)."""
    from mmstack.train.align.data import reward_inputs

    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        c, r = model(**reward_inputs(batch)).rewards.chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def pairwise_accuracy(
    model: Any, data: Any, kinds: Sequence[str] = (), limit: int = 0, batch_size: int = 32
) -> dict[str, Any]:
    """Pairwise accuracy of a reward model on preference pairs (a path, or a ``PreferenceBatches``).

    Ties count as half right, so a constant reward scores 0.5 rather than 0 or 1.
    """
    from mmstack.train.align.data import PreferenceBatches, load_preferences

    if not isinstance(data, PreferenceBatches):
        data = PreferenceBatches(load_preferences(data, kinds, limit), model.processor)
    chosen, rejected = reward_scores(model, data, batch_size)
    right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, ok in zip(data.kinds, right.tolist(), strict=True):
        by_kind[kind].append(ok)
    return {
        "accuracy": float(right.mean()),
        "n": len(right),
        "margin": float((chosen - rejected).mean()),
        "by_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())},
    }


# ------------------------------------------------------------------------------------- hallucination


def mentions(text: str) -> tuple[set[str], set[str]]:
    """The shapes (singular) and colours a text names, e.g. ``"two red stars"`` -> ({"star"}, {"red"})."""
    words = _WORD.findall(text.lower())
    return {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}, {
        _COLOUR_WORDS[w] for w in words if w in _COLOUR_WORDS
    }


def coloured_shapes(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) objects a text names: a colour word right before a shape word, as the world
    writes them (``"a large red star and two blue crosses"`` -> {("red", "star"), ("blue", "cross")})."""
    words = _WORD.findall(text.lower())
    return {(_COLOUR_WORDS[a], _SHAPE_WORDS[b]) for a, b in pairwise(words) if a in _COLOUR_WORDS and b in _SHAPE_WORDS}


def claimed_objects(question: str, answer: str) -> set[tuple[str, str]]:
    """The coloured shapes an answer claims, also through its question: "pink" to "What colour is the
    cross?" claims a pink cross, "cross" to "What shape is the pink object?" too."""
    objects = coloured_shapes(answer)
    shapes, colours = mentions(answer)
    q_shapes, q_colours = mentions(question)
    if colours and not shapes and len(q_shapes) == 1 and not q_colours:
        objects |= {(c, next(iter(q_shapes))) for c in colours}
    if shapes and not colours and len(q_colours) == 1 and not q_shapes:
        objects |= {(next(iter(q_colours)), s) for s in shapes}
    return objects


@dataclass
class HallucinationItem:
    """A prompt about a scene and what the scene contains: its objects as (colour, shape) pairs."""

    question: str
    image: Path
    kind: str
    objects: set[tuple[str, str]]
    answers: list[str] = field(default_factory=list)
    id: str = ""

    @property
    def shapes(self) -> set[str]:
        return {s for _, s in self.objects}

    @property
    def colours(self) -> set[str]:
        return {c for c, _ in self.objects}

    def absent_words(self, answer: str) -> list[str]:
        """The shapes and colours ``answer`` names that no object of the scene has."""
        shapes, colours = mentions(answer)
        return sorted(shapes - self.shapes) + sorted(colours - self.colours)

    def absent_objects(self, answer: str) -> list[str]:
        """The coloured shapes ``answer`` claims (see ``claimed_objects``) that the scene does not have."""
        return [f"{c} {s}" for c, s in sorted(claimed_objects(self.question, answer) - self.objects)]

    def absent(self, answer: str) -> list[str]:
        """Everything ``answer`` names that the scene does not have: words, then objects."""
        return self.absent_words(answer) + self.absent_objects(answer)

    def named(self, answer: str) -> int:
        shapes, colours = mentions(answer)
        return len(shapes) + len(colours) + len(claimed_objects(self.question, answer))


def hallucination_items(
    folder: str | Path, limit: int | None = None, describe: bool = True, named_only: bool = True
) -> list[HallucinationItem]:
    """Per scene of ``folder/scenes.jsonl``: a describe prompt, and each question whose answer names things
    (every question with ``named_only=False``)."""
    path = Path(folder) / "scenes.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path} not found: the hallucination eval needs a shapes-world folder (its scenes are the ground truth)"
        )
    items = []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for line in lines[:limit]:
        scene = json.loads(line)
        objects = {(o["colour"], o["shape"]) for o in scene["objects"]}
        image = Path(folder) / scene["image"]
        prompts = [(DESCRIBE_PROMPT, "describe", scene["caption"])] if describe else []
        prompts += [(q["question"], q["kind"], str(q["answer"])) for q in scene.get("questions", [])]
        for question, kind, answer in prompts:
            if kind == "describe" or not named_only or any(mentions(answer)):
                items.append(HallucinationItem(question, image, kind, objects, [answer], scene["id"]))
    if not items:
        raise DataError(f"{path} has no scenes to ask about")
    return items


def answer_prompts(
    model: Any, items: Sequence[HallucinationItem], batch_size: int, generation: Any = None
) -> list[str]:
    """Greedy answers (or as ``generation`` says): long enough for a description, short for questions."""
    from mmstack.eval.vqa import VqaItem, answer_items

    out = [""] * len(items)
    for is_describe, max_new in ((True, 48), (False, 8)):
        idx = [i for i, it in enumerate(items) if (it.kind == "describe") == is_describe]
        vqa = [VqaItem(items[i].question, items[i].answers, items[i].kind, items[i].image) for i in idx]
        for i, text in zip(idx, answer_items(model, vqa, batch_size, max_new, generation), strict=True):
            out[i] = text
    return out


def score_hallucinations(
    items: Sequence[HallucinationItem], answers: Sequence[str], n_examples: int = 6
) -> dict[str, Any]:
    """Hallucination rates (answers and mentions), by kind, with a few hallucinating examples."""
    pairs = list(zip(items, answers, strict=True))
    hits = [bool(it.absent(a)) for it, a in pairs]
    named = sum(it.named(a) for it, a in pairs)
    absent = sum(len(it.absent(a)) for it, a in pairs)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for it, h in zip(items, hits, strict=True):
        by_kind[it.kind].append(h)
    examples = [
        {"id": it.id, "question": it.question, "answer": a, "absent": it.absent(a)}
        for (it, a), h in zip(pairs, hits, strict=True)
        if h
    ][:n_examples]
    return {
        "rate": sum(hits) / len(hits),
        "word_rate": sum(bool(it.absent_words(a)) for it, a in pairs) / len(hits),
        "object_rate": sum(bool(it.absent_objects(a)) for it, a in pairs) / len(hits),
        "n": len(hits),
        "mention_rate": absent / named if named else 0.0,
        "mentions": named,
        "by_kind": {k: {"rate": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())},
        "examples": examples,
    }


def evaluate_hallucination(
    model: Any, folder: str | Path, limit: int | None = None, batch_size: int = 64, describe: bool = True
) -> dict[str, Any]:
    """Ask ``model`` about every scene of ``folder`` and score the answers against the ground truth."""
    items = hallucination_items(folder, limit, describe)
    model.eval()
    with torch.inference_mode():
        answers = answer_prompts(model, items, batch_size)
    return {"data": str(folder), **score_hallucinations(items, answers)}


def evaluate_alignment(
    model: Any, folder: str | Path, limit: int | None = None, vqa: bool = True, batch_size: int = 64
) -> dict[str, Any]:
    """Hallucination rate and (optionally) VQA accuracy of a bridge VLM on a world folder."""
    out: dict[str, Any] = {"hallucination": evaluate_hallucination(model, folder, limit, batch_size)}
    if vqa:
        from mmstack.eval.vqa import evaluate_vqa

        out["vqa"] = evaluate_vqa(model, folder, limit=limit, batch_size=batch_size)
    return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Headline changes between two ``evaluate_alignment`` results."""
    hb, ha = before["hallucination"]["rate"], after["hallucination"]["rate"]
    out: dict[str, Any] = {
        "hallucination_before": hb,
        "hallucination_after": ha,
        "hallucination_ratio": ha / hb if hb else None,
    }
    if "vqa" in before and "vqa" in after:
        vb, va = before["vqa"]["accuracy"], after["vqa"]["accuracy"]
        out.update({"vqa_before": vb, "vqa_after": va, "vqa_change_points": round(100 * (va - vb), 2)})
    return out
