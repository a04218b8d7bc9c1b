"""``mmstack ask``: answer a question over a collection with a VLM, citing the retrieved sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_rows, stdout


def ask(
    question: str = typer.Argument(..., help="The question."),
    db: Path = typer.Option(..., "--db", help="A collection (mmstack index build) or a pairs file/folder."),
    model: Path = typer.Option(..., "--model", help="The VLM that answers: a bridge checkpoint folder."),
    image: Path = typer.Option(None, "--image", help="An image the question is about (query by example)."),
    retriever: Path = typer.Option(
        None, "--retriever", help="Two-tower checkpoint for embedding queries (required for a pairs --db)."
    ),
    rerank: bool = typer.Option(False, "--rerank/--no-rerank", help="Rerank fused sources by the two-tower score."),
    top_k: int = typer.Option(5, "--top-k", help="Fused sources kept and reported."),
    context_k: int = typer.Option(1, "--context-k", help="Sources placed in the prompt as [1], [2], ..."),
    max_images: int = typer.Option(3, "--max-images", help="Source images placed in the prompt."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", help="Longest answer in tokens."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Retrieve text, image and cross-modal matches, fuse them (RRF), and let the VLM answer with citations.

    Example: mmstack ask --db kb/pairs.jsonl --retriever models/clip --model models/vlm-rag "Which exhibit shows a purple cross?"
    """
    from mmstack.rag import BridgeGenerator, Pipeline, PipelineConfig, TwoTowerReranker
    from mmstack.rag.knowledge import open_knowledge_base

    config = PipelineConfig(top_k=top_k, context_k=min(context_k, top_k), max_images=max_images)
    retrievers, two_tower = open_knowledge_base(db, retriever)
    reranker = TwoTowerReranker(two_tower) if rerank and two_tower is not None else None
    pipe = Pipeline(
        retrievers, BridgeGenerator.from_pretrained(model, max_new_tokens), reranker=reranker, config=config
    )
    result = pipe.ask(question, image=image)
    emit(
        {"db": str(db), "model": str(model), "image": str(image) if image else None, **result.to_dict()},
        as_json,
        _render,
    )


def _render(result: dict[str, Any]) -> None:
    for w in result["warnings"]:
        stdout.print(f"[yellow]warning:[/] {w}")
    if result["message"]:
        stdout.print(result["message"])
        return
    stdout.print(f"[bold]{result['answer']}[/]")
    rows = [
        {
            "cited": "*" if s["number"] in result["citations"] else "",
            "n": s["number"] or "",
            "id": s["id"],
            "path": s["path"],
            "score": s["score"],
            "retrievers": ", ".join(f"{k}#{v}" for k, v in s["retrievers"].items()),
            "text": s["text"],
        }
        for s in result["sources"]
    ]
    print_rows(rows, title="sources")
