"""Bridge VLM benchmarks: demo-recipe quality, resampler compression, decoding speed against transformers.

- **quality**: worlds as the demo makes them (train 20k with clips, val 1k, compositional 500), the demo
  CLIP (``configs/clip-demo.yaml`` when present, else a shapes-tiny CLIP; timed separately), then the
  llava recipe (``configs/llava-demo.yaml``) through stages 0-2, timed per stage; VQA accuracy by kind on
  val (with its motion questions) and on the compositional split.
- **compression**: the same recipe with a Perceiver resampler (a quarter of the tokens: 16 -> 4 with the demo
  CLIP's 16 patches, 64 -> 16 with a patch-8 tower) instead of the MLP
  (stage 0 shared); prefill latency ratio MLP / resampler on the same prompts, and the VQA difference.
- **decoding**: greedy tokens/s of our KV-cache loop against ``LlavaForConditionalGeneration.generate``
  on the exported model, same prompts, same number of new tokens (ratio ours / transformers).

``quick`` runs everything at toy sizes (the micro recipes) to check the benchmark itself.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import median_seconds

WORK = Path("bench-output") / "bridge-work"
FULL = {"train": (20000, 1000), "val": (1000, 100), "compositional": (500, 0)}
QUICK = {"train": (300, 30), "val": (40, 8), "compositional": (30, 0)}
SEEDS = {"train": 0, "val": 1000, "compositional": 2000}


def _worlds(quick: bool) -> dict[str, Path]:
    from mmstack.world import generate_world

    sizes, size = (QUICK, 32) if quick else (FULL, 64)
    dirs = {}
    for split, (n, clips) in sizes.items():
        dirs[split] = WORK / ("quick" if quick else "full") / split
        if not (dirs[split] / "world.json").is_file():
            generate_world(dirs[split], n=n, seed=SEEDS[split], split=split, image_size=size, clips=clips)
    return dirs


def _clip(quick: bool, train: Path) -> tuple[Path, float]:
    """The vision source: a CLIP trained with the clip recipe (reused when finished with the same config)."""
    from mmstack.config import configs_dir, load_config
    from mmstack.train.clip import ClipRecipeConfig, finished_checkpoint, train_clip

    name = "clip-micro.yaml" if quick or not (configs_dir() / "clip-demo.yaml").is_file() else "clip-demo.yaml"
    overrides = (
        {}
        if quick or name == "clip-demo.yaml"
        else {"model": {"preset": "shapes-tiny"}, "train": {"max_steps": 300, "batch_size": 256}}
    )
    cfg = load_config(ClipRecipeConfig, configs_dir() / name, overrides=overrides)
    out = WORK / ("quick" if quick else "full") / "clip"
    t0 = time.perf_counter()
    if finished_checkpoint(out, cfg, train) is None:
        train_clip(cfg, train, out, resume=False)
    return out, time.perf_counter() - t0


def _recipe(quick: bool, dirs: dict[str, Path], clip: Path, connector: dict[str, Any] | None = None):
    from mmstack.config import configs_dir, load_config
    from mmstack.train.llava import LlavaRecipeConfig

    over = {
        "data": {"train": str(dirs["train"]), "cache": str(WORK / "cache")},
        "model": {"vision": {"pretrained": str(clip)}},
    }
    if connector:
        over["model"]["connector"] = connector
    name = "llava-micro.yaml" if quick else "llava-demo.yaml"
    return load_config(LlavaRecipeConfig, configs_dir() / name, overrides=over)


def _train(cfg: Any, out: Path, share_stage0: Path | None = None) -> tuple[dict[str, Any], float, float]:
    from mmstack.train.llava import train_llava

    if share_stage0 is not None and not (out / "stage0").exists() and (share_stage0 / "stage0").exists():
        shutil.copytree(share_stage0 / "stage0", out / "stage0")
    c0, t0 = time.process_time(), time.perf_counter()
    res = train_llava(cfg, out, "all")
    return res, time.perf_counter() - t0, time.process_time() - c0


def _vqa(model: Any, dirs: dict[str, Path], limit: int | None) -> dict[str, Any]:
    from mmstack.eval.vqa import evaluate_vqa

    val = evaluate_vqa(model, dirs["val"], limit=limit)
    comp = evaluate_vqa(model, dirs["compositional"], limit=limit, clips=False)
    return {
        "val_accuracy": round(val["accuracy"], 4),
        "val_image_accuracy": round(val["image_accuracy"] or 0.0, 4),
        "val_n": val["n"],
        "val_by_kind": {k: round(v["accuracy"], 4) for k, v in val["by_kind"].items()},
        "compositional_accuracy": round(comp["accuracy"], 4),
        "compositional_by_kind": {k: round(v["accuracy"], 4) for k, v in comp["by_kind"].items()},
    }


def _prompts(model: Any, val: Path, n: int) -> dict[str, Any]:
    from mmstack.data.images import load_image
    from mmstack.eval.vqa import load_vqa_items

    items = [it for it in load_vqa_items(val, clips=False) if it.image][:n]
    return model.processor.prompts([it.question for it in items], [load_image(it.image) for it in items])


def _prefill_ms(model: Any, batch: dict[str, Any], repeats: int) -> float:
    with torch.inference_mode():
        return 1000 * median_seconds(lambda: model.prefill(**batch), repeats=repeats)


def _greedy_ours(model: Any, batch: dict[str, Any], n: int) -> torch.Tensor:
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    return model.generate(ids, mask, pix, max_new_tokens=n, eos_token_ids=[])


def _greedy_hf(hf: Any, batch: dict[str, Any], n: int) -> torch.Tensor:
    ids = batch["input_ids"]
    out = hf.generate(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=n,
        do_sample=False,
    )
    return out[:, ids.shape[1] :]


def decoding(model: Any, val: Path, batch_sizes: tuple[int, ...], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Tokens/s of ``model.generate`` and of the exported HF Llava's ``generate`` (greedy, fixed length)."""
    from functools import partial

    from mmstack.models.bridge_hf import to_hf_llava

    hf = to_hf_llava(model)
    # Both run exactly ``new_tokens`` steps: no end token stops either (min_new_tokens would instead mask
    # the end token's logit in transformers and change which tokens are chosen).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = model.processor.pad_token_id
    out: dict[str, Any] = {}
    for b in batch_sizes:
        batch = _prompts(model, val, b)
        ours_fn = partial(_greedy_ours, model, batch, new_tokens)
        hf_fn = partial(_greedy_hf, hf, batch, new_tokens)
        with torch.inference_mode():
            same = bool(torch.equal(ours_fn(), hf_fn()))
            t_ours, t_hf = median_seconds(ours_fn, repeats), median_seconds(hf_fn, repeats)
        tokens = b * new_tokens
        out[f"batch{b}"] = {
            "ours_tokens_per_s": round(tokens / t_ours, 1),
            "transformers_tokens_per_s": round(tokens / t_hf, 1),
            "ratio": round(t_hf / t_ours, 3),
            "same_tokens": same,
        }
    return out


def run(quick: bool) -> dict[str, Any]:
    from mmstack.models.bridge import BridgeModel
    from mmstack.train.llava import STAGES

    torch.set_num_threads(2)
    dirs = _worlds(quick)
    clip, clip_s = _clip(quick, dirs["train"])
    root = WORK / ("quick" if quick else "full")
    limit = None if not quick else 20
    res, wall, cpu = _train(_recipe(quick, dirs, clip), root / "vlm-mlp")
    mlp = BridgeModel.from_pretrained(res["model"])
    quality = {
        "clip_train_s": round(clip_s, 1),
        "llava_wall_s": round(wall, 1),
        "llava_cpu_s": round(cpu, 1),
        "stages": {
            f"stage{s}": {k: res[f"stage{s}"].get(k) for k in ("steps", "train_s", "final_loss", "cached")}
            for s in STAGES
        },
        **_vqa(mlp, dirs, limit),
    }
    queries = 4 if quick else 16
    # a quarter of the MLP's visual tokens (the demo CLIP's patch 16 on 64 px: 16 -> 4)
    compressed = max(1, mlp.tokens_per_view(*mlp.processor.config.image.size) // 4)
    connector = {"type": "resampler", "num_queries": compressed, "depth": 2, "heads": 4}
    res_r, wall_r, _ = _train(
        _recipe(quick, dirs, clip, connector), root / "vlm-resampler", share_stage0=root / "vlm-mlp"
    )
    resampler = BridgeModel.from_pretrained(res_r["model"])
    batch = _prompts(mlp, dirs["val"], queries)
    batch_r = _prompts(resampler, dirs["val"], queries)
    r_quality = _vqa(resampler, dirs, limit)
    reps = 3 if quick else 7
    compression = {
        "visual_tokens_mlp": mlp.tokens_per_view(*mlp.processor.config.image.size),
        "visual_tokens_resampler": resampler.tokens_per_view(*resampler.processor.config.image.size),
        "prefill_ms_mlp": round(_prefill_ms(mlp, batch, reps), 2),
        "prefill_ms_resampler": round(_prefill_ms(resampler, batch_r, reps), 2),
        "resampler_val_accuracy": r_quality["val_accuracy"],
        "resampler_val_by_kind": r_quality["val_by_kind"],
        "resampler_llava_wall_s": round(wall_r, 1),
    }
    compression["prefill_speedup"] = round(compression["prefill_ms_mlp"] / compression["prefill_ms_resampler"], 3)
    compression["accuracy_points_lost"] = round(100 * (quality["val_accuracy"] - r_quality["val_accuracy"]), 2)
    speed = decoding(mlp, dirs["val"], (1, 8) if quick else (1, 8, 32), 8 if quick else 32, reps)
    return {
        "note": "2-core CPU shared with other jobs while measured; wall times are upper bounds",
        "quality": quality,
        "compression": compression,
        "decoding": speed,
    }
