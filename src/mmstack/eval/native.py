"""Evaluation of the native model on a shapes-world folder, scored by the world's parser (as GenEval uses a
detector): nothing here is FID or any learned metric.

- **Generation** (text -> image): each val scene's canonical caption prompts an image; ``parse_image`` reads
  the objects back and each prompted object is matched to a parsed one (the assignment that agrees on the
  most attributes). Accuracy of shape, colour and cell per prompted object, ``object_accuracy`` when all
  three agree (``object_accuracy_size`` also the size), and ``scene_accuracy`` when every object of the
  scene is right and nothing extra was drawn. Swept over guidance scales (1.0 = no guidance).
- **Bounds** beside the score: ``real`` (the parser on the real images), ``roundtrip`` (the real image
  through the VQ tokenizer and back: the best a generator over these codes can hope for) and ``shuffled``
  (the generated images scored against other scenes' prompts: what ignoring the prompt gives).
- **Validity**: the share of unconstrained generations (no masks, no forced tokens) that parse as images.
- **Captioning** (image -> text): the generated caption is read with ``describe_prompt`` and matched to the
  scene's objects; an object is right when shape, colour, size and cell agree; the accuracy divides the right
  objects by the larger of the true and the described object counts (so hallucinated objects cost too).
- **Clips** (clip -> text, when the model was trained on them): motion accuracy per object.
- **Reconstruction**: PSNR of the VQ round trip and codebook usage over the whole pass.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmstack.errors import ConfigError, DataError

ATTRS = ("shape", "colour", "cell", "size")


@dataclass
class NativeEvalConfig:
    """How much to evaluate. ``guidance_scales`` is the sweep (1.0 = plain conditional sampling);
    ``guidance`` is the scale of the headline numbers, the bounds and the validity check."""

    n_generate: int = 100
    n_caption: int = 200
    n_unconstrained: int = 50
    n_clips: int = 50
    guidance: float = 3.0
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    top_k: int = 64
    temperature: float = 1.0
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_generate", "n_caption", "n_unconstrained", "n_clips"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.guidance < 0 or any(g < 0 for g in self.guidance_scales):
            raise ConfigError("eval guidance scales must be >= 0")
        if self.batch_size < 1 or self.top_k < 1:
            raise ConfigError("eval.batch_size and eval.top_k must be >= 1")


# ---------------------------------------------------------------------------------------- scoring


def match_objects(truth: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, bool]]:
    """For each true object, which attributes the matched found object shares (all False when unmatched).

    The assignment maximises agreements (shape, colour and cell count 1 each, size 0.1 as a tie-break);
    attributes a true object leaves open (None) count as agreeing.
    """

    def agree(t: dict[str, Any], f: dict[str, Any]) -> dict[str, bool]:
        return {a: t.get(a) is None or t.get(a) == f.get(a) for a in ATTRS}

    def score(t: dict[str, Any], f: dict[str, Any]) -> float:
        m = agree(t, f)
        return m["shape"] + m["colour"] + m["cell"] + 0.1 * m["size"]

    found = found[:9]  # at most one object per cell in the world; more is noise
    best, best_perm = -1.0, ()
    k = min(len(truth), len(found))
    for perm in itertools.permutations(range(len(found)), k):
        for rows in itertools.combinations(range(len(truth)), k) if k < len(truth) else [tuple(range(k))]:
            s = sum(score(truth[r], found[c]) for r, c in zip(rows, perm, strict=True))
            if s > best:
                best, best_perm = s, tuple(zip(rows, perm, strict=True))
    out = [dict.fromkeys(ATTRS, False) for _ in truth]
    for r, c in best_perm:
        out[r] = agree(truth[r], found[c])
    return out


def object_scores(truths: list[list[dict]], founds: list[list[dict]]) -> dict[str, float]:
    """Per-attribute and all-attribute accuracy over every true object, and whole-scene accuracy."""
    n, counts, scenes_ok = 0, dict.fromkeys([*ATTRS, "all", "all_size"], 0), 0
    for truth, found in zip(truths, founds, strict=True):
        matches = match_objects(truth, found)
        ok_all = [m["shape"] and m["colour"] and m["cell"] for m in matches]
        for m, ok in zip(matches, ok_all, strict=True):
            n += 1
            for a in ATTRS:
                counts[a] += m[a]
            counts["all"] += ok
            counts["all_size"] += ok and m["size"]
        scenes_ok += all(ok_all) and len(found) == len(truth)
    d = max(n, 1)
    return {
        "object_accuracy": counts["all"] / d,
        "object_accuracy_size": counts["all_size"] / d,
        **{f"{a}_accuracy": counts[a] / d for a in ("shape", "colour", "cell", "size")},
        "scene_accuracy": scenes_ok / max(len(truths), 1),
        "objects": n,
    }


def parsed(img: Any) -> list[dict[str, Any]]:
    from mmstack.world.parser import parse_image

    return [{a: getattr(o, a) for a in ATTRS} for o in parse_image(img)]


def caption_scores(truths: list[list[dict]], captions: list[str]) -> dict[str, float]:
    """Captioning accuracy: right objects / max(true, described) per scene, pooled; plus exact scenes.

    A described object must name all four attributes to be right (an unnamed cell is not a right cell).
    """
    from mmstack.world.language import describe_prompt

    right, denom, exact = 0, 0, 0
    for truth, text in zip(truths, captions, strict=True):
        described = [{a: v if v is not None else "?" for a, v in o._asdict().items()} for o in describe_prompt(text)]
        ok = sum(all(m.values()) for m in match_objects(truth, described))
        right += ok
        denom += max(len(truth), len(described))
        exact += ok == len(truth) == len(described)
    return {"caption_accuracy": right / max(denom, 1), "caption_exact": exact / max(len(truths), 1)}


# -------------------------------------------------------------------------------------------- data


def read_scenes(data: str | Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` scene records of a shapes-world folder (image path resolved)."""
    path = Path(data) / "scenes.jsonl"
    if not path.is_file():
        raise DataError(
            f"{data} has no scenes.jsonl: native evaluation needs a shapes-world folder (mmstack world generate)"
        )
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and len(out) < n:
            rec = json.loads(line)
            rec["image_path"] = Path(data) / rec["image"]
            out.append(rec)
    return out


def truth_of(scene: dict[str, Any]) -> list[dict[str, Any]]:
    return [{a: o[a] for a in ATTRS} for o in scene["objects"]]


def load_uint8(paths: list[Path], size: int) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            arrays.append(np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


# -------------------------------------------------------------------------------------------- runs


@torch.no_grad()
def evaluate_reconstruction(vq: Any, pixels: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """PSNR of the VQ round trip (mean of per-image PSNR on 8-bit outputs, and pooled over all pixels) and
    codebook usage counted over the whole pass (codes used at least once, perplexity of their frequencies)."""
    vq.eval()
    counts = torch.zeros(vq.codebook_size)
    mses = []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i : i + batch_size].float() / 255.0
        codes = vq.encode(x)
        recon = (vq.decode(codes) * 255).round() / 255  # what a saved PNG holds
        mses.append((recon - x).pow(2).flatten(1).mean(1))
        counts += torch.bincount(codes.flatten(), minlength=vq.codebook_size).float()
    mse = torch.cat(mses)
    p = counts[counts > 0] / counts.sum()
    return {
        "images": len(pixels),
        "psnr": float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()),
        "psnr_pooled": 10 * math.log10(1.0 / max(float(mse.mean()), 1e-10)),
        "codes_used": int((counts > 0).sum()),
        "codebook_size": vq.codebook_size,
        "code_perplexity": float(torch.exp(-(p * p.log()).sum())),
    }


def draw_images(model: Any, prompts: list[str], cfg: NativeEvalConfig, guidance: float | None, **options: Any):
    """The images ``model`` draws for ``prompts`` with the evaluation's sampling (top-k, temperature, seed,
    batch size) at ``guidance`` (None: no guidance); ``options`` go to ``generate`` (e.g. ``constrained``)."""
    return model.generate(
        prompts,
        "image",
        guidance=guidance,
        top_k=cfg.top_k,
        temperature=cfg.temperature,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        **options,
    )


def evaluate_generation(model: Any, scenes: list[dict], cfg: NativeEvalConfig) -> dict[str, Any]:
    """Object accuracy of text->image over the guidance sweep, with the real / round-trip / shuffled bounds."""
    prompts = [s["captions"][0] for s in scenes]
    truths = [truth_of(s) for s in scenes]
    out: dict[str, Any] = {"prompts": len(prompts), "sweep": {}}
    images_at: dict[float, list] = {}
    for g in sorted(set([*cfg.guidance_scales, cfg.guidance])):
        t0 = time.perf_counter()
        gen = draw_images(model, prompts, cfg, None if g == 1.0 else g)
        images_at[g] = gen.outputs
        scores = object_scores(truths, [parsed(im) for im in gen.outputs])
        scores["seconds_per_image"] = (time.perf_counter() - t0) / max(len(prompts), 1)
        out["sweep"][str(g)] = scores
    head = out["sweep"][str(cfg.guidance)]
    out.update({k: head[k] for k in head if k.endswith("accuracy") or k.endswith("accuracy_size")})
    out["object_accuracy_no_cfg"] = out["sweep"]["1.0"]["object_accuracy"] if "1.0" in out["sweep"] else None
    pixels = load_uint8([s["image_path"] for s in scenes], model.vq.config.image_size)
    recon = model.vq.decode(model.vq.encode(pixels.float() / 255.0))
    from mmstack.models.native_generate import to_image

    out["bounds"] = {
        "real": object_scores(truths, [parsed(p.permute(1, 2, 0).numpy()) for p in pixels])["object_accuracy"],
        "roundtrip": object_scores(truths, [parsed(to_image(r)) for r in recon])["object_accuracy"],
        "shuffled": object_scores(_derange(truths, cfg.seed), [parsed(im) for im in images_at[cfg.guidance]])[
            "object_accuracy"
        ],
    }
    return out


def _derange(items: list, seed: int) -> list:
    """``items`` in an order where (for 2 or more) no item keeps its place."""
    if len(items) < 2:
        return list(items)
    order = list(range(len(items)))
    rng = random.Random(seed)
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    return [items[j] for j in order]


def evaluate_validity(model: Any, scenes: list[dict], cfg: NativeEvalConfig) -> dict[str, Any]:
    """Share of unconstrained generations (the model writes <boi>, <eol>, <eoi> itself) that parse."""
    prompts = [s["captions"][0] for s in scenes]
    gen = draw_images(model, prompts, cfg, cfg.guidance, constrained=False)
    return {"unconstrained": len(prompts), "valid_rate": sum(gen.valid) / max(len(prompts), 1)}


def evaluate_captioning(model: Any, scenes: list[dict], cfg: NativeEvalConfig) -> dict[str, Any]:
    pixels = load_uint8([s["image_path"] for s in scenes], model.vq.config.image_size)
    gen = model.generate(pixels.float() / 255.0, "text", batch_size=cfg.batch_size)
    scores = caption_scores([truth_of(s) for s in scenes], gen.outputs)
    return {
        "captions": len(scenes),
        **scores,
        "examples": [
            {"truth": s["captions"][0], "caption": c} for s, c in zip(scenes[:5], gen.outputs[:5], strict=True)
        ],
    }


_MOTION = re.compile(
    r"\b(\w+) (\w+) moves (up and to the left|up and to the right|down and to the left|"
    r"down and to the right|to the left|to the right|up|down)"
)


def evaluate_clips(model: Any, data: str | Path, cfg: NativeEvalConfig, frames: int) -> dict[str, Any] | None:
    """Clip captioning: per object, whether the caption names its colour, shape and motion."""
    path = Path(data) / "clips.jsonl"
    if cfg.n_clips == 0 or not path.is_file():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][: cfg.n_clips]
    clips = []
    for r in recs:
        pick = np.round(np.linspace(0, len(r["frames"]) - 1, frames)).astype(int)
        clips.append([Path(data) / r["frames"][i] for i in pick])
    gen = model.generate(clips, "text", batch_size=cfg.batch_size)
    right = total = 0
    for rec, text in zip(recs, gen.outputs, strict=True):
        said = {(c, s): m for c, s, m in _MOTION.findall(text)}
        for obj, motion in zip(rec["objects"], rec["motions"], strict=True):
            total += 1
            right += _phrase(said.get((obj["colour"], obj["shape"]))) == motion
    return {"clips": len(recs), "motion_accuracy": right / max(total, 1), "example": gen.outputs[0] if recs else ""}


def _phrase(p: str | None) -> str | None:
    if p is None:
        return None
    return p.replace(" and to the ", " ").replace("to the ", "")


def evaluate_native(
    model: Any, data: str | Path, cfg: NativeEvalConfig | None = None, clip_frames: int = 4
) -> dict[str, Any]:
    """Every native metric on the shapes-world folder ``data`` (see the module docstring)."""
    cfg = cfg or NativeEvalConfig()
    n = max(cfg.n_generate, cfg.n_caption, cfg.n_unconstrained)
    scenes = read_scenes(data, n)
    pixels = load_uint8([s["image_path"] for s in scenes], model.vq.config.image_size)
    result: dict[str, Any] = {"data": str(data), "reconstruction": evaluate_reconstruction(model.vq, pixels)}
    if cfg.n_generate:
        result["generation"] = evaluate_generation(model, scenes[: cfg.n_generate], cfg)
    if cfg.n_unconstrained:
        result["validity"] = evaluate_validity(model, scenes[: cfg.n_unconstrained], cfg)
    if cfg.n_caption:
        result["captioning"] = evaluate_captioning(model, scenes[: cfg.n_caption], cfg)
    clips = evaluate_clips(model, data, cfg, clip_frames)
    if clips is not None:
        result["clips"] = clips
    return result
