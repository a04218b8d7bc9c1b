"""Distributed embedding with Ray Data: read -> decode/preprocess -> embed on an actor pool -> write.

    build_collection_ray("photos.db", ["/data/photos"], model="models/clip", partitions=64, actors=4)
    # mmstack index build --db photos.db --source /data/photos --model models/clip --ray --partitions 64

The driver plans exactly as the local build (``builder._plan``: scan, skip unchanged units, apply renames
and deletions), so only new or changed units reach Ray. Those are split into ``partitions`` Ray Data blocks:
decoding and preprocessing (the checkpoint's processor: resize, uint8) run as Ray tasks, the model runs in
an actor pool (each actor loads the model once), and the driver writes each returned batch of units into
the collection in one transaction, as the local build does. A failed or interrupted run keeps every
committed unit, so the next run plans only what is missing: a finished partition (indeed every finished
unit) is never embedded again. Without ``--ray`` the same command runs the local builder.

Limits: the driver also loads the model once (the collection checks model id and dimension before writing);
workers must see the source files and the checkpoint at the same paths (a shared file system); actors run on
CPU (``actor_cpus`` each).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmstack.errors import ConfigError, ModelError
from mmstack.index.ann import AnnConfig
from mmstack.index.builder import (
    BuildConfig,
    BuildReport,
    Embedders,
    _embed_batch,
    _load,
    build_index,
    drop_collection,
)
from mmstack.index.embedders import MINILM_NAMES, Embedder, load_embedder
from mmstack.utils.progress import make_progress


@dataclass
class RayConfig:
    """Where and how wide the Ray pipeline runs.

    Args:
        address: a running cluster (``auto``, ``ray://head:10001``) or None to start a local Ray instance.
        partitions: Ray Data blocks the units are split into (parallel decode tasks; the unit of scheduling).
        actors: size of the embedding actor pool (each holds one copy of the model).
        actor_cpus: CPUs reserved per actor (and torch threads inside it).
    """

    address: str | None = None
    partitions: int = 8
    actors: int = 1
    actor_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.actors < 1 or self.actor_cpus <= 0:
            raise ConfigError(
                f"--partitions and --ray-actors must be >= 1 and actor CPUs > 0, got "
                f"{self.partitions}, {self.actors}, {self.actor_cpus}"
            )


@dataclass
class _Specs:
    """How a worker rebuilds the embedders: checkpoint specs, not model objects (they stay out of pickles)."""

    image: str | None
    text: str | None
    text_space: str


# ------------------------------------------------------------------------------------- worker side

_CACHE: dict[tuple[str, str], Any] = {}


class _Preparer:
    """The image half of an embedder without its weights: the checkpoint's processor (decode tasks)."""

    supports_images = True

    def __init__(self, spec: str) -> None:
        from mmstack.processing.two_tower import TwoTowerProcessor

        self.processor = TwoTowerProcessor.from_pretrained(spec)

    def prepare_image(self, image: Any) -> np.ndarray:
        return self.processor.image_to_uint8(image)  # (H, W, 3) uint8, as TwoTowerEmbedder.prepare_image


def _cached(kind: str, spec: str, make: Callable[[str], Any]) -> Any:
    if (kind, spec) not in _CACHE:
        _CACHE[(kind, spec)] = make(spec)
    return _CACHE[(kind, spec)]


def _decode(batch: dict[str, np.ndarray], specs: _Specs, cfg: BuildConfig) -> dict[str, Any]:
    """Ray task: read and preprocess units (``builder._load``); rows carry the pickled result."""
    image = _cached("prepare", specs.image, _Preparer) if specs.image else None
    embedders = Embedders(image, None)
    loaded = [_load(pickle.loads(u), embedders, cfg) for u in batch["unit"]]
    return {"idx": batch["idx"], "loaded": np.array([pickle.dumps(x) for x in loaded], dtype=object)}


class _EmbedActor:
    """Ray actor: holds the model(s) and embeds one batch of decoded units per call."""

    def __init__(self, specs: _Specs, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.specs = specs
        self.image = load_embedder(specs.image) if specs.image else None
        self.text: Embedder | None = None  # loaded on the first document

    def _text_embedder(self) -> Embedder:
        if self.specs.text_space == "image":
            if self.image is None:
                raise ModelError("--text-space image needs a two-tower --model")
            return self.image
        if self.text is None:
            if not self.specs.text:
                raise ModelError("no text encoder for documents: pass --text-model, or --text-space image")
            self.text = load_embedder(self.specs.text)
        return self.text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        loaded = [pickle.loads(b) for b in batch["loaded"]]
        good = [x for x in loaded if x.error is None]
        images = [im for x in good for im in x.images]
        texts = [t for x in good for t in x.texts]
        img = self.image.embed_prepared(images) if images else None  # (n_images, D)
        txt = self._text_embedder().embed_texts(texts) if texts else None  # (n_texts, D)
        i_img = i_txt = 0
        img_out, txt_out = [], []
        for x in loaded:
            n_i, n_t = (len(x.images), len(x.texts)) if x.error is None else (0, 0)
            img_out.append(_pack(img[i_img : i_img + n_i]) if n_i else b"")
            txt_out.append(_pack(txt[i_txt : i_txt + n_t]) if n_t else b"")
            i_img, i_txt = i_img + n_i, i_txt + n_t
        return {
            "idx": batch["idx"],
            "loaded": batch["loaded"],
            "image_vecs": np.array(img_out, dtype=object),
            "text_vecs": np.array(txt_out, dtype=object),
        }


def _pack(vecs: np.ndarray) -> bytes:
    return pickle.dumps(np.ascontiguousarray(vecs, dtype=np.float32))


def _unpack(blob: bytes) -> np.ndarray:
    return pickle.loads(blob)


# ------------------------------------------------------------------------------------- driver side


class _Precomputed:
    """Stands in for an embedder on the driver: hands back the vectors the actors computed, so the local
    build's row assembly (``builder._embed_batch``) is reused as is."""

    def __init__(self, real: Embedder) -> None:
        self.model_id, self.dim, self.supports_images = real.model_id, real.dim, real.supports_images
        self.pending_texts: np.ndarray | None = None

    def embed_prepared(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(list(prepared))  # the "prepared images" are already their vectors

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        vecs, self.pending_texts = self.pending_texts, None
        if vecs is None or len(vecs) != len(texts):
            raise ModelError("internal: text vectors out of step with the batch")
        return vecs


def build_collection_ray(
    db: str | Path,
    sources: Sequence[str | Path],
    model: str | None,
    text_model: str | None = "minilm",
    cfg: BuildConfig | None = None,
    ann: AnnConfig | None = None,
    ray_cfg: RayConfig | None = None,
    rebuild: bool = False,
) -> BuildReport:
    """``build_collection`` with the embedding done by Ray Data (see the module docstring)."""
    cfg, ann, ray_cfg = cfg or BuildConfig(), ann or AnnConfig(), ray_cfg or RayConfig()
    if not model:
        raise ConfigError("--model is required: a two-tower checkpoint folder (or 'minilm' for text documents only)")
    if not sources:
        raise ConfigError("give at least one --source (a folder, a pairs file or a world)")
    main = load_embedder(model)
    is_image = main.supports_images
    text_spec = None if (text_model in (None, "none") and is_image) else (text_model if is_image else model)
    specs = _Specs(str(Path(model).resolve()) if is_image else None, _spec(text_spec), cfg.text_space)
    refs = {"image": specs.image} if is_image else {}
    if text_spec:
        refs["text"] = specs.text
    text_real: Embedder | Callable[[], Embedder] | None = None if is_image else main
    if is_image and text_spec:
        text_real = lambda: load_embedder(text_spec)  # noqa: E731  (loaded only if a document needs it)
    if rebuild:
        drop_collection(db)

    def embed(store: Any, todo: Any, report: BuildReport, errors: dict) -> None:
        drivers = _driver_embedders(main if is_image else None, text_real, cfg.text_space)
        _embed_with_ray(store, todo, specs, drivers, cfg, ray_cfg, report, errors, refs)

    embedders = Embedders(main if is_image else None, text_real)
    return build_index(db, sources, embedders, cfg, ann, refs, embed=embed)


def _spec(spec: str | None) -> str | None:
    if not spec or spec == "none":
        return None
    return spec if spec in MINILM_NAMES else str(Path(spec).resolve())


def _driver_embedders(image: Embedder | None, text: Any, text_space: str) -> Embedders:
    """Embedders whose calls return the actors' vectors; the real text model is loaded only if needed
    (the collection records its id and dimension)."""
    img_shim = _Precomputed(image) if image is not None else None
    if text_space == "image":
        return Embedders(img_shim, lambda: img_shim)  # type: ignore[arg-type, return-value]
    if text is None:
        return Embedders(img_shim, None)  # type: ignore[arg-type]

    def text_shim() -> Any:
        return _Precomputed(text() if callable(text) and not isinstance(text, Embedder) else text)

    return Embedders(img_shim, text_shim)  # type: ignore[arg-type]


def _embed_with_ray(
    store: Any,
    todo: list[Any],
    specs: _Specs,
    embedders: Embedders,
    cfg: BuildConfig,
    ray_cfg: RayConfig,
    report: BuildReport,
    errors: dict[str, tuple[str, str]],
    refs: dict[str, str | None],
) -> None:
    if not todo:
        return
    t0 = time.perf_counter()
    started = _start_ray(ray_cfg.address)
    try:
        n_items = 0
        with make_progress() as progress:
            bar = progress.add_task("indexing (ray)", total=len(todo))
            for out in _pipeline(todo, specs, cfg, ray_cfg).iter_batches(batch_size=None, batch_format="numpy"):
                n_items += _write_batch(store, out, embedders, cfg, report, errors, refs)
                progress.advance(bar, len(out["idx"]))
        report.items_embedded = n_items
        report.embed_seconds = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()


def _start_ray(address: str | None) -> bool:
    """Connect to ``address`` or start a local instance; True when this call started Ray (and must stop it)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'mmstack[distributed]'") from None

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return True


def _pipeline(todo: list[Any], specs: _Specs, cfg: BuildConfig, ray_cfg: RayConfig) -> Any:
    import ray.data

    rows = [{"idx": i, "unit": pickle.dumps(u)} for i, u in enumerate(todo)]
    blocks = min(ray_cfg.partitions, len(rows))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(_decode, fn_kwargs={"specs": specs, "cfg": cfg}, batch_format="numpy", batch_size=None)
    return ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"specs": specs, "threads": int(ray_cfg.actor_cpus)},
        compute=ray.data.ActorPoolStrategy(size=ray_cfg.actors),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=ray_cfg.actor_cpus,
    )


def _write_batch(
    store: Any,
    out: dict[str, np.ndarray],
    embedders: Embedders,
    cfg: BuildConfig,
    report: BuildReport,
    errors: dict[str, tuple[str, str]],
    refs: dict[str, str | None],
) -> int:
    """Commit one batch of embedded units (one transaction) and count its items."""
    good = []
    texts = []
    for blob, img, txt in zip(out["loaded"], out["image_vecs"], out["text_vecs"], strict=True):
        loaded = pickle.loads(blob)
        if loaded.error is not None:
            errors[loaded.unit.uid] = (loaded.unit.path, loaded.error)
            status = loaded.unit.meta["_status"]
            setattr(report, status, getattr(report, status) - 1)
            continue
        loaded.images = list(_unpack(img)) if img else []
        if txt:
            texts.append(_unpack(txt))
        good.append(loaded)
    if texts:
        text_emb = embedders.image if cfg.text_space == "image" else embedders.text()
        text_emb.pending_texts = np.concatenate(texts)  # type: ignore[union-attr]
    rows = _embed_batch(store, good, embedders, cfg, refs, errors)
    if rows:
        store.write_units(rows)
    return sum(len(items) for _, items in rows)
