"""Collection search at scale: query latency p50/p99 and recall@10 against exact search.

Data: ``n`` random unit vectors of dim 512 drawn from a mixture of 1024 Gaussian clusters (the shape of
real embedding sets, and the data the issue's reference numbers were measured on); queries are fresh
draws from the same mixture. Uniform i.i.d. vectors are not used: in 512 dimensions all their distances
concentrate, so every graph index (FAISS, usearch, hnswlib alike) stays below recall 0.4 there.

Measured, in the same run:

- ours: rows bulk-written to the SQLite store, the HNSW cache built by ``ann.open_index``, and one
  ``Collection`` search per query *including* fetching the hits' metadata from SQLite;
- reference: a bare FAISS ``IndexHNSWFlat`` (M 32, efConstruction 80), search only;
- exact: FAISS ``IndexFlatIP`` (the ground truth), latency for one query.

Build time, memory (RSS growth when opening ours / building the reference) and the index file size are
reported.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import percentile

DIM = 512
N_QUERIES = 300
EF_VALUES = (32, 64, 128)


def clustered_unit_vectors(n: int, seed: int, n_clusters: int = 1024, spread: float = 0.6) -> np.ndarray:
    """``(n, DIM)`` float32 unit vectors from a Gaussian mixture (fixed centres per ``n_clusters``)."""
    centres = np.random.default_rng(12345).standard_normal((n_clusters, DIM), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, n_clusters, m)] + spread * rng.standard_normal((m, DIM), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def _latency(fn, queries: np.ndarray) -> tuple[list[list[int]], float, float]:
    found, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        found.append(fn(q))
        times.append(time.perf_counter() - t0)
    ms = [t * 1e3 for t in times]
    return found, percentile(ms, 50), percentile(ms, 99)


def _fill_store(folder: Path, vectors: np.ndarray) -> float:
    """Bulk-write ``vectors`` as items of an ``image`` space; returns seconds."""
    from mmstack.index.store import ItemRow, SqliteStore, UnitRow

    t0 = time.perf_counter()
    with SqliteStore.open(folder, create=True) as store:
        store.set_meta("spaces", {"image": {"model_id": "bench-random", "dim": DIM, "model": None}})
        for start in range(0, len(vectors), 20_000):
            batch = []
            for i in range(start, min(start + 20_000, len(vectors))):
                uid = f"/bench/img_{i:07d}.png"
                item = ItemRow(
                    uid,
                    0,
                    "image",
                    "image",
                    "/bench",
                    uid,
                    vectors[i],
                    caption=f"item {i}",
                    text=f"item {i}",
                    tags=["bench"],
                    meta={"i": i},
                )
                batch.append((UnitRow(uid, "image", "/bench", uid, 1, 1, f"h{i}"), [item]))
            store.write_units(batch)
    return time.perf_counter() - t0


def _measure(n: int, quick: bool) -> dict:
    import faiss

    from mmstack.index.ann import AnnConfig, open_index
    from mmstack.index.collection import Collection
    from mmstack.index.store import Filters, item_id

    vectors = clustered_unit_vectors(n, seed=1)
    queries = clustered_unit_vectors(N_QUERIES, seed=2)
    ids = np.array([item_id(f"/bench/img_{i:07d}.png", 0) for i in range(n)], np.int64)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(vectors)
    _, truth_pos = flat.search(queries, 10)
    truth = ids[truth_pos]
    faiss.omp_set_num_threads(1)  # single-query latency: one thread, as a server handling requests
    _, exact_p50, exact_p99 = _latency(lambda q: flat.search(q[None], 10)[1][0].tolist(), queries[:50])
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat.reset()  # free its memory before the builds
    out: dict = {"n": n, "dim": DIM, "exact_faiss_flat_ms": {"p50": exact_p50, "p99": exact_p99}}

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        folder = Path(tmp) / "db"
        out["store_write_s"] = _fill_store(folder, vectors)
        ann = AnnConfig(kind="hnsw", m=32, ef_construction=80)
        from mmstack.index.store import SqliteStore

        t0 = time.perf_counter()
        with SqliteStore.open(folder) as store:
            open_index(store, "image", ann)
        out["ours_build_s"] = time.perf_counter() - t0
        out["ours_index_file_mb"] = (folder / "ann-image.faiss").stat().st_size / 2**20
        faiss.omp_set_num_threads(1)
        rss0, t0 = _rss_mb(), time.perf_counter()
        col = Collection.open(folder, ann=ann)
        col.backend.index("image")
        out["ours_open_s"] = time.perf_counter() - t0
        out["ours_open_rss_mb"] = _rss_mb() - rss0
        out["ours"] = {}
        for ef in EF_VALUES:
            col.backend.index("image").cfg.ef_search = ef

            def query(q: np.ndarray) -> list[int]:
                hits = col.backend.dense("image", q, 10, Filters())
                meta = col.backend.items([i for i, _ in hits])  # hits come back with their metadata
                return [i for i, _ in hits if i in meta]

            found, p50, p99 = _latency(query, queries)
            out["ours"][f"ef{ef}"] = {"recall@10": _recall(found, truth), "p50_ms": p50, "p99_ms": p99}
        col.close()
    faiss.omp_set_num_threads(os.cpu_count() or 1)

    rss0, t0 = _rss_mb(), time.perf_counter()
    ref = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    ref.hnsw.efConstruction = 80
    ref.add(vectors)
    out["faiss_build_s"] = time.perf_counter() - t0
    out["faiss_build_rss_mb"] = _rss_mb() - rss0
    faiss.omp_set_num_threads(1)
    out["faiss"] = {}
    for ef in EF_VALUES:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        found, p50, p99 = _latency(lambda q, p=params: ids[ref.search(q[None], 10, params=p)[1][0]].tolist(), queries)
        out["faiss"][f"ef{ef}"] = {"recall@10": _recall(found, truth), "p50_ms": p50, "p99_ms": p99}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out


def run(quick: bool) -> dict:
    """Quick: 20k vectors. Full: 100k and 1M (several minutes of both cores, mostly the two HNSW builds)."""
    import json
    import sys

    sizes = [20_000] if quick else [100_000, 1_000_000]
    results = []
    for n in sizes:
        results.append(_measure(n, quick))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # partial results while the next size runs
    return {
        "data": "clustered unit vectors, 1024 Gaussian clusters, dim 512; fresh queries from the same mixture",
        "queries": N_QUERIES,
        "threads": {"build": os.cpu_count(), "search": 1},
        "results": results,
    }
