"""``mmstack search``: query a collection with text, images, stored items, weights, negatives and filters."""

from __future__ import annotations

from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_rows


def search(
    query: list[str] = typer.Argument(
        None, help='Query terms: texts, image paths, id:N; weights "2:red circle"; + and - between terms.'
    ),
    db: str = typer.Option(..., "--db", help="Collection folder or qdrant://host:port/name."),
    image: list[str] = typer.Option(None, "--image", help="Query image (repeatable): image-to-image search."),
    like: list[int] = typer.Option(None, "--like", help="A stored item id: more like this (repeatable)."),
    top_k: int = typer.Option(10, "--top-k", "-k", help="Number of hits."),
    mode: str = typer.Option("auto", "--mode", help="auto | hybrid (dense + BM25) | dense | text (BM25 only)."),
    path: str = typer.Option(None, "--path", help="Only items whose path matches this glob."),
    source: str = typer.Option(None, "--source", help="Only items from this source (path or glob)."),
    tag: list[str] = typer.Option(None, "--tag", help="Only items with this tag (repeatable: all must match)."),
    kind: str = typer.Option(None, "--kind", help="Only items of this kind: image, pair, text, clip."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Search a collection; prints hits with scores (one JSON object with --json)."""
    from mmstack.index.collection import Collection
    from mmstack.index.store import Filters

    filters = Filters(path=path, source=source, tags=tuple(tag or ()), kind=kind)
    with Collection.open(db) as col:
        hits = col.search(query or None, images=image or (), like=like or (), top_k=top_k, filters=filters, mode=mode)
    result = {"db": db, "query": query or [], "mode": mode, "hits": [h.to_dict() for h in hits]}
    emit(result, as_json, render=_render)


def _render(result: dict[str, Any]) -> None:
    rows = [
        {
            "rank": i,
            "score": h["score"],
            "id": h["id"],
            "kind": h["kind"],
            "path": h["path"],
            "caption": h["caption"] or "",
        }
        for i, h in enumerate(result["hits"], 1)
    ]
    print_rows(rows, title=f"{len(rows)} hits")
