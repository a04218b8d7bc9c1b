"""Cleaning image-text pairs: caption length, image size and aspect, model score and near-duplicates.

``clean_pairs`` reads any pairs source, never writes into it, and writes into the output folder:

- ``kept.jsonl``: the pairs that pass every filter (a pairs file ``read_pairs`` reads back; image paths
  relative to the output folder when below it, else absolute), with their model ``score`` when scored;
- ``rejected.jsonl``: every other pair (or unreadable record) with the first failed filter as ``reason``
  and a human ``detail`` ("score 0.081 < 0.2", "near-duplicate of 000012 (cos 0.993)");
- ``summary.json``: counts per reason and the thresholds used.

Filters run cheapest first: caption words, then image decoding, size and aspect, then the model's
image-text cosine similarity, then near-duplicates: an image whose embedding has cosine >= the threshold
with an earlier kept image is dropped (the first occurrence in file order is kept).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmstack.errors import ConfigError, DataError, ImageError
from mmstack.utils.atomic import atomic_write_json, atomic_write_text
from mmstack.utils.progress import make_progress

DEFAULT_MIN_SCORE = 0.2
DEFAULT_DEDUP_THRESHOLD = 0.98


@dataclass
class CleanConfig:
    """Thresholds; ``None`` switches a filter off. Score and dedup need a model."""

    min_caption_words: int | None = 3
    min_size: int | None = 16
    max_aspect: float | None = 3.0
    min_score: float | None = None
    dedup_threshold: float | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.min_caption_words is not None and self.min_caption_words < 0:
            raise ConfigError(f"--min-caption-words must be >= 0, got {self.min_caption_words}")
        if self.min_size is not None and self.min_size < 1:
            raise ConfigError(f"--min-size must be >= 1 pixel, got {self.min_size}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ConfigError(f"--max-aspect is long side / short side, so it must be >= 1; got {self.max_aspect}")
        if self.min_score is not None and not -1 <= self.min_score <= 1:
            raise ConfigError(f"--min-score is a cosine similarity in [-1, 1], got {self.min_score}")
        if self.dedup_threshold is not None and not -1 < self.dedup_threshold <= 1:
            raise ConfigError(f"--dedup-threshold is a cosine similarity in (-1, 1], got {self.dedup_threshold}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")


def clean_pairs(src: str | Path, out: str | Path, cfg: CleanConfig | None = None, model: Any = None) -> dict[str, Any]:
    """Filter the pairs in ``src`` into ``out``/kept.jsonl and rejected.jsonl; returns the summary.

    Args:
        src: any pairs source ``read_pairs`` reads; it is only read.
        out: output folder (created; must not be inside ``src``'s folder).
        cfg: thresholds (default ``CleanConfig()``); with a model, unset score/dedup thresholds take
            ``DEFAULT_MIN_SCORE`` / ``DEFAULT_DEDUP_THRESHOLD``.
        model: a two-tower model for the score and near-duplicate filters.
    """
    from mmstack.data.pairs import read_pairs
    from mmstack.data.records import SkipReport

    cfg = cfg or CleanConfig()
    cfg = _with_model_defaults(cfg, model)
    out = Path(out)
    _check_out(src, out)
    report = SkipReport()
    pairs = read_pairs(src, skip_bad=True, report=report)
    verdicts: dict[int, tuple[str, str]] = {}
    _caption_filter(pairs, cfg, verdicts)
    scores, embeds = _image_filters(pairs, cfg, model, verdicts)
    if cfg.dedup_threshold is not None:
        _dedup(pairs, embeds, cfg.dedup_threshold, verdicts)
    return _write(src, out, pairs, report, verdicts, scores, cfg)


def _with_model_defaults(cfg: CleanConfig, model: Any) -> CleanConfig:
    if model is None:
        if cfg.min_score is not None or cfg.dedup_threshold is not None:
            raise ConfigError("--min-score and --dedup-threshold need a model: pass --model CKPT")
        return cfg
    values = asdict(cfg)
    values["min_score"] = DEFAULT_MIN_SCORE if cfg.min_score is None else cfg.min_score
    values["dedup_threshold"] = DEFAULT_DEDUP_THRESHOLD if cfg.dedup_threshold is None else cfg.dedup_threshold
    return CleanConfig(**values)


def _check_out(src: str | Path, out: Path) -> None:
    src_dir = Path(src) if Path(src).is_dir() else Path(src).parent
    src_dir, target = Path(os.path.abspath(src_dir)), Path(os.path.abspath(out))
    if target == src_dir or src_dir in target.parents:
        raise ConfigError(f"--out {out} is inside the input folder {src_dir}; cleaning never writes into its input")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; pass a folder for kept/rejected lists")


def _caption_filter(pairs: list, cfg: CleanConfig, verdicts: dict[int, tuple[str, str]]) -> None:
    if cfg.min_caption_words is None:
        return
    for i, p in enumerate(pairs):
        n = len(p.caption.split())
        if n < cfg.min_caption_words:
            verdicts[i] = ("caption_too_short", f"{n} words < {cfg.min_caption_words}")


def _image_filters(pairs: list, cfg: CleanConfig, model: Any, verdicts: dict) -> tuple[dict[int, float], dict]:
    """Decode images (size, aspect), then score survivors with the model; returns scores and image embeddings."""
    todo = [i for i in range(len(pairs)) if i not in verdicts]
    scores: dict[int, float] = {}
    embeds: dict[int, Any] = {}
    with make_progress() as progress, ThreadPoolExecutor(max_workers=2) as pool:
        task = progress.add_task("clean", total=len(todo))
        for lo in range(0, len(todo), cfg.batch_size):
            batch = todo[lo : lo + cfg.batch_size]
            loaded = list(pool.map(lambda i: _check_image(pairs[i], cfg), batch))
            ok = []
            for i, (img, verdict) in zip(batch, loaded, strict=True):
                if verdict is not None:
                    verdicts[i] = verdict
                else:
                    ok.append((i, img))
            if model is not None and ok:
                _score(model, pairs, ok, cfg, verdicts, scores, embeds)
            progress.advance(task, len(batch))
    return scores, embeds


def _check_image(pair: Any, cfg: CleanConfig) -> tuple[Any, tuple[str, str] | None]:
    try:
        img = pair.load_image()
    except ImageError as err:
        return None, ("unreadable_image", str(err))
    w, h = img.size
    if cfg.min_size is not None and min(w, h) < cfg.min_size:
        return None, ("image_too_small", f"{w}x{h}: shorter side < {cfg.min_size} px")
    aspect = max(w, h) / min(w, h)
    if cfg.max_aspect is not None and aspect > cfg.max_aspect:
        return None, ("bad_aspect_ratio", f"{w}x{h}: aspect {aspect:.2f} > {cfg.max_aspect}")
    return img, None


def _score(model: Any, pairs: list, ok: list, cfg: CleanConfig, verdicts: dict, scores: dict, embeds: dict) -> None:
    import torch

    proc = model.processor
    device = next(model.parameters()).device
    with torch.inference_mode():
        pixels = proc.images([img for _, img in ok]).to(device)
        enc = proc.text([pairs[i].caption for i, _ in ok])
        img = model.encode_image(pixels, normalize=True).float().cpu()
        txt = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device), normalize=True)
        sims = (img * txt.float().cpu()).sum(dim=-1)
    for row, (i, _) in enumerate(ok):
        score = round(float(sims[row]), 6)
        scores[i] = score
        if cfg.min_score is not None and score < cfg.min_score:
            verdicts[i] = ("low_score", f"score {score:.6f} < {cfg.min_score:g}")
        else:
            embeds[i] = img[row]


def _dedup(pairs: list, embeds: dict, threshold: float, verdicts: dict, chunk: int = 1024) -> None:
    """Greedy in file order: drop an image too similar to an earlier kept one."""
    import torch

    if not embeds:
        return
    order = sorted(embeds)
    kept_idx: list[int] = []
    kept = torch.zeros(0, embeds[order[0]].shape[0])
    for lo in range(0, len(order), chunk):
        ids = order[lo : lo + chunk]
        block = torch.stack([embeds[i] for i in ids])  # (c, D)
        to_kept = block @ kept.T  # (c, K): against images kept in earlier chunks
        inner = block @ block.T  # (c, c)
        new_rows: list[int] = []
        for r, i in enumerate(ids):
            cands = [(float(to_kept[r].max()), kept_idx[int(to_kept[r].argmax())])] if kept_idx else []
            cands += [(float(inner[r, s]), ids[s]) for s in new_rows]
            best = max(cands, default=None)
            if best is not None and best[0] >= threshold:
                verdicts[i] = ("near_duplicate", f"near-duplicate of {_name(pairs, best[1])} (cos {best[0]:.3f})")
            else:
                new_rows.append(r)
        kept = torch.cat([kept, block[new_rows]])
        kept_idx += [ids[r] for r in new_rows]


def _name(pairs: list, i: int) -> str:
    return str(pairs[i].id) if pairs[i].id is not None else str(pairs[i].image)


def _record(pair: Any, out: Path) -> dict[str, Any]:
    from mmstack.data.records import relative_to

    rec = {"image": relative_to(pair.image, out), "caption": pair.caption}
    if pair.id is not None:
        rec["id"] = pair.id
    return {**pair.meta, **rec}


def _write(src, out: Path, pairs: list, report, verdicts: dict, scores: dict, cfg: CleanConfig) -> dict[str, Any]:
    kept, rejected = [], []
    for i, p in enumerate(pairs):
        rec = _record(p, out)
        if i in scores:
            rec["score"] = scores[i]
        if i in verdicts:
            rejected.append({**rec, "reason": verdicts[i][0], "detail": verdicts[i][1]})
        else:
            kept.append(rec)
    rejected += [{"location": loc, "reason": "bad_record", "detail": why} for loc, why in report.skipped]
    if not pairs and not report.skipped:
        raise DataError(f"{src} holds no image-text pairs; nothing to clean")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "kept.jsonl", "".join(_line(r) for r in kept))
    atomic_write_text(out / "rejected.jsonl", "".join(_line(r) for r in rejected))
    summary = {
        "in": str(src),
        "out": str(out),
        "n_in": len(pairs) + report.n_skipped,
        "n_kept": len(kept),
        "n_rejected": len(rejected),
        "reasons": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "thresholds": asdict(cfg),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, sort_keys=True, default=str) + "\n"
