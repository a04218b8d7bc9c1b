"""``mmstack eval rag``: the world RAG benchmark (retrieval recall, answer and citation accuracy, baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows


def eval_rag(
    model: Path = typer.Option(..., "--model", help="The VLM that answers: a bridge checkpoint folder."),
    retriever: Path = typer.Option(..., "--retriever", help="The two-tower (CLIP) checkpoint used for retrieval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the benchmark (knowledge base and questions)."),
    n: int = typer.Option(100, "--n", help="Number of questions."),
    records: int = typer.Option(50, "--records", help="Exhibits in the knowledge base (at most 99)."),
    rerank: bool = typer.Option(False, "--rerank/--no-rerank", help="Rerank fused sources by the two-tower score."),
    dense: bool = typer.Option(
        None, "--dense/--no-dense", help="Patch scores in text -> image search (default: on for a region-trained CLIP)."
    ),
    context_k: int = typer.Option(1, "--context-k", help="Sources placed in the prompt."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also answer without retrieval."),
    out: Path = typer.Option(None, "--out", help="Keep the generated benchmark folder here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Build the world RAG benchmark from SEED and report recall@5, answer accuracy, citation accuracy, the
    no-retrieval baseline and latency per part.

    Example: mmstack eval rag --model models/vlm-rag --retriever models/clip --seed 0 --n 100 --json
    """
    import logging

    from mmstack.eval.rag import run_rag_benchmark
    from mmstack.rag import PipelineConfig

    logging.getLogger("mmstack.rag").setLevel(logging.ERROR)  # per-question warnings are counted, not printed
    config = PipelineConfig(context_k=context_k, max_images=context_k)
    result = run_rag_benchmark(model, retriever, seed, n, records, out, rerank, config, baseline, dense=dense)
    emit(result, as_json, render=_render)


def _render(result: dict[str, Any]) -> None:
    keys = (
        "model",
        "retriever",
        "dense",
        "n",
        "recall_at_5",
        "answer_accuracy",
        "citation_accuracy",
        "baseline_accuracy",
    )
    print_kv({k: result.get(k) for k in keys}, title="RAG benchmark")
    print_rows([{"kind": k, **v} for k, v in result["by_kind"].items()], title="by question kind")
    print_kv(result["latency"], title="latency (ms)")
    print_rows(result["examples"], title="examples", columns=["question", "reference", "answer", "cited", "correct"])
