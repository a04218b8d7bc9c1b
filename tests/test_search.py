"""Search: query parsing, weighted and negative queries, hybrid fusion, filters, more-like-this."""

from __future__ import annotations

import pytest

from _index_fakes import ColourEmbedder, HashTextEmbedder, colour_image, photo_folder
from mmstack.errors import CollectionError
from mmstack.index.builder import BuildConfig, Embedders, build_index
from mmstack.index.collection import Collection
from mmstack.index.fusion import RRF_K
from mmstack.index.query import QueryPart, parse_query
from mmstack.index.store import Filters


@pytest.fixture
def col(tmp_path):
    src = photo_folder(tmp_path / "photos")
    trip = tmp_path / "trip"
    colour_image(trip / "red_sail.png", ["red"])
    emb = Embedders(ColourEmbedder(), HashTextEmbedder())
    build_index(tmp_path / "db", [src], emb, BuildConfig(workers=0))
    build_index(tmp_path / "db", [trip], emb, BuildConfig(workers=0, tags=("trip", "sea")))
    with Collection.open(tmp_path / "db", embedders={"image": ColourEmbedder(), "text": HashTextEmbedder()}) as c:
        c.src, c.trip = src, trip
        yield c


def _names(hits):
    return [h.path.rsplit("/", 1)[-1] for h in hits]


def test_parse_query_weights_negatives_images_and_items(tmp_path):
    img = colour_image(tmp_path / "q.png", ["red"])
    parts = parse_query(["2:red circle", "+", str(img), "-", "blue", "-0.5:green", "id:42"])
    assert parts == [
        QueryPart("text", "red circle", 2.0),
        QueryPart("image", str(img.resolve()), 1.0),
        QueryPart("text", "blue", -1.0),
        QueryPart("text", "green", -0.5),
        QueryPart("item", 42, 1.0),
    ]
    assert parse_query('"2:red circle" + img:' + str(img) + " - blue") == [parts[0], parts[1], parts[2]]
    assert parse_query("photo.jpg") == [QueryPart("text", "photo.jpg", 1.0)]  # no slash, no such file: text
    # words without an operator between them are one phrase; an operator or an image ends it
    assert parse_query(["a", "red", "circle", "-", "blue", "sky"]) == [
        QueryPart("text", "a red circle", 1.0),
        QueryPart("text", "blue sky", -1.0),
    ]
    assert parse_query(["red", str(img), "blue"])[1:] == [parts[1], QueryPart("text", "blue", 1.0)]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "empty query"),
        ("red +", "ends with an operator"),
        ("red + - blue", "two operators"),
        ("- blue", "only negative"),
        ("./missing.png", "not found"),
        ("id:x", "not an item id"),
    ],
)
def test_parse_query_errors(query, message):
    with pytest.raises(CollectionError, match=message):
        parse_query(query)


def test_weights_and_negatives_change_rankings(col):
    only_images = Filters(kind="image")
    assert _names(col.search("red", top_k=3, mode="dense", filters=only_images))[0] in ("red.png", "red_sail.png")
    plain = _names(col.search("red", top_k=6, mode="dense", filters=only_images))
    assert plain.index("red_blue.png") < plain.index("blue.png")
    minus = _names(col.search("red - blue", top_k=6, mode="dense", filters=only_images))
    assert minus[-1] == "blue.png" and minus.index("red_blue.png") > minus.index("red.png")
    red_heavy = _names(col.search("3:red + blue", top_k=1, mode="dense", filters=only_images))
    blue_heavy = _names(col.search("red + 3:blue", top_k=1, mode="dense", filters=only_images))
    both = _names(col.search("red + blue", top_k=1, mode="dense", filters=only_images))
    assert red_heavy[0] in ("red.png", "red_sail.png") and blue_heavy == ["blue.png"] and both == ["red_blue.png"]


def test_image_query_and_more_like_this(col):
    hits = col.search(images=[col.src / "blue.png"], top_k=2, mode="dense")
    assert _names(hits)[0] == "blue.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    red = col.search(images=[col.src / "red.png"], top_k=1, mode="dense", filters=Filters(path="*/photos/red.png"))[0]
    similar = col.more_like_this(red.id, top_k=3)
    assert red.id not in [h.id for h in similar]
    assert _names(similar)[0] == "red_sail.png"  # the other pure-red image
    mixed = _names(col.search(["img:" + str(col.src / "red.png"), "+", "blue"], top_k=1, mode="dense"))
    assert mixed == ["red_blue.png"]  # image + text arithmetic


def test_hybrid_fuses_dense_and_bm25_with_rrf(col):
    hits = col.search("lighthouse harbour", top_k=5, mode="hybrid")
    assert _names(hits)[0] == "notes.md"
    dense = col.backend.dense("text", col.query_vector(parse_query("lighthouse harbour"), "text"), 50, Filters())
    bm25 = col.backend.bm25('("lighthouse" OR "harbour")', 50, Filters())
    top = hits[0]
    rank_d = [i for i, _ in dense].index(top.id) + 1
    rank_b = [i for i, _ in bm25].index(top.id) + 1
    assert top.score == pytest.approx(1 / (RRF_K + rank_d) + 1 / (RRF_K + rank_b))
    assert set(top.scores) == {"dense:text", "bm25", "dense:image"} - ({"dense:image"} - set(top.scores))
    assert "bm25" in top.scores and "dense:text" in top.scores
    text_only = col.search("tomato", mode="text")
    assert set(_names(text_only)) == {"red_green.png", "recipe.txt"}  # caption and document words
    assert col.search("tomato - soup", mode="text")[0].path.endswith("red_green.png")


def test_filters_path_source_tags_kind(col):
    sub = col.search("red", top_k=10, mode="dense", filters=Filters(path="*/sub/*"))
    assert sub and all("/sub/" in h.path for h in sub)
    tagged = col.search("red", top_k=10, filters=Filters(tags=("trip",)))
    assert _names(tagged) == ["red_sail.png"] and tagged[0].tags == ["sea", "trip"]
    assert col.search("red", filters=Filters(tags=("trip", "nope"))) == []
    by_source = col.search("red", top_k=10, mode="dense", filters=Filters(source=str(col.trip)))
    assert _names(by_source) == ["red_sail.png"]
    docs = col.search("notes", top_k=10, filters=Filters(kind="text"))
    assert docs and all(h.kind == "text" for h in docs)


def test_stats(col):
    stats = col.stats()
    assert stats["rows"] == 9 and stats["by_space"] == {"image": 7, "text": 2}
    assert stats["spaces"]["image"]["dim"] == 8 and stats["index"] == {"image": "exact", "text": "exact"}
    assert str(col.trip) in stats["sources"]
