"""``POST /v1/search``: a text query, an image, or both (with optional negatives and "more like this")
against a collection built by ``mmstack index build``.

Each collection has its own batching engine: requests are bounded (429), get deadlines, and run in the
engine's worker thread, which owns the collection (SQLite connections belong to the thread that opened
them). Query terms arrive as typed fields, never through the CLI's query parser, so a web user cannot name
server files as ``img:`` terms; a query image comes as a URL under the same rules as chat images.
"""

from __future__ import annotations

import base64
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image

from mmstack.serve.batching import BatchingEngine, watch_disconnect
from mmstack.serve.config import ServeConfig
from mmstack.serve.errors import APIError
from mmstack.serve.media import body_bytes, load_image_url, off_loop
from mmstack.serve.schemas import SearchRequest
from mmstack.serve.state import state_of

router = APIRouter()
THUMBNAIL_PX = 128
FILTER_KEYS = ("path", "source", "tags", "kind")


@dataclass
class SearchQuery:
    """One search: its terms, the query image (decoded), and how to answer."""

    text: str | None
    negative: list[str] = field(default_factory=list)
    image: Image.Image | None = None
    like: list[int] = field(default_factory=list)
    top_k: int = 10
    filters: dict[str, Any] = field(default_factory=dict)
    mode: str = "auto"
    include_images: bool = False


class SearchService:
    """Serves one collection (``mmstack.index.Collection``) through a batching engine."""

    capabilities = ("search",)

    def __init__(self, name: str, db: str, config: ServeConfig, metrics: Any = None) -> None:
        from mmstack.index.collection import Collection

        self.name, self.db = name, db
        with Collection.open(db) as col:  # fail at startup, not at the first query, when db is wrong
            stats = col.stats()
        self.rows = int(stats.get("rows", 0))
        self.spaces = {k: {"dim": v.get("dim"), "model_id": v.get("model_id")} for k, v in stats["spaces"].items()}
        self.max_pixels = config.media.max_image_pixels
        self._collection: Any = None
        self._tmp = Path(tempfile.mkdtemp(prefix=f"mmstack-search-{name}-"))
        self.engine = BatchingEngine(f"collection:{name}", self.run_batch, config.batching, metrics)

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "collection", "rows": self.rows, "spaces": self.spaces}

    def run_batch(self, jobs: list[Any]) -> list[Any]:
        """Searches one by one in the worker thread (each query's terms make their own vectors)."""
        from mmstack.index.collection import Collection

        if self._collection is None:
            self._collection = Collection.open(self.db)
        out: list[Any] = []
        for job in jobs:
            try:
                out.append(self._search(job.payload))
            except Exception as err:  # one bad query fails alone
                out.append(err)
        return out

    def _search(self, q: SearchQuery) -> list[dict[str, Any]]:
        from mmstack.index.query import QueryPart
        from mmstack.index.store import Filters

        parts = [QueryPart("text", q.text, 1.0)] if q.text else []
        parts += [QueryPart("text", t, -1.0) for t in q.negative]
        parts += [QueryPart("item", int(i), 1.0) for i in q.like]
        image_file = None
        if q.image is not None:
            # The collection embeds query images from a path; the decoded upload is written privately.
            image_file = self._tmp / f"{time.monotonic_ns()}.png"
            q.image.save(image_file, format="PNG")
            parts.append(QueryPart("image", str(image_file), 1.0))
        try:
            filters = Filters(**{k: tuple(v) if k == "tags" else v for k, v in q.filters.items()})
            hits = self._collection.search_parts(parts, top_k=q.top_k, filters=filters, mode=q.mode)
        finally:
            if image_file is not None:
                image_file.unlink(missing_ok=True)
        return [self._hit(h, q.include_images) for h in hits]

    def _hit(self, hit: Any, with_image: bool) -> dict[str, Any]:
        out = {
            "id": hit.id,
            "score": hit.score,
            "scores": hit.scores,
            "path": hit.path,
            "kind": hit.kind,
            "caption": hit.caption,
            "source": hit.source,
            "tags": hit.tags,
        }
        if with_image and hit.kind in ("image", "pair", "clip"):
            out["image"] = self._thumbnail(hit.path)
        return out

    def _thumbnail(self, path: str) -> str | None:
        from mmstack.data.images import load_image
        from mmstack.errors import ImageError

        try:
            img = load_image(path, max_pixels=self.max_pixels)
        except ImageError:  # the file changed or went away since indexing: the hit stays, without a picture
            return None
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def open_collections(config: ServeConfig, metrics: Any = None) -> dict[str, SearchService]:
    """A search service for every configured collection (each opened once to check it)."""
    return {name: SearchService(name, entry.db, config, metrics) for name, entry in config.collections.items()}


def describe(name: str, svc: Any) -> dict[str, Any]:
    return svc.describe() if hasattr(svc, "describe") else {"id": name, "object": "collection"}


def _query(body: SearchRequest) -> SearchQuery:
    filters = dict(body.filters or {})
    unknown = [k for k in filters if k not in FILTER_KEYS]
    if unknown:
        raise APIError(f"unknown filter {unknown[0]!r}; filters: {', '.join(FILTER_KEYS)}", param="filters")
    if isinstance(filters.get("tags"), str):
        filters["tags"] = [filters["tags"]]
    for key in ("path", "source", "kind"):
        if key in filters and not isinstance(filters[key], str):
            raise APIError(f"filter {key!r} takes one string", param="filters")
    text = (body.query or "").strip() or None
    if not text and not body.image and not body.like:
        raise APIError("give a query, an image, or items to find more like (like)", param="query")
    return SearchQuery(
        text,
        list(body.negative or []),
        None,
        list(body.like or []),
        body.top_k,
        filters,
        body.mode,
        body.include_images,
    )


@router.post("/v1/search")
async def search(body: SearchRequest, request: Request):
    state = state_of(request)
    svc = state.collection(body.collection)
    query = _query(body)
    t0 = time.perf_counter()
    with svc.engine.admit() as ticket:  # 429 here, before the query image is decoded
        if body.image:
            media = state.config.media
            size = body_bytes(request.headers)
            query.image = await off_loop(load_image_url, body.image, media, "image", body_bytes=size, urls=[body.image])
        hits = await ticket.submit(query, op="search").result(watch_disconnect(request.receive))
    took = round(1000 * (time.perf_counter() - t0), 2)
    return JSONResponse({"object": "list", "collection": svc.name, "hits": hits, "took_ms": took})
