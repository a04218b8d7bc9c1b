"""``Collection``: open a built collection and search it (the CLI's ``mmstack search`` is a thin layer on this).

    col = Collection.open("photos.db")
    for hit in col.search('"2:red circle" + ./img.png - blue', top_k=5, filters=Filters(path="*/beach/*")):
        print(hit.score, hit.path, hit.caption)

A search embeds the query's terms in every space of the collection (texts with each space's text encoder,
images and stored items only in spaces that hold them), sums them with their weights (negatives subtract)
into one unit vector per space, takes the top candidates of each space (ANN or exact), adds a BM25
ranking of the query's words, and fuses the rankings with reciprocal rank fusion keyed on item id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmstack.errors import CollectionError
from mmstack.index.ann import AnnConfig, ExactIndex, HnswIndex, open_index, top_k_indices
from mmstack.index.embedders import Embedder, load_embedder
from mmstack.index.fts import match_expression
from mmstack.index.fusion import RRF_K, reciprocal_rank_fusion
from mmstack.index.query import QueryPart, parse_query, text_terms
from mmstack.index.store import Filters, SqliteStore

MODES = ("auto", "hybrid", "dense", "text")
EXACT_FILTER_LIMIT = 50_000  # filtered searches over at most this many rows run exactly


@dataclass
class Hit:
    """One search result.

    ``score`` is the cosine similarity when one dense ranking produced the results, the BM25 score for a
    text-only search, and the reciprocal-rank-fusion score when several rankings were fused; ``scores``
    holds each ranking's own score (``dense:image``, ``dense:text``, ``bm25``) for this item.
    """

    id: int
    score: float
    path: str
    kind: str
    space: str
    source: str
    caption: str | None = None
    tags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    unit: str = ""
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EmbeddedBackend:
    """Dense search over the embedded store: an ANN (or exact) index per space, filters through SQLite."""

    def __init__(self, store: SqliteStore, ann: AnnConfig) -> None:
        self.store, self.ann = store, ann
        self._indexes: dict[str, ExactIndex | HnswIndex] = {}

    def index(self, space: str) -> ExactIndex | HnswIndex:
        if space not in self._indexes:
            self._indexes[space] = open_index(self.store, space, self.ann)
        return self._indexes[space]

    def dense(self, space: str, query: np.ndarray, k: int, filters: Filters) -> list[tuple[int, float]]:
        if not filters:
            return self.index(space).search(query, k)
        if self.store.count_filtered(filters, space) <= EXACT_FILTER_LIMIT:
            return self._exact_filtered(space, query, k, filters)
        index = self.index(space)
        for fetch in (10 * k, 100 * k):  # filter ANN candidates; fall back to exact when too few pass
            hits = index.search(query, fetch)
            allowed = self.store.filter_ids(filters, space, [i for i, _ in hits])
            passed = [h for h in hits if h[0] in allowed]
            if len(passed) >= k:
                return passed[:k]
        return self._exact_filtered(space, query, k, filters)

    def _exact_filtered(self, space: str, query: np.ndarray, k: int, filters: Filters) -> list[tuple[int, float]]:
        """Exact top ``k`` among the rows passing ``filters``, streamed from the store in batches."""
        where, params = filters.sql()
        best_ids, best_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for ids, vecs in self.store.iter_vectors(space, where=where, params=params):
            all_ids = np.concatenate([best_ids, ids])
            all_scores = np.concatenate([best_scores, vecs @ query])  # (n,)
            top = top_k_indices(all_scores, k)
            best_ids, best_scores = all_ids[top], all_scores[top]
        return [(int(i), float(s)) for i, s in zip(best_ids, best_scores, strict=True)]

    def bm25(self, match: str, k: int, filters: Filters) -> list[tuple[int, float]]:
        return self.store.bm25(match, k, filters)

    def has_kind(self, space: str, kind: str) -> bool:
        return self.store.has_kind(space, kind)

    def items(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        return self.store.items(ids)

    def vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        return self.store.vectors(ids)

    def spaces(self) -> dict[str, dict[str, Any]]:
        return self.store.spaces()

    def stats(self) -> dict[str, Any]:
        out = self.store.stats()
        out["index"] = {s: self.index(s).kind for s in self.spaces()}
        return out

    def close(self) -> None:
        self.store.close()


class Collection:
    """A searchable collection: the embedded store (a folder) or a Qdrant collection (``qdrant://...``).

    Open with ``Collection.open(db)``. Query embedders are loaded on first use from the model paths the
    collection recorded; pass ``embedders={"image": ..., "text": ...}`` to supply them (their model id and
    dimension must match the collection's, else ``CollectionError``).
    """

    def __init__(self, backend: Any, embedders: dict[str, Embedder] | None = None) -> None:
        self.backend = backend
        self._embedders: dict[str, Embedder] = {}
        for space, emb in (embedders or {}).items():
            self._check(space, emb)
            self._embedders[space] = emb

    @classmethod
    def open(
        cls, db: str | Path, embedders: dict[str, Embedder] | None = None, ann: AnnConfig | None = None
    ) -> Collection:
        """Open a collection folder or ``qdrant://`` URL; ``ann`` overrides the search index the build chose."""
        if str(db).startswith("qdrant://"):
            from mmstack.index.qdrant import QdrantStore

            return cls(QdrantStore.open(str(db)), embedders)
        store = SqliteStore.open(db)
        if ann is None:
            ann = AnnConfig(**store.get_meta("ann", {}))  # as the last build chose (--ann)
        return cls(EmbeddedBackend(store, ann), embedders)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- embedders

    def _check(self, space: str, emb: Embedder) -> None:
        info = self.backend.spaces().get(space)
        if info is None:
            raise CollectionError(f"the collection has no {space!r} space (it has: {', '.join(self.backend.spaces())})")
        if int(info["dim"]) != int(emb.dim) or info["model_id"] != emb.model_id:
            raise CollectionError(
                f"the collection's {space} space was built with {info['model_id']} (dimension {info['dim']}); "
                f"{emb.model_id} (dimension {emb.dim}) cannot search it; use the same model"
            )

    def embedder(self, space: str) -> Embedder:
        """The query embedder of ``space``, loaded from the recorded model path on first use."""
        if space not in self._embedders:
            ref = self.backend.spaces()[space].get("model")
            if not ref:
                raise CollectionError(f"the collection does not record a model for its {space} space; pass embedders=")
            emb = load_embedder(ref)
            self._check(space, emb)
            self._embedders[space] = emb
        return self._embedders[space]

    # -------------------------------------------------------------------------------------- search

    def search(
        self,
        query: str | Sequence[str] | None = None,
        *,
        images: Sequence[str | Path] = (),
        like: Sequence[int] = (),
        top_k: int = 10,
        filters: Filters | None = None,
        mode: str = "auto",
        rrf_k: int = RRF_K,
    ) -> list[Hit]:
        """Search with a query string/tokens (see ``mmstack.index.query``), images and stored items.

        Args:
            mode: ``hybrid`` (dense + BM25), ``dense``, ``text`` (BM25 only) or ``auto`` (hybrid when the
                query has words, else dense).
        """
        if mode not in MODES:
            raise CollectionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if top_k < 1:
            raise CollectionError(f"top_k must be >= 1, got {top_k}")
        parts = parse_query(query, images, like)
        return self.search_parts(parts, top_k=top_k, filters=filters or Filters(), mode=mode, rrf_k=rrf_k)

    def more_like_this(self, item: int, top_k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Items nearest to a stored item (itself excluded)."""
        hits = self.search(like=[item], top_k=top_k + 1, filters=filters, mode="dense")
        return [h for h in hits if h.id != item][:top_k]

    def search_parts(
        self, parts: list[QueryPart], top_k: int, filters: Filters, mode: str, rrf_k: int = RRF_K
    ) -> list[Hit]:
        pos, neg = text_terms(parts)
        use_text = mode in ("hybrid", "text") or (mode == "auto" and bool(pos))
        use_dense = mode != "text"
        fetch = max(top_k, 50) if (use_text and use_dense) else top_k
        rankings: dict[str, list[tuple[int, float]]] = {}
        if use_dense:
            for space in self.backend.spaces():
                if filters.kind and not self.backend.has_kind(space, filters.kind):
                    continue  # no model call for a space the filter empties
                qvec = self.query_vector(parts, space)
                if qvec is not None:
                    rankings[f"dense:{space}"] = self.backend.dense(space, qvec, fetch, filters)
        if use_text:
            match = match_expression(pos, neg)
            if match is not None:
                rankings["bm25"] = self.backend.bm25(match, fetch, filters)
        if not rankings:
            raise CollectionError("nothing to search with: the query has no terms this collection can embed or match")
        return self._hits(rankings, top_k, rrf_k)

    def query_vector(self, parts: Sequence[QueryPart], space: str) -> np.ndarray | None:
        """The weighted sum of the parts' unit vectors in ``space`` (normalised), or None if none applies.

        Texts are embedded in one model call and images in another, whatever their number.
        """
        vectors = self._part_vectors(parts, space)
        used = [(p, v) for p, v in zip(parts, vectors, strict=True) if v is not None]
        if not any(p.weight > 0 for p, _ in used):
            return None
        total = np.sum([p.weight * v for p, v in used], axis=0)
        norm = float(np.linalg.norm(total))
        return (total / norm).astype(np.float32) if norm > 1e-12 else None

    def _part_vectors(self, parts: Sequence[QueryPart], space: str) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(parts)
        items = [int(p.value) for p in parts if p.kind == "item"]
        if items:
            stored, info = self.backend.vectors(items), self.backend.items(items)
            for i, p in enumerate(parts):
                if p.kind == "item":
                    if p.value not in stored:
                        raise CollectionError(f"no item with id {p.value} in the collection")
                    out[i] = stored[p.value] if info[p.value]["space"] == space else None
        texts = [i for i, p in enumerate(parts) if p.kind == "text"]
        images = [i for i, p in enumerate(parts) if p.kind == "image"]
        if not texts and not images:
            return out
        emb = self.embedder(space)
        if texts:
            for i, v in zip(texts, emb.embed_texts([str(parts[i].value) for i in texts]), strict=True):
                out[i] = v
        if images and emb.supports_images:
            from mmstack.data.images import load_image

            prepared = [emb.prepare_image(load_image(str(parts[i].value))) for i in images]
            for i, v in zip(images, emb.embed_prepared(prepared), strict=True):
                out[i] = v
        return out

    def _hits(self, rankings: dict[str, list[tuple[int, float]]], top_k: int, rrf_k: int) -> list[Hit]:
        names = [n for n in rankings if rankings[n]]  # an empty ranking adds nothing; one left keeps its scores
        if not names:
            return []
        if len(names) == 1:
            fused = rankings[names[0]][:top_k]
        else:
            fused = reciprocal_rank_fusion([[i for i, _ in rankings[n]] for n in names], k=rrf_k)[:top_k]
        per = {n: dict(rankings[n]) for n in names}
        meta = self.backend.items([i for i, _ in fused])
        hits = []
        for iid, score in fused:
            m = meta.get(iid)
            if m is None:  # removed between ranking and lookup (a concurrent build)
                continue
            scores = {n: per[n][iid] for n in names if iid in per[n]}
            hits.append(Hit(score=float(score), scores=scores, **m))
        return hits

    # --------------------------------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Row count, spaces (model id, dimension), sources and index type."""
        out = self.backend.stats()
        out["spaces"] = self.backend.spaces()
        return out
