"""The native model end to end on CPU: tokenizer + decoder training time and quality, guidance sweep, shared
head vs per-modality heads, and image-generation latency with and without the KV cache.

Targets (issue 6): <= 10 minutes of CPU training for the tokenizer and the decoder together; reconstruction
PSNR >= 28 dB at 64 px; object accuracy (parser) >= 0.70 on held-out prompts with guidance better than
none; captioning accuracy >= 0.90. ``--quick`` runs the micro configs on a tiny world (checks that it runs;
its numbers mean nothing).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import median_seconds

FULL = {"n_train": 20000, "n_val": 300, "clips": 200, "vq": "vq-demo.yaml", "native": "native-demo.yaml"}
QUICK = {"n_train": 200, "n_val": 20, "clips": 4, "vq": "vq-micro.yaml", "native": "native-micro.yaml"}


def run(quick: bool) -> dict[str, Any]:
    from mmstack.world import generate_world

    p = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_world(root / "train", n=p["n_train"], seed=0, clips=p["clips"])
        generate_world(root / "val", n=p["n_val"], seed=1000, split="val", clips=min(p["clips"], 50))
        vq = _train_vq(root, p)
        result: dict[str, Any] = {"vq": vq, "heads": {}}
        for head in ("shared", "per_modality"):
            result["heads"][head] = _train_and_eval_native(root, p, head, quick)
        shared = result["heads"]["shared"]
        result["train_s_total"] = round(vq["total_s"] + shared["train"]["total_s"], 1)
        result["targets"] = {
            "train_s_total<=600": result["train_s_total"] <= 600,
            "psnr>=28": vq["val"]["psnr"] >= 28.0,
            "object_accuracy>=0.70": shared["eval"]["generation"]["object_accuracy"] >= 0.70,
            "cfg_better_than_none": shared["eval"]["generation"]["object_accuracy"]
            > shared["eval"]["generation"]["object_accuracy_no_cfg"],
            "caption_accuracy>=0.90": shared["eval"]["captioning"]["caption_accuracy"] >= 0.90,
        }
    return result


def _train_vq(root: Path, p: dict[str, Any]) -> dict[str, Any]:
    from mmstack.config import configs_dir, load_config
    from mmstack.train.vq import VQRecipeConfig, train_vq

    cfg = load_config(VQRecipeConfig, configs_dir() / p["vq"], {"data": {"cache_dir": str(root / "cache")}})
    return train_vq(cfg, root / "train", root / "vq", val=root / "val", resume=False).as_dict()


def _train_and_eval_native(root: Path, p: dict[str, Any], head: str, quick: bool) -> dict[str, Any]:
    from mmstack.config import configs_dir, load_config
    from mmstack.eval.native import NativeEvalConfig, evaluate_native
    from mmstack.models.native import NativeModel
    from mmstack.train.native import NativeRecipeConfig, train_native

    overrides = {"data": {"cache_dir": str(root / "cache")}, "model": {"head": head}}
    cfg = load_config(NativeRecipeConfig, configs_dir() / p["native"], overrides)
    out = root / f"native-{head}"
    train = train_native(cfg, root / "train", root / "vq", out, resume=False).as_dict()
    model = NativeModel.from_pretrained(out)
    n = 8 if quick else 200
    eval_cfg = NativeEvalConfig(
        n_generate=n, n_caption=n, n_unconstrained=min(n, 50), n_clips=min(n, 50), guidance_scales=[1.0, 2.0, 3.0, 5.0]
    )
    evaluation = evaluate_native(model, root / "val", eval_cfg, cfg.data.clip_frames)
    evaluation["captioning"].pop("examples", None)
    return {"train": train, "eval": evaluation, "latency": _latency(model, 4 if quick else 16)}


def _latency(model: Any, n: int) -> dict[str, float]:
    """Seconds per image (batch of ``n`` prompts, guidance on) with and without the KV cache."""
    prompts = ["a large red circle at the top left and a small blue star in the center"] * n
    torch.manual_seed(0)
    cached = median_seconds(lambda: model.generate(prompts, "image", use_cache=True), repeats=3) / n
    plain = median_seconds(lambda: model.generate(prompts, "image", use_cache=False), repeats=1, warmup=0) / n
    t0 = time.perf_counter()
    model.generate(prompts[:1], "image", use_cache=True)
    single = time.perf_counter() - t0
    return {
        "s_per_image_kv_cache": round(cached, 4),
        "s_per_image_no_cache": round(plain, 4),
        "speedup": round(plain / cached, 2),
        "s_single_image_kv_cache": round(single, 4),
        "batch": n,
    }
