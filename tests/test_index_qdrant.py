"""The Qdrant backend (qdrant-client local mode) against the embedded store: same ids, payloads, rankings."""

from __future__ import annotations

import pytest

from _index_fakes import ColourEmbedder, HashTextEmbedder, colour_image, photo_folder
from mmstack.errors import CollectionError
from mmstack.index.builder import BuildConfig, Embedders, build_index
from mmstack.index.collection import Collection
from mmstack.index.query import parse_query
from mmstack.index.store import Filters

pytest.importorskip("qdrant_client")

QUERIES = ["red", "red - blue", "3:red + blue", "green + yellow", "lighthouse harbour"]


def _embedders():
    return Embedders(ColourEmbedder(), HashTextEmbedder())


def _open(db):
    return Collection.open(db, embedders={"image": ColourEmbedder(), "text": HashTextEmbedder()})


def _build_both(tmp_path, *sources, **cfg):
    url = f"qdrant://{tmp_path}/qdrant/photos"
    reports = [
        build_index(db, list(sources), _embedders(), BuildConfig(workers=0, **cfg)) for db in (tmp_path / "db", url)
    ]
    return tmp_path / "db", url, reports


def _same(a, b):
    """Same hits in the same order, except that hits with equal scores may come in any order."""
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    groups_a, groups_b = _tie_groups(a), _tie_groups(b)
    assert groups_a[:-1] == groups_b[:-1]  # the last group may be cut differently by top_k
    fields = {h.id: (h.path, h.caption, h.tags, h.kind, h.space, h.meta) for h in a}
    for h in b:
        if h.id in fields:
            assert fields[h.id] == (h.path, h.caption, h.tags, h.kind, h.space, h.meta)


class _Scored:
    def __init__(self, iid, score):
        self.id, self.score = iid, score
        self.path = self.caption = self.tags = self.kind = self.space = self.meta = None


def _tie_groups(hits):
    groups, last = [], None
    for h in hits:
        if last is None or abs(h.score - last) > 1e-5:
            groups.append(set())
        groups[-1].add(h.id)
        last = h.score
    return groups


def test_qdrant_local_mode_matches_the_embedded_store(tmp_path):
    src = photo_folder(tmp_path / "photos")
    db, url, (r1, r2) = _build_both(tmp_path, src, tags=("home",))
    assert r1.rows == r2.rows == 8 and r1.items_embedded == r2.items_embedded
    with _open(db) as emb, _open(url) as qd:
        flts = (
            Filters(),
            Filters(kind="image"),
            Filters(path="*/sub/*"),
            Filters(tags=("home",)),
            Filters(source=str(src)),
        )
        for q in QUERIES:
            parts = parse_query(q)
            for space in ("image", "text"):
                vec = emb.query_vector(parts, space)
                for flt in flts:  # each backend's dense ranking: same ids (ties aside) and cosine scores
                    ours = [_Scored(*h) for h in emb.backend.dense(space, vec, 8, flt)]
                    theirs = [_Scored(*h) for h in qd.backend.dense(space, vec, 8, flt)]
                    _same(ours, theirs)
            # whole searches with one ranking: same hits with the same payloads
            flt = Filters(kind="image")
            _same(emb.search(q, top_k=8, mode="dense", filters=flt), qd.search(q, top_k=8, mode="dense", filters=flt))
        red = emb.search("red", top_k=1, mode="dense")[0].id
        _same(emb.more_like_this(red, top_k=3), qd.more_like_this(red, top_k=3))
        s1, s2 = emb.stats(), qd.stats()
        assert {k: s1[k] for k in ("rows", "units", "by_kind", "by_space", "sources")} == {
            k: s2[k] for k in ("rows", "units", "by_kind", "by_space", "sources")
        }
        assert s2["spaces"] == s1["spaces"]


def test_qdrant_incremental_changes_match(tmp_path):
    src = photo_folder(tmp_path / "photos")
    db, url, _ = _build_both(tmp_path, src)
    (src / "blue.png").rename(src / "azure.png")
    (src / "green.png").unlink()
    colour_image(src / "red.png", ["yellow"])
    _, _, (r1, r2) = _build_both(tmp_path, src)
    assert (r1.renamed, r1.deleted, r1.changed) == (r2.renamed, r2.deleted, r2.changed) == (1, 1, 1)
    with _open(db) as emb, _open(url) as qd:
        for q in QUERIES[:4]:
            flt = Filters(kind="image")
            _same(emb.search(q, top_k=7, mode="dense", filters=flt), qd.search(q, top_k=7, mode="dense", filters=flt))


def test_qdrant_dimension_check_and_missing_collection(tmp_path):
    src = photo_folder(tmp_path / "photos")
    url = f"qdrant://{tmp_path}/qdrant/photos"
    build_index(url, [src], _embedders(), BuildConfig(workers=0))
    with pytest.raises(CollectionError, match="dimension 12"):
        build_index(url, [src], Embedders(ColourEmbedder(dim=12, model_id="x"), None), BuildConfig(workers=0))
    with pytest.raises(CollectionError, match="no collection"):
        Collection.open(f"qdrant://{tmp_path}/qdrant/other")
