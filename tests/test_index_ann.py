"""The HNSW cache against exact search: equivalence, incremental catch-up, rebuild when it cannot be trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmstack.index.ann import AnnConfig, ExactIndex, HnswIndex, open_index
from mmstack.index.collection import Collection
from mmstack.index.store import Filters, ItemRow, SqliteStore, UnitRow, item_id

DIM = 32
HNSW = AnnConfig(kind="hnsw", m=16, ef_construction=40, ef_search=64)


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((20, DIM))
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(store: SqliteStore, names: list[str], vecs: np.ndarray, tag: str = "") -> None:
    rows = []
    for name, v in zip(names, vecs, strict=True):
        uid = f"/data/{name}.png"
        item = ItemRow(uid, 0, "image", "image", "/data", uid, v, text=name, tags=[tag] if tag else [])
        rows.append((UnitRow(uid, "image", "/data", uid, 1, 1, name), [item]))
    store.write_units(rows)


@pytest.fixture
def db(tmp_path):
    with SqliteStore.open(tmp_path / "db", create=True) as store:
        store.set_meta("spaces", {"image": {"model_id": "random", "dim": DIM, "model": None}})
        _write(store, [f"a{i}" for i in range(1500)], _vectors(1500, 1), tag="old")
    return tmp_path / "db"


def _recall(index, exact, queries, k=10) -> float:
    found = [len({i for i, _ in index.search(q, k)} & {i for i, _ in exact.search(q, k)}) / k for q in queries]
    return float(np.mean(found))


def _exact(store: SqliteStore) -> ExactIndex:
    return open_index(store, "image", AnnConfig(kind="exact"))


def test_hnsw_matches_exact_search(db):
    queries = _vectors(30, 7)
    with SqliteStore.open(db) as store:
        hnsw = open_index(store, "image", HNSW)
        assert isinstance(hnsw, HnswIndex) and hnsw.count == 1500
        exact = _exact(store)
        assert _recall(hnsw, exact, queries) >= 0.95
        top_h, top_e = hnsw.search(queries[0], 5), exact.search(queries[0], 5)
        assert top_h[0][0] == top_e[0][0] and top_h[0][1] == pytest.approx(top_e[0][1], abs=1e-5)
    assert (db / "ann-image.faiss").is_file() and json.loads((db / "ann-image.json").read_text())["rows"] == 1500


def test_cache_catches_up_with_adds_and_deletes(db):
    with SqliteStore.open(db) as store:
        open_index(store, "image", HNSW)  # saved at this point of the change log
        store.delete_units([f"/data/a{i}.png" for i in range(0, 1500, 3)])  # 500 removed
        _write(store, [f"b{i}" for i in range(300)], _vectors(300, 2))  # 300 added
        _write(store, ["a1"], -_vectors(1, 1))  # re-embedded: same id, new vector
        index = open_index(store, "image", HNSW)
        assert index.count == store.count("image") == 1300
        removed = item_id("/data/a0.png", 0)
        queries = _vectors(30, 9)
        assert all(removed not in {i for i, _ in index.search(q, 50)} for q in queries)
        assert _recall(index, _exact(store), queries) >= 0.95
        a1 = item_id("/data/a1.png", 0)
        v = store.vectors([a1])[a1]
        assert index.search(v, 1)[0] == (a1, pytest.approx(1.0, abs=1e-5))  # the new vector, not the old one
    meta = json.loads((db / "ann-image.json").read_text())
    assert meta["rows"] == 1300


@pytest.mark.parametrize("damage", ["delete", "corrupt", "other_model", "future"])
def test_untrustworthy_cache_is_rebuilt_from_the_store(db, damage):
    with SqliteStore.open(db) as store:
        open_index(store, "image", HNSW)
    faiss_file, meta_file = db / "ann-image.faiss", db / "ann-image.json"
    meta = json.loads(meta_file.read_text())
    if damage == "delete":
        faiss_file.unlink()
    elif damage == "corrupt":
        faiss_file.write_bytes(faiss_file.read_bytes()[:1000])
    elif damage == "other_model":
        meta_file.write_text(json.dumps({**meta, "model_id": "someone-else"}))
    else:
        meta_file.write_text(json.dumps({**meta, "change_seq": meta["change_seq"] + 10**6}))
    with SqliteStore.open(db) as store:
        index = open_index(store, "image", HNSW)
        assert index.count == 1500
        assert _recall(index, _exact(store), _vectors(20, 3)) >= 0.95
    assert json.loads(meta_file.read_text())["model_id"] == "random"


def test_row_count_mismatch_triggers_rebuild(db):
    with SqliteStore.open(db) as store:
        open_index(store, "image", HNSW)
        store.prune_changes(store.last_change())
        store.delete_units(["/data/a5.png"])
        store.prune_changes(store.last_change())  # the log lost the deletion: only the count can tell
        index = open_index(store, "image", HNSW)
        assert index.count == 1499 and item_id("/data/a5.png", 0) not in index.pos


def test_filtered_search_is_exact_over_the_filtered_rows(db):
    with SqliteStore.open(db) as store:
        _write(store, [f"n{i}" for i in range(50)], _vectors(50, 4), tag="new")
    q = _vectors(1, 5)[0]
    with Collection.open(db, ann=HNSW) as col:
        hits = col.backend.dense("image", q, 10, Filters(tags=("new",)))
        with SqliteStore.open(db) as store:
            ids = store.filter_ids(Filters(tags=("new",)))
            vecs = store.vectors(ids)
        want = sorted(vecs, key=lambda i: -float(vecs[i] @ q))[:10]
        assert [i for i, _ in hits] == want
