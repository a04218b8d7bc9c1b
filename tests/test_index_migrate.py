"""``mmstack index migrate``: embedded store -> Qdrant (local mode) -> embedded store loses nothing."""

from __future__ import annotations

import numpy as np
import pytest

from _index_fakes import ColourEmbedder, HashTextEmbedder, colour_image, photo_folder
from mmstack.errors import CollectionError
from mmstack.index.builder import BuildConfig, Embedders, build_index
from mmstack.index.collection import Collection
from mmstack.index.migrate import migrate
from mmstack.index.store import Filters, SqliteStore

pytest.importorskip("qdrant_client")


def everything(db) -> dict:
    """Spaces, units, errors and every item with all its fields (text and vector included)."""
    with SqliteStore.open(db) as store:
        cols = "id, uid, seq, kind, space, source, path, caption, text, tags, meta, vector"
        items = {r[0]: r[1:] for r in store.conn.execute(f"SELECT {cols} FROM items")}
        return {"spaces": store.spaces(), "units": store.units(), "errors": store.errors(), "items": items}


@pytest.fixture
def collection(tmp_path):
    src = photo_folder(tmp_path / "photos")
    (src / "broken.png").write_bytes(b"not an image")  # an unreadable file: the error list moves too
    colour_image(tmp_path / "more" / "blue2.png", ["blue", "yellow"])
    db = tmp_path / "db"
    embedders = Embedders(ColourEmbedder(), HashTextEmbedder())
    build_index(db, [tmp_path / "more"], embedders, BuildConfig(workers=0))  # items without tags
    build_index(db, [src], embedders, BuildConfig(workers=0, tags=("trip",)))  # the last run's errors are kept
    return db


def test_round_trip_through_qdrant_loses_nothing(tmp_path, collection, run_cli):
    url = f"qdrant://{tmp_path}/qdrant/photos"
    there = run_cli("index", "migrate", "--from", collection, "--to", url, "--json")
    assert there.code == 0, there.err
    before = everything(collection)
    assert there.json()["items"] == len(before["items"]) and there.json()["units"] == len(before["units"])
    assert there.json()["errors"] == 1 and there.json()["orphans"] == 0

    # the Qdrant copy answers a dense query as exact search over the original vectors does
    query = ColourEmbedder().embed_texts(["red yellow"])[0]
    images = {i: np.frombuffer(r[-1], np.float32) for i, r in before["items"].items() if r[3] == "image"}
    exact = sorted((-round(float(v @ query), 5), i) for i, v in images.items())  # ties broken by id
    with Collection.open(url, embedders={"image": ColourEmbedder(), "text": HashTextEmbedder()}) as col:
        hits = sorted((-round(s, 5), i) for i, s in col.backend.dense("image", query, len(images), Filters()))
    assert hits == exact

    back = tmp_path / "back"
    again = run_cli("index", "migrate", "--from", url, "--to", back, "--json")
    assert again.code == 0, again.err
    after = everything(back)
    assert after["spaces"] == before["spaces"] and after["units"] == before["units"]
    assert after["errors"] == before["errors"]
    assert after["items"] == before["items"]  # ids, fields, text, tags, meta and vector bytes all equal
    assert any(row[7] for row in after["items"].values())  # the searchable text really travelled

    # an incremental build on the copy finds nothing to re-embed
    report = build_index(back, [tmp_path / "photos"], Embedders(ColourEmbedder(), HashTextEmbedder()))
    assert report.items_embedded == 0 and report.unchanged == report.scanned - 1


def test_non_empty_target_is_refused_unless_replace(tmp_path, collection, run_cli):
    copy = tmp_path / "copy"
    assert run_cli("index", "migrate", "--from", collection, "--to", copy).code == 0
    refused = run_cli("index", "migrate", "--from", collection, "--to", copy)
    assert refused.code == 2 and "--replace" in refused.err
    assert run_cli("index", "migrate", "--from", collection, "--to", copy, "--replace").code == 0
    assert everything(copy)["items"] == everything(collection)["items"]
    with pytest.raises(CollectionError, match="no collection"):
        migrate(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
