"""The data that flows through the RAG pipeline: a query, retrieved hits, numbered sources, the answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class Query:
    """A question: text, optionally with an image (a PIL image and/or the path it came from)."""

    text: str
    image: Image.Image | None = None
    image_path: str | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass
class Hit:
    """One item a retriever found: its id (the fusion key), score, image path and/or text snippet."""

    id: str
    score: float
    path: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """A fused (and possibly reranked) item. ``number`` is its [n] in the prompt (0: not in the prompt).

    ``retrievers`` maps each retriever that found the item to the item's rank there (from 1).
    """

    id: str
    score: float
    path: str | None = None
    text: str | None = None
    retrievers: dict[str, int] = field(default_factory=dict)
    rerank_score: float | None = None
    number: int = 0
    image_in_prompt: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "id": self.id,
            "path": self.path,
            "text": self.text,
            "score": self.score,
            "rerank_score": self.rerank_score,
            "retrievers": dict(self.retrievers),
            "image_in_prompt": self.image_in_prompt,
        }


@dataclass
class Prompt:
    """What the generator gets: the text with ``<image>`` placeholders (one per source image in source order,
    then the query image's) and the images themselves, in placeholder order."""

    text: str
    images: list[Image.Image]
    sources: list[Source]


@dataclass
class RagAnswer:
    """The pipeline's result.

    Args:
        answer: the generated text with citation markers removed.
        raw: the generator's full output.
        citations: source numbers the answer cites, in order of first mention (valid ones only).
        sources: every fused source kept (``top_k``), in rank order; those in the prompt have a number.
        invalid_citations: cited numbers that match no source in the prompt.
        message: set instead of an answer when nothing could be retrieved (e.g. an empty collection).
        timings: seconds per part: ``retrieve`` (and ``retrieve.<name>``), ``fuse``, ``rerank``,
            ``prompt``, ``generate``, ``total``.
    """

    question: str
    answer: str
    raw: str = ""
    citations: list[int] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    invalid_citations: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cited(self) -> list[Source]:
        """The sources the answer cites, in citation order."""
        by_number = {s.number: s for s in self.sources if s.number}
        return [by_number[n] for n in self.citations if n in by_number]

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "raw": self.raw,
            "citations": list(self.citations),
            "cited": [s.id for s in self.cited],
            "invalid_citations": list(self.invalid_citations),
            "sources": [s.to_dict() for s in self.sources],
            "warnings": list(self.warnings),
            "message": self.message,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


def as_query(text: str, image: Image.Image | str | Path | None = None) -> Query:
    """A ``Query`` from a question and an optional image or image path (loaded robustly)."""
    if image is None or isinstance(image, Image.Image):
        return Query(text, image)
    from mmstack.data.images import load_image

    return Query(text, load_image(image), str(image))
