"""The world RAG benchmark: a knowledge base of exhibits (an image plus a text note) and questions that can
only be answered by retrieving the right exhibit.

Each record is a shapes-world scene (1-3 objects) named "exhibit N", with a note that states a fact the image
does not show ("Exhibit 17 belongs to the north hall."). Questions come in five kinds:

- ``attribute``: name -> what the image shows ("What colour is the star in exhibit 17?" -> "red");
- ``lookup``: what an image shows -> name ("Which exhibit shows a purple cross?" -> "exhibit 17");
- ``fact``: what an image shows -> the note's fact ("In which hall is the exhibit with a purple cross?");
- ``note``: name -> the note's fact ("In which hall is exhibit 17?" -> "north hall");
- ``image``: a query image (a new photo of an exhibit: same objects, new jitter, pixel noise) -> its name
  or hall ("Which exhibit is this?").

Every question has exactly one right record: a described object is unique in its scene, and a (colour,
shape) pair asked about is shown by exactly one exhibit of the knowledge base. Questions are worded apart
from the notes' templates (a question shares no verb with a note), so keyword retrieval matches a note by
its name, not by its phrasing. Everything is determined by the seed.

Layout written by ``generate_rag_world``::

    DIR/images/exhibit-17.png     DIR/records.jsonl   {"id", "name", "number", "image", "note", "hall", "objects"}
    DIR/queries/q00003.png        DIR/pairs.jsonl     {"id", "image", "caption": note}  (for ``mmstack index``)
    DIR/questions.jsonl           {"id", "question", "answer", "kind", "record", "image": null | "queries/..."}
    DIR/rag_world.json            seed, sizes, counts per kind, generator version
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from mmstack.errors import ConfigError
from mmstack.utils.atomic import atomic_dir
from mmstack.world.language import article
from mmstack.world.render import render_scene
from mmstack.world.scene import Scene, sample_scene
from mmstack.world.vocab import derive_seed

RAG_WORLD_VERSION = "1.0"
HALLS: tuple[str, ...] = ("north hall", "south hall", "east hall", "west hall", "garden hall", "tower hall")
NOTE_TEMPLATES: tuple[str, ...] = (
    "{Name} belongs to the {hall}.",
    "{Name} is kept in the {hall}.",
    "The {hall} holds {name}.",
    "{Name} was moved to the {hall}.",
)
RAG_KINDS: tuple[str, ...] = ("attribute", "lookup", "fact", "note", "image")
MAX_NUMBER = 99  # exhibit numbers are drawn from 1..MAX_NUMBER, so a knowledge base holds at most 99 records
QUERY_NOISE = 0.05


@dataclass(frozen=True)
class RagRecord:
    """One exhibit: its id ("exhibit-17"), name ("exhibit 17"), scene, hall and note."""

    number: int
    scene: Scene
    hall: str
    note: str

    @property
    def id(self) -> str:
        return f"exhibit-{self.number}"

    @property
    def name(self) -> str:
        return f"exhibit {self.number}"

    @property
    def image(self) -> str:
        """The image path relative to the benchmark folder."""
        return f"images/{self.id}.png"

    def render(self, image_size: int = 64) -> Image.Image:
        return render_scene(self.scene, image_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "number": self.number,
            "image": self.image,
            "note": self.note,
            "hall": self.hall,
            **self.scene.to_dict(),
        }


@dataclass(frozen=True)
class RagQuestion:
    """A question, its short answer, its kind, the id of the one record that answers it and, for the
    ``image`` kind, the query photo (a scene to render with ``query_seed``)."""

    id: str
    question: str
    answer: str
    kind: str
    record: str
    query_scene: Scene | None = None
    query_seed: int = 0

    @property
    def image(self) -> str | None:
        return f"queries/{self.id}.png" if self.query_scene is not None else None

    def render_query(self, image_size: int = 64) -> Image.Image | None:
        """The query photo: the exhibit's objects with new jitter and pixel noise (None for text questions)."""
        if self.query_scene is None:
            return None
        return render_scene(self.query_scene, image_size, noise=QUERY_NOISE, seed=self.query_seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "kind": self.kind,
            "record": self.record,
            "image": self.image,
        }


@dataclass
class RagWorld:
    """A knowledge base and its questions (in memory; ``write`` puts them on disk)."""

    records: list[RagRecord]
    questions: list[RagQuestion]
    seed: int = 0
    image_size: int = 64
    by_id: dict[str, RagRecord] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.records}

    def summary(self) -> dict[str, Any]:
        return {
            "generator_version": RAG_WORLD_VERSION,
            "seed": self.seed,
            "image_size": self.image_size,
            "n_records": len(self.records),
            "n_questions": len(self.questions),
            "question_kinds": dict(sorted(Counter(q.kind for q in self.questions).items())),
            "halls": list(HALLS),
        }


# ------------------------------------------------------------------------------------------ sampling


def sample_records(n: int, seed: int, min_objects: int = 1, max_objects: int = 3) -> list[RagRecord]:
    """``n`` exhibits with distinct numbers in 1..99, a random hall and note each (deterministic in seed)."""
    if not 1 <= n <= MAX_NUMBER:
        raise ConfigError(f"--records must be in 1..{MAX_NUMBER} (exhibit numbers are 1..{MAX_NUMBER}); got {n}")
    rng = random.Random(derive_seed("rag-records", int(seed)))
    numbers = rng.sample(range(1, MAX_NUMBER + 1), n)
    records = []
    for number in numbers:
        scene = sample_scene(
            random.Random(derive_seed("rag-scene", int(seed), number)), "train", min_objects, max_objects
        )
        hall = rng.choice(HALLS)
        name = f"exhibit {number}"
        note = rng.choice(NOTE_TEMPLATES).format(Name=name.capitalize(), name=name, hall=hall)
        records.append(RagRecord(number, scene, hall, note))
    return records


def pair_counts(records: list[RagRecord]) -> Counter[tuple[str, str]]:
    """How many exhibits show each (colour, shape) pair (an exhibit counts once)."""
    return Counter(p for r in records for p in {(o.colour, o.shape) for o in r.scene.objects})


def _attribute_question(rec: RagRecord, rng: random.Random) -> tuple[str, str] | None:
    objs = rec.scene.objects
    options = []
    for o in objs:
        if sum(x.shape == o.shape for x in objs) == 1:
            options.append((f"What colour is the {o.shape} in {rec.name}?", o.colour))
        if sum(x.colour == o.colour for x in objs) == 1:
            options.append((f"What shape is the {o.colour} object in {rec.name}?", o.shape))
    return rng.choice(options) if options else None


def _unique_pair(rec: RagRecord, counts: Counter, rng: random.Random) -> tuple[str, str] | None:
    pairs = sorted({(o.colour, o.shape) for o in rec.scene.objects if counts[(o.colour, o.shape)] == 1})
    return rng.choice(pairs) if pairs else None


def _query_scene(rec: RagRecord, rng: random.Random) -> Scene:
    """A new photo of the exhibit: the same objects in the same cells, placed with new jitter."""
    objs = [replace(o, jx=rng.uniform(-1, 1), jy=rng.uniform(-1, 1)) for o in rec.scene.objects]
    return Scene(tuple(objs))


def make_question(rec: RagRecord, kind: str, counts: Counter, rng: random.Random, qid: str) -> RagQuestion | None:
    """A question of ``kind`` whose only answering record is ``rec``; None when ``rec`` cannot support it."""
    if kind == "attribute":
        qa = _attribute_question(rec, rng)
        return RagQuestion(qid, qa[0], qa[1], kind, rec.id) if qa else None
    if kind == "note":
        return RagQuestion(qid, f"In which hall is {rec.name}?", rec.hall, kind, rec.id)
    if kind == "image":
        text, answer = rng.choice((("Which exhibit is this?", rec.name), ("In which hall is this exhibit?", rec.hall)))
        seed = rng.getrandbits(32)
        return RagQuestion(qid, text, answer, kind, rec.id, query_scene=_query_scene(rec, rng), query_seed=seed)
    pair = _unique_pair(rec, counts, rng)
    if pair is None:
        return None
    thing = f"{article(pair[0])} {pair[0]} {pair[1]}"
    if kind == "lookup":
        return RagQuestion(qid, f"Which exhibit shows {thing}?", rec.name, kind, rec.id)
    return RagQuestion(qid, f"In which hall is the exhibit with {thing}?", rec.hall, kind, rec.id)


def sample_questions(records: list[RagRecord], n: int, seed: int) -> list[RagQuestion]:
    """``n`` questions cycling through ``RAG_KINDS``; each asks about a random record that supports it."""
    if n < 1:
        raise ConfigError(f"--n (number of questions) must be >= 1; got {n}")
    rng = random.Random(derive_seed("rag-questions", int(seed)))
    counts = pair_counts(records)
    out: list[RagQuestion] = []
    while len(out) < n:
        kind = RAG_KINDS[len(out) % len(RAG_KINDS)]
        for _ in range(50):  # a random record may not support the kind (no unique pair / object)
            q = make_question(rng.choice(records), kind, counts, rng, f"q{len(out):05d}")
            if q is not None:
                out.append(q)
                break
        else:
            raise ConfigError(f"no record of this knowledge base supports a {kind!r} question; use more --records")
    return out


def sample_rag_world(n_records: int = 50, n_questions: int = 100, seed: int = 0, image_size: int = 64) -> RagWorld:
    """The benchmark in memory: ``n_records`` exhibits and ``n_questions`` questions (see the module docstring)."""
    records = sample_records(n_records, seed)
    return RagWorld(records, sample_questions(records, n_questions, seed), seed, image_size)


# ------------------------------------------------------------------------------------------- writing


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def generate_rag_world(
    out_dir: str | Path, n_records: int = 50, n_questions: int = 100, seed: int = 0, image_size: int = 64
) -> dict[str, Any]:
    """Write the benchmark folder (see the module docstring) atomically and return its summary."""
    world = sample_rag_world(n_records, n_questions, seed, image_size)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "rag_world.json").is_file():
        raise ConfigError(f"--out {out} exists and is not a RAG world folder (no rag_world.json); choose a new folder")
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "queries").mkdir()
        for rec in world.records:
            rec.render(image_size).save(tmp / rec.image, format="PNG", compress_level=1)
        for q in world.questions:
            img = q.render_query(image_size)
            if img is not None:
                img.save(tmp / q.image, format="PNG", compress_level=1)
        (tmp / "records.jsonl").write_text(_jsonl([r.to_dict() for r in world.records]), encoding="utf-8")
        pairs = [{"id": r.id, "image": r.image, "caption": r.note} for r in world.records]
        (tmp / "pairs.jsonl").write_text(_jsonl(pairs), encoding="utf-8")
        (tmp / "questions.jsonl").write_text(_jsonl([q.to_dict() for q in world.questions]), encoding="utf-8")
        (tmp / "rag_world.json").write_text(json.dumps(world.summary(), sort_keys=True, indent=2) + "\n")
    return {"out": str(out), **world.summary()}


def load_rag_questions(folder: str | Path) -> list[dict[str, Any]]:
    """The questions of a written benchmark folder, with ``image`` made absolute (or None)."""
    folder = Path(folder)
    path = folder / "questions.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: {folder} is not a RAG world folder (generate one with generate_rag_world)"
        )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        r["image"] = str(folder / r["image"]) if r.get("image") else None
    return rows
