"""VQA accuracy of a bridge VLM, scored with the standard VQA answer normalisation.

``normalize_answer`` follows the official VQA evaluation script (Antol et al., ``vqaEval.py``):
punctuation stripped or spaced, periods removed unless inside numbers, number words to digits,
articles dropped, contractions restored. ``vqa_score`` is exact match after normalisation for one
reference answer and ``min(matches / 3, 1)`` when several references exist (the VQA "three humans
agree" rule). ``evaluate_vqa`` asks every question of a data folder (``conversations.json``, and the
clips of ``clips.jsonl``) as a single-turn prompt and reports accuracy overall and by question kind.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmstack.errors import DataError

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official (odd) pattern, kept for comparable numbers
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's normalisation of an answer string."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """1/0 exact match (normalised) for one reference; ``min(matches / 3, 1)`` for several."""
    if not references:
        raise DataError("a VQA item needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = sum(pred == normalize_answer(r) for r in references)
    if len(references) == 1:
        return float(matches)
    return min(matches / 3.0, 1.0)


@dataclass
class VqaItem:
    """One question about an image (``image``) or a clip (``frames``), with its reference answers."""

    question: str
    answers: list[str]
    kind: str = "all"
    image: Path | None = None
    frames: list[Path] = field(default_factory=list)
    id: str = ""


def load_vqa_items(folder: str | Path, clips: bool = True, limit: int | None = None) -> list[VqaItem]:
    """Every question of ``folder/conversations.json`` (+ ``clips.jsonl``) as single-turn VQA items.

    A question's kind comes from the record's ``kinds`` list (the shapes world), the turn's ``kind``, or
    is ``"all"``. Clip questions get kind ``motion`` (or ``clip_<kind>``). Several reference answers may
    be given as a list in the answer turn's ``answers`` field. ``limit`` keeps the first N records.
    """
    from mmstack.data.conversations import IMAGE_TOKEN, read_conversations

    folder = Path(folder)
    path = folder if folder.is_file() else folder / "conversations.json"
    items = []
    for conv in read_conversations(path)[:limit]:
        kinds = conv.meta.get("kinds") if isinstance(conv.meta.get("kinds"), list) else []
        for j in range(0, len(conv.turns) - 1, 2):
            q, a = conv.turns[j], conv.turns[j + 1]
            kind = kinds[j // 2] if j // 2 < len(kinds) else q.meta.get("kind", a.meta.get("kind", "all"))
            answers = a.meta.get("answers") if isinstance(a.meta.get("answers"), list) else [a.value]
            question = q.value.replace(IMAGE_TOKEN, "").strip()
            items.append(VqaItem(question, [str(x) for x in answers], str(kind), conv.image, id=str(conv.id)))
    clip_file = (folder if folder.is_dir() else folder.parent) / "clips.jsonl"
    if clips and clip_file.is_file():
        lines = [ln for ln in clip_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for rec in map(json.loads, lines[:limit]):
            frames = [clip_file.parent / f for f in rec["frames"]]
            for q in rec.get("questions", []):
                kind = "motion" if q.get("kind") == "motion" else f"clip_{q.get('kind', 'all')}"
                items.append(VqaItem(q["question"], [str(q["answer"])], kind, frames=frames, id=f"clip {rec['id']}"))
    if not items:
        raise DataError(f"{path} has no questions to evaluate")
    return items


def answer_items(
    model: Any, items: Sequence[VqaItem], batch_size: int = 64, max_new_tokens: int = 8, generation: Any = None
) -> list[str]:
    """The model's answers to ``items`` (images and clips batched separately): greedy, or as ``generation``
    (a ``GenerationConfig``, e.g. sampling) says, with ``max_new_tokens`` either way."""
    import dataclasses

    from mmstack.data.images import load_image
    from mmstack.models.bridge_generate import GenerationConfig, generate_text
    from mmstack.processing.video import load_frames

    cfg = dataclasses.replace(generation or GenerationConfig(), max_new_tokens=max_new_tokens)
    k = model.processor.config.video_frames
    cache: dict[Any, Any] = {}

    def visual(item: VqaItem):
        key = item.image or tuple(item.frames)
        if key not in cache:
            cache[key] = load_image(item.image) if item.image else load_frames(item.frames, k)
        return cache[key]

    answers: list[str] = [""] * len(items)
    for is_clip in (False, True):
        idx = [i for i, it in enumerate(items) if bool(it.frames) == is_clip]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            prompts = [items[i].question for i in chunk]
            vis = [visual(items[i]) if (items[i].image or items[i].frames) else None for i in chunk]
            kwargs = {"videos": vis} if is_clip else {"images": vis if any(v is not None for v in vis) else None}
            for i, text in zip(chunk, generate_text(model, prompts, config=cfg, **kwargs), strict=True):
                answers[i] = text
            cache.clear()
    return answers


def score_items(items: Sequence[VqaItem], predictions: Sequence[str], n_examples: int = 8) -> dict[str, Any]:
    """Accuracy overall and by kind, plus a few examples (right and wrong)."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    scores = []
    examples = []
    for item, pred in zip(items, predictions, strict=True):
        s = vqa_score(pred, item.answers)
        scores.append(s)
        by_kind[item.kind].append(s)
        if len(examples) < n_examples:
            examples.append({"question": item.question, "answers": item.answers, "prediction": pred, "score": s})
    image_scores = [s for it, s in zip(items, scores, strict=True) if not it.frames]
    return {
        "accuracy": sum(scores) / len(scores),
        "n": len(scores),
        "image_accuracy": sum(image_scores) / len(image_scores) if image_scores else None,
        "by_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())},
        "examples": examples,
    }


def evaluate_vqa(
    model: Any,
    folder: str | Path,
    limit: int | None = None,
    batch_size: int = 64,
    clips: bool = True,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Answer every question of ``folder`` with ``model`` and score them (see the module docstring)."""
    import torch

    items = load_vqa_items(folder, clips=clips, limit=limit)
    model.eval()
    with torch.inference_mode():
        predictions = answer_items(model, items, batch_size, max_new_tokens)
    return {"data": str(folder), **score_items(items, predictions)}
