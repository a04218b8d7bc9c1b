"""Demo stage ``vlm``: train the bridge VLM through its stages, report VQA, show sample dialogues.

The stage's config (the ``vlm:`` section of the demo YAML)::

    vlm:
      config: llava-demo.yaml     # recipe in configs/ (the smoke demo uses llava-micro.yaml)
      overrides: {}               # optional dotted-key dict merged into the recipe
      vision_from_clip: true      # the vision tower is the demo CLIP's image tower (models/clip)
      val_limit: 0                # val records asked (0 = all: ~20 s), plus the compositional split
      dialogues: 4                # val images shown with a short conversation

It trains into ``models/vlm`` (each finished stage with an unchanged config is reused), evaluates VQA on
the val world by question kind (motion questions on its clips) and on the compositional split, and
writes ``vlm/*.png`` with the dialogues shown in the report.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from mmstack.demo.pipeline import DemoContext, StageResult, recipe_name
from mmstack.utils.progress import console

QUESTION_KINDS = ("colour", "shape", "count", "position", "relation")


def recipe(ctx: DemoContext, cfg: dict[str, Any], train_dir: Path):
    """The llava recipe named by the stage config, pointed at the demo's world, cache and CLIP."""
    from mmstack.config import configs_dir, load_config, merge
    from mmstack.train.llava import LlavaRecipeConfig

    data = {"train": str(train_dir), "cache": str(ctx.path("cache", "pixels"))}
    overrides = merge(cfg.get("overrides") or {}, {"data": data})
    clip = ctx.path("models", "clip")
    if cfg.get("vision_from_clip", True) and (clip / "config.json").is_file():
        overrides = merge(overrides, {"model": {"vision": {"pretrained": str(clip)}}})
    name = recipe_name(ctx, cfg, "config", "llava")
    return load_config(LlavaRecipeConfig, configs_dir() / name, overrides=overrides)


def run(ctx: DemoContext, cfg: dict[str, Any]) -> StageResult:
    """Train (or reuse) the demo VLM, evaluate it, and write the dialogues section."""
    from mmstack.demo.clip_stage import world_dirs
    from mmstack.eval.vqa import evaluate_vqa
    from mmstack.models.bridge import BridgeModel
    from mmstack.train.llava import train_llava

    dirs = world_dirs(ctx, cfg)
    rcfg = recipe(ctx, cfg, dirs["train"])
    result = train_llava(rcfg, ctx.path("models", "vlm"), "all")
    model = BridgeModel.from_pretrained(result["model"])
    limit = int(cfg.get("val_limit", 0)) or None
    val = evaluate_vqa(model, dirs["val"], limit=limit)
    comp = evaluate_vqa(model, dirs["compositional"], limit=limit, clips=False)
    metrics = _metrics(result, val, comp)
    dialogues = write_dialogues(model, dirs["val"], ctx.path("vlm"), int(cfg.get("dialogues", 4)))
    console.print(
        f"vlm: val VQA {val['accuracy']:.3f} (images {val['image_accuracy'] or 0:.3f}) | compositional "
        f"{comp['accuracy']:.3f} | " + " ".join(f"{k} {v['accuracy']:.2f}" for k, v in val["by_kind"].items())
    )
    rel = Path(result["model"]).relative_to(ctx.out)
    section = _section(result, val, comp, dialogues)
    return StageResult(metrics=metrics, html=section, outputs=[str(rel / "config.json"), *dialogues["files"]])


def _metrics(result: dict[str, Any], val: dict[str, Any], comp: dict[str, Any]) -> dict[str, Any]:
    from mmstack.train.llava import STAGES

    out: dict[str, Any] = {"train_s": round(sum(result[f"stage{s}"].get("train_s", 0.0) for s in STAGES), 1)}
    out["val_accuracy"] = round(val["accuracy"], 4)
    out["val_image_accuracy"] = round(val["image_accuracy"] or 0.0, 4)
    out["compositional_accuracy"] = round(comp["accuracy"], 4)
    for kind, v in val["by_kind"].items():
        out[f"val_{kind}"] = round(v["accuracy"], 4)
    return out


def write_dialogues(model: Any, val: Path, folder: Path, n: int) -> dict[str, Any]:
    """Ask ``n`` val images a few questions each (one of each kind they have); copy the images to ``folder``."""
    from mmstack.data.images import load_image
    from mmstack.eval.vqa import vqa_score
    from mmstack.models.bridge_generate import GenerationConfig, generate_text

    scenes = [json.loads(line) for line in (val / "scenes.jsonl").read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"dialogues": [], "files": []}
    for scene in scenes[:n]:
        picked = {}
        for q in scene["questions"]:
            picked.setdefault(q["kind"], q)
        qs = [picked[k] for k in QUESTION_KINDS if k in picked][:4]
        image = load_image(val / scene["image"])
        answers = generate_text(
            model, [q["question"] for q in qs], [image] * len(qs), config=GenerationConfig(max_new_tokens=8)
        )
        name = f"vlm/{scene['id']}.png"
        shutil.copyfile(val / scene["image"], folder / f"{scene['id']}.png")
        turns = [
            {"question": q["question"], "answer": a, "truth": q["answer"], "ok": vqa_score(a, [q["answer"]]) == 1.0}
            for q, a in zip(qs, answers, strict=True)
        ]
        out["dialogues"].append({"image": name, "caption": scene["caption"], "turns": turns})
        out["files"].append(name)
    return out


def _section(result: dict[str, Any], val: dict[str, Any], comp: dict[str, Any], dialogues: dict[str, Any]) -> str:
    from mmstack.train.llava import STAGES

    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['accuracy']:.3f}</td><td>{v['n']}</td></tr>"
        for k, v in val["by_kind"].items()
    )
    stages = ", ".join(
        f"stage {s}: {result[f'stage{s}'].get('steps', 0)} steps in {result[f'stage{s}'].get('train_s', 0):.0f} s"
        for s in STAGES
        if not result[f"stage{s}"].get("skipped")
    )
    parts = [
        "<p>A LLaVA-style VLM: the demo CLIP's image tower, an MLP connector and a small Llama-style LM "
        f"pretrained on the world's text, trained in stages ({html.escape(stages)}).</p>",
        f"<p>VQA accuracy on the held-out val world: <b>{val['accuracy']:.3f}</b> over {val['n']} questions "
        f"(images only {val['image_accuracy'] or 0:.3f}); compositional split (unseen shape-colour pairs): "
        f"<b>{comp['accuracy']:.3f}</b>.</p>",
        f"<table class='metrics'><tr><th>kind</th><th>accuracy</th><th>n</th></tr>{rows}</table>",
        "<h3>Sample dialogues</h3><div style='display:flex;flex-wrap:wrap;gap:1.5em'>",
    ]
    for d in dialogues["dialogues"]:
        lines = "".join(
            f"<li>{html.escape(t['question'])} <b>{html.escape(t['answer'] or '(nothing)')}</b> "
            f"<span class='meta'>{'right' if t['ok'] else 'wrong: ' + html.escape(t['truth'])}</span></li>"
            for t in d["turns"]
        )
        parts.append(
            f"<div><img src='{d['image']}' width='128' alt='{html.escape(d['caption'])}'><ul>{lines}</ul></div>"
        )
    parts.append("</div>")
    return "".join(parts)
