"""Multimodal retrieval-augmented generation: retrieve -> fuse (RRF) -> rerank -> prompt -> generate, with
citations.

    from mmstack.rag import Pipeline, BridgeGenerator, collection_retrievers
    pipe = Pipeline(collection_retrievers(collection), BridgeGenerator.from_pretrained("runs/vlm"))
    result = pipe.ask("Which exhibit shows a purple cross?")
    print(result.answer, [(s.number, s.id, s.path) for s in result.cited])
"""

from mmstack.rag.citations import map_citations, parse_citations, strip_citations
from mmstack.rag.fusion import fuse_hits
from mmstack.rag.generators import BridgeGenerator
from mmstack.rag.pipeline import Generator, Pipeline, PipelineConfig, Reranker, Retriever, answer_without_retrieval
from mmstack.rag.prompt import build_prompt, render_prompt
from mmstack.rag.rerank import TwoTowerReranker
from mmstack.rag.types import Hit, Prompt, Query, RagAnswer, Source, as_query

__all__ = [
    "BridgeGenerator",
    "Generator",
    "Hit",
    "Pipeline",
    "PipelineConfig",
    "Prompt",
    "Query",
    "RagAnswer",
    "Reranker",
    "Retriever",
    "Source",
    "TwoTowerReranker",
    "answer_without_retrieval",
    "as_query",
    "build_prompt",
    "fuse_hits",
    "map_citations",
    "parse_citations",
    "render_prompt",
    "strip_citations",
]
