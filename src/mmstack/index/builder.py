"""Incremental, crash-safe indexing: scan sources, embed what changed, commit unit by unit.

One run:

1. scan the sources into units (``sources.py``) and read each one's (size, mtime);
2. compare with the store: same (size, mtime) -> unchanged, nothing read; otherwise hash the content:
   same hash -> only the mtime is updated; a hash that belongs to a unit gone from its old path -> a
   rename (path updated, vector and id kept); else the unit is (re-)embedded. Units of the scanned sources
   that are no longer there are removed;
3. embed: worker threads decode and preprocess units while the main thread runs the model; each batch of
   units is written in one transaction, so ``kill -9`` at any point loses at most the batch in flight and
   the next run (which sees those units as new) completes it, with no duplicates (item ids are derived
   from the unit, and a unit's old items are deleted in the same transaction);
4. bring the ANN cache up to date (``ann.open_index``).

Unreadable units (bad images, undecodable files) are skipped and listed, never fatal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmstack.errors import CollectionError, ConfigError, DataError, ModelError
from mmstack.index.ann import AnnConfig, open_index, saved_change_seq
from mmstack.index.embedders import Embedder
from mmstack.index.fts import searchable_text
from mmstack.index.sources import Unit, chunk_text, scan_source
from mmstack.index.store import ItemRow, SqliteStore, UnitRow
from mmstack.utils.progress import console, make_progress


@dataclass
class BuildConfig:
    """Options of ``mmstack index build``.

    Args:
        batch_size: items per model call (and per committed transaction).
        workers: threads that decode and preprocess ahead of the model (0: in the main thread).
        chunk_words, chunk_overlap: text document chunking (words).
        clip_mode: ``"frames"`` (one vector per sampled frame) or ``"pooled"`` (mean of the frames).
        clip_frames: frames sampled evenly per clip (0: all).
        text_space: where text documents go: ``"text"`` (the sentence encoder) or ``"image"`` (the
            two-tower's text tower, so images and documents share one space).
        tags: tags given to every item indexed in this run.
        prune: remove units of the given sources that are no longer on disk.
    """

    batch_size: int = 64
    workers: int = 2
    chunk_words: int = 120
    chunk_overlap: int = 20
    clip_mode: str = "frames"
    clip_frames: int = 4
    text_space: str = "text"
    tags: tuple[str, ...] = ()
    prune: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError(f"--batch-size must be >= 1 and --workers >= 0, got {self.batch_size}, {self.workers}")
        if self.clip_mode not in ("frames", "pooled"):
            raise ConfigError(f"--clip-mode must be 'frames' or 'pooled', got {self.clip_mode!r}")
        if self.text_space not in ("text", "image"):
            raise ConfigError(f"--text-space must be 'text' or 'image', got {self.text_space!r}")
        if not 0 <= self.chunk_overlap < self.chunk_words:
            raise ConfigError(f"need 0 <= chunk_overlap < chunk_words, got {self.chunk_overlap}, {self.chunk_words}")
        self.tags = tuple(self.tags)


@dataclass
class BuildReport:
    """What one build did (``mmstack index build --json`` prints this)."""

    scanned: int = 0
    unchanged: int = 0
    added: int = 0
    changed: int = 0
    renamed: int = 0
    touched: int = 0
    deleted: int = 0
    items_embedded: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["errors"] = len(self.skipped)
        d["items_per_s"] = round(self.items_embedded / self.embed_seconds, 2) if self.embed_seconds > 0 else None
        return d


@dataclass
class _Loaded:
    """A unit read from disk and preprocessed, ready for the model."""

    unit: Unit
    images: list[Any] = field(default_factory=list)  # prepared images (one per image item, or frames to pool)
    texts: list[str] = field(default_factory=list)  # chunks to embed with the text-space embedder
    error: str | None = None


class Embedders:
    """The embedders of a collection's spaces; the text encoder is loaded only when a document needs it."""

    def __init__(self, image: Embedder | None, text: Embedder | Callable[[], Embedder] | None) -> None:
        self.image = image
        self._text = text

    def text(self) -> Embedder:
        if callable(self._text) and not isinstance(self._text, Embedder):
            self._text = self._text()
        if self._text is None:
            raise ModelError("no text encoder for documents: pass --text-model, or --text-space image")
        return self._text  # type: ignore[return-value]


def check_space(store: SqliteStore, space: str, emb: Embedder, model_ref: str | None) -> None:
    """Record the space's model on first use; afterwards refuse a different model or dimension."""
    spaces = store.spaces()
    info = spaces.get(space)
    if info is None:
        spaces[space] = {"model_id": emb.model_id, "dim": int(emb.dim), "model": model_ref}
        store.set_meta("spaces", spaces)
        return
    if int(info["dim"]) != int(emb.dim):
        raise CollectionError(
            f"collection {store.folder} stores {space} vectors of dimension {info['dim']} from model "
            f"{info['model_id']}, but {emb.model_id} makes dimension {emb.dim}; use that model, a new --db, "
            "or --rebuild to re-embed everything"
        )
    if info["model_id"] != emb.model_id:
        raise CollectionError(
            f"collection {store.folder} was built with {space} model {info['model_id']}, not {emb.model_id} "
            "(vectors of different models are not comparable); use that model, a new --db, or --rebuild"
        )


def build_index(
    db: str | Path,
    sources: Sequence[str | Path],
    embedders: Embedders,
    cfg: BuildConfig | None = None,
    ann: AnnConfig | None = None,
    model_refs: dict[str, str | None] | None = None,
    embed: Callable[..., None] | None = None,
) -> BuildReport:
    """Index ``sources`` into collection ``db`` (a folder, created if needed, or ``qdrant://...``).

    Args:
        embedders: the image-space model (or None) and the text-space encoder (or a factory for it).
        model_refs: per space, how to load its query embedder later (a checkpoint path, ``"minilm"``).
        embed: ``fn(store, todo, report, errors)`` that embeds and writes the planned units instead of the
            local loop (the Ray Data path); planning, errors and the ANN refresh stay here.
    """
    cfg, ann = cfg or BuildConfig(), ann or AnnConfig()
    if not sources:
        raise ConfigError("give at least one --source (a folder, a pairs file or a world)")
    t0 = time.perf_counter()
    report = BuildReport()
    with open_store(db, create=True) as store:
        if embedders.image is not None:
            check_space(store, "image", embedders.image, (model_refs or {}).get("image"))
        todo, errors = _plan(store, sources, _local_folder(db), cfg, report)
        if embed is None:
            _embed_all(store, todo, embedders, cfg, report, errors, model_refs or {})
        else:
            embed(store, todo, report, errors)
        store.set_errors(errors)
        report.skipped = [{"path": p, "error": e} for p, e in errors.values()]
        if isinstance(store, SqliteStore):
            store.set_meta("ann", asdict(ann))  # searches open the index the way it was built
            _refresh_ann(store, ann)
        report.rows = store.count()
    report.seconds = time.perf_counter() - t0
    return report


def build_collection(
    db: str | Path,
    sources: Sequence[str | Path],
    model: str | None,
    text_model: str | None = "minilm",
    cfg: BuildConfig | None = None,
    ann: AnnConfig | None = None,
    rebuild: bool = False,
) -> BuildReport:
    """``build_index`` with embedders loaded from specs (what ``mmstack index build`` runs).

    Args:
        model: a two-tower checkpoint folder (images, pairs, clips), or ``"minilm"`` for documents only.
        text_model: the documents' sentence encoder (``"minilm"``, a folder) or ``"none"``.
        rebuild: drop the collection first.
    """
    from mmstack.index.embedders import MINILM_NAMES, load_embedder

    if not model:
        raise ConfigError("--model is required: a two-tower checkpoint folder (or 'minilm' for text documents only)")
    main = load_embedder(model)
    refs: dict[str, str | None] = {}
    text: Embedder | Callable[[], Embedder] | None = None
    image = main if main.supports_images else None
    if image is not None:
        refs["image"] = str(Path(model).resolve())
    else:
        text, refs["text"] = main, _ref(model, MINILM_NAMES)
    if text is None and text_model and text_model != "none":
        text, refs["text"] = (lambda: load_embedder(text_model)), _ref(text_model, MINILM_NAMES)
    if rebuild:
        drop_collection(db)
    return build_index(db, sources, Embedders(image, text), cfg, ann, refs)


def _ref(spec: str, names: Sequence[str]) -> str:
    return spec if spec in names else str(Path(spec).resolve())


def open_store(db: str | Path, create: bool = False) -> Any:
    """The store behind ``db``: ``SqliteStore`` for a folder, ``QdrantStore`` for ``qdrant://...``."""
    if str(db).startswith("qdrant://"):
        from mmstack.index.qdrant import QdrantStore

        return QdrantStore.open(str(db), create=create)
    return SqliteStore.open(db, create=create)


def _local_folder(db: str | Path) -> Path | None:
    return None if str(db).startswith("qdrant://") else Path(db).resolve()


def drop_collection(db: str | Path) -> None:
    """Delete a collection (its folder must hold a collection database, so nothing else is ever removed)."""
    import shutil

    from mmstack.index.store import DB_FILE

    if str(db).startswith("qdrant://"):
        from mmstack.index.qdrant import QdrantStore

        QdrantStore.drop(str(db))
        return
    folder = Path(db)
    if folder.exists():
        if not (folder / DB_FILE).is_file():
            raise CollectionError(f"--rebuild: {folder} is not a collection folder (no {DB_FILE}); not deleting it")
        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------- planning


def _plan(
    store: Any, sources: Sequence[str | Path], db: Path | None, cfg: BuildConfig, report: BuildReport
) -> tuple[list[Unit], dict[str, tuple[str, str]]]:
    """Scan, classify every unit and apply the cheap changes (touch, rename, delete); return what to embed."""
    stored = store.units()
    seen: dict[str, Unit] = {}
    errors: dict[str, tuple[str, str]] = {}
    roots = [str(Path(s).resolve()) for s in sources]
    for src in sources:
        for unit in scan_source(src, skip=db):
            if unit.uid in seen:
                continue
            seen[unit.uid] = unit
            try:
                if "error" in unit.meta:
                    raise DataError(unit.meta["error"])
                unit.stat()
            except DataError as err:
                errors[unit.uid] = (unit.path, str(err))
    report.scanned = len(seen)
    candidates = [u for u in seen.values() if u.uid not in errors]
    fresh = [u for u in candidates if not _same_stat(stored.get(u.uid), u)]
    report.unchanged = len(candidates) - len(fresh)
    _hash_all(fresh, cfg.workers, errors)
    gone = {uid: row for uid, row in stored.items() if row.source in roots and uid not in seen}
    by_hash: dict[tuple[str, str], str] = {(row.kind, row.hash): uid for uid, row in gone.items()}
    todo, touched = [], []
    for u in fresh:
        if u.uid in errors:
            continue
        old = stored.get(u.uid)
        row = UnitRow(u.uid, u.kind, u.source, u.path, u.size, u.mtime_ns, u.hash or "")
        if old is not None and old.hash == u.hash:
            touched.append(row)
        elif old is None and (u.kind, u.hash) in by_hash:
            src_uid = by_hash.pop((u.kind, u.hash))
            gone.pop(src_uid)
            store.rename_unit(src_uid, row, lambda path, caption, tags: searchable_text(path, caption, tags))
            report.renamed += 1
        else:
            todo.append(u)
            u.meta["_status"] = "changed" if old is not None else "added"
            report.changed += old is not None
            report.added += old is None
    if touched:
        store.touch_units(touched)
    report.touched = len(touched)
    if cfg.prune and gone:
        report.deleted = store.delete_units(gone)
    return todo, errors


def _same_stat(row: UnitRow | None, unit: Unit) -> bool:
    return row is not None and row.size == unit.size and row.mtime_ns == unit.mtime_ns


def _hash_all(units: list[Unit], workers: int, errors: dict[str, tuple[str, str]]) -> None:
    def one(u: Unit) -> None:
        try:
            u.content_hash()
        except (DataError, OSError) as err:
            errors[u.uid] = (u.path, str(err))

    if workers > 0 and len(units) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, units))
    else:
        for u in units:
            one(u)


# ------------------------------------------------------------------------------------------ embedding


def _embed_all(
    store: SqliteStore,
    todo: list[Unit],
    embedders: Embedders,
    cfg: BuildConfig,
    report: BuildReport,
    errors: dict[str, tuple[str, str]],
    model_refs: dict[str, str | None],
) -> None:
    if not todo:
        return
    t0 = time.perf_counter()
    n_items = 0
    with make_progress() as progress:
        task = progress.add_task("indexing", total=len(todo))
        for batch in _batches(_load_all(todo, embedders, cfg), cfg.batch_size):
            good = []
            for loaded in batch:
                if loaded.error is not None:
                    errors[loaded.unit.uid] = (loaded.unit.path, loaded.error)
                    setattr(report, loaded.unit.meta["_status"], getattr(report, loaded.unit.meta["_status"]) - 1)
                else:
                    good.append(loaded)
            rows = _embed_batch(store, good, embedders, cfg, model_refs, errors)
            if rows:
                store.write_units(rows)
            n_items += sum(len(items) for _, items in rows)
            progress.advance(task, len(batch))
    report.items_embedded = n_items
    report.embed_seconds = time.perf_counter() - t0


def _load_all(todo: list[Unit], embedders: Embedders, cfg: BuildConfig) -> Iterator[_Loaded]:
    """Loaded units in order; with workers, decoding runs up to ``4 * batch_size`` units ahead of the model."""
    if cfg.workers == 0:
        yield from (_load(u, embedders, cfg) for u in todo)
        return
    ahead = 4 * cfg.batch_size
    with ThreadPoolExecutor(cfg.workers) as pool:
        futures = [pool.submit(_load, u, embedders, cfg) for u in todo[:ahead]]
        for i in range(len(todo)):
            if i + ahead < len(todo):
                futures.append(pool.submit(_load, todo[i + ahead], embedders, cfg))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]  # free the decoded pixels


def _load(unit: Unit, embedders: Embedders, cfg: BuildConfig) -> _Loaded:
    from mmstack.data.images import load_image

    out = _Loaded(unit)
    try:
        if unit.kind == "text":
            raw = Path(unit.path).read_bytes()
            out.texts = chunk_text(raw.decode("utf-8", errors="replace"), cfg.chunk_words, cfg.chunk_overlap)
            if not out.texts:
                raise DataError(f"{unit.path}: empty document")
            return out
        if embedders.image is None:
            raise ModelError(f"{unit.path}: images need a two-tower model (--model CKPT)")
        if unit.kind == "pair" and "caption_file" in unit.meta:
            unit.meta["caption"] = Path(unit.meta["caption_file"]).read_text(encoding="utf-8", errors="replace").strip()
        frames = _sample(list(unit.parts), cfg.clip_frames) if unit.kind == "clip" else [unit.path]
        if unit.kind == "clip":
            unit.meta["frames"] = [(unit.parts.index(f), f) for f in frames]
        out.images = [embedders.image.prepare_image(load_image(f)) for f in frames]
    except (DataError, OSError, ModelError) as err:
        out.error = str(err)
    return out


def _sample(frames: list[str], n: int) -> list[str]:
    """``n`` frames spread evenly over the clip, first and last included (all when ``n`` is 0 or larger)."""
    if n <= 0 or n >= len(frames):
        return frames
    if n == 1:
        return [frames[len(frames) // 2]]
    return [frames[round(i * (len(frames) - 1) / (n - 1))] for i in range(n)]


def _batches(loaded: Iterator[_Loaded], batch_size: int) -> Iterator[list[_Loaded]]:
    """Groups of whole units holding about ``batch_size`` items."""
    batch: list[_Loaded] = []
    size = 0
    for item in loaded:
        batch.append(item)
        size += max(1, len(item.images) + len(item.texts))
        if size >= batch_size:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _embed_batch(
    store: SqliteStore,
    batch: list[_Loaded],
    embedders: Embedders,
    cfg: BuildConfig,
    model_refs: dict[str, str | None],
    errors: dict[str, tuple[str, str]],
) -> list[tuple[UnitRow, list[ItemRow]]]:
    """One model call per space for the whole batch, then the rows to commit."""
    images = [im for b in batch for im in b.images]
    texts = [t for b in batch for t in b.texts]
    img_vecs = embedders.image.embed_prepared(images) if images else None
    txt_vecs = None
    text_space = cfg.text_space
    if texts:
        if text_space == "image":
            if embedders.image is None:
                raise ModelError("--text-space image needs a two-tower --model")
            txt_emb = embedders.image
        else:
            txt_emb = embedders.text()
            check_space(store, "text", txt_emb, model_refs.get("text"))
        txt_vecs = txt_emb.embed_texts(texts)
    rows = []
    i_img = i_txt = 0
    for b in batch:
        u = b.unit
        if b.texts:
            vecs = txt_vecs[i_txt : i_txt + len(b.texts)]  # (n_chunks, D)
            i_txt += len(b.texts)
            items = [
                _item(u, s, text_space, v, caption=t, cfg=cfg)
                for s, (t, v) in enumerate(zip(b.texts, vecs, strict=True))
            ]
        else:
            vecs = img_vecs[i_img : i_img + len(b.images)]  # (n_images, D)
            i_img += len(b.images)
            items = _image_items(u, vecs, cfg)
        rows.append((UnitRow(u.uid, u.kind, u.source, u.path, u.size, u.mtime_ns, u.content_hash()), items))
    return rows


def _image_items(u: Unit, vecs: np.ndarray, cfg: BuildConfig) -> list[ItemRow]:
    caption = u.meta.get("caption")
    if u.kind != "clip":
        return [_item(u, 0, "image", vecs[0], caption, cfg)]
    if cfg.clip_mode == "pooled":
        pooled = vecs.mean(0)
        return [_item(u, 0, "image", pooled / max(float(np.linalg.norm(pooled)), 1e-12), caption, cfg, pooled=True)]
    frames = u.meta["frames"]
    return [_item(u, s, "image", v, caption, cfg, frame=frames[s][0], path=frames[s][1]) for s, v in enumerate(vecs)]


def _item(
    u: Unit,
    seq: int,
    space: str,
    vec: np.ndarray,
    caption: str | None,
    cfg: BuildConfig,
    path: str | None = None,
    **extra: Any,
) -> ItemRow:
    path = path or u.path
    meta = {k: v for k, v in u.meta.items() if k not in ("caption", "caption_file", "tags", "frames", "_status")}
    meta.update(extra)
    own = u.meta.get("tags")
    tags = sorted({*cfg.tags, *(str(t) for t in (own if isinstance(own, list) else []))})
    if u.kind == "text":
        meta["chunk"] = seq
    return ItemRow(
        uid=u.uid,
        seq=seq,
        kind=u.kind,
        space=space,
        source=u.source,
        path=path,
        vector=np.asarray(vec, np.float32),
        caption=caption,
        text=searchable_text(path, caption, tags),
        tags=tags,
        meta=meta,
    )


def _refresh_ann(store: SqliteStore, ann: AnnConfig) -> None:
    """Catch the ANN caches up with this run, then drop change-log entries every cache has seen."""
    seqs = []
    for space in store.spaces():
        open_index(store, space, ann, save=True)
        seqs.append(saved_change_seq(store.folder, space))
    saved = [s for s in seqs if s is not None]
    store.prune_changes(min(saved) if saved else store.last_change())
    console.print(f"[dim]collection {store.folder}: {store.count()} rows[/dim]")
