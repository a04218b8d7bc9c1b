"""The Qdrant backend: the same units, item ids and payloads as the embedded store, in Qdrant collections.

``--db qdrant://host:port/name`` talks to a Qdrant server; ``qdrant:///abs/folder/name`` uses
qdrant-client's local mode (an embedded Qdrant in ``/abs/folder``, what the tests run against).

Layout: one Qdrant collection per vector space, ``name__image`` and ``name__text`` (cosine distance; our
vectors are unit length, so scores equal the embedded store's inner products), whose point ids are the item
ids of ``store.item_id`` and whose payloads hold uid, seq, kind, space, source, path, caption, text, tags
and meta; and ``name__units`` holding one point per unit (its fingerprint) plus point 0 with the collection's
spaces (model id, dimension, model path) and the last run's unreadable files.

Qdrant has no transactions: a batch deletes the units' old points, writes the items, then the unit points
last, so a crash leaves at worst items whose unit point is missing; the next run sees those units as new and
overwrites the same ids. Differences from the embedded store: no BM25 ranking (hybrid search uses the dense
rankings only), and path/source globs are applied to over-fetched candidates on the client.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from mmstack.errors import CollectionError
from mmstack.index.store import Filters, ItemRow, UnitRow, _is_glob, item_id

META_ID = 0
_UNIT_FIELDS = ("uid", "kind", "source", "path", "size", "mtime_ns", "hash", "n_items")


def parse_url(url: str) -> tuple[dict[str, Any], str]:
    """``(QdrantClient kwargs, collection name)`` of a ``qdrant://`` URL."""
    u = urlparse(url)
    if u.scheme != "qdrant":
        raise CollectionError(f"{url}: expected qdrant://host:port/name or qdrant:///local/folder/name")
    if u.netloc:
        name = u.path.strip("/")
        if not name or "/" in name:
            raise CollectionError(
                f"{url}: give one collection name after the host, e.g. qdrant://localhost:6333/photos"
            )
        return {"host": u.hostname, "port": u.port or 6333}, name
    path = Path(u.path)
    if not u.path.startswith("/") or not path.name:
        raise CollectionError(
            f"{url}: local mode needs an absolute folder and a name, e.g. qdrant:///data/qdrant/photos"
        )
    return {"path": str(path.parent)}, path.name


class QdrantStore:
    """Store and search backend over Qdrant (see the module docstring)."""

    def __init__(self, client: Any, name: str, url: str) -> None:
        self.client, self.name, self.folder = client, name, url
        self._meta_cache: dict[str, Any] | None = None

    @classmethod
    def open(cls, url: str, create: bool = False) -> QdrantStore:
        from qdrant_client import QdrantClient, models

        kwargs, name = parse_url(url)
        if "path" in kwargs:
            Path(kwargs["path"]).mkdir(parents=True, exist_ok=True)
        store = cls(QdrantClient(**kwargs), name, url)
        if not store.client.collection_exists(store._units):
            if not create:
                store.close()
                raise CollectionError(
                    f"no collection {name!r} at {url}; build one with `mmstack index build --db {url}`"
                )
            store.client.create_collection(store._units, vectors_config=models.VectorParams(size=1, distance="Dot"))
            store._put_meta({"spaces": {}, "errors": []})
        return store

    @classmethod
    def drop(cls, url: str) -> None:
        store = cls.open(url, create=True)
        try:
            for coll in [store._units, *(store._coll(s) for s in ("image", "text"))]:
                if store.client.collection_exists(coll):
                    store.client.delete_collection(coll)
        finally:
            store.close()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> QdrantStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _units(self) -> str:
        return f"{self.name}__units"

    def _coll(self, space: str) -> str:
        return f"{self.name}__{space}"

    # ---------------------------------------------------------------------------------------- meta

    def _meta(self) -> dict[str, Any]:
        if self._meta_cache is None:
            (point,) = self.client.retrieve(self._units, [META_ID], with_payload=True)
            self._meta_cache = dict(point.payload["meta"])
        return self._meta_cache

    def _put_meta(self, meta: dict[str, Any]) -> None:
        from qdrant_client import models

        self.client.upsert(self._units, [models.PointStruct(id=META_ID, vector=[0.0], payload={"meta": meta})])
        self._meta_cache = meta

    def spaces(self) -> dict[str, dict[str, Any]]:
        return dict(self._meta().get("spaces", {}))

    def set_meta(self, key: str, value: Any) -> None:
        from qdrant_client import models

        meta = {**self._meta(), key: value}
        if key == "spaces":
            for space, info in value.items():
                if not self.client.collection_exists(self._coll(space)):
                    params = models.VectorParams(size=int(info["dim"]), distance=models.Distance.COSINE)
                    self.client.create_collection(self._coll(space), vectors_config=params)
        self._put_meta(meta)

    def set_errors(self, errors: dict[str, tuple[str, str]]) -> None:
        self.set_meta("errors", [{"path": p, "error": e} for p, e in errors.values()])

    def errors(self) -> list[dict[str, str]]:
        return list(self._meta().get("errors", []))

    # --------------------------------------------------------------------------------------- units

    def units(self) -> dict[str, UnitRow]:
        out = {}
        for point in self._scroll(self._units, with_vectors=False):
            if point.id != META_ID:
                out[point.payload["uid"]] = UnitRow(*(point.payload[f] for f in _UNIT_FIELDS))
        return out

    def _scroll(self, coll: str, with_vectors: bool = False, flt: Any = None) -> Iterable[Any]:
        offset = None
        while True:
            points, offset = self.client.scroll(
                coll, scroll_filter=flt, limit=1024, offset=offset, with_payload=True, with_vectors=with_vectors
            )
            yield from points
            if offset is None:
                return

    def _unit_point(self, row: UnitRow, n_items: int) -> Any:
        from qdrant_client import models

        payload = {f: getattr(row, f) for f in _UNIT_FIELDS}
        payload["n_items"] = n_items
        return models.PointStruct(id=item_id(row.uid, -1), vector=[0.0], payload=payload)

    def _delete_items(self, uids: Sequence[str]) -> None:
        from qdrant_client import models

        flt = models.Filter(must=[models.FieldCondition(key="uid", match=models.MatchAny(any=list(uids)))])
        for space in self.spaces():
            self.client.delete(self._coll(space), points_selector=models.FilterSelector(filter=flt))

    def write_units(self, units: Sequence[tuple[UnitRow, Sequence[ItemRow]]]) -> None:
        from qdrant_client import models

        self._delete_items([u.uid for u, _ in units])
        by_space: dict[str, list[Any]] = {}
        for _, items in units:
            for it in items:
                vec = np.asarray(it.vector, np.float32).tolist()
                by_space.setdefault(it.space, []).append(models.PointStruct(id=it.id, vector=vec, payload=_payload(it)))
        for space, points in by_space.items():
            self.client.upsert(self._coll(space), points)
        self.client.upsert(self._units, [self._unit_point(u, len(items)) for u, items in units])

    def delete_units(self, uids: Iterable[str]) -> int:
        uids = list(uids)
        if uids:
            self._delete_items(uids)
            self.client.delete(self._units, points_selector=[item_id(u, -1) for u in uids])
        return len(uids)

    def rename_unit(self, old: str, new: UnitRow, text_of: Any) -> None:
        from qdrant_client import models

        flt = models.Filter(must=[models.FieldCondition(key="uid", match=models.MatchValue(value=old))])
        n = 0
        for space in self.spaces():
            for p in self._scroll(self._coll(space), flt=flt):
                text = text_of(new.path, p.payload.get("caption"), p.payload.get("tags", []))
                payload = {"uid": new.uid, "path": new.path, "source": new.source, "text": text}
                self.client.set_payload(self._coll(space), payload=payload, points=[p.id])
                n += 1
        self.client.delete(self._units, points_selector=[item_id(old, -1)])
        self.client.upsert(self._units, [self._unit_point(new, n)])

    def touch_units(self, rows: Sequence[UnitRow]) -> None:
        current = self.units()
        self.client.upsert(self._units, [self._unit_point(r, current[r.uid].n_items) for r in rows])

    # --------------------------------------------------------------------------------------- items

    def count(self, space: str | None = None) -> int:
        spaces = [space] if space else list(self.spaces())
        return sum(self.client.count(self._coll(s), exact=True).count for s in spaces)

    def _retrieve(self, ids: Sequence[int], with_vectors: bool) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for space in self.spaces():
            for p in self.client.retrieve(self._coll(space), list(ids), with_payload=True, with_vectors=with_vectors):
                out[int(p.id)] = p
        return out

    def items(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        return {i: _hit_fields(i, p.payload) for i, p in self._retrieve(ids, False).items()}

    def vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        return {i: np.asarray(p.vector, np.float32) for i, p in self._retrieve(ids, True).items()}

    def dense(self, space: str, query: np.ndarray, k: int, filters: Filters) -> list[tuple[int, float]]:
        server_filter, client_side = _to_qdrant(filters)
        fetch = k if not client_side else 20 * k
        res = self.client.query_points(
            self._coll(space),
            query=np.asarray(query, np.float32).tolist(),
            limit=fetch,
            query_filter=server_filter,
            with_payload=client_side,
        )
        hits = [(int(p.id), float(p.score)) for p in res.points if not client_side or _passes(p.payload, filters)]
        return hits[:k]

    def has_kind(self, space: str, kind: str) -> bool:
        from qdrant_client import models

        flt = models.Filter(must=[models.FieldCondition(key="kind", match=models.MatchValue(value=kind))])
        return self.client.count(self._coll(space), count_filter=flt, exact=False).count > 0

    def bm25(self, match: str, k: int, filters: Filters) -> list[tuple[int, float]]:
        return []  # no BM25 in Qdrant without its inference add-ons: hybrid search is dense-only here

    def stats(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        sources: dict[str, int] = {}
        for space in self.spaces():
            for p in self._scroll(self._coll(space)):
                by_kind[p.payload["kind"]] = by_kind.get(p.payload["kind"], 0) + 1
                sources[p.payload["source"]] = sources.get(p.payload["source"], 0) + 1
        return {
            "rows": self.count(),
            "units": len(self.units()),
            "by_kind": dict(sorted(by_kind.items())),
            "by_space": {s: self.count(s) for s in self.spaces()},
            "sources": dict(sorted(sources.items())),
            "errors": len(self.errors()),
            "index": {s: "qdrant-hnsw" for s in self.spaces()},
        }


def _payload(it: ItemRow) -> dict[str, Any]:
    return {
        "uid": it.uid,
        "seq": it.seq,
        "kind": it.kind,
        "space": it.space,
        "source": it.source,
        "path": it.path,
        "caption": it.caption,
        "text": it.text,
        "tags": list(it.tags),
        "meta": it.meta,
    }


def _hit_fields(iid: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": iid,
        "unit": payload["uid"],
        "seq": payload["seq"],
        "kind": payload["kind"],
        "space": payload["space"],
        "source": payload["source"],
        "path": payload["path"],
        "caption": payload.get("caption"),
        "tags": list(payload.get("tags", [])),
        "meta": payload.get("meta", {}),
    }


def _to_qdrant(filters: Filters) -> tuple[Any, bool]:
    """``(server-side Filter or None, whether globs remain to check on the client)``."""
    from qdrant_client import models

    must = [models.FieldCondition(key="tags", match=models.MatchValue(value=t)) for t in filters.tags]
    if filters.kind:
        must.append(models.FieldCondition(key="kind", match=models.MatchValue(value=filters.kind)))
    client_side = bool(filters.path) or (bool(filters.source) and _is_glob(filters.source))
    if filters.source and not _is_glob(filters.source):
        source = str(Path(filters.source).resolve())
        must.append(models.FieldCondition(key="source", match=models.MatchValue(value=source)))
    return (models.Filter(must=must) if must else None), client_side


def _passes(payload: dict[str, Any], filters: Filters) -> bool:
    if filters.path and not fnmatch.fnmatchcase(payload["path"], filters.path):
        return False
    return not (
        filters.source and _is_glob(filters.source) and not fnmatch.fnmatchcase(payload["source"], filters.source)
    )
