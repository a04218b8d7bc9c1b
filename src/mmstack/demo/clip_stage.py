"""Demo stage ``clip``: train the demo CLIP model, evaluate retrieval and zero-shot, draw ``retrieval.png``.

The stage's config (the ``clip:`` section of the demo YAML)::

    clip:
      config: clip-demo.yaml      # recipe in configs/ (the smoke demo uses clip-micro.yaml)
      max_steps: null             # optional override of train.max_steps
      overrides: {}               # optional dotted-key dict merged into the recipe
      n_train: 20000              # only used when the world stage's folders are absent
      n_val: 1000
      n_compositional: 500
      queries: 6                  # text queries in retrieval.png

It reads the world stage's train/val/compositional folders when they exist (else generates its own with
the same seeds), trains into ``models/clip`` (an unchanged, finished checkpoint is reused), and reports
retrieval on val and on the compositional split plus zero-shot shape/colour accuracy.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from mmstack.demo.pipeline import DemoContext, StageResult, recipe_name
from mmstack.utils.progress import console

SPLITS = ("train", "val", "compositional")
SEED_OFFSET = {"train": 0, "val": 1000, "compositional": 2000}  # as the world stage: val is held out


def world_dirs(ctx: DemoContext, cfg: dict[str, Any]) -> dict[str, Path]:
    """The world stage's folders, or this stage's own worlds (generated once) when those are missing."""
    from mmstack.demo.world_stage import world_dir

    shared = {s: Path(world_dir(ctx, s)) for s in SPLITS}
    if all((d / "scenes.jsonl").is_file() for d in shared.values()):
        return shared
    from mmstack.world import generate_world

    sizes = {"train": 20000, "val": 1000, "compositional": 500}
    own = {}
    for split in SPLITS:
        own[split] = ctx.path("clip-data", split)
        if not (own[split] / "scenes.jsonl").is_file():
            n = int(cfg.get(f"n_{split}", sizes[split]))
            generate_world(own[split], n=n, seed=int(cfg.get("seed", 0)) + SEED_OFFSET[split], split=split)
    return own


def recipe(ctx: DemoContext, cfg: dict[str, Any]):
    """The CLIP recipe config named by the stage config, with its overrides and the demo's pixel cache."""
    from mmstack.config import configs_dir, load_config, merge
    from mmstack.train.clip import ClipRecipeConfig

    overrides = merge(cfg.get("overrides") or {}, {"data": {"cache_dir": str(ctx.path("cache", "pixels"))}})
    if cfg.get("max_steps"):
        overrides = merge(overrides, {"train": {"max_steps": int(cfg["max_steps"])}})
    name = recipe_name(ctx, cfg, "config", "clip")
    return load_config(ClipRecipeConfig, configs_dir() / name, overrides=overrides)


def run(ctx: DemoContext, cfg: dict[str, Any]) -> StageResult:
    """Train (or reuse) the demo CLIP model; evaluate it; write ``retrieval.png``."""
    from mmstack.train.clip import finished_checkpoint, train_clip

    dirs = world_dirs(ctx, cfg)
    rcfg = recipe(ctx, cfg)
    out = ctx.path("models", "clip")
    train = finished_checkpoint(out, rcfg, dirs["train"])
    if train is None:
        train = train_clip(rcfg, dirs["train"], out, resume=False).as_dict()
    else:
        console.print(f"reusing {out}: trained with the same config and data")
    model = _load(out)
    metrics = {**_train_metrics(train), **evaluate(model, dirs)}
    grid = write_grid(model, dirs["val"], ctx.path("retrieval.png"), int(cfg.get("queries", 6)))
    _print(metrics)
    section = (
        f"<p>A two-tower CLIP model ({train['parameters']:,} parameters) trained from scratch on "
        f"{html.escape(dirs['train'].name)} pairs: {train['steps']} steps in {train['train_s']:.0f} s. "
        "Retrieval counts a hit when the retrieved item shows the same scene; the compositional split holds "
        "(shape, colour) pairs never seen in training.</p>"
        f"<p>Text queries from the held-out val world with their top-5 images (green: same scene):</p>"
        f"<img src='retrieval.png' alt='text queries with their top-5 images'>"
        f"<p class='meta'>{grid['hits']} of {grid['queries']} top-1 images show the queried scene.</p>"
    )
    return StageResult(metrics=metrics, html=section, outputs=["retrieval.png", "models/clip/config.json"])


def _load(path: Path):
    from mmstack.models.two_tower import TwoTowerModel

    return TwoTowerModel.from_pretrained(path).eval()


def _train_metrics(train: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "train_s", "total_s", "samples_per_s", "final_loss", "temperature", "parameters")
    return {k: train[k] for k in keys if k in train}


def evaluate(model: Any, dirs: dict[str, Path]) -> dict[str, float]:
    """Retrieval (val, compositional) and zero-shot shape/colour accuracy (val single-object scenes)."""
    from mmstack.eval.retrieval import evaluate_retrieval
    from mmstack.eval.zeroshot import evaluate_zeroshot

    out: dict[str, float] = {}
    for split in ("val", "compositional"):
        res = evaluate_retrieval(model, dirs[split])
        for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "t2i_median_rank"):
            out[f"{split}_{key}"] = round(float(res[key]), 4)
    for attribute in ("shape", "colour"):
        out[f"zeroshot_{attribute}_acc"] = round(float(evaluate_zeroshot(model, dirs["val"], attribute)["accuracy"]), 4)
    return out


def write_grid(model: Any, val: Path, path: Path, n_queries: int) -> dict[str, int]:
    """``retrieval.png``: ``n_queries`` val captions (1 to 4 objects) against the val images."""
    from mmstack.eval.data import read_eval_pairs, scene_groups
    from mmstack.eval.grid import retrieval_grid_png

    pairs = read_eval_pairs(val)
    groups = scene_groups(pairs).tolist()
    picks = _diverse_queries(pairs, n_queries)
    relevant = [{j for j, g in enumerate(groups) if g == groups[i]} for i in picks]
    res = retrieval_grid_png(model, [pairs.captions[i] for i in picks], pairs.images, path, k=5, relevant=relevant)
    hits = sum(top[0] in rel for top, rel in zip(res["top"], relevant, strict=True))
    return {"hits": hits, "queries": len(picks)}


def _diverse_queries(pairs: Any, n: int) -> list[int]:
    """The first val items with 1, 2, 3, 4, 1, 2, ... objects (the same picks every run)."""
    by_count: dict[int, list[int]] = {}
    for i, scene in enumerate(pairs.scenes or [{}] * len(pairs)):
        by_count.setdefault(len(scene.get("objects", [])), []).append(i)
    picks: list[int] = []
    counts = sorted(by_count)
    while len(picks) < min(n, len(pairs)):
        for c in counts:
            rest = [i for i in by_count[c] if i not in picks]
            if rest and len(picks) < n:
                picks.append(rest[0])
    return picks


def _print(metrics: dict[str, Any]) -> None:
    console.print(
        "clip: val R@1 t2i {val_t2i_r1:.3f} i2t {val_i2t_r1:.3f} | compositional t2i {compositional_t2i_r1:.3f} "
        "i2t {compositional_i2t_r1:.3f} | zero-shot shape {zeroshot_shape_acc:.3f} colour {zeroshot_colour_acc:.3f}".format(
            **metrics
        )
    )
