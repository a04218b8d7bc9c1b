"""Demo stage ``native``: train the VQ tokenizer and the native decoder, evaluate them, draw a prompt grid.

The stage's config (the ``native:`` section of the demo YAML)::

    native:
      vq_config: vq-demo.yaml          # tokenizer recipe in configs/ (the smoke demo: vq-micro.yaml)
      native_config: native-demo.yaml  # decoder recipe (the smoke demo: native-micro.yaml)
      vq_overrides: {}                 # dotted-key dicts merged into the recipes
      native_overrides: {}
      eval: {n_generate: 100, n_caption: 100, n_unconstrained: 30}   # over the recipe's eval section
      grid: 12                         # prompts in native.png
      captions: 6                      # val images in native_captions.png

It reads the world stage's train/val folders (generating its own when absent), trains into ``models/vq`` and
``models/native`` (a finished run with the same config and data is reused; a changed one is retrained), and
reports PSNR, codebook usage, object accuracy with and without guidance beside its bounds, the valid-image
rate and captioning accuracy.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from mmstack.demo.pipeline import DemoContext, StageResult, recipe_name
from mmstack.utils.progress import console

SMOKE_EVAL = {"n_generate": 8, "n_caption": 8, "n_unconstrained": 4, "n_clips": 4, "batch_size": 8}


def world_dirs(ctx: DemoContext) -> dict[str, Path]:
    """The world stage's train/val folders, or this stage's own (with clips) when those are missing."""
    from mmstack.demo.world_stage import world_dir

    shared = {s: Path(world_dir(ctx, s)) for s in ("train", "val")}
    if all((d / "scenes.jsonl").is_file() for d in shared.values()):
        return shared
    from mmstack.world import generate_world

    own = {}
    for offset, (split, n) in enumerate((("train", 200 if ctx.smoke else 20000), ("val", 50 if ctx.smoke else 1000))):
        own[split] = ctx.path("native-data", split)
        if not (own[split] / "scenes.jsonl").is_file():
            generate_world(own[split], n=n, seed=1000 * offset, split=split, clips=4 if ctx.smoke else 200)
    return own


def _recipe(cls: type, name: str, overrides: dict[str, Any], cache: Path):
    from mmstack.config import configs_dir, load_config, merge

    overrides = merge(overrides or {}, {"data": {"cache_dir": str(cache)}})
    return load_config(cls, configs_dir() / name, overrides=overrides)


def _fresh_unless_same(out: Path, run_config: dict[str, Any]) -> None:
    """Delete ``out`` when it holds a run of another config (the demo owns the folder), so it retrains."""
    saved = out / "train_config.json"
    if saved.is_file():
        same = json.loads(saved.read_text()) == json.loads(json.dumps(run_config, default=str))
        if not same:
            console.print(f"{out}: config or data changed, training again")
            shutil.rmtree(out)


def run(ctx: DemoContext, cfg: dict[str, Any]) -> StageResult:
    """Train (or reuse) the tokenizer and the decoder; evaluate; write ``native.png``/``native_captions.png``."""
    from mmstack.config import from_dict, to_dict
    from mmstack.eval.native import NativeEvalConfig, evaluate_native
    from mmstack.models.native import NativeModel
    from mmstack.models.vq import VQModel
    from mmstack.train.native import NativeRecipeConfig, train_native
    from mmstack.train.native_data import vq_fingerprint
    from mmstack.train.vq import VQRecipeConfig, train_vq

    dirs = world_dirs(ctx)
    vq_name = recipe_name(ctx, cfg, "vq_config", "vq")
    nat_name = recipe_name(ctx, cfg, "native_config", "native")
    vq_cfg = _recipe(VQRecipeConfig, vq_name, cfg.get("vq_overrides", {}), ctx.path("cache", "pixels"))
    nat_cfg = _recipe(NativeRecipeConfig, nat_name, cfg.get("native_overrides", {}), ctx.path("cache", "codes"))
    vq_out, nat_out = ctx.path("models", "vq"), ctx.path("models", "native")
    _fresh_unless_same(vq_out, {**to_dict(vq_cfg), "data_path": str(dirs["train"].resolve())})
    vq_run = train_vq(vq_cfg, dirs["train"], vq_out, val=dirs["val"]).as_dict()
    fingerprint = vq_fingerprint(VQModel.from_pretrained(vq_out))
    _fresh_unless_same(nat_out, {**to_dict(nat_cfg), "data_path": str(dirs["train"].resolve()), "vq": fingerprint})
    nat_run = train_native(nat_cfg, dirs["train"], vq_out, nat_out).as_dict()
    model = NativeModel.from_pretrained(nat_out)
    # the recipe's eval section (sized to the demo budget), then the smoke sizes, then the stage's own overrides
    eval_fields = {**to_dict(nat_cfg.eval), **(SMOKE_EVAL if ctx.smoke else {}), **cfg.get("eval", {})}
    eval_cfg = from_dict(NativeEvalConfig, eval_fields, "native.eval")
    result = evaluate_native(model, dirs["val"], eval_cfg, nat_cfg.data.clip_frames)
    metrics = _metrics(vq_run, nat_run, result)
    _grid(model, dirs["val"], ctx.path("native.png"), int(cfg.get("grid", 6 if ctx.smoke else 12)), eval_cfg)
    _captions(model, dirs["val"], ctx.path("native_captions.png"), int(cfg.get("captions", 6)))
    console.print(
        "native: PSNR {psnr:.2f} dB, object accuracy {object_accuracy_no_cfg:.3f} (no guidance) / "
        "{object_accuracy:.3f} (guidance), captioning {caption_accuracy:.3f}".format(**metrics)
    )
    return StageResult(
        metrics=metrics,
        html=_section(model, vq_run, nat_run, result),
        outputs=["native.png", "native_captions.png", "models/native/config.json"],
    )


def _metrics(vq_run: dict, nat_run: dict, result: dict) -> dict[str, Any]:
    rec, gen = result["reconstruction"], result.get("generation", {})
    out = {
        "psnr": rec["psnr"],
        "codes_used": rec["codes_used"],
        "vq_train_s": vq_run["train_s"],
        "native_train_s": nat_run["train_s"],
        "native_steps": nat_run["steps"],
        "object_accuracy_no_cfg": gen.get("object_accuracy_no_cfg"),
        "object_accuracy": gen.get("object_accuracy"),
        "bound_roundtrip": gen.get("bounds", {}).get("roundtrip"),
        "bound_shuffled": gen.get("bounds", {}).get("shuffled"),
        "valid_rate": result.get("validity", {}).get("valid_rate"),
        "caption_accuracy": result.get("captioning", {}).get("caption_accuracy"),
    }
    if "clips" in result:
        out["clip_motion_accuracy"] = result["clips"]["motion_accuracy"]
    return out


def _grid(model: Any, val: Path, path: Path, n: int, eval_cfg: Any) -> None:
    """Prompts from held-out scenes with the images the model draws (guided) and what the parser reads."""
    from mmstack.eval.native import draw_images, read_scenes
    from mmstack.world import contact_sheet, parse_image

    scenes = read_scenes(val, n)
    prompts = [s["captions"][0] for s in scenes]
    gen = draw_images(model, prompts, eval_cfg, eval_cfg.guidance)
    labels = []
    for prompt, img in zip(prompts, gen.outputs, strict=True):
        seen = ", ".join(f"{o.colour} {o.shape} ({o.cell})" for o in parse_image(img)) or "nothing"
        labels.append(f"{prompt}\n-> parser: {seen}")
    contact_sheet(gen.outputs, labels, path, cols=6)


def _captions(model: Any, val: Path, path: Path, n: int) -> None:
    from mmstack.eval.native import read_scenes
    from mmstack.world import contact_sheet

    scenes = read_scenes(val, n)
    images = [str(s["image_path"]) for s in scenes]
    texts = model.generate(images, "text").outputs
    contact_sheet(images, [f"model: {t}\ntruth: {s['captions'][0]}" for t, s in zip(texts, scenes, strict=True)], path)


def _section(model: Any, vq_run: dict, nat_run: dict, result: dict) -> str:
    rec, gen = result["reconstruction"], result.get("generation", {})
    sweep = " · ".join(f"g={g}: {s['object_accuracy']:.2f}" for g, s in gen.get("sweep", {}).items())
    bounds = gen.get("bounds", {})
    cap = result.get("captioning", {})
    return (
        f"<p>A native (Emu3-style) model: a VQ tokenizer ({rec['codebook_size']} codes, 8x8 per image, "
        f"{vq_run['train_s']:.0f} s of training) and one {model.config.layers}-layer decoder "
        f"({nat_run['parameters']:,} parameters, {model.config.head} head, {nat_run['steps']} steps in "
        f"{nat_run['train_s']:.0f} s) that both draws and captions. Reconstruction {rec['psnr']:.2f} dB PSNR "
        f"with {rec['codes_used']} codes used on val.</p>"
        f"<p>Object accuracy of generated images, read by the world's parser (not FID): {html.escape(sweep)}; "
        f"bounds: real images {bounds.get('real', float('nan')):.2f}, tokenizer round trip "
        f"{bounds.get('roundtrip', float('nan')):.2f}, shuffled prompts {bounds.get('shuffled', float('nan')):.2f}. "
        f"Captioning accuracy {cap.get('caption_accuracy', float('nan')):.2f}.</p>"
        "<p>Held-out prompts and the images the model drew (guided), with what the parser reads:</p>"
        "<img src='native.png' alt='prompts and generated images'>"
        "<p>Captions of held-out images:</p><img src='native_captions.png' alt='captions of val images'>"
    )
