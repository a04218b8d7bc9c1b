"""Collections: index images, image-text pairs, text documents and world clips; search them.

    from mmstack.index import Collection, Filters, build_collection
    build_collection("photos.db", ["~/Pictures"], model="models/clip")
    with Collection.open("photos.db") as col:
        hits = col.search('"2:red circle" + ./img.png - blue', top_k=5, filters=Filters(path="*/2024/*"))

Modules: ``sources`` (what a path holds: units and fingerprints), ``embedders`` (two-tower and MiniLM
adapters), ``store`` (the SQLite truth with FTS5), ``ann`` (exact search or the FAISS HNSW cache),
``builder`` (incremental, crash-safe indexing), ``query`` (weighted/negative query parsing), ``fts`` and
``fusion`` (BM25 queries, reciprocal rank fusion), ``collection`` (search API), ``qdrant`` (server backend).
"""

from mmstack.index.ann import AnnConfig
from mmstack.index.builder import BuildConfig, BuildReport, build_collection, build_index
from mmstack.index.collection import Collection, Hit
from mmstack.index.embedders import Embedder, SentenceEmbedder, TwoTowerEmbedder, load_embedder
from mmstack.index.fusion import reciprocal_rank_fusion
from mmstack.index.query import QueryPart, parse_query
from mmstack.index.store import Filters

__all__ = [
    "AnnConfig",
    "BuildConfig",
    "BuildReport",
    "Collection",
    "Embedder",
    "Filters",
    "Hit",
    "QueryPart",
    "SentenceEmbedder",
    "TwoTowerEmbedder",
    "build_collection",
    "build_index",
    "load_embedder",
    "parse_query",
    "reciprocal_rank_fusion",
]
