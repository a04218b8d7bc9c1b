"""Vector indexes over one space of a collection: exact search, or FAISS HNSW as a rebuildable cache.

The SQLite store is the truth; the HNSW index is a cache beside it (``DB/ann-<space>.faiss`` plus
``ann-<space>.json``) that never has to be right: on open it catches up from the store's change log
(items added or removed since it was saved), and it is rebuilt from the stored vectors when its file is
missing or unreadable, was built for another model or other parameters, or its row count disagrees with
the store after catching up. Small spaces (below ``hnsw_min`` rows) are searched exactly instead, which
is faster than HNSW at that size and needs no file.

FAISS HNSW cannot delete, so removed items are tombstoned here (their position is marked dead and skipped
when reading results); the index is rebuilt once more than ``max_dead`` of its rows are dead. Measured
choice (see BENCHMARKS.md / the index benchmark): FAISS ``IndexHNSWFlat`` built 2.7x faster than usearch
and hnswlib with the same M/efConstruction on this machine and answered as fast or faster.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmstack.errors import ConfigError
from mmstack.index.store import SqliteStore
from mmstack.utils.atomic import atomic_write_json


@dataclass
class AnnConfig:
    """How a space is searched.

    Args:
        kind: ``"auto"`` (exact below ``hnsw_min`` rows, else HNSW), ``"exact"`` or ``"hnsw"``.
        hnsw_min: row count from which ``auto`` builds an HNSW index.
        m: HNSW graph degree (FAISS ``M``).
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (raised to ``k`` when smaller). 128 measured recall@10 0.97 at
            0.65 ms p50 on 1M clustered 512-d vectors (64: 0.93), see the index_ann benchmark.
        max_dead: fraction of tombstoned rows that triggers a rebuild.
    """

    kind: str = "auto"
    hnsw_min: int = 50_000
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    max_dead: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "exact", "hnsw"):
            raise ConfigError(f"ann.kind must be 'auto', 'exact' or 'hnsw', got {self.kind!r}")
        if self.m < 4 or self.ef_construction < 8 or self.ef_search < 1:
            raise ConfigError(f"ann: m >= 4, ef_construction >= 8, ef_search >= 1 required, got {self}")
        if not 0.0 < self.max_dead < 1.0:
            raise ConfigError(f"ann.max_dead must be in (0, 1), got {self.max_dead}")


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class ExactIndex:
    """Brute-force inner product over an in-memory matrix (the reference every ANN is tested against)."""

    kind = "exact"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids = np.zeros(0, np.int64)
        self.vectors = np.zeros((0, dim), np.float32)

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(ids)
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, np.float32).reshape(-1, self.dim)])

    def remove(self, ids: Any) -> None:
        if len(self.ids) and len(ids):
            keep = ~np.isin(self.ids, np.fromiter(ids, np.int64))
            self.ids, self.vectors = self.ids[keep], self.vectors[keep]

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self.count:
            return []
        scores = self.vectors @ np.asarray(query, np.float32)  # (N,)
        top = top_k_indices(scores, k)
        return [(int(self.ids[i]), float(scores[i])) for i in top]


class HnswIndex:
    """FAISS ``IndexHNSWFlat`` (inner product) keyed by item id, with tombstones for removals."""

    kind = "hnsw"

    def __init__(
        self,
        dim: int,
        cfg: AnnConfig,
        index: Any = None,
        labels: np.ndarray | None = None,
        alive: np.ndarray | None = None,
    ) -> None:
        import faiss

        self.dim, self.cfg = dim, cfg
        if index is None:
            index = faiss.IndexHNSWFlat(dim, cfg.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.ef_construction
        self.index = index
        self.labels = np.zeros(0, np.int64) if labels is None else labels  # position -> item id
        self.alive = np.zeros(0, bool) if alive is None else alive
        self.pos = {int(i): p for p, i in enumerate(self.labels) if self.alive[p]}

    @property
    def count(self) -> int:
        return len(self.pos)

    @property
    def dead_fraction(self) -> float:
        return 1.0 - self.count / len(self.labels) if len(self.labels) else 0.0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        self.remove(ids)
        start = len(self.labels)
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim))
        self.labels = np.concatenate([self.labels, ids])
        self.alive = np.concatenate([self.alive, np.ones(len(ids), bool)])
        self.pos.update({int(i): start + j for j, i in enumerate(ids)})

    def remove(self, ids: Any) -> None:
        for i in ids:
            p = self.pos.pop(int(i), None)
            if p is not None:
                self.alive[p] = False

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        import faiss

        if not self.count:
            return []
        q = np.asarray(query, np.float32).reshape(1, self.dim)
        want = k + min(len(self.labels) - self.count, 4 * k)  # room for tombstones among the hits
        while True:
            fetch = min(want, self.index.ntotal)
            params = faiss.SearchParametersHNSW(efSearch=max(self.cfg.ef_search, fetch))
            scores, pos = self.index.search(q, fetch, params=params)
            hits = [
                (int(self.labels[p]), float(s))
                for s, p in zip(scores[0], pos[0], strict=True)
                if p >= 0 and self.alive[p]
            ]
            if len(hits) >= k or fetch >= self.index.ntotal:
                return hits[:k]
            want *= 4

    def save(self, path: Path) -> None:
        import faiss

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "ab") as f:  # labels and tombstones ride at the end of the same file: one rename
            trailer = self.labels.tobytes() + self.alive.astype(np.uint8).tobytes()
            f.write(trailer + len(self.labels).to_bytes(8, "little") + b"MMSTKANN")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int, cfg: AnnConfig) -> HnswIndex:
        import faiss

        with open(path, "rb") as f:
            f.seek(-16, os.SEEK_END)
            tail = f.read(16)
            if tail[8:] != b"MMSTKANN":
                raise ValueError("no mmstack trailer")
            n = int.from_bytes(tail[:8], "little")
            f.seek(-16 - 9 * n, os.SEEK_END)
            labels = np.frombuffer(f.read(8 * n), np.int64).copy()
            alive = np.frombuffer(f.read(n), np.uint8).astype(bool)
        index = faiss.read_index(str(path))  # reads its own bytes and stops before our trailer
        if index.ntotal != n or index.d != dim:
            raise ValueError(f"index holds {index.ntotal} x {index.d}, trailer says {n} x {dim}")
        return cls(dim, cfg, index, labels, alive)


def open_index(store: SqliteStore, space: str, cfg: AnnConfig, save: bool = True) -> ExactIndex | HnswIndex:
    """The search index of ``space``, caught up with the store (see the module docstring)."""
    info = store.spaces()[space]
    dim = int(info["dim"])
    with _snapshot(store):
        n, last = store.count(space), store.last_change()
        if cfg.kind == "exact" or (cfg.kind == "auto" and n < cfg.hnsw_min):
            return _fill(ExactIndex(dim), store, space)
        index, changed = _load_hnsw(store, space, cfg, dim, info["model_id"], last)
    if index is None or index.count != n or index.dead_fraction > cfg.max_dead:
        with _snapshot(store):
            index, last = _fill(HnswIndex(dim, cfg), store, space), store.last_change()
        changed = True
    if changed and save:
        with contextlib.suppress(OSError):  # a read-only collection still searches; it catches up next time
            _save_hnsw(store.folder, space, index, cfg, info["model_id"], last)
    return index


@contextlib.contextmanager
def _snapshot(store: SqliteStore):
    """One read transaction, so counts, the change log and vectors come from the same commit."""
    store.conn.execute("BEGIN")
    try:
        yield
    finally:
        store.conn.execute("COMMIT")


def _fill(index: ExactIndex | HnswIndex, store: SqliteStore, space: str) -> ExactIndex | HnswIndex:
    for ids, vecs in store.iter_vectors(space):
        index.add(ids, vecs)
    return index


def _paths(folder: Path, space: str) -> tuple[Path, Path]:
    return folder / f"ann-{space}.faiss", folder / f"ann-{space}.json"


def _load_hnsw(store: SqliteStore, space: str, cfg: AnnConfig, dim: int, model_id: str, last: int):
    """``(index caught up to change ``last``, whether it changed)``, or ``(None, True)`` to rebuild."""
    path, meta_path = _paths(store.folder, space)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("model_id") != model_id or meta.get("params") != _params(cfg) or meta.get("dim") != dim:
            return None, True
        index = HnswIndex.load(path, dim, cfg)
    except (OSError, ValueError, RuntimeError, KeyError):
        return None, True
    seq = int(meta.get("change_seq", -1))
    if seq > last:
        return None, True  # saved from a newer store than this one (restored backup): do not trust it
    changed = sorted(store.changed_since(seq, space, upto=last))
    if changed:
        index.remove(changed)
        vecs = store.vectors(changed)
        ids = np.array([i for i in changed if i in vecs], np.int64)
        if len(ids):
            index.add(ids, np.stack([vecs[int(i)] for i in ids]))
    return index, bool(changed)


def _params(cfg: AnnConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k in ("m", "ef_construction")}


def _save_hnsw(folder: Path, space: str, index: HnswIndex, cfg: AnnConfig, model_id: str, last: int) -> None:
    path, meta_path = _paths(folder, space)
    # The json is written after the index: a crash between the two leaves an older json whose change_seq
    # is <= the index's, and replaying changes is idempotent, so the pair still catches up correctly.
    index.save(path)
    atomic_write_json(
        meta_path,
        {
            "kind": "hnsw",
            "dim": index.dim,
            "model_id": model_id,
            "params": _params(cfg),
            "change_seq": last,
            "rows": index.count,
        },
    )


def saved_change_seq(folder: Path, space: str) -> int | None:
    """The change-log position an HNSW cache was saved at (None when there is no cache)."""
    try:
        return int(json.loads(_paths(folder, space)[1].read_text())["change_seq"])
    except (OSError, ValueError, KeyError):
        return None
