"""``mmstack index``: build a searchable collection from folders, pairs files, documents and world clips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows

app = typer.Typer(help="Collections: index images, pairs, documents and clips; show stats.", no_args_is_help=True)


@app.command()
def build(
    sources: list[str] = typer.Argument(None, help="Sources (same as --source)."),
    source: list[str] = typer.Option(
        None, "--source", help="Folder, pairs file (.jsonl/.csv/.tsv/.tar) or world; repeatable."
    ),
    db: str = typer.Option(..., "--db", help="Collection folder (created), or qdrant://host:port/name."),
    model: str = typer.Option(
        None, "--model", help="Two-tower checkpoint for images (or 'minilm' for documents only)."
    ),
    text_model: str = typer.Option(
        "minilm", "--text-model", help="Sentence encoder for documents: 'minilm', a folder, or 'none'."
    ),
    text_space: str = typer.Option(
        "text", "--text-space", help="Documents in the 'text' space, or 'image' (two-tower text tower)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Items per model call and per commit."),
    workers: int = typer.Option(2, "--workers", help="Decode/preprocess threads running ahead of the model."),
    clip_mode: str = typer.Option(
        "frames", "--clip-mode", help="World clips: 'frames' (a vector per frame) or 'pooled'."
    ),
    clip_frames: int = typer.Option(4, "--clip-frames", help="Frames sampled per clip (0: all)."),
    tag: list[str] = typer.Option(None, "--tag", help="Tag every item of this run (repeatable)."),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="Remove items whose files are gone from the sources."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Drop the collection first and re-embed everything."),
    ann: str = typer.Option("auto", "--ann", help="Search index: auto (exact below 50k rows, else HNSW), exact, hnsw."),
    ray: bool = typer.Option(
        False, "--ray", help="Embed with Ray Data (decode tasks, model actor pool); needs [distributed]."
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Ray cluster to join ('auto', ray://head:10001); default: start a local one."
    ),
    partitions: int = typer.Option(
        8, "--partitions", help="With --ray: Ray Data blocks the units to embed are split into."
    ),
    ray_actors: int = typer.Option(1, "--ray-actors", help="With --ray: embedding actors (one model copy each)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Index sources into a collection; unchanged files are skipped, changed ones re-embedded, gone ones removed.

    With --ray the embedding runs on Ray (local or --ray-address auto); committed units survive a crash, so a
    rerun embeds only what is missing.
    """
    from mmstack.index.ann import AnnConfig
    from mmstack.index.builder import BuildConfig, build_collection

    cfg = BuildConfig(
        batch_size=batch_size,
        workers=workers,
        clip_mode=clip_mode,
        clip_frames=clip_frames,
        text_space=text_space,
        tags=tuple(tag or ()),
        prune=prune,
    )
    args = {"model": model, "text_model": text_model, "cfg": cfg, "ann": AnnConfig(kind=ann), "rebuild": rebuild}
    if ray:
        from mmstack.index.ray_embed import RayConfig, build_collection_ray

        ray_cfg = RayConfig(address=ray_address, partitions=partitions, actors=ray_actors)
        report = build_collection_ray(db, [*(source or []), *(sources or [])], ray_cfg=ray_cfg, **args)
    else:
        report = build_collection(db, [*(source or []), *(sources or [])], **args)
    emit({"db": db, **report.to_dict()}, as_json, render=_render_build)


def _render_build(result: dict[str, Any]) -> None:
    print_kv({k: v for k, v in result.items() if k != "skipped"}, title="index build")
    if result["skipped"]:
        print_rows(result["skipped"][:20], title=f"{len(result['skipped'])} skipped (unreadable)")


@app.command()
def migrate(
    source: str = typer.Option(..., "--from", help="Collection to copy: a folder or qdrant://host:port/name."),
    target: str = typer.Option(..., "--to", help="Where to copy it: qdrant://host:port/name or a folder."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a target that already holds rows."),
    hnsw_m: int = typer.Option(None, "--hnsw-m", help="Qdrant server target: HNSW graph degree (default 16)."),
    hnsw_ef: int = typer.Option(None, "--hnsw-ef-construct", help="Qdrant server target: HNSW build beam (100)."),
    payload_indexes: bool = typer.Option(
        True, "--payload-indexes/--no-payload-indexes", help="Qdrant server target: index kind/source/tags/uid."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Copy a collection between the embedded store and Qdrant (either way): ids, vectors, payloads, text.

    Example: mmstack index migrate --from photos.db --to qdrant://localhost:6333/photos --hnsw-m 32
    """
    from mmstack.index.migrate import QdrantTuning
    from mmstack.index.migrate import migrate as run

    tuning = QdrantTuning(m=hnsw_m, ef_construct=hnsw_ef, payload_indexes=payload_indexes)
    emit(run(source, target, replace=replace, tuning=tuning).to_dict(), as_json)


@app.command()
def stats(
    db: str = typer.Option(..., "--db", help="Collection folder or qdrant://host:port/name."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Row count, model ids and dimensions, sources and index type of a collection."""
    from mmstack.index.collection import Collection

    with Collection.open(db) as col:
        result = col.stats()
    first = next(iter(result["spaces"].values()), {})
    result = {"db": db, "model_id": first.get("model_id"), "dim": first.get("dim"), **result}
    emit(result, as_json)


@app.command()
def errors(
    db: Path = typer.Option(..., "--db", help="Collection folder."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Files the last build could not read, with the reason."""
    from mmstack.index.store import SqliteStore

    with SqliteStore.open(db) as store:
        rows = store.errors()
    emit({"db": str(db), "errors": rows}, as_json, render=lambda r: print_rows(r["errors"], title="unreadable files"))
