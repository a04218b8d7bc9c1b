"""In-memory retrievers, the two-tower reranker and the RAG benchmark scoring, with tiny random models."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from PIL import Image

from mmstack.eval.rag import RagItem, evaluate_rag, score_one
from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
from mmstack.processing import train_caption_tokenizer
from mmstack.rag import Pipeline, PipelineConfig, Query, RagAnswer, Source, TwoTowerReranker
from mmstack.rag.retrievers import CrossModalRetriever, ImageRetriever, Item, KeywordRetriever, memory_retrievers
from mmstack.world import generate_rag_world
from mmstack.world.rag_world import load_rag_questions


@pytest.fixture(scope="module")
def two_tower():
    tok = train_caption_tokenizer(["a red circle", "a blue square left of a green star"], max_length=16)
    cfg = TwoTowerConfig.from_preset("shapes-micro")
    torch.manual_seed(0)
    return TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).eval()


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    out = tmp_path_factory.mktemp("rag") / "kb"
    generate_rag_world(out, n_records=12, n_questions=15, seed=2, image_size=32)
    return out


NOTES = [
    Item("a", text="Exhibit 1 belongs to the north hall."),
    Item("b", text="Exhibit 2 is kept in the north hall. Exhibit 2 is red."),
    Item("c", text="Exhibit 3 was moved to the east hall."),
]


def test_keyword_retriever_is_bm25_without_uninformative_terms():
    r = KeywordRetriever(NOTES, max_df=0.5)
    assert "exhibit" not in r.idf and "hall" not in r.idf and "north" not in r.idf  # in > half the notes
    hits = r.retrieve(Query("What colour is exhibit 2?"), k=5)
    assert [h.id for h in hits] == ["b"]
    # by hand: idf("2") = ln(1 + (3 - 1 + 0.5) / 1.5); tf 2; |b| = 8 words without stop words; avg = 18 / 3
    idf = math.log(1 + 2.5 / 1.5)
    tf_part = 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 8 / 6))
    assert hits[0].score == pytest.approx(idf * tf_part)
    assert r.retrieve(Query("Which exhibit is in a hall?"), k=5) == []  # only stop words and common terms
    assert [h.id for h in r.retrieve(Query("moved east"), k=5)] == ["c"]


def test_image_retrievers_find_the_same_picture(two_tower, kb):
    records = [line for line in (kb / "pairs.jsonl").read_text().splitlines()]
    text, image, cross = memory_retrievers(two_tower, _items(kb))
    assert (text.name, image.name, cross.name) == ("text", "image", "cross")
    assert isinstance(image, ImageRetriever) and isinstance(cross, CrossModalRetriever)
    item = _items(kb)[4]
    hits = image.retrieve(Query("which?", Image.open(item.path).convert("RGB")), k=3)
    assert hits[0].id == item.id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert not image.applies(Query("text only")) and len(records) == 12
    ranked = cross.retrieve(Query("a red circle"), k=50)
    assert sorted(h.id for h in ranked) == sorted(i.id for i in _items(kb))
    assert all(a.score >= b.score for a, b in itertools.pairwise(ranked))


def test_cross_modal_query_is_caption_like(two_tower):
    from mmstack.rag.encoders import known_text

    tok = two_tower.processor.tokenizer
    # unknown words ("hall", "exhibit") and a question's function words go; articles and content stay
    assert known_text(tok, "In which hall is the exhibit with a red star?") == "a red star"
    assert (
        known_text(tok, "Which exhibit shows a blue square left of a green star?")
        == "a blue square left of a green star"
    )
    assert known_text(tok, "Which exhibit is it?") == "" and known_text(tok, "In a hall?") == ""
    matrix_query = CrossModalRetriever(memory_retrievers(two_tower, [])[1].matrix)
    assert not matrix_query.applies(Query("Which exhibit is this?"))  # nothing the tower can search for


def test_dense_text_search_adds_the_best_patch_and_follows_the_card(two_tower, kb):
    from mmstack.rag.encoders import TwoTowerEncoder

    items = _items(kb)
    assert memory_retrievers(two_tower, items)[2].matrix.patches is None  # no region training on record
    two_tower.card = {"training": {"config": {"loss": {"region_weight": 1.0}}}}
    try:
        cross = memory_retrievers(two_tower, items)[2]
    finally:
        two_tower.card = {}
    assert cross.matrix.patches is not None
    enc = TwoTowerEncoder(two_tower)
    q = enc.embed_texts(["a red circle"])[0]
    g, p = enc.embed_images_dense([Image.open(items[0].path).convert("RGB")])
    assert torch.allclose(g[0], cross.matrix.vectors[0], atol=1e-5)  # the same global vector as plain search
    hits = {h.id: h.score for h in cross.retrieve(Query("a red circle"), k=50)}
    assert hits[items[0].id] == pytest.approx(float(g[0] @ q + (p[0] @ q).max()), abs=1e-5)
    plain = {h.id: h.score for h in cross.matrix.top(q, 50)}
    assert hits != plain


def test_reranker_orders_by_two_tower_similarity(two_tower, kb):
    items = _items(kb)
    sources = [Source(it.id, 0.0, path=it.path) for it in items[:5]]
    query = Query("this one?", Image.open(items[3].path).convert("RGB"))
    ranked = TwoTowerReranker(two_tower).rerank(query, sources)
    assert ranked[0].id == items[3].id and ranked[0].rerank_score == pytest.approx(1.0, abs=1e-5)
    assert [s.rerank_score for s in ranked] == sorted((s.rerank_score for s in ranked), reverse=True)


class FirstSourceGenerator:
    """Answers with the exhibit named in source [1] and cites it (a stand-in that reads its prompt)."""

    def generate(self, prompt: str, images) -> str:
        line = next(x for x in prompt.splitlines() if x.startswith("[1]"))
        number = re.search(r"exhibit (\d+)", line.lower()).group(1)
        return f"exhibit {number} [1]"


def test_benchmark_scoring_end_to_end(two_tower, kb):
    items = [RagItem.from_dict(q) for q in load_rag_questions(kb)]
    pipe = Pipeline(memory_retrievers(two_tower, _items(kb)), FirstSourceGenerator(), config=PipelineConfig(top_k=5))
    metrics = evaluate_rag(pipe, items, baseline=_NoSources())
    lookups = [i for i in items if i.kind == "lookup" or i.answer.startswith("exhibit")]
    assert metrics["n"] == 15 and set(metrics["by_kind"]) == {"attribute", "lookup", "fact", "note", "image"}
    # the generator always cites [1], so citation accuracy is exactly recall@1
    assert metrics["citation_accuracy"] == metrics["recall_at_1"]
    assert metrics["by_kind"]["note"]["recall_at_1"] == 1.0  # the name is in the question: BM25 finds it
    assert metrics["baseline_accuracy"] == 0.0 and lookups
    assert {"retrieve_p50_ms", "generate_p50_ms", "total_p50_ms"} <= set(metrics["latency"])


class _NoSources:
    def generate(self, prompt: str, images) -> str:
        assert "No sources." in prompt
        return "exhibit 0"


def test_score_one_counts_recall_answer_and_citations():
    item = RagItem("q?", "exhibit 17", "lookup", "exhibit-17")
    sources = [Source("exhibit-3", 1.0, number=1), Source("exhibit-17", 0.5, number=2)]
    result = RagAnswer("q?", "Exhibit 17.", citations=[2, 1], sources=sources)
    row = score_one(item, result, k=5)
    assert row == {
        "recall_at_1": 0.0,
        "recall_at_5": 1.0,
        "answer_accuracy": 1.0,
        "citation_accuracy": 1.0,
        "citation_precision": 0.5,
    }


def _items(kb) -> list[Item]:
    from mmstack.rag.retrievers import items_from_pairs

    return items_from_pairs(kb / "pairs.jsonl")
