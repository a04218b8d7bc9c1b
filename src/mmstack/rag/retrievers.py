"""Retrievers over a small in-memory knowledge base (items with an image path and/or a text), for the RAG
benchmark, tests and ad-hoc folders; collections on disk go through ``mmstack.rag.collection``.

- ``KeywordRetriever`` ("text"): BM25 over the items' texts, English stop words and terms found in more
  than ``max_df`` of the items ignored (they carry no signal and would hand every item a rank, which
  rank fusion would then reward).
- ``ImageRetriever`` ("image"): the query image against the items' images (two-tower image embeddings).
- ``CrossModalRetriever`` ("cross"): the query text against the items' images (two-tower text -> image;
  with a region-trained tower, also against each image's best patch).

Search is exact (a matrix product): right for thousands of items; the index package is for millions.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmstack.rag.encoders import TwoTowerEncoder
from mmstack.rag.types import Hit, Query

STOP_WORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "why",
        "with",
    }
)
_WORD = re.compile(r"\w+")


@dataclass
class Item:
    """One knowledge-base item: its id, image path (or None) and text (or None)."""

    id: str
    path: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def hit(self, score: float) -> Hit:
        return Hit(self.id, float(score), self.path, self.text, dict(self.metadata))


def items_from_pairs(path: str | Path) -> list[Item]:
    """Items from a pairs file (jsonl/csv/folder; see ``mmstack.data.pairs``): image + caption each; the
    pair's id is the item id (its image path when it has none)."""
    from mmstack.data.pairs import read_pairs

    return [Item(str(p.id) if p.id is not None else str(p.image), str(p.image), p.caption) for p in read_pairs(path)]


def tokenize(text: str) -> list[str]:
    """Lower-cased words without stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


class KeywordRetriever:
    """BM25 (k1 = 1.2, b = 0.75) over the items' texts; only items matching an informative term are returned."""

    def __init__(
        self, items: Sequence[Item], name: str = "text", max_df: float = 0.5, k1: float = 1.2, b: float = 0.75
    ):
        self.name = name
        self.items = [it for it in items if it.text]
        self.docs = [Counter(tokenize(it.text or "")) for it in self.items]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg_len = (sum(self.lengths) / len(self.lengths)) if self.lengths else 1.0
        n = len(self.docs)
        df = Counter(term for d in self.docs for term in d)
        # Lucene's idf; terms in more than max_df of the items are dropped
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items() if c <= max_df * n}
        self.k1, self.b = k1, b

    def retrieve(self, query: Query, k: int) -> list[Hit]:
        terms = [t for t in tokenize(query.text) if t in self.idf]
        scored = []
        for i, (doc, length) in enumerate(zip(self.docs, self.lengths, strict=True)):
            s = 0.0
            for t in terms:
                tf = doc.get(t, 0)
                if tf:
                    s += (
                        self.idf[t]
                        * tf
                        * (self.k1 + 1)
                        / (tf + self.k1 * (1 - self.b + self.b * length / self.avg_len))
                    )
            if s > 0:
                scored.append((s, i))
        scored.sort(key=lambda t: (-t[0], t[1]))
        return [self.items[i].hit(s) for s, i in scored[:k]]


class _ImageMatrix:
    """The items with an image and their unit image embeddings (computed once); with ``dense`` also their
    unit patch-token embeddings, for text queries (``top(..., dense=True)``)."""

    def __init__(self, encoder: TwoTowerEncoder, items: Sequence[Item], batch_size: int = 64, dense: bool = False):
        self.encoder = encoder
        self.items = [it for it in items if it.path]
        paths = [it.path for it in self.items]
        self.patches: torch.Tensor | None = None
        if dense:
            self.vectors, self.patches = encoder.embed_paths_dense(paths, batch_size)  # (N, D), (N, T, D)
        else:
            self.vectors = encoder.embed_paths(paths, batch_size)  # (N, D)

    def top(self, q: torch.Tensor, k: int, dense: bool = False) -> list[Hit]:
        """The ``k`` best items for the unit query ``q``: cosine to the image embedding, plus (``dense``, when
        patch embeddings are held) the best cosine to one of its patch tokens."""
        if not self.items:
            return []
        scores = self.vectors @ q  # (N,)
        if dense and self.patches is not None:
            scores = scores + (self.patches @ q).amax(1)
        order = scores.argsort(descending=True)[:k].tolist()
        return [self.items[i].hit(float(scores[i])) for i in order]


class ImageRetriever:
    """The query image against the items' images; applies only to questions with an image."""

    def __init__(self, matrix: _ImageMatrix, name: str = "image") -> None:
        self.matrix, self.name = matrix, name

    def applies(self, query: Query) -> bool:
        return query.image is not None

    def retrieve(self, query: Query, k: int) -> list[Hit]:
        return self.matrix.top(self.matrix.encoder.embed_images([query.image])[0], k)


class CrossModalRetriever:
    """The query text against the items' images. Words the text tower cannot represent are dropped; a
    question with no word it knows (e.g. "Which exhibit is this?" for a world-trained CLIP) is not searched,
    since a ranking from an embedding of unknown tokens is noise that rank fusion would reward.

    When the image matrix holds patch embeddings (a tower trained with region-text alignment), an image
    scores its global cosine plus its best patch's cosine: a partial description ("a purple star") matches
    the one patch that shows it, where the pooled embedding describes the whole scene. On the world RAG
    benchmark (seed 0, 50 exhibits, the session-11 demo CLIP) that lifts text -> image recall@5 of fact
    questions 0.70 -> 0.97 and of lookup questions 0.73 -> 0.95 (recall@1 0.47 -> 0.87, 0.45 -> 0.82).
    """

    def __init__(self, matrix: _ImageMatrix, name: str = "cross") -> None:
        self.matrix, self.name = matrix, name

    def applies(self, query: Query) -> bool:
        return bool(self.matrix.encoder.known_text(query.text))

    def retrieve(self, query: Query, k: int) -> list[Hit]:
        text = self.matrix.encoder.known_text(query.text)
        return self.matrix.top(self.matrix.encoder.embed_texts([text])[0], k, dense=True) if text else []


def memory_retrievers(model: Any, items: Sequence[Item], max_df: float = 0.5, dense: bool | None = None) -> list[Any]:
    """The three retrievers (text, image, cross) over ``items``, sharing one two-tower encoding of the images.

    ``dense``: add patch scores to text -> image search (``CrossModalRetriever``); ``None`` decides by the
    checkpoint (on when its card records region-text training, whose patch tokens match texts).
    """
    encoder = TwoTowerEncoder(model)
    matrix = _ImageMatrix(encoder, items, dense=encoder.dense if dense is None else dense)
    return [KeywordRetriever(items, max_df=max_df), ImageRetriever(matrix), CrossModalRetriever(matrix)]
