"""The RAG pipeline: retrieve (several retrievers) -> fuse (RRF) -> rerank (optional) -> prompt -> generate
-> answer with cited sources.

    pipe = Pipeline([text_retriever, image_retriever, cross_retriever], generator=BridgeGenerator(vlm))
    result = pipe.ask("What colour is the star in exhibit 17?")
    result.answer, [s.id for s in result.cited]

Every part is pluggable: a retriever is anything with ``name`` and ``retrieve(query, k) -> list[Hit]``
(and optionally ``applies(query) -> bool``, e.g. an image retriever for text-only questions), the fusion a
function of the named ranked lists, the reranker anything with ``rerank(query, sources) -> sources`` and the
generator anything with ``generate(prompt, images) -> str``. A retriever that raises or finds nothing is
skipped with a warning; a question nothing can be retrieved for gets a clear message, not an exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from mmstack.errors import ConfigError
from mmstack.rag.citations import map_citations, parse_citations, strip_citations
from mmstack.rag.fusion import RRF_K, fuse_hits
from mmstack.rag.prompt import build_prompt
from mmstack.rag.types import Hit, Prompt, Query, RagAnswer, Source, as_query

log = logging.getLogger("mmstack.rag")

NOTHING_RETRIEVED = (
    "Nothing was retrieved for this question: the collection is empty or no retriever found a match, so "
    "there is nothing to answer from. Index some images or documents first (mmstack index build)."
)


@runtime_checkable
class Retriever(Protocol):
    """Finds items for a query, best first."""

    name: str

    def retrieve(self, query: Query, k: int) -> list[Hit]: ...


@runtime_checkable
class Generator(Protocol):
    """Answers a prompt whose ``<image>`` placeholders stand for ``images`` (in order)."""

    def generate(self, prompt: str, images: Sequence[Image.Image]) -> str: ...


class Reranker(Protocol):
    def rerank(self, query: Query, sources: list[Source]) -> list[Source]: ...


Fusion = Callable[[Mapping[str, Sequence[Hit]]], list[Source]]


@dataclass
class PipelineConfig:
    """How many items flow through each step.

    Args:
        k_per_retriever: candidates each retriever returns.
        top_k: fused sources kept and reported (retrieval recall@K is measured on these).
        context_k: sources placed in the prompt as numbered snippets (the first ``context_k`` of ``top_k``).
            Default 1: the demo VLM reads one exhibit's image far better than the right one among three (world
            RAG benchmark, 500 questions: answer accuracy 0.87 against 0.71, attribute questions 0.67 against
            0.42; BENCHMARKS.md, session 22), at the price of answers bounded by recall@1 (0.93). A VLM tuned
            with ``RagTuneConfig.context_k`` N should be asked with the same N.
        max_images: source images placed in the prompt (of the first sources that have one).
        rrf_k: the k of reciprocal rank fusion.
        rerank_top: fused candidates the reranker re-sorts (when a reranker is set).
        max_snippet_chars: longest snippet text in the prompt.
    """

    k_per_retriever: int = 20
    top_k: int = 5
    context_k: int = 1
    max_images: int = 3
    rrf_k: int = RRF_K
    rerank_top: int = 20
    max_snippet_chars: int = 400

    def __post_init__(self) -> None:
        for name in ("k_per_retriever", "top_k", "context_k", "rrf_k", "rerank_top", "max_snippet_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rag.{name} must be >= 1; got {getattr(self, name)}")
        if self.max_images < 0:
            raise ConfigError(f"rag.max_images must be >= 0; got {self.max_images}")
        if self.context_k > self.top_k:
            raise ConfigError(f"rag.context_k ({self.context_k}) must be <= rag.top_k ({self.top_k})")


def _load_image(path: str) -> Image.Image:
    from mmstack.data.images import load_image

    return load_image(path)


class Pipeline:
    """Retrieval-augmented generation over a collection (see the module docstring).

    Args:
        retrievers: the retrievers to run (their names must differ).
        generator: produces the answer; None for retrieval only (``retrieve``).
        fusion: fuses the named ranked lists (default: RRF with ``config.rrf_k``).
        reranker: optional second-stage scorer (e.g. ``TwoTowerReranker``).
        config: sizes (``PipelineConfig``).
        load_image: reads a source's image from its path (default: ``mmstack.data.images.load_image``).
    """

    def __init__(
        self,
        retrievers: Sequence[Retriever],
        generator: Generator | None = None,
        fusion: Fusion | None = None,
        reranker: Reranker | None = None,
        config: PipelineConfig | None = None,
        load_image: Callable[[str], Image.Image] = _load_image,
    ) -> None:
        names = [r.name for r in retrievers]
        if len(set(names)) != len(names):
            raise ConfigError(f"retriever names must be unique; got {names}")
        self.retrievers = list(retrievers)
        self.generator = generator
        self.config = config or PipelineConfig()
        self.fusion = fusion or (lambda lists: fuse_hits(lists, k=self.config.rrf_k))
        self.reranker = reranker
        self.load_image = load_image

    # ------------------------------------------------------------------------------------ retrieval

    def _run_retrievers(self, query: Query, warnings: list[str], timings: dict[str, float]) -> dict[str, list[Hit]]:
        lists: dict[str, list[Hit]] = {}
        for r in self.retrievers:
            applies = getattr(r, "applies", None)
            if applies is not None and not applies(query):
                continue
            t0 = time.perf_counter()
            try:
                hits = list(r.retrieve(query, self.config.k_per_retriever))
            except Exception as err:  # one broken retriever must not sink the others
                warnings.append(f"retriever {r.name!r} failed ({type(err).__name__}: {err}); using the others")
                hits = []
            else:
                if not hits:
                    warnings.append(f"retriever {r.name!r} found nothing; using the others")
            timings[f"retrieve.{r.name}"] = time.perf_counter() - t0
            lists[r.name] = hits
        return lists

    def retrieve(self, question: str | Query, image: Image.Image | str | Path | None = None) -> RagAnswer:
        """Retrieval, fusion and reranking only: a ``RagAnswer`` with sources and no generated answer."""
        query = question if isinstance(question, Query) else as_query(question, image)
        result = RagAnswer(question=query.text, answer="")
        t0 = time.perf_counter()
        lists = self._run_retrievers(query, result.warnings, result.timings)
        result.timings["retrieve"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        fused = self.fusion(lists)
        result.timings["fuse"] = time.perf_counter() - t1
        if self.reranker is not None and fused:
            t2 = time.perf_counter()
            head, tail = fused[: self.config.rerank_top], fused[self.config.rerank_top :]
            try:
                fused = list(self.reranker.rerank(query, head)) + tail
            except Exception as err:
                result.warnings.append(f"rerank failed ({type(err).__name__}: {err}); keeping the fused order")
            result.timings["rerank"] = time.perf_counter() - t2
        result.sources = fused[: self.config.top_k]
        if not result.sources:
            result.message = NOTHING_RETRIEVED
        result.timings["total"] = time.perf_counter() - t0
        return result

    # ----------------------------------------------------------------------------------- generation

    def build_prompt(self, query: Query, sources: Sequence[Source], warnings: list[str] | None = None) -> Prompt:
        """The prompt for ``query`` with the first ``context_k`` of ``sources`` (numbering them)."""
        cfg = self.config
        return build_prompt(
            query.text,
            list(sources[: cfg.context_k]),
            query.image,
            self.load_image,
            cfg.max_images,
            cfg.max_snippet_chars,
            warn=warnings.append if warnings is not None else None,
        )

    def ask(self, question: str | Query, image: Image.Image | str | Path | None = None) -> RagAnswer:
        """Answer ``question`` (optionally about ``image``) from the retrieved sources, with citations."""
        if self.generator is None:
            raise ConfigError("this pipeline has no generator: pass generator=... (or use retrieve())")
        query = question if isinstance(question, Query) else as_query(question, image)
        t0 = time.perf_counter()
        result = self.retrieve(query)
        if result.message is not None:
            _log_warnings(result.warnings)
            return result
        t1 = time.perf_counter()
        prompt = self.build_prompt(query, result.sources, result.warnings)
        result.timings["prompt"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        result.raw = self.generator.generate(prompt.text, prompt.images)
        result.timings["generate"] = time.perf_counter() - t2
        result.answer = strip_citations(result.raw)
        result.citations, result.invalid_citations = map_citations(parse_citations(result.raw), result.sources)
        if result.invalid_citations:
            result.warnings.append(f"the answer cites {result.invalid_citations}, which match no source in the prompt")
        result.timings["total"] = time.perf_counter() - t0
        _log_warnings(result.warnings)
        return result


def _log_warnings(warnings: list[str]) -> None:
    for w in warnings:
        log.warning(w)


def answer_without_retrieval(generator: Generator, query: Query) -> str:
    """The no-retrieval baseline: the same prompt layout with no sources ("No sources.")."""
    from mmstack.rag.prompt import render_prompt

    images = [query.image] if query.image is not None else []
    return generator.generate(render_prompt(query.text, [], query.image is not None), images)


def pipeline_summary(pipe: Pipeline) -> dict[str, Any]:
    """What a pipeline is made of (for reports)."""
    return {
        "retrievers": [r.name for r in pipe.retrievers],
        "reranker": type(pipe.reranker).__name__ if pipe.reranker is not None else None,
        "generator": type(pipe.generator).__name__ if pipe.generator is not None else None,
        "config": vars(pipe.config),
    }
