"""Demo stage ``world``: generate the train, val and compositional worlds and a contact sheet.

Config: ``seed``, ``image_size``, ``n_train``/``n_val``/``n_compositional`` scenes, ``clips`` (train) and
``val_clips`` (default: ``clips``) short clips, ``sheet`` images on the contact sheet.
"""

from __future__ import annotations

import html
import json

from mmstack.demo.pipeline import DemoContext, StageResult


def world_dir(ctx: DemoContext, split: str):
    """Where the demo keeps the world of ``split`` (later stages read from here)."""
    return ctx.path("world", split)


def run(ctx: DemoContext, cfg: dict) -> StageResult:
    """Generate the demo worlds (train/val/compositional) and ``world.png``."""
    from PIL import Image

    from mmstack.world import contact_sheet, generate_world

    seed, size = int(cfg.get("seed", 0)), int(cfg.get("image_size", 64))
    sizes = {
        "train": cfg.get("n_train", 2000),
        "val": cfg.get("n_val", 200),
        "compositional": cfg.get("n_compositional", 200),
    }
    clips_by_split = {"train": int(cfg.get("clips", 0)), "val": int(cfg.get("val_clips", cfg.get("clips", 0)))}
    summaries = {}
    # Each split draws from its own seed stream so val is held out from train.
    for offset, (split, n) in enumerate(sizes.items()):
        clips = clips_by_split.get(split, 0)
        summaries[split] = generate_world(
            world_dir(ctx, split), n=int(n), seed=seed + 1000 * offset, split=split, image_size=size, clips=clips
        )
    train = world_dir(ctx, "train")
    n_sheet = int(cfg.get("sheet", 24))
    pairs = [json.loads(line) for line in (train / "pairs.jsonl").read_text().splitlines()[:n_sheet]]
    convs = {c["id"]: c for c in json.loads((train / "conversations.json").read_text())}
    images, captions = [], []
    for p in pairs:
        images.append(Image.open(train / p["image"]).convert("RGB"))
        turns = convs.get(p["id"], {}).get("conversations", [])
        qa = f"\nQ: {turns[0]['value'].replace('<image>', '').strip()} A: {turns[1]['value']}" if len(turns) > 1 else ""
        captions.append(p["caption"] + qa)
    contact_sheet(images, captions, ctx.path("world.png"))
    metrics = {f"{split}_scenes": s.get("n_scenes", sizes[split]) for split, s in summaries.items()}
    metrics.update({f"{split}_clips": s.get("n_clips", 0) for split, s in summaries.items()})
    held_out = summaries["train"].get("held_out_pairs", [])
    section = (
        "<p>Synthetic scenes with exactly known ground truth. Held-out (shape, colour) pairs never seen in "
        f"training: {html.escape(', '.join(' '.join(p) for p in held_out))}.</p>"
        "<img src='world.png' alt='contact sheet of the shapes world'>"
    )
    return StageResult(metrics=metrics, html=section, outputs=["world.png", "world/train/pairs.jsonl"])
