"""Retrievers over a collection built by ``mmstack index build`` (``mmstack.index.Collection``).

Three searches of one collection, each a retriever for the pipeline's fusion:

- ``text``: BM25 over captions, notes and document chunks (the collection's full-text index). The question
  loses its stop words first, and hits scoring under ``min_text_score`` are dropped: FTS5 gives a word in
  more than half of the rows an idf of 1e-6, so such hits only say "shares a common word", and handing them
  ranks would let rank fusion reward noise.
- ``image``: the query image against the stored vectors (query by example); only for image questions.
- ``cross``: the question text against the stored vectors (CLIP text -> image, and documents when the
  collection has a text space), without the words the image space's text tower cannot represent (and not
  at all when it knows none of the question's words: a ranking of unknown tokens is noise).

A hit's id is the item's own id where it has one (a pair's or clip's id, so the frames of one clip fuse
into one source), else the row id.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mmstack.errors import CollectionError
from mmstack.rag.retrievers import tokenize
from mmstack.rag.types import Hit, Query

MODES = ("text", "image", "cross")


def open_collection(db: str | Path) -> Any:
    """``Collection.open(db)``, with an error that says what to do when ``db`` is no collection."""
    from mmstack.index.collection import Collection

    try:
        return Collection.open(db)
    except CollectionError:
        raise
    except Exception as err:
        raise CollectionError(
            f"--db {db} is not a collection ({err}); build one with `mmstack index build`, or pass a pairs file"
        ) from err


def _to_hit(h: Any) -> Hit:
    item_id = str(h.meta["id"]) if isinstance(h.meta, dict) and "id" in h.meta else str(h.id)
    metadata = {"row": h.id, "kind": h.kind, "source": h.source, "space": h.space, "scores": dict(h.scores)}
    return Hit(item_id, float(h.score), path=h.path if h.kind != "text" else None, text=h.caption, metadata=metadata)


class CollectionRetriever:
    """One search mode (``text``, ``image`` or ``cross``) of a collection as a RAG retriever."""

    def __init__(self, collection: Any, mode: str, name: str | None = None, min_text_score: float = 1e-3) -> None:
        if mode not in MODES:
            raise CollectionError(f"retriever mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.collection, self.mode, self.name = collection, mode, name or mode
        self.min_text_score = min_text_score

    def applies(self, query: Query) -> bool:
        if self.mode == "image":
            return query.image is not None or query.image_path is not None
        return bool(self._cross_text(query.text)) if self.mode == "cross" else True

    def _cross_text(self, text: str) -> str:
        """The question without words the image space's text tower cannot represent (see ``known_text``)."""
        from mmstack.rag.encoders import known_text

        if "image" not in self.collection.backend.spaces():
            return text
        tokenizer = getattr(getattr(self.collection.embedder("image"), "processor", None), "tokenizer", None)
        return known_text(tokenizer, text) if tokenizer is not None else text

    def retrieve(self, query: Query, k: int) -> list[Hit]:
        from mmstack.index.query import QueryPart
        from mmstack.index.store import Filters

        if self.mode == "image":
            return self._by_image(query, k)
        if self.mode == "text":
            words = " ".join(tokenize(query.text))
            if not words:
                return []
            hits = self.collection.search_parts([QueryPart("text", words)], top_k=k, filters=Filters(), mode="text")
            return [_to_hit(h) for h in hits if h.score >= self.min_text_score]
        text = self._cross_text(query.text)
        if not text:
            return []
        hits = self.collection.search_parts([QueryPart("text", text)], top_k=k, filters=Filters(), mode="dense")
        return [_to_hit(h) for h in hits]

    def _by_image(self, query: Query, k: int) -> list[Hit]:
        from mmstack.index.query import QueryPart
        from mmstack.index.store import Filters

        def search(path: str) -> list[Hit]:
            hits = self.collection.search_parts([QueryPart("image", path)], top_k=k, filters=Filters(), mode="dense")
            return [_to_hit(h) for h in hits]

        if query.image_path is not None:
            return search(query.image_path)
        with tempfile.TemporaryDirectory(prefix="mmstack-rag-") as tmp:  # the collection embeds images by path
            path = str(Path(tmp) / "query.png")
            query.image.save(path)
            return search(path)


def collection_retrievers(collection: Any) -> list[CollectionRetriever]:
    """The text, image and cross-modal retrievers of ``collection`` (image ones only with an image space)."""
    out = [CollectionRetriever(collection, "text")]
    if "image" in collection.backend.spaces():
        out += [CollectionRetriever(collection, "image"), CollectionRetriever(collection, "cross")]
    elif collection.backend.spaces():
        out.append(CollectionRetriever(collection, "cross"))  # documents only: dense text search
    return out


def collection_two_tower(collection: Any) -> Any | None:
    """The two-tower model behind the collection's image space (for reranking), or None."""
    if "image" not in collection.backend.spaces():
        return None
    return getattr(collection.embedder("image"), "model", None)
