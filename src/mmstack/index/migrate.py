"""Move a collection between the embedded store and Qdrant, either way, losing nothing.

    migrate("photos.db", "qdrant://qdrant.internal:6333/photos")     # mmstack index migrate --from ... --to ...
    migrate("qdrant://qdrant.internal:6333/photos", "photos-copy.db")

What moves: the spaces (model id, dimension, model path: what later builds and queries check), every unit's
fingerprint (so incremental builds continue on the target without re-embedding), every item (id, vector,
kind, space, source, path, caption, searchable text, tags, metadata) and the unreadable-file list. Units are
copied in batches with the backends' own ``write_units`` (one transaction per batch in SQLite). Items are the
same ids in both backends (``store.item_id``), so a migration back gives the same collection.

A Qdrant server target gets payload indexes on the filtered fields (kind, source, tags, uid) and the
HNSW ``m`` / ``ef_construct`` given; qdrant-client's local mode has neither (it searches exactly), so there
they are skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmstack.errors import CollectionError, ConfigError
from mmstack.index.store import ItemRow, SqliteStore, UnitRow, _split_tags

PAYLOAD_INDEXES = {"kind": "keyword", "source": "keyword", "tags": "keyword", "uid": "keyword"}


@dataclass
class QdrantTuning:
    """Settings of Qdrant server collections written by ``migrate`` (ignored in local mode).

    ``m``: HNSW graph degree (Qdrant's default 16; 32 for higher recall at more memory); ``ef_construct``:
    build-time beam (default 100); ``payload_indexes``: index the filtered payload fields.
    """

    m: int | None = None
    ef_construct: int | None = None
    payload_indexes: bool = True


@dataclass
class MigrateReport:
    """What one migration copied (``mmstack index migrate --json`` prints this)."""

    source: str
    target: str
    units: int = 0
    items: int = 0
    orphans: int = 0  # Qdrant items whose unit point is missing (a crashed build): left for the next build
    errors: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def migrate(
    source: str | Path,
    target: str | Path,
    batch_units: int = 256,
    replace: bool = False,
    tuning: QdrantTuning | None = None,
) -> MigrateReport:
    """Copy collection ``source`` into ``target`` (a folder or ``qdrant://...``; either may be either).

    Args:
        batch_units: units per write (per transaction in SQLite).
        replace: drop a non-empty target first (otherwise a non-empty target is refused).
        tuning: HNSW and payload-index settings for a Qdrant server target.
    """
    from mmstack.index.builder import drop_collection, open_store

    if str(source) == str(target):
        raise ConfigError(f"--from and --to are the same collection ({source})")
    t0 = time.perf_counter()
    report = MigrateReport(str(source), str(target))
    with open_store(source) as src:
        _refuse_or_drop(target, replace, drop_collection, open_store)
        with open_store(target, create=True) as dst:
            dst.set_meta("spaces", src.spaces())
            if isinstance(src, SqliteStore) and isinstance(dst, SqliteStore) and src.get_meta("ann"):
                dst.set_meta("ann", src.get_meta("ann"))
            for batch in _batched(_read_units(src, report), batch_units):
                dst.write_units(batch)
                report.units += len(batch)
                report.items += sum(len(items) for _, items in batch)
            errors = src.errors()
            dst.set_errors({e["path"]: (e["path"], e["error"]) for e in errors})
            report.errors = len(errors)
            _finish(dst, tuning or QdrantTuning())
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _refuse_or_drop(target: str | Path, replace: bool, drop_collection: Any, open_store: Any) -> None:
    try:
        with open_store(target) as existing:
            rows = existing.count()
    except CollectionError:
        return  # nothing there yet
    if not rows:
        return  # an empty target (e.g. Qdrant collections created with cluster settings) is written into
    if not replace:
        raise CollectionError(f"{target} already holds {rows} rows; pass --replace to overwrite it, or another --to")
    drop_collection(target)


def _batched(units: Iterator[tuple[UnitRow, list[ItemRow]]], n: int) -> Iterator[list[tuple[UnitRow, list[ItemRow]]]]:
    batch: list[tuple[UnitRow, list[ItemRow]]] = []
    for unit in units:
        batch.append(unit)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_units(store: Any, report: MigrateReport) -> Iterator[tuple[UnitRow, list[ItemRow]]]:
    if isinstance(store, SqliteStore):
        yield from _read_sqlite(store)
    else:
        yield from _read_qdrant(store, report)


def _read_sqlite(store: SqliteStore) -> Iterator[tuple[UnitRow, list[ItemRow]]]:
    """Units with their items, streamed in uid order (items carry their searchable text too)."""
    units = store.units()
    cur = store.conn.execute(
        "SELECT uid, seq, kind, space, source, path, caption, text, tags, meta, vector FROM items ORDER BY uid, seq"
    )
    current: str | None = None
    items: list[ItemRow] = []
    for r in cur:
        if r[0] != current:
            if current is not None:
                yield units.pop(current), items
            current, items = r[0], []
        vec = np.frombuffer(r[10], dtype=np.float32).copy()
        items.append(ItemRow(r[0], r[1], r[2], r[3], r[4], r[5], vec, r[6], r[7], _split_tags(r[8]), json.loads(r[9])))
    if current is not None:
        yield units.pop(current), items
    for unit in units.values():  # units without items (e.g. an empty clip) keep their fingerprint
        yield unit, []


def _read_qdrant(store: Any, report: MigrateReport) -> Iterator[tuple[UnitRow, list[ItemRow]]]:
    """Units with their items, a chunk of units at a time (a filter on ``uid`` per chunk and space)."""
    from qdrant_client import models

    units = store.units()
    uids = sorted(units)
    seen = 0
    for start in range(0, len(uids), 256):
        chunk = uids[start : start + 256]
        by_uid: dict[str, list[ItemRow]] = {u: [] for u in chunk}
        flt = models.Filter(must=[models.FieldCondition(key="uid", match=models.MatchAny(any=chunk))])
        for space in store.spaces():
            for p in store._scroll(store._coll(space), with_vectors=True, flt=flt):
                by_uid[p.payload["uid"]].append(_item_of(p))
        for uid in chunk:
            items = sorted(by_uid[uid], key=lambda it: it.seq)
            seen += len(items)
            yield units[uid], items
    report.orphans = store.count() - seen


def _item_of(point: Any) -> ItemRow:
    p = point.payload
    vec = np.asarray(point.vector, dtype=np.float32)
    tags, meta = list(p.get("tags", [])), dict(p.get("meta", {}))
    return ItemRow(p["uid"], p["seq"], p["kind"], p["space"], p["source"], p["path"], vec, p.get("caption"), p.get("text"), tags, meta)  # fmt: skip


def _finish(dst: Any, tuning: QdrantTuning) -> None:
    """Bring the embedded store's ANN cache up to date, or tune a Qdrant server's collections."""
    if isinstance(dst, SqliteStore):
        from mmstack.index.ann import AnnConfig
        from mmstack.index.builder import _refresh_ann

        _refresh_ann(dst, AnnConfig(**(dst.get_meta("ann") or {})))
        return
    tune_qdrant(dst, tuning)


def tune_qdrant(store: Any, tuning: QdrantTuning) -> bool:
    """Apply HNSW settings and payload indexes to a Qdrant server collection; False in local mode."""
    from qdrant_client import models

    from mmstack.index.qdrant import parse_url

    kwargs, _ = parse_url(store.folder)
    if "path" in kwargs:
        return False  # local mode: exact search, no indexes
    for space in store.spaces():
        coll = store._coll(space)
        if tuning.m is not None or tuning.ef_construct is not None:
            hnsw = models.HnswConfigDiff(m=tuning.m, ef_construct=tuning.ef_construct)
            store.client.update_collection(coll, hnsw_config=hnsw)
        if tuning.payload_indexes:
            for field, schema in PAYLOAD_INDEXES.items():
                store.client.create_payload_index(coll, field_name=field, field_schema=schema)
    return True
