"""CLIP benchmarks: demo-recipe quality and time, training speed against open_clip, embedding throughput.

- quality: ``configs/clip-demo.yaml`` trained on a 20k-pair train world; retrieval R@1/R@5 both ways on a
  held-out val world (another seed) and on the compositional split; zero-shot shape/colour accuracy.
- training speed: our trainer (``ClipTask``) against open_clip's ``CLIP`` + ``ClipLoss`` with the same
  architecture on the same batches, each side in its own process (``benchmarks/clip_speed_worker.py``),
  alternated over rounds; the ratio of median samples/s.
- embedding throughput: ``mmstack.eval.embed.embed_images`` (decode of the next batch pipelined with the
  model, fused normalisation; fp32, and bf16 autocast) against a plain loop of HF ``CLIPProcessor`` + ``CLIPModel.get_image_features`` on
  the same model exported with ``export_hf_clip``; features are checked to agree.

``quick`` uses the micro recipe and small worlds (about a minute) to check that everything runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-output" / "clip"
SIZES = {
    True: {"train": 1000, "val": 200, "compositional": 100},
    False: {"train": 20000, "val": 1000, "compositional": 500},
}
SEEDS = {"train": 0, "val": 1000, "compositional": 2000}


def make_worlds(quick: bool) -> dict[str, Path]:
    """Train/val/compositional worlds (val and compositional use seeds the train world never sees)."""
    from mmstack.world import generate_world

    dirs = {}
    for split, n in SIZES[quick].items():
        d = OUT / ("world-quick" if quick else "world") / split
        if not (d / "scenes.jsonl").is_file():
            generate_world(d, n=n, seed=SEEDS[split], split=split)
        dirs[split] = d
    return dirs


def quality(dirs: dict[str, Path], quick: bool) -> tuple[dict[str, Any], Path]:
    """Train the demo recipe from scratch with ``mmstack train clip`` (timed, own process), then evaluate.

    A finished checkpoint of exactly this config and data in ``bench-output/clip/model`` is reused with the
    timings recorded when it was trained (``reused: true``); delete the folder to train again.
    """
    from mmstack.config import load_config
    from mmstack.demo.clip_stage import evaluate
    from mmstack.models.two_tower import TwoTowerModel
    from mmstack.train.clip import ClipRecipeConfig, finished_checkpoint

    name = "clip-micro.yaml" if quick else "clip-demo.yaml"
    ckpt = OUT / ("model-quick" if quick else "model")
    cache = f"data.cache_dir={OUT / 'cache'}"
    res = finished_checkpoint(ckpt, load_config(ClipRecipeConfig, ROOT / "configs" / name, [cache]), dirs["train"])
    reused, wall = res is not None, None
    if res is None:
        cmd = [sys.executable, "-m", "mmstack", "train", "clip", "--config", str(ROOT / "configs" / name),
               "--data", str(dirs["train"]), "--out", str(ckpt), "--no-resume", "--json", cache]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), check=False)
        wall = round(time.perf_counter() - t0, 1)
        if done.returncode != 0:
            raise RuntimeError(f"mmstack train clip failed:\n{done.stderr[-2000:]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
    model = TwoTowerModel.from_pretrained(ckpt).eval()
    metrics = evaluate(model, dirs)
    keys = ("steps", "parameters", "prepare_s", "train_s", "total_s", "samples_per_s", "final_loss", "temperature")
    out = {"config": name, "reused": reused, "command_wall_s": wall, **{k: res.get(k) for k in keys}, **metrics}
    return out, ckpt


def _env() -> dict[str, str]:
    # Sleeping (not spinning) OpenMP workers: with 2 cores shared by other jobs, spinning threads stall
    # each other (measured: 17 ms/step at 1 thread vs 1.3 s/step at 2 spinning threads on a busy machine).
    return {**os.environ, "MMSTACK_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}  # fmt: skip


def speed_batches(ckpt: Path, train: Path, quick: bool, batch_size: int, steps: int) -> Path:
    """The shared input of both speed workers: uint8 pixels, tokens, and every step's index list."""
    from mmstack.config import load_config
    from mmstack.models.two_tower import TwoTowerModel
    from mmstack.train.clip import ClipRecipeConfig, build_dataset, read_training_pairs
    from mmstack.train.sampler import StepSampler

    model = TwoTowerModel.from_pretrained(ckpt)
    images, captions = read_training_pairs(train, "pair")
    n = min(len(images), batch_size * steps)
    cfg = load_config(ClipRecipeConfig, {"data": {"cache_dir": str(OUT / "cache"), "captions": "pair"}})
    ds = build_dataset(model.processor, images[:n], captions[:n], cfg)
    v, t = model.config.vision, model.config.text
    saved = json.loads((ckpt / "train_config.json").read_text())
    data = {
        "checkpoint": str(ckpt),
        "pixels": ds.pixels,
        "input_ids": ds.input_ids,
        "attention_mask": ds.attention_mask,
        "mean": torch.tensor(model.processor.image_config.mean),
        "std": torch.tensor(model.processor.image_config.std),
        "batch_size": batch_size,
        "seed": 0,
        "steps": [StepSampler(n, batch_size, 0).indices(i) for i in range(steps)],
        "text_buckets": int(saved["data"]["text_buckets"]),
        "arch": {
            "embed_dim": model.config.embed_dim,
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "vision_width": v["hidden_size"],
            "vision_layers": v["num_hidden_layers"],
            "vision_heads": v["num_attention_heads"],
            "vision_mlp": v["intermediate_size"],
            "context_length": t["max_position_embeddings"],
            "vocab_size": t["vocab_size"],
            "text_width": t["hidden_size"],
            "text_layers": t["num_hidden_layers"],
            "text_heads": t["num_attention_heads"],
            "text_mlp": t["intermediate_size"],
        },
    }
    path = OUT / "speed-batches.pt"
    torch.save(data, path)
    return path


def training_speed(batches: Path, steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Alternate the two workers ``rounds`` times; median samples/s of each and their ratio."""
    threads = int(os.environ.get("BENCH_THREADS", torch.get_num_threads()))
    runs: dict[str, list[dict]] = {"ours": [], "open_clip": []}
    env = _env()
    for _ in range(rounds):
        for side in runs:
            cmd = [sys.executable, "-m", "benchmarks.clip_speed_worker", side, str(batches), str(steps), str(warmup),
                   str(threads)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{side} worker failed:\n{done.stderr[-2000:]}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {side: statistics.median(r["samples_per_s"] for r in rs) for side, rs in runs.items()}
    med_cpu = {side: statistics.median(r["samples_per_cpu_s"] for r in rs) for side, rs in runs.items()}
    return {
        "threads": threads,
        "steps_timed": steps,
        "rounds": rounds,
        "ours_samples_per_s": round(med["ours"], 1),
        "open_clip_samples_per_s": round(med["open_clip"], 1),
        "ratio": round(med["ours"] / med["open_clip"], 3),
        "ratio_per_cpu_s": round(med_cpu["ours"] / med_cpu["open_clip"], 3),
        "parameters": {side: rs[0]["parameters"] for side, rs in runs.items()},
        "runs": runs,
    }


@torch.inference_mode()
def embedding_throughput(ckpt: Path, val: Path, batch_size: int = 256, repeats: int = 2) -> dict[str, Any]:
    """Images/s of our embedder against HF CLIPProcessor + CLIPModel.get_image_features, same weights."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from mmstack.data.pairs import read_pairs
    from mmstack.eval.embed import embed_images
    from mmstack.models.two_tower import TwoTowerModel, hf_features

    paths = [p.image for p in read_pairs(val)]
    model = TwoTowerModel.from_pretrained(ckpt).eval()
    hf_dir = OUT / "hf-export"
    model.export_hf_clip(hf_dir)
    hf, proc = CLIPModel.from_pretrained(hf_dir).eval(), CLIPProcessor.from_pretrained(hf_dir)

    def ours() -> torch.Tensor:
        return embed_images(model, paths, batch_size=batch_size)

    def ours_bf16() -> torch.Tensor:
        return embed_images(model, paths, batch_size=batch_size, precision="bf16")

    def plain() -> torch.Tensor:
        out = []
        for i in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
            inputs = proc(images=images, return_tensors="pt")
            out.append(hf_features(hf.get_image_features(pixel_values=inputs["pixel_values"])))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    times: dict[str, list[float]] = {"ours": [], "ours_bf16": [], "hf": []}
    feats = {}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("ours_bf16", ours_bf16), ("hf", plain)):
            t0 = time.perf_counter()
            feats[name] = fn()
            times[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}  # wall time of the repeats
    return {
        "images": len(paths),
        "batch_size": batch_size,
        "ours_images_per_s": round(len(paths) / median["ours"], 1),
        "hf_images_per_s": round(len(paths) / median["hf"], 1),
        "ratio": round(median["hf"] / median["ours"], 3),
        "max_abs_feature_diff": float((feats["ours"] - feats["hf"]).abs().max()),
        "ours_bf16_images_per_s": round(len(paths) / median["ours_bf16"], 1),
        "ratio_bf16": round(median["hf"] / median["ours_bf16"], 3),
        "min_cosine_bf16_vs_hf": float((feats["ours_bf16"] * feats["hf"]).sum(-1).min()),
    }


def run(quick: bool) -> dict[str, Any]:
    """All three measurements; see the module docstring."""
    os.environ.setdefault("MMSTACK_NO_PROGRESS", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    dirs = make_worlds(quick)
    result: dict[str, Any] = {"note": "2 shared CPU cores; other jobs may run beside the benchmark"}
    result["quality"], ckpt = quality(dirs, quick)
    batch_size, steps, warmup = (64, 6, 2) if quick else (256, 20, 3)
    batches = speed_batches(ckpt, dirs["train"], quick, batch_size, steps + warmup)
    result["training_speed"] = training_speed(batches, steps, warmup, rounds=1 if quick else 3)
    result["embedding"] = embedding_throughput(ckpt, dirs["val"], repeats=1 if quick else 3)
    return result
