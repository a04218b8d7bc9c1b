"""RAG training conversations from the world RAG benchmark generator, in the pipeline's own prompt layout.

A VLM answers RAG prompts well only after it has seen them: numbered snippets, one image per source, and an
answer that names its source first ("[2] red"): the model picks the source, writes its number, and then
answers looking at that source (a one-step chain of thought that a small model learns more easily than
answering and citing at once).

Each conversation takes a record of a sampled knowledge base, places it among ``context_k - 1`` others
(half of them chosen to look like it, as a retriever's near misses are) at a random position (position 1
with ``p_first``, as after a good retriever), and asks about it with ``mmstack.rag.prompt.render_prompt``;
``turns - 1`` follow-up questions (``render_question``) then ask about any record of the same sources. The
long part of a RAG sample is its sources (one image each); several questions about them give several
answers to learn from for little more compute.

``write_training_conversations`` writes them as LLaVA-Instruct records with several images
(``"images": [...]``, one ``<image>`` per image, in order) for a recipe to mix in;
``build_training_set`` keeps them in memory for ``mmstack.rag.tune``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmstack.errors import ConfigError
from mmstack.rag.prompt import render_prompt, render_question
from mmstack.utils.atomic import atomic_dir
from mmstack.world.language import join_list, noun_phrase, reading_order
from mmstack.world.rag_world import (
    HALLS,
    MAX_NUMBER,
    NOTE_TEMPLATES,
    RAG_KINDS,
    RagQuestion,
    RagRecord,
    make_question,
    pair_counts,
    sample_records,
)
from mmstack.world.vocab import derive_seed

TEXT_KINDS = tuple(k for k in RAG_KINDS if k != "image")  # what described notes alone can answer


@dataclass
class RagExample:
    """One training conversation: alternating human/gpt turns (the first holds the sources), the images
    (indices into the set's image list, in placeholder order) and the kind of each question."""

    conversation: list[dict[str, str]]
    images: list[int]
    kinds: list[str]

    def turns(self) -> list[dict[str, str]]:
        return self.conversation


@dataclass
class RagTrainingSet:
    """Examples and the images they refer to (rendered once, shared by every example that shows them)."""

    examples: list[RagExample] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)

    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def add_image(self, name: str, render: Callable[[], Image.Image]) -> int:
        """The index of image ``name``, rendering it the first time it is asked for."""
        if name not in self._index:
            self._index[name] = len(self.images)
            self.images.append(render())
            self.image_names.append(name)
        return self._index[name]


def world_vocabulary() -> list[str]:
    """Texts holding every word a RAG-world prompt or answer can use beyond the examples at hand (all
    exhibit numbers, halls, note templates, the prompt's fixed words), for vocabulary extension."""
    names = [f"exhibit {n} [{n}]" for n in range(1, MAX_NUMBER + 1)]
    notes = [t.format(Name="Exhibit", name="exhibit", hall=h) for t in NOTE_TEMPLATES for h in HALLS]
    return names + notes + [render_prompt("Which exhibit shows this?", [("", True)], True)]


def _likeness(a: RagRecord, b: RagRecord) -> int:
    """Shared colours and shapes: how much ``b`` looks like ``a`` to a retriever."""
    ca, sa = {o.colour for o in a.scene.objects}, {o.shape for o in a.scene.objects}
    return len(ca & {o.colour for o in b.scene.objects}) + len(sa & {o.shape for o in b.scene.objects})


def simulate_context(
    gold: RagRecord, records: list[RagRecord], k: int, rng: random.Random, p_first: float = 0.5
) -> list[RagRecord]:
    """``k`` records holding ``gold``: near misses and random others, ``gold`` first with ``p_first``."""
    others = [r for r in records if r.id != gold.id]
    if len(others) < k - 1:
        raise ConfigError(f"a context of {k} records needs a knowledge base of at least {k} records")
    similar = sorted(others, key=lambda r: (-_likeness(gold, r), rng.random()))[: max(1, 3 * k)]
    chosen: list[RagRecord] = []
    while len(chosen) < k - 1:
        pool = similar if rng.random() < 0.5 else others
        r = rng.choice(pool)
        if r not in chosen:
            chosen.append(r)
    pos = 0 if rng.random() < p_first else rng.randrange(k)
    chosen.insert(pos, gold)
    return chosen


def _ask(
    rec: RagRecord, context: list[RagRecord], rng: random.Random, qid: str, kinds: tuple[str, ...] = RAG_KINDS
) -> RagQuestion:
    """A question of one of ``kinds`` (at random, "note" always works) whose only answer in ``context`` is ``rec``."""
    counts = pair_counts(context)
    for kind in [*rng.sample(kinds, len(kinds)), "note"]:
        q = make_question(rec, kind, counts, rng, qid)
        if q is not None:
            return q
    raise AssertionError("a note question always exists")


def described_note(rec: RagRecord) -> str:
    """The note and, in words, what the exhibit's image shows: "Exhibit 17 belongs to the north hall. It shows
    a red circle and a blue star." (text-only training of the lookups that images answer at inference)."""
    return f"{rec.note} It shows {join_list([noun_phrase(o, size=False) for o in reading_order(rec.scene)])}."


def conversation_for(
    context: list[RagRecord],
    questions: list[RagQuestion],
    source_images: list[int] | None,
    query_images: list[int | None],
    described: bool = False,
) -> RagExample:
    """The conversation asking ``questions`` (the first with the sources) about ``context``; without
    ``source_images`` the sources are their notes alone (text-only RAG), ``described`` in words
    (``described_note``)."""
    numbers = {r.id: i for i, r in enumerate(context, start=1)}
    snippets = [(described_note(r) if described else r.note, source_images is not None) for r in context]
    conversation, images = [], list(source_images or [])
    for j, (q, query) in enumerate(zip(questions, query_images, strict=True)):
        text = (
            render_prompt(q.question, snippets, query is not None)
            if j == 0
            else render_question(q.question, query is not None)
        )
        conversation += [
            {"from": "human", "value": text},
            {"from": "gpt", "value": f"[{numbers[q.record]}] {q.answer}"},
        ]
        if query is not None:
            images.append(query)
    return RagExample(conversation, images, [q.kind for q in questions])


def build_training_set(
    n_examples: int,
    seed: int = 1000,
    context_k: int = 3,
    turns: int = 4,
    n_records: int = 60,
    image_size: int = 64,
    p_first: float = 0.5,
    text_only: float = 0.0,
    described: bool = False,
) -> RagTrainingSet:
    """``n_examples`` RAG conversations of ``turns`` questions each over fresh knowledge bases (seeds
    derived from ``seed``; use seeds the evaluation does not use). A share ``text_only`` of them shows the
    notes without images and asks only about notes: about a third of the compute of a multimodal one, they
    teach the in-context lookup (find the source that names exhibit 17, copy its hall and number) that the
    multimodal questions build on. With ``described`` the notes-only conversations say in words what each image
    shows and ask every kind of question but the query-image one, so lookups by content ("Which exhibit shows
    a blue star?": find the source, copy its number) are practised on text first."""
    if n_examples < 1 or turns < 1:
        raise ConfigError(f"n_examples and turns must be >= 1; got {n_examples}, {turns}")
    out = RagTrainingSet()
    rng = random.Random(derive_seed("rag-train", int(seed)))
    per_kb, records = 50, []
    notes_kinds = TEXT_KINDS if described else ("note",)  # what a notes-only conversation asks
    for i in range(n_examples):
        kb = i // per_kb
        if i % per_kb == 0:
            records = sample_records(n_records, derive_seed("rag-train-kb", int(seed), kb))
        gold = rng.choice(records)
        context = simulate_context(gold, records, context_k, rng, p_first)
        notes_only = rng.random() < text_only
        kinds = notes_kinds if notes_only else RAG_KINDS
        questions = [_ask(gold, context, rng, f"c{i}t0", kinds)]
        for j in range(1, turns):  # follow-ups about any source, never a question asked already
            for _ in range(20):
                q = _ask(rng.choice(context), context, rng, f"c{i}t{j}", kinds)
                if all(q.question != p.question for p in questions):
                    questions.append(q)
                    break
        if notes_only:
            out.examples.append(conversation_for(context, questions, None, [None] * len(questions), described))
            continue
        ids = [out.add_image(f"kb{kb}/{r.id}", lambda r=r: r.render(image_size)) for r in context]
        queries = [
            out.add_image(f"kb{kb}/c{i}/{q.id}", lambda q=q: q.render_query(image_size)) if q.query_scene else None
            for q in questions
        ]
        out.examples.append(conversation_for(context, questions, ids, queries))
    return out


def write_training_conversations(
    out_dir: str | Path, n_examples: int, seed: int = 1000, context_k: int = 3, image_size: int = 64
) -> dict[str, Any]:
    """Write ``conversations.json`` (LLaVA-Instruct records with ``"images"``: several per record, one
    ``<image>`` each, in order) and ``images/`` into ``out_dir``; returns a summary."""
    data = build_training_set(n_examples, seed, context_k, image_size=image_size)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        paths = []
        for name, img in zip(data.image_names, data.images, strict=True):
            rel = "images/" + name.replace("/", "_") + ".png"
            img.save(tmp / rel, format="PNG", compress_level=1)
            paths.append(rel)
        records = [
            {
                "id": f"rag{i:06d}",
                "images": [paths[j] for j in ex.images],
                "conversations": ex.turns(),
                "kinds": ex.kinds,
            }
            for i, ex in enumerate(data.examples)
        ]
        (tmp / "conversations.json").write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    return {"out": str(out), "n_examples": len(data.examples), "n_images": len(data.images), "context_k": context_k}
