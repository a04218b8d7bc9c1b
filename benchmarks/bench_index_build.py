"""Indexing throughput against a plain transformers loop, and re-indexing an unchanged collection.

- plain loop: the same two-tower model (``shapes-tiny``, random weights: speed does not depend on them),
  ``PIL.Image.open`` + the checkpoint's processor + ``encode_image`` in batches of 64, one thread, nothing
  stored;
- ours: ``mmstack index build`` (``build_collection``) on the same images: hashing, decoding in worker
  threads, embedding, SQLite commits per batch, FTS and ANN upkeep; with 2 decode workers and with 0;
- re-index: the same build again with nothing changed (the target is <= 5% of the full build).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

BATCH = 64


def _model(folder: Path) -> Path:
    import torch

    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer
    from mmstack.world import COLOURS, SHAPES

    tok = train_caption_tokenizer([f"a small large {c} {s}" for c in COLOURS for s in SHAPES], max_length=32)
    cfg = TwoTowerConfig.from_preset("shapes-tiny")
    torch.manual_seed(0)
    TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).save_pretrained(folder)
    return folder


def _plain_loop(model_dir: Path, paths: list[Path]) -> float:
    """Images per second of the simplest correct loop."""
    import torch
    from PIL import Image

    from mmstack.models.two_tower import TwoTowerModel

    model = TwoTowerModel.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), BATCH):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + BATCH]]
            model.encode_image(model.processor.images(images), normalize=True)
    return len(paths) / (time.perf_counter() - t0)


def run(quick: bool) -> dict:
    """Quick: 256 images. Full: 10,000 images (64 px shapes world); the plain loop times the first 2,000 and
    the 0-worker variant is skipped, to keep the run under half an hour on a shared 2-core machine."""
    import torch

    from mmstack.index.builder import BuildConfig, build_collection
    from mmstack.world import generate_world

    n = 256 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="bench-index-build-") as tmp:
        root = Path(tmp)
        world = root / "world"
        generate_world(world, n=n, seed=0)
        model = _model(root / "model")
        paths = [world / json.loads(line)["image"] for line in (world / "pairs.jsonl").read_text().splitlines()]
        plain = _plain_loop(model, paths[:2000])
        out: dict = {
            "images": n,
            "model": "shapes-tiny (64 px, ViT 4x128)",
            "torch_threads": torch.get_num_threads(),
            "plain_loop_images_per_s": plain,
        }
        for workers in (2, 0) if quick else (2,):
            db = root / f"db-{workers}"
            t0 = time.perf_counter()
            report = build_collection(
                db, [world], str(model), text_model="none", cfg=BuildConfig(batch_size=BATCH, workers=workers)
            )
            full = time.perf_counter() - t0
            out[f"ours_workers{workers}"] = {
                "build_s": full,
                "images_per_s": n / full,
                "embed_images_per_s": report.items_embedded / report.embed_seconds,
                "ratio_vs_plain": (n / full) / plain,
            }
        t0 = time.perf_counter()
        again = build_collection(
            root / "db-2", [world], str(model), text_model="none", cfg=BuildConfig(batch_size=BATCH, workers=2)
        )
        reindex = time.perf_counter() - t0
        assert again.items_embedded == 0 and again.unchanged == n
        out["reindex_unchanged_s"] = reindex
        out["reindex_fraction_of_full"] = reindex / out["ours_workers2"]["build_s"]
    return out
