"""RAG over real collections (``mmstack.index``) and the ``mmstack ask`` / ``mmstack eval rag`` commands,
with tiny random models saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from _bridge_helpers import tiny_model
from mmstack.index.builder import build_collection
from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
from mmstack.processing import train_caption_tokenizer
from mmstack.rag import Query
from mmstack.rag.collection import collection_retrievers, open_collection
from mmstack.world import generate_rag_world


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = train_caption_tokenizer(["a red circle", "a blue square left of a green star"], max_length=16)
    cfg = TwoTowerConfig.from_preset("shapes-micro")
    torch.manual_seed(0)
    TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).save_pretrained(root / "clip")
    tiny_model().save_pretrained(root / "vlm")
    kb = root / "kb"
    generate_rag_world(kb, n_records=10, n_questions=6, seed=4, image_size=32)
    build_collection(root / "col", [str(kb / "pairs.jsonl")], str(root / "clip"), text_model="none")
    return root


def _record(models, i: int = 3) -> dict:
    return json.loads((models / "kb" / "records.jsonl").read_text().splitlines()[i])


def test_collection_retrievers_search_text_images_and_across(models):
    col = open_collection(models / "col")
    text, image, cross = collection_retrievers(col)
    rec = _record(models)
    hits = text.retrieve(Query(f"In which hall is {rec['name']}?"), k=10)
    assert [h.id for h in hits] == [rec["id"]]  # "exhibit", "hall": in every note, no rank for the others
    assert hits[0].text == rec["note"] and hits[0].path.endswith(f"{rec['id']}.png")
    photo = Image.open(models / "kb" / rec["image"]).convert("RGB")
    assert image.retrieve(Query("which?", photo), k=3)[0].id == rec["id"]
    assert not cross.applies(Query("Which exhibit is this?"))  # the micro CLIP knows none of these words
    assert cross.applies(Query("Which exhibit shows a red circle?"))
    assert len(cross.retrieve(Query("a red circle"), k=4)) == 4


def test_ask_over_a_collection(run_cli, models):
    rec = _record(models)
    res = run_cli(
        "ask", "--db", models / "col", "--model", models / "vlm", f"In which hall is {rec['name']}?", "--json"
    )
    assert res.code == 0, res.err
    out = res.json()
    assert out["sources"][0]["id"] == rec["id"] and out["sources"][0]["retrievers"]["text"] == 1
    assert out["sources"][0]["number"] == 1 and isinstance(out["answer"], str)
    assert set(out["timings"]) >= {"retrieve", "fuse", "prompt", "generate", "total"}


def test_ask_over_a_pairs_file_with_an_image(run_cli, models):
    rec = _record(models, 5)
    res = run_cli(
        "ask", "--db", models / "kb" / "pairs.jsonl", "--retriever", models / "clip", "--model", models / "vlm",
        "--image", models / "kb" / rec["image"], "--rerank", "Which exhibit is this?", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    out = res.json()
    assert out["sources"][0]["id"] == rec["id"] and out["sources"][0]["rerank_score"] == pytest.approx(1.0, abs=1e-4)
    res = run_cli("ask", "--db", models / "kb" / "pairs.jsonl", "--model", models / "vlm", "anything?")
    assert res.code == 2 and "--retriever" in res.err


def test_ask_over_an_empty_collection_gives_a_clear_message(run_cli, models, tmp_path):
    (tmp_path / "empty").mkdir()
    build_collection(tmp_path / "col", [str(tmp_path / "empty")], str(models / "clip"), text_model="none")
    res = run_cli("ask", "--db", tmp_path / "col", "--model", models / "vlm", "What is in it?", "--json")
    assert res.code == 0, res.err
    out = res.json()
    assert "empty" in out["message"] and out["answer"] == "" and out["sources"] == []
    res = run_cli("ask", "--db", tmp_path / "col", "--model", models / "vlm", "What is in it?")
    assert res.code == 0 and "empty" in res.out
    res = run_cli("ask", "--db", tmp_path / "nowhere", "--model", models / "vlm", "What?")
    assert res.code == 2 and "index build" in res.err


def test_eval_rag_reports_every_metric(run_cli, models, tmp_path):
    res = run_cli(
        "eval", "rag", "--model", models / "vlm", "--retriever", models / "clip", "--n", "5", "--records", "8",
        "--seed", "2", "--out", tmp_path / "bench", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    out = res.json()
    for key in ("recall_at_5", "answer_accuracy", "citation_accuracy", "baseline_accuracy"):
        assert 0.0 <= out[key] <= 1.0
    assert out["n"] == 5 and out["world"]["seed"] == 2 and "total_p50_ms" in out["latency"]
    assert (tmp_path / "bench" / "questions.jsonl").is_file()
    assert out["dense"] is False  # the test CLIP's card records no region training
    forced = run_cli(
        "eval", "rag", "--model", models / "vlm", "--retriever", models / "clip", "--n", "5", "--records", "8",
        "--seed", "2", "--dense", "--no-baseline", "--json",
    )  # fmt: skip
    assert forced.code == 0, forced.err
    assert forced.json()["dense"] is True


def test_demo_stage_smoke(models, tmp_path):
    import shutil

    from mmstack.demo import rag_stage
    from mmstack.demo.pipeline import DemoContext

    ctx = DemoContext(out=tmp_path / "demo", config={}, smoke=True)
    for name in ("clip", "vlm"):
        shutil.copytree(models / name, ctx.path("models", name))
    result = rag_stage.run(ctx, {"context_k": 2})
    assert set(result.metrics) >= {"recall_at_5", "answer_accuracy", "citation_accuracy", "baseline_accuracy"}
    assert result.html.count("<tr>") >= 6 and "<img src='rag/kb/images/" in result.html
    assert all(ctx.path(p).exists() for p in result.outputs)
    assert (ctx.path("models", "vlm-rag") / "config.json").is_file()
