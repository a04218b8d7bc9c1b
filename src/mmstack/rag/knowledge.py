"""Opening what a RAG question is asked over: a collection built by ``mmstack index build``, or a pairs
file/folder (image + caption/note per item) searched in memory with a two-tower model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmstack.errors import CollectionError, ConfigError
from mmstack.rag.retrievers import items_from_pairs, memory_retrievers

PAIRS_SUFFIXES = (".jsonl", ".csv", ".tsv")


def _pairs_source(db: Path) -> Path | None:
    """The pairs file/folder ``db`` names, or None when ``db`` is not one."""
    if db.is_file() and db.suffix in PAIRS_SUFFIXES:
        return db
    if db.is_dir() and (db / "pairs.jsonl").is_file():
        return db / "pairs.jsonl"
    return None


def load_two_tower(path: str | Path, device: str = "cpu") -> Any:
    from mmstack.models.two_tower import TwoTowerModel

    return TwoTowerModel.from_pretrained(path).to(device).eval()


def open_knowledge_base(db: str | Path, retriever: str | Path | None = None, device: str = "cpu") -> tuple[list, Any]:
    """The retrievers over ``db`` and the two-tower model they use (for reranking).

    ``db`` is a collection folder (``mmstack index build``) or a pairs file/folder; ``retriever`` is the
    two-tower checkpoint (required for pairs; for a collection it defaults to the collection's own model).
    """
    db = Path(db)
    if not db.exists():
        raise CollectionError(f"--db {db} does not exist; build a collection with `mmstack index build` first")
    pairs = _pairs_source(db)
    if pairs is None:
        from mmstack.rag.collection import collection_retrievers, collection_two_tower, open_collection

        collection = open_collection(db)
        model = load_two_tower(retriever, device) if retriever else collection_two_tower(collection)
        return collection_retrievers(collection), model
    if retriever is None:
        raise ConfigError(f"--db {db} is a pairs file: pass --retriever CKPT (a two-tower checkpoint) to embed it")
    model = load_two_tower(retriever, device)
    return memory_retrievers(model, items_from_pairs(pairs)), model
