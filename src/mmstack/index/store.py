"""The embedded store: one SQLite file that is the truth of a collection.

``DB/collection.sqlite`` (WAL journal, ``synchronous=FULL``: a committed batch survives ``kill -9`` and
power loss) holds

- ``meta``: schema version and, per vector space, the model id, dimension and model path (checked on open);
- ``units``: what incremental indexing tracks (uid, kind, source, path, size, mtime, content hash);
- ``items``: one row per vector: id, unit, position in the unit, kind, space, path, caption, searchable
  text, tags, metadata (JSON) and the float32 vector;
- ``fts``: an FTS5 index over ``items.text`` kept in step by triggers (BM25 in the same transaction);
- ``changes``: a log of item ids added or removed, from which the ANN cache catches up (``ann.py``);
- ``errors``: units that could not be read on the last run, with the reason.

A unit and all its items are written in one transaction, so an interrupted build leaves whole units only.
Item ids are derived from ``(uid, position)`` (63-bit blake2b), so the same data gets the same ids in every
backend (the Qdrant backend uses them as point ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmstack.errors import CollectionError

SCHEMA_VERSION = 1
DB_FILE = "collection.sqlite"
SPACES = ("image", "text")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    uid TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL, n_items INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS units_hash ON units(hash);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, uid TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, space TEXT NOT NULL,
    source TEXT NOT NULL, path TEXT NOT NULL, caption TEXT, text TEXT, tags TEXT NOT NULL DEFAULT ',',
    meta TEXT NOT NULL DEFAULT '{}', vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS items_uid ON items(uid);
CREATE INDEX IF NOT EXISTS items_space_kind ON items(space, kind);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER NOT NULL,
    space TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS errors (uid TEXT PRIMARY KEY, path TEXT NOT NULL, error TEXT NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(text, content='items', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS items_ai AFTER INSERT ON items BEGIN
    INSERT INTO fts(rowid, text) VALUES (new.id, new.text);
    INSERT INTO changes(item_id, space) VALUES (new.id, new.space);
END;
CREATE TRIGGER IF NOT EXISTS items_ad AFTER DELETE ON items BEGIN
    INSERT INTO fts(fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO changes(item_id, space) VALUES (old.id, old.space);
END;
CREATE TRIGGER IF NOT EXISTS items_au AFTER UPDATE OF text ON items BEGIN
    INSERT INTO fts(fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO fts(rowid, text) VALUES (new.id, new.text);
END;
"""


def item_id(uid: str, seq: int) -> int:
    """The id of item ``seq`` of unit ``uid``: 63 bits of blake2b, the same in every backend."""
    digest = hashlib.blake2b(f"{uid}\0{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class UnitRow:
    """A unit as stored: the fingerprint incremental indexing compares against."""

    uid: str
    kind: str
    source: str
    path: str
    size: int
    mtime_ns: int
    hash: str
    n_items: int = 0


@dataclass
class ItemRow:
    """One vector with what a hit shows."""

    uid: str
    seq: int
    kind: str
    space: str
    source: str
    path: str
    vector: np.ndarray  # (D,) float32, unit norm
    caption: str | None = None
    text: str | None = None
    tags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return item_id(self.uid, self.seq)


@dataclass
class Filters:
    """Metadata filters of a search; all given ones must hold.

    Args:
        path: a glob on the item's path (``*`` matches across folders, as SQLite GLOB).
        source: a source path, exact or as a glob.
        tags: tags the item must all carry.
        kind: ``image``, ``pair``, ``text`` or ``clip``.
    """

    path: str | None = None
    source: str | None = None
    tags: tuple[str, ...] = ()
    kind: str | None = None

    def __bool__(self) -> bool:
        return bool(self.path or self.source or self.tags or self.kind)

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE clause (without the keyword; ``1`` when empty) and its parameters."""
        clauses, params = [], []
        if self.path:
            clauses.append("path GLOB ?")
            params.append(self.path)
        if self.source:
            clauses.append("(source = ? OR source GLOB ?)")
            params += [str(Path(self.source).resolve()) if not _is_glob(self.source) else self.source, self.source]
        for tag in self.tags:
            clauses.append("tags LIKE ?")
            params.append(f"%,{tag},%")
        if self.kind:
            clauses.append("kind = ?")
            params.append(self.kind)
        return (" AND ".join(clauses) or "1"), params


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


class SqliteStore:
    """The SQLite truth of one collection folder (see the module docstring).

    Use ``SqliteStore.open(folder, create=...)``; it is a context manager that closes the connection.
    """

    def __init__(self, folder: Path, conn: sqlite3.Connection) -> None:
        self.folder = folder
        self.conn = conn

    @classmethod
    def open(cls, folder: str | Path, create: bool = False) -> SqliteStore:
        folder = Path(folder)
        path = folder / DB_FILE
        if not path.is_file():
            if not create:
                raise CollectionError(
                    f"no collection at {folder} (missing {DB_FILE}); build one with `mmstack index build --db {folder}`"
                )
            folder.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            # Set before the first table exists (later it is a no-op): a row with a 512-d float32 vector is
            # ~2.3 kB, so 4 kB pages hold one row each and waste ~45% of the file; 16 kB pages hold six.
            conn.execute("PRAGMA page_size=16384")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise CollectionError(f"{path}: not a readable collection database ({err}); rebuild it") from None
        store = cls(folder, conn)
        version = store.get_meta("schema_version")
        if version is None:
            store.set_meta("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise CollectionError(f"{path}: schema version {version}, this mmstack reads {SCHEMA_VERSION}; rebuild it")
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---------------------------------------------------------------------------------------- meta

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, sort_keys=True)),
        )

    def spaces(self) -> dict[str, dict[str, Any]]:
        """``{space: {"model_id", "dim", "model"}}`` of the spaces this collection has."""
        return self.get_meta("spaces", {}) or {}

    # --------------------------------------------------------------------------------------- units

    def units(self) -> dict[str, UnitRow]:
        rows = self.conn.execute("SELECT uid, kind, source, path, size, mtime_ns, hash, n_items FROM units")
        return {r[0]: UnitRow(*r) for r in rows}

    def write_units(self, units: Sequence[tuple[UnitRow, Sequence[ItemRow]]]) -> None:
        """Replace each unit and its items, all in one transaction."""
        with self.transaction() as c:
            for unit, items in units:
                c.execute("DELETE FROM items WHERE uid = ?", (unit.uid,))
                c.executemany(
                    "INSERT INTO items(id, uid, seq, kind, space, source, path, caption, text, tags, meta, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_item_values(it) for it in items],
                )
                c.execute(
                    "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (unit.uid, unit.kind, unit.source, unit.path, unit.size, unit.mtime_ns, unit.hash, len(items)),
                )
                c.execute("DELETE FROM errors WHERE uid = ?", (unit.uid,))

    def delete_units(self, uids: Iterable[str]) -> int:
        uids = list(uids)
        with self.transaction() as c:
            for uid in uids:
                c.execute("DELETE FROM items WHERE uid = ?", (uid,))
                c.execute("DELETE FROM units WHERE uid = ?", (uid,))
        return len(uids)

    def rename_unit(self, old: str, new: UnitRow, text_of: Any) -> None:
        """Move unit ``old`` to ``new`` (same content, new path): vectors and item ids are kept.

        ``text_of(path, caption, tags)`` recomputes the searchable text, which includes the file name.
        """
        with self.transaction() as c:
            rows = c.execute("SELECT id, caption, tags FROM items WHERE uid = ?", (old,)).fetchall()
            for iid, caption, tags in rows:
                c.execute(
                    "UPDATE items SET uid = ?, source = ?, path = ?, text = ? WHERE id = ?",
                    (new.uid, new.source, new.path, text_of(new.path, caption, _split_tags(tags)), iid),
                )
            c.execute("DELETE FROM units WHERE uid = ?", (old,))
            c.execute(
                "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (new.uid, new.kind, new.source, new.path, new.size, new.mtime_ns, new.hash, len(rows)),
            )

    def touch_units(self, rows: Sequence[UnitRow]) -> None:
        """Record a new (size, mtime) for units whose content hash did not change."""
        with self.transaction() as c:
            c.executemany(
                "UPDATE units SET size = ?, mtime_ns = ? WHERE uid = ?", [(r.size, r.mtime_ns, r.uid) for r in rows]
            )

    def set_errors(self, errors: dict[str, tuple[str, str]]) -> None:
        """Replace the error list with ``{uid: (path, reason)}`` of this run."""
        with self.transaction() as c:
            c.execute("DELETE FROM errors")
            c.executemany("INSERT INTO errors VALUES (?, ?, ?)", [(u, p, e) for u, (p, e) in errors.items()])

    def errors(self) -> list[dict[str, str]]:
        return [{"path": p, "error": e} for p, e in self.conn.execute("SELECT path, error FROM errors ORDER BY path")]

    # --------------------------------------------------------------------------------------- items

    def count(self, space: str | None = None) -> int:
        if space is None:
            return self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM items WHERE space = ?", (space,)).fetchone()[0]

    def iter_vectors(self, space: str, batch: int = 65536, where: str = "1", params: Sequence[Any] = ()):
        """Yield ``(ids (n,), vectors (n, D))`` of a space in id order, ``batch`` rows at a time."""
        cur = self.conn.execute(
            f"SELECT id, vector FROM items WHERE space = ? AND ({where}) ORDER BY id", (space, *params)
        )
        while rows := cur.fetchmany(batch):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield ids, vecs

    def vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        out = {}
        for chunk in _chunks(list(ids), 900):
            q = f"SELECT id, vector FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: np.frombuffer(r[1], dtype=np.float32) for r in self.conn.execute(q, chunk)})
        return out

    def items(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Metadata (everything but the vector) of ``ids``, keyed by id."""
        out = {}
        cols = "id, uid, seq, kind, space, source, path, caption, tags, meta"
        for chunk in _chunks(list(ids), 900):
            q = f"SELECT {cols} FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            for r in self.conn.execute(q, chunk):
                out[r[0]] = {
                    "id": r[0],
                    "unit": r[1],
                    "seq": r[2],
                    "kind": r[3],
                    "space": r[4],
                    "source": r[5],
                    "path": r[6],
                    "caption": r[7],
                    "tags": _split_tags(r[8]),
                    "meta": json.loads(r[9]),
                }
        return out

    def filter_ids(self, filters: Filters, space: str | None = None, ids: Sequence[int] | None = None) -> set[int]:
        """Ids (of ``space``, among ``ids`` when given) that pass ``filters``."""
        where, params = filters.sql()
        if space is not None:
            where, params = f"({where}) AND space = ?", [*params, space]
        if ids is None:
            return {r[0] for r in self.conn.execute(f"SELECT id FROM items WHERE {where}", params)}
        out: set[int] = set()
        for chunk in _chunks(list(ids), 900):
            q = f"SELECT id FROM items WHERE ({where}) AND id IN ({','.join('?' * len(chunk))})"
            out.update(r[0] for r in self.conn.execute(q, [*params, *chunk]))
        return out

    def has_kind(self, space: str, kind: str) -> bool:
        q = "SELECT 1 FROM items WHERE space = ? AND kind = ? LIMIT 1"
        return self.conn.execute(q, (space, kind)).fetchone() is not None

    def count_filtered(self, filters: Filters, space: str) -> int:
        where, params = filters.sql()
        return self.conn.execute(
            f"SELECT COUNT(*) FROM items WHERE ({where}) AND space = ?", (*params, space)
        ).fetchone()[0]

    def bm25(self, match: str, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """Top ``k`` ``(id, score)`` for an FTS5 ``match`` expression; score = -bm25 (higher is better)."""
        where, params = (filters or Filters()).sql()
        q = (
            "SELECT items.id, -bm25(fts) AS s FROM fts JOIN items ON items.id = fts.rowid "
            f"WHERE fts MATCH ? AND ({where}) ORDER BY bm25(fts) LIMIT ?"
        )
        try:
            return [(r[0], float(r[1])) for r in self.conn.execute(q, (match, *params, k))]
        except sqlite3.OperationalError as err:
            raise CollectionError(f"full-text query {match!r} is invalid ({err})") from None

    # ------------------------------------------------------------------------------------- changes

    def last_change(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def changed_since(self, seq: int, space: str, upto: int | None = None) -> set[int]:
        """Ids of ``space`` added or removed after change ``seq`` (up to ``upto``)."""
        upto = self.last_change() if upto is None else upto
        q = "SELECT DISTINCT item_id FROM changes WHERE seq > ? AND seq <= ? AND space = ?"
        rows = self.conn.execute(q, (seq, upto, space))
        return {r[0] for r in rows}

    def prune_changes(self, upto: int) -> None:
        self.conn.execute("DELETE FROM changes WHERE seq <= ?", (upto,))

    def stats(self) -> dict[str, Any]:
        c = self.conn
        return {
            "rows": self.count(),
            "units": c.execute("SELECT COUNT(*) FROM units").fetchone()[0],
            "by_kind": dict(c.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind ORDER BY kind").fetchall()),
            "by_space": dict(c.execute("SELECT space, COUNT(*) FROM items GROUP BY space ORDER BY space").fetchall()),
            "sources": dict(c.execute("SELECT source, COUNT(*) FROM items GROUP BY source ORDER BY source").fetchall()),
            "errors": c.execute("SELECT COUNT(*) FROM errors").fetchone()[0],
        }


def _item_values(it: ItemRow) -> tuple:
    vec = np.ascontiguousarray(it.vector, dtype=np.float32)
    tags = "," + ",".join(it.tags) + "," if it.tags else ","
    meta = json.dumps(it.meta, sort_keys=True, ensure_ascii=False)
    return (
        it.id,
        it.uid,
        it.seq,
        it.kind,
        it.space,
        it.source,
        it.path,
        it.caption,
        it.text,
        tags,
        meta,
        vec.tobytes(),
    )


def _split_tags(tags: str | None) -> list[str]:
    return [t for t in (tags or "").split(",") if t]


def _chunks(xs: list, n: int) -> Iterator[list]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]
