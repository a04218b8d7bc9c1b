"""``/v1/search`` against a real collection built from a small world with a tiny two-tower model."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from _serve_models import data_url, save_clip, save_vlm


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mmstack.index.builder import build_collection
    from mmstack.world import generate_world

    root = tmp_path_factory.mktemp("serve-search")
    world = root / "world"
    generate_world(world, n=24, seed=3)
    clip = save_clip(root / "clip")
    save_vlm(root / "vlm")
    build_collection(root / "db", [world], model=str(clip), text_model="none")
    return root


@pytest.fixture(scope="module")
def server(built):
    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config
    from mmstack.serve.runner import LiveServer

    cfg = {"models": {"clip": "clip", "vlm": "vlm"}, "collections": {"world": {"db": "db", "model": "clip"}}}
    (built / "serve.yaml").write_text(__import__("yaml").safe_dump(cfg))
    with LiveServer(create_app(load_serve_config(built / "serve.yaml"))) as live:  # loaded from the config
        yield live


def _search(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/search", json={"collection": "world", **body}, timeout=30)


def _direct(built, text: str, k: int, mode: str = "auto") -> list[int]:
    from mmstack.index.collection import Collection
    from mmstack.index.query import QueryPart
    from mmstack.index.store import Filters

    with Collection.open(built / "db") as col:
        return [h.id for h in col.search_parts([QueryPart("text", text)], top_k=k, filters=Filters(), mode=mode)]


def test_text_search_matches_the_collection_api(server, built):
    r = _search(server, query="a red circle", top_k=5)
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and all({"id", "score", "path", "caption", "kind"} <= set(h) for h in hits)
    assert [h["id"] for h in hits] == _direct(built, "a red circle", 5)


def test_image_search_finds_the_image_itself_with_a_thumbnail(server, built):
    path = built / "world" / "images" / "000005.png"
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    r = _search(server, image=url, top_k=3, mode="dense", include_images=True)
    top = r.json()["hits"][0]
    assert top["path"] == str(path) and top["score"] == pytest.approx(1.0, abs=1e-4)
    thumb = Image.open(io.BytesIO(base64.b64decode(top["image"].split(",", 1)[1])))
    assert max(thumb.size) <= 128


def test_negatives_filters_and_more_like_this(server):
    plain = _search(server, query="a red circle", top_k=8, mode="dense").json()["hits"]
    steered = _search(server, query="a red circle", negative=["red"], top_k=8, mode="dense").json()["hits"]
    assert [h["id"] for h in plain] != [h["id"] for h in steered]
    only_pairs = _search(server, query="a star", filters={"kind": "pair"}, top_k=4).json()["hits"]
    assert only_pairs and all(h["kind"] == "pair" for h in only_pairs)
    like = _search(server, like=[plain[0]["id"]], top_k=2, mode="dense").json()["hits"]
    assert like[0]["id"] == plain[0]["id"]


def test_query_text_cannot_name_server_files(server):
    r = _search(server, query="img:/etc/passwd", top_k=2, mode="dense")
    assert r.status_code == 200  # searched as words, never opened as a file
    r = _search(server, image="file:///etc/passwd")
    assert r.status_code == 400 and "file://" in r.json()["error"]["message"]


def test_search_errors_and_listing(server):
    assert _search(server).status_code == 400
    assert httpx.post(server.url + "/v1/search", json={"collection": "nope", "query": "x"}).status_code == 404
    assert _search(server, query="x", filters={"colour": "red"}).status_code == 400
    listed = httpx.get(server.url + "/v1/collections").json()["data"]
    assert listed == [{"id": "world", "object": "collection", "rows": 24, "spaces": listed[0]["spaces"]}]
    assert listed[0]["spaces"]["image"]["dim"] == 32


def test_rag_answers_with_sources_like_the_pipeline(server, built):
    from mmstack.models.bridge import BridgeModel
    from mmstack.rag import BridgeGenerator, Pipeline
    from mmstack.rag.knowledge import open_knowledge_base

    question = "what colour is the star ?"
    r = httpx.post(
        server.url + "/v1/rag", json={"collection": "world", "question": question, "max_tokens": 6}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "rag.answer" and body["model"] == "vlm"
    assert body["sources"] and all("path" in s and "retrievers" in s for s in body["sources"])
    retrievers, _ = open_knowledge_base(built / "db")
    pipe = Pipeline(retrievers, BridgeGenerator(BridgeModel.from_pretrained(built / "vlm"), 6))
    want = pipe.ask(question).to_dict()
    assert body["raw"] == want["raw"] and [s["id"] for s in body["sources"]] == [s["id"] for s in want["sources"]]
    with_image = {"collection": "world", "question": "which one is this ?", "image": data_url("red"), "max_tokens": 4}
    r = httpx.post(server.url + "/v1/rag", json=with_image, timeout=60)
    assert r.status_code == 200 and any("image" in s["retrievers"] for s in r.json()["sources"])
    r = httpx.post(server.url + "/v1/rag", json={"collection": "world", "question": "x", "model": "clip"})
    assert r.status_code == 400
