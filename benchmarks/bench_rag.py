"""The world RAG benchmark with the demo models: retrieval recall@5, answer and citation accuracy against the
no-retrieval baseline (targets: accuracy >= 0.85, recall@5 >= 0.95), with and without the two-tower
rerank, with and without patch scores in text -> image search (``dense``), and end-to-end latency per
question (p50) broken down by part.

Uses the checkpoints ``make demo`` writes (``demo-output/models/clip`` and ``models/vlm-rag``; another
folder with ``MMSTACK_DEMO_OUT``); without them it says so and measures nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

SEEDS = (100, 101)  # benchmark worlds: not the demo's knowledge base (seed 1) nor the tuning data


def _models() -> tuple[Path, Path] | None:
    root = Path(os.environ.get("MMSTACK_DEMO_OUT", "demo-output"))
    clip, vlm = root / "models" / "clip", root / "models" / "vlm-rag"
    return (clip, vlm) if (clip / "config.json").is_file() and (vlm / "config.json").is_file() else None


def run(quick: bool) -> dict[str, Any]:
    import torch

    from mmstack.eval.rag import run_rag_benchmark

    models = _models()
    if models is None:
        return {"skipped": "no demo models: run `make demo` first (or set MMSTACK_DEMO_OUT)"}
    clip, vlm = models
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    logging.getLogger("mmstack.rag").setLevel(logging.ERROR)
    n = 20 if quick else 100
    seeds = SEEDS[:1] if quick else SEEDS
    variants = {"rrf": {}, "rerank": {"rerank": True}, "global_only": {"dense": False}}
    runs = {
        (tag, seed): run_rag_benchmark(vlm, clip, seed=seed, n=n, **kwargs)
        for tag, kwargs in variants.items()
        for seed in seeds
    }
    keys = ("recall_at_1", "recall_at_5", "answer_accuracy", "citation_accuracy", "baseline_accuracy")
    out: dict[str, Any] = {"models": {"clip": str(clip), "vlm": str(vlm)}, "questions_per_seed": n}
    for tag in variants:
        chosen = [r for (t, _), r in runs.items() if t == tag]
        out[tag] = {k: round(sum(r[k] for r in chosen) / len(chosen), 4) for k in keys}
        out[tag]["dense"] = chosen[0]["dense"]
        out[tag]["by_kind"] = {f"seed{s}": r["by_kind"] for (t, s), r in runs.items() if t == tag}
        out[tag]["latency_ms"] = chosen[0]["latency"]
    out["targets"] = {
        "answer_accuracy>=0.85": out["rrf"]["answer_accuracy"] >= 0.85,
        "recall_at_5>=0.95": out["rrf"]["recall_at_5"] >= 0.95,
    }
    out["examples"] = runs[("rrf", seeds[0])]["examples"]
    return out
