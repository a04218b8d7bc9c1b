"""Scoring the RAG pipeline on the world RAG benchmark (``mmstack.world.rag_world``).

Per question: retrieval recall@1/@K (the right record among the first K fused sources), answer accuracy
(the answer equals the reference after VQA normalisation, citation markers removed), citation accuracy
(the answer cites the right record) and citation precision (the share of cited sources that are the right
record); the same generator without retrieval is the baseline. Latency is reported per part (p50, ms).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmstack.eval.vqa import normalize_answer
from mmstack.rag.pipeline import Generator, Pipeline, PipelineConfig, answer_without_retrieval
from mmstack.rag.types import Query, RagAnswer
from mmstack.utils.progress import make_progress


@dataclass
class RagItem:
    """One benchmark question: text, optional query image path, reference answer, kind, right record id."""

    question: str
    answer: str
    kind: str
    record: str
    image: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RagItem:
        return cls(d["question"], d["answer"], d["kind"], d["record"], d.get("image"))

    def query(self) -> Query:
        if self.image is None:
            return Query(self.question)
        from mmstack.data.images import load_image

        return Query(self.question, load_image(self.image), self.image)


def score_one(item: RagItem, result: RagAnswer, k: int = 5) -> dict[str, float]:
    """Recall@1/@k, answer and citation scores of one pipeline result."""
    ids = [s.id for s in result.sources]
    cited = [s.id for s in result.cited]
    return {
        "recall_at_1": float(item.record in ids[:1]),
        f"recall_at_{k}": float(item.record in ids[:k]),
        "answer_accuracy": float(answer_matches(result.answer, item.answer)),
        "citation_accuracy": float(item.record in cited),
        "citation_precision": cited.count(item.record) / len(cited) if cited else 0.0,
    }


def answer_matches(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def _mean(rows: Sequence[dict[str, float]], key: str) -> float:
    return round(statistics.fmean(r[key] for r in rows), 4) if rows else float("nan")


def _latency(results: Sequence[RagAnswer]) -> dict[str, float]:
    """p50 milliseconds of every timed part (and p90 of the total)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for name, seconds in r.timings.items():
            parts[name].append(seconds * 1000)
    out = {f"{name}_p50_ms": round(statistics.median(v), 2) for name, v in sorted(parts.items())}
    if parts.get("total"):
        totals = sorted(parts["total"])
        out["total_p90_ms"] = round(totals[min(len(totals) - 1, int(0.9 * len(totals)))], 2)
    return out


def evaluate_rag(
    pipeline: Pipeline,
    items: Sequence[RagItem],
    baseline: Generator | None = None,
    k: int = 5,
    n_examples: int = 6,
) -> dict[str, Any]:
    """Run every item through ``pipeline`` (and ``baseline`` without retrieval); return the metrics.

    The pipeline's ``top_k`` should be >= ``k`` so that recall@k sees k sources.
    """
    rows, results, examples = [], [], []
    with make_progress() as progress:
        task = progress.add_task("rag eval", total=len(items))
        for item in items:
            query = item.query()
            result = pipeline.ask(query)
            row = score_one(item, result, k)
            row["kind"] = item.kind
            if baseline is not None:
                guess = answer_without_retrieval(baseline, query)
                row["baseline_accuracy"] = float(answer_matches(guess, item.answer))
            rows.append(row)
            results.append(result)
            if len(examples) < n_examples:
                examples.append(_example(item, result, row))
            progress.advance(task)
    metrics = _summary(rows, k, baseline is not None)
    metrics["latency"] = _latency(results)
    metrics["examples"] = examples
    return metrics


def _summary(rows: list[dict[str, Any]], k: int, with_baseline: bool) -> dict[str, Any]:
    keys = ["recall_at_1", f"recall_at_{k}", "answer_accuracy", "citation_accuracy", "citation_precision"]
    keys += ["baseline_accuracy"] if with_baseline else []
    out: dict[str, Any] = {"n": len(rows), **{key: _mean(rows, key) for key in keys}}
    kinds = sorted({r["kind"] for r in rows})
    out["by_kind"] = {kind: {key: _mean([r for r in rows if r["kind"] == kind], key) for key in keys} for kind in kinds}
    return out


def _example(item: RagItem, result: RagAnswer, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": item.question,
        "image": item.image,
        "reference": item.answer,
        "record": item.record,
        "answer": result.answer,
        "raw": result.raw,
        "cited": [{"number": s.number, "id": s.id, "path": s.path} for s in result.cited],
        "sources": [s.id for s in result.sources],
        "correct": bool(row["answer_accuracy"]),
    }


def run_rag_benchmark(
    model: str | Path,
    retriever: str | Path,
    seed: int = 0,
    n: int = 100,
    n_records: int = 50,
    out: str | Path | None = None,
    rerank: bool = False,
    config: PipelineConfig | None = None,
    baseline: bool = True,
    device: str = "cpu",
    dense: bool | None = None,
) -> dict[str, Any]:
    """Build the world RAG benchmark from ``seed`` (in ``out``, or a temporary folder), answer its questions
    with the VLM ``model`` over retrievers built with the two-tower ``retriever``; return the metrics.
    ``dense``: patch scores in text -> image search (``memory_retrievers``; ``None``: as the checkpoint says)."""
    import tempfile

    from mmstack.rag import BridgeGenerator, Pipeline, TwoTowerReranker
    from mmstack.rag.knowledge import load_two_tower
    from mmstack.rag.retrievers import items_from_pairs, memory_retrievers
    from mmstack.world.rag_world import generate_rag_world, load_rag_questions

    with tempfile.TemporaryDirectory(prefix="mmstack-rag-") as tmp:
        folder = Path(out) if out is not None else Path(tmp) / "rag-world"
        world = generate_rag_world(folder, n_records=n_records, n_questions=n, seed=seed)
        two_tower = load_two_tower(retriever, device)
        generator = BridgeGenerator.from_pretrained(model, device=device)
        retrievers = memory_retrievers(two_tower, items_from_pairs(folder / "pairs.jsonl"), dense=dense)
        pipe = Pipeline(
            retrievers,
            generator,
            reranker=TwoTowerReranker(two_tower) if rerank else None,
            config=config or PipelineConfig(),
        )
        items = [RagItem.from_dict(q) for q in load_rag_questions(folder)]
        metrics = evaluate_rag(pipe, items, baseline=generator if baseline else None, k=5)
    summary = {k: world[k] for k in ("seed", "n_records", "n_questions", "question_kinds")}
    dense_used = retrievers[2].matrix.patches is not None  # text, image, cross
    return {
        "model": str(model),
        "retriever": str(retriever),
        "rerank": rerank,
        "dense": dense_used,
        "world": summary,
        **metrics,
    }
